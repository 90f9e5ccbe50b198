-- check.lua: the pre-flight decision of authorize.lua without holding or charging anything.
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua; for holds charged at
--   lease's end by reclaim)
-- ARGV[1] now_ms
-- ARGV[2] estimate, micro-USD (> 0; the sidecar applies its floor)
-- ARGV[3] keep_ms
-- ARGV[4] token estimate
-- ARGV[5] nb: the number of budgets
-- ARGV[6] the rate limiters' clock, ms ('' = Redis TIME)
-- ARGV[7] the estimate re-priced for the downgrade model ('' = none; see authorize.lua)
-- ARGV[8..] three per budget: cid, limit (micro-USD), mode ('b' | 'w' | 'd')
-- then six per rate limit: rf, metric ('r' | 't' | 'c'), limit, window_ms, burst, shadow
-- Returns: {verdict, held, u1, h1, ..., w1, ..., then per rate limit: would_deny,
--   remaining, retry_after_ms} (w: each budget's recent-spend window, as authorize): verdict 1 if authorize would hold now (held: what it would hold,
--   ARGV[2] or, downgraded, ARGV[7]), else 0; or BACKLOG (-9, alone) as authorize.
-- It returns ended leases first (reclaim) so that its answer matches authorize's.
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local est = tonumber(ARGV[2])
local nb = tonumber(ARGV[5])
if reclaim(ctr, lease, res, gc, now, tonumber(ARGV[3])) then return done({BACKLOG}) end

local fields, limits, modes, cids = {}, {}, {}, {}
local last_budget = 7 + 3 * nb
for i = 8, last_budget, 3 do
  cids[#cids + 1] = ARGV[i]
  fields[#fields + 1] = 'u:' .. ARGV[i]
  fields[#fields + 1] = 'h:' .. ARGV[i]
  limits[#limits + 1] = tonumber(ARGV[i + 1])
  modes[#modes + 1] = ARGV[i + 2]
end
local rates = rate_args(last_budget + 1, fields)
local wfirst = #fields  -- the budgets' recent-spend windows, after the limiters' fields
for _, cid in ipairs(cids) do fields[#fields + 1] = 'w:' .. cid end
local raw = {}
if #fields > 0 then raw = redis.call('HMGET', ctr, unpack(fields)) end

local out = {1, est}
local downgrade = false
for i = 1, nb do
  local u, h = tonumber(raw[2 * i - 1]) or 0, tonumber(raw[2 * i]) or 0
  if over(u, h, est, limits[i]) then
    if modes[i] == 'b' then out[1] = 0 elseif modes[i] == 'd' then downgrade = true end
  end
  out[#out + 1] = u
  out[#out + 1] = h
end
for i = 1, nb do out[#out + 1] = raw[wfirst + i] or '' end
-- The same downgrade rule as authorize.lua: the re-priced call must fit, or it is denied.
local est_down = tonumber(ARGV[7])
if downgrade and out[1] == 1 then
  if not est_down then out[1] = 0 else out[2] = est_down end
  for i = 1, nb do
    if est_down and modes[i] ~= 'w' and over(out[1 + 2 * i], out[2 + 2 * i], est_down, limits[i]) then
      out[1] = 0
    end
  end
end
local rnow = 0
if #rates > 0 then rnow = limiter_now(ARGV[6]) end
local est_tokens = tonumber(ARGV[4])
for j, r in ipairs(rates) do
  local a, b = raw[2 * nb + 2 * j - 1], raw[2 * nb + 2 * j]
  local cost = r.metric == 't' and est_tokens or 1
  local deny, left, retry = rate_eval(r.metric, a, b, rnow, r.limit, r.window, r.burst, cost)
  if deny and not r.shadow then out[1] = 0 end
  out[#out + 1] = deny and 1 or 0
  out[#out + 1] = left
  out[#out + 1] = retry
end
return done(out)
