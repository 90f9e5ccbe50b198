-- wrk script: authorize, then settle the reservation it returned (per wrk thread, a queue
-- of reservation ids: a connection that is free settles one if there is one waiting).
local authorize = '{"org_id":"org-1","team_id":"team-1","user_id":"user-1","provider":"openai",'
  .. '"model":"gpt-4o","estimated_tokens_in":500,"estimated_tokens_out":200,"lease_ms":5000}'
local waiting = {}
local headers = {["Content-Type"] = "application/json"}
decisions, settles, denials = 0, 0, 0

request = function()
  local rid = table.remove(waiting)
  if rid then
    return wrk.format("POST", "/v1/settle", headers,
      '{"reservation_id":"' .. rid .. '","tokens_in":450,"tokens_out":180}')
  end
  return wrk.format("POST", "/v1/authorize", headers, authorize)
end

response = function(status, hdrs, body)
  if string.find(body, '"state":"settled"', 1, true) then
    settles = settles + 1
    return
  end
  local rid = string.match(body, '"allowed":true,"action":"[a-z]+","reservation_id":"([0-9a-f]+)"')
  if rid then
    decisions = decisions + 1
    waiting[#waiting + 1] = rid
  else
    denials = denials + 1
  end
end

local threads = {}
setup = function(thread)
  threads[#threads + 1] = thread
end

done = function(summary, latency, requests)
  local d, s, n = 0, 0, 0
  for _, t in ipairs(threads) do
    d = d + t:get("decisions")
    s = s + t:get("settles")
    n = n + t:get("denials")
  end
  io.write(string.format("PAIR decisions=%d settles=%d denials=%d\n", d, s, n))
end
