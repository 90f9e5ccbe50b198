-- wrk script: POST /v1/authorize for an identity under five stacked budgets (org, team,
-- agent, workflow, user): the bench config's agent and workflow budgets apply only here.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"org_id":"org-1","team_id":"team-1","agent_id":"agent-1","workflow_id":"wf-1",'
  .. '"user_id":"user-1","provider":"openai","model":"gpt-4o","estimated_tokens_in":500,'
  .. '"estimated_tokens_out":200,"lease_ms":600000}'
