-- wrk script: POST /v1/authorize with one identity under three stacked budgets.
-- The lease outlives the run: this measures authorize itself; returning abandoned holds
-- (reclaim) is measured by the pair run's settles instead.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"org_id":"org-1","team_id":"team-1","user_id":"user-1","provider":"openai",'
  .. '"model":"gpt-4o","estimated_tokens_in":500,"estimated_tokens_out":200,"lease_ms":600000}'
