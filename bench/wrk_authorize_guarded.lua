-- wrk script: POST /v1/authorize as wrk_authorize.lua, plus what the runaway guards read:
-- a run id (1,000 runs in turn: a per-run cap and its call count) and a fingerprint of its
-- own per request (a loop guard's key each, as distinct prompts make). With
-- GUARDS in bench/run.py: one guard of each kind applies to every decision.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local body = '{"org_id":"org-1","team_id":"team-1","user_id":"user-1","provider":"openai",'
    .. '"model":"gpt-4o","estimated_tokens_in":500,"estimated_tokens_out":200,'
    .. '"lease_ms":600000,"run_id":"run-' .. (n % 1000) .. '","fingerprint":"q-' .. n .. '"}'
  return wrk.format(nil, nil, nil, body)
end
