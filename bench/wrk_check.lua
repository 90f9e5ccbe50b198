-- wrk script: POST /v1/check (a decision that holds nothing) for the same identity and
-- estimate as wrk_authorize.lua, under three stacked budgets.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"org_id":"org-1","team_id":"team-1","user_id":"user-1","provider":"openai",'
  .. '"model":"gpt-4o","estimated_tokens_in":500,"estimated_tokens_out":200}'
