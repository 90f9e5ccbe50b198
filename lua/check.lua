-- check.lua: the pre-flight decision of authorize.lua without holding or charging anything.
-- Returns: {verdict, held, weighed, u1, h1, ..., w1, ..., then per rate limit: would_deny,
--   remaining, retry_after_ms; then per budget its calls; then the stop in force (field,
--   value, ms left; '' '' '' = none); then per loop guard: would_deny, its calls in the window}:
--   verdict 1 if authorize would hold now (held: what it would hold, ARGV[2] or the
--   learned figure or, downgraded, ARGV[7]), else 0; weighed as authorize's; or BACKLOG
--   (-9, alone) or LOST (-8, alone) as authorize. Writes nothing but expiries.
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua; for holds charged at
--   lease's end by reclaim)
-- KEYS[9..8+ng] one per loop guard, then KEYS[9+ng] est when learning, then the state
--   marker when named (as authorize.lua)
-- ARGV[1] now_ms
-- ARGV[2] estimate, micro-USD (> 0; the sidecar applies its floor)
-- ARGV[3] keep_ms
-- ARGV[4] token estimate
-- ARGV[5] nb: the number of budgets
-- ARGV[6] the rate limiters' clock, ms ('' = Redis TIME)
-- ARGV[7] the estimate re-priced for the downgrade model ('' = none; see authorize.lua)
-- ARGV[8] ARGV[9] ARGV[10] the learned-estimate series, ceiling and minimum count, as
--   authorize.lua's ARGV[20..22]
-- ARGV[11] nl: the number of rate limits   ARGV[12] ns: the number of stop fields
-- ARGV[13] ng: the number of loop guards
-- ARGV[14..] three per budget: limit (micro-USD), mode ('b' | 'w' | 'd'), call cap
--   ('' = none)
-- then six per rate limit: rf, metric ('r' | 't' | 'c' | 'u'), limit, window_ms, burst,
--   shadow; then six per loop guard; then the ctr fields to read and, when ng > 0, the
--   fingerprint (both as authorize.lua)
-- It returns ended leases first (reclaim) so that its answer matches authorize's.
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local est = tonumber(ARGV[2])
local nb = tonumber(ARGV[5])
local nl, ns, ng = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
if state_lost(8 + ng + (ARGV[8] ~= '' and 1 or 0)) then return done({LOST}) end
if reclaim(ctr, lease, res, gc, now, tonumber(ARGV[3])) then return done({BACKLOG}) end

if ARGV[8] ~= '' then
  local learned_est = learned(KEYS[9 + ng], ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10]))
  if learned_est and learned_est > est then est = learned_est end
end

local limits, modes, caps = {}, {}, {}
local ncap = 0
local FIRST_BUDGET = 14
local last_budget = FIRST_BUDGET - 1 + 3 * nb
for b = 1, nb do
  local i = FIRST_BUDGET + 3 * (b - 1)
  limits[b], modes[b], caps[b] = tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2])
  if caps[b] then ncap = ncap + 1 end
end
local rates = rate_args(last_budget + 1, nil, nl)
local first_loop = last_budget + 6 * nl + 1
-- The fields read, named by the sidecar in authorize.lua's order.
local F = first_loop + 6 * ng
local first_calls = 2 * nb + 2 * nl
local first_stop = first_calls + ncap
local wfirst = first_stop + ns  -- the budgets' recent-spend windows (as authorize.lua's w)
local raw = {}
if wfirst + nb > 0 then raw = redis.call('HMGET', ctr, unpack(ARGV, F, F + wfirst + nb - 1)) end
-- A period-total counter past its idle time reads as none (authorize collects it).
do
  local ic = first_calls
  for b = 1, nb do
    if caps[b] then ic = ic + 1 end
    local field = ARGV[F + 2 * (b - 1)]  -- "u:<cid>"
    -- Only a period-total counter ("/t" last) goes idle: no cid is cut out for the others.
    if string.byte(field, -1) == 116 and string.byte(field, -2) == 47 then
      idle_over(ctr, gc, string.sub(field, 3), now, raw, b, caps[b] and ic, false)
    end
  end
end

local out = {1, est, est}
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
    if est_down and modes[i] ~= 'w' and over(out[2 + 2 * i], out[3 + 2 * i], est_down, limits[i]) then
      out[1] = 0
    end
  end
end
local rnow = 0
if #rates > 0 then rnow = limiter_now(ARGV[6]) end
local est_tokens = tonumber(ARGV[4])
local units = usd_units(out[2])
for j, r in ipairs(rates) do
  local a, b = raw[2 * nb + 2 * j - 1], raw[2 * nb + 2 * j]
  local cost = 1
  if r.metric == 't' then cost = est_tokens elseif r.metric == 'u' then cost = units end
  local deny, left, retry = rate_eval(r.metric, a, b, rnow, r.limit, r.window, r.burst, cost)
  if deny and not r.shadow then out[1] = 0 end
  out[#out + 1] = deny and 1 or 0
  out[#out + 1] = left
  out[#out + 1] = retry
end
local at = first_calls
for i = 1, nb do
  local n = 0
  if caps[i] then
    at = at + 1
    n = tonumber(raw[at]) or 0
    if n >= caps[i] and modes[i] == 'b' then out[1] = 0 end
  end
  out[#out + 1] = n
end
local stop_field, stop_value, stop_left =
  active_stop(F + first_stop, raw, first_stop + 1, ns, ARGV[6], #rates > 0 and rnow or nil)
if stop_field ~= '' then out[1] = 0 end
out[#out + 1] = stop_field
out[#out + 1] = stop_value
out[#out + 1] = stop_left
for g = 1, ng do
  local i = first_loop + 6 * (g - 1)
  local state = loop_read(KEYS[8 + g], now, tonumber(ARGV[i + 2]), ARGV[#ARGV])
  local would = #state.times >= tonumber(ARGV[i + 1])
  if would and ARGV[i + 3] ~= '1' then out[1] = 0 end
  out[#out + 1] = would and 1 or 0
  out[#out + 1] = #state.times
end
return done(out)
