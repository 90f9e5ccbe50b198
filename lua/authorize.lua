-- authorize.lua: hold an estimate on every budget, and charge every rate limit, that
-- applies to a call, or do nothing at all (invariant 2).
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc   (see _lib.lua)
-- Returns: {verdict, reservation id, state, budget figures..., rate figures...}: below.
-- ARGV[1] now_ms
-- ARGV[2] reservation id to create
-- ARGV[3] lease_ms: the hold returns to its budgets at now_ms + lease_ms unless settled
-- ARGV[4] estimate, micro-USD (>= 0)
-- ARGV[5] idempotency key ('' = none)
-- ARGV[6] input price, pico-USD per token ('' = unpriced: settle must give a cost)
-- ARGV[7] output price, pico-USD per token
-- ARGV[8] keep_ms: how long a finished reservation is remembered
-- ARGV[9] meta: the ledger tuple (see _lib.lua, record field 11), returned by settle/release
-- ARGV[10] token estimate (what token limiters are charged)
-- ARGV[11] nb: the number of budgets
-- ARGV[12] the rate limiters' clock, ms ('' = Redis TIME; see limiter_now)
-- ARGV[13..] five per budget: cid, limit (micro-USD), mode ('b' block, 'w' warn,
--           'd' downgrade), gc_at_ms (when the counter's window is long past), alert
--           thresholds in percent, '.'-joined ('' = none; kept for settle's alerts)
-- then six per rate limit: rf, metric ('r' requests, 't' tokens, 'c' concurrent), limit,
--           window_ms, burst, shadow ('1': evaluate and report, never deny)
-- The reply: {verdict, reservation id, state, u1, h1, ..., then per rate limit:
--           would_deny (0/1), remaining, retry_after_ms (-1: unknown)}
--   verdict 0: denied (by a block budget or an enforced rate limit), nothing changed;
--   1: held and charged everywhere; 2: an earlier authorize with this idempotency key,
--   returned as it is (state H/E/S/R, counters as they are now, no rate figures);
--   3: this reservation id was cancelled before this call ran (see release.lua).
--   u, h: settled and held micro-USD of each budget counter before this call.
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local lease_ms = tonumber(ARGV[3])
local est = tonumber(ARGV[4])
local idem = ARGV[5]
local keep = tonumber(ARGV[8])
local est_tokens = tonumber(ARGV[10])
local nb = tonumber(ARGV[11])

if redis.call('HEXISTS', res, rid) == 1 then return done({3, rid, 'R'}) end
reclaim(ctr, lease, res, gc, now, keep)
collect(ctr, res, gc, now)

-- One HMGET for every field the decision reads: budgets first, then limiters.
local fields = {}
local cids, limits, modes, gc_at, alert_specs = {}, {}, {}, {}, {}
local rnow = 0  -- read only if a rate limit applies
local last_budget = 12 + 5 * nb
for i = 13, last_budget, 5 do
  local cid = ARGV[i]
  cids[#cids + 1] = cid
  limits[#limits + 1] = tonumber(ARGV[i + 1])
  modes[#modes + 1] = ARGV[i + 2]
  gc_at[#gc_at + 1] = ARGV[i + 3]
  alert_specs[#alert_specs + 1] = ARGV[i + 1] .. ':' .. ARGV[i + 4]
  fields[#fields + 1] = 'u:' .. cid
  fields[#fields + 1] = 'h:' .. cid
end
local rates = rate_args(last_budget + 1, fields)
local raw = {}
if #fields > 0 then raw = redis.call('HMGET', ctr, unpack(fields)) end
if #rates > 0 then rnow = limiter_now(ARGV[12]) end

if idem ~= '' then
  local prior = redis.call('HGET', res, 'k:' .. idem)
  if prior then
    local rec = redis.call('HGET', res, prior)
    local state = rec and string.sub(rec, 1, 1) or 'R'
    local out = {2, prior, state}
    for i = 1, 2 * nb do out[#out + 1] = tonumber(raw[i]) or 0 end
    return done(out)
  end
end

local out = {1, rid, 'H'}
local fresh = {}
for i = 1, nb do
  local u, h = tonumber(raw[2 * i - 1]), tonumber(raw[2 * i])
  fresh[i] = (not u) and (not h)
  u, h = u or 0, h or 0
  if modes[i] == 'b' and over(u, h, est, limits[i]) then out[1] = 0 end
  out[#out + 1] = u
  out[#out + 1] = h
end
local charge = {}
for j, r in ipairs(rates) do
  local a, b = raw[2 * nb + 2 * j - 1], raw[2 * nb + 2 * j]
  local cost = r.metric == 't' and est_tokens or 1
  local deny, left, retry, debt = rate_eval(r.metric, a, b, rnow, r.limit, r.window, r.burst, cost)
  r.debt, r.fresh, r.last = debt, not a, tonumber(b)
  if deny and not r.shadow then out[1] = 0 end
  -- A shadow limiter that would deny is not charged: it keeps counting what enforcing
  -- it would have let through.
  charge[j] = not deny
  out[#out + 1] = deny and 1 or 0
  out[#out + 1] = left
  out[#out + 1] = retry
end
if out[1] == 0 then
  out[3] = ''
  return done(out)
end

for i, cid in ipairs(cids) do
  if est ~= 0 then redis.call('HINCRBY', ctr, 'h:' .. cid, est) end
  if fresh[i] then redis.call('ZADD', gc, gc_at[i], 'c:' .. cid) end
end
local slots, token_limiters = {}, {}
for j, r in ipairs(rates) do
  if charge[j] then
    if r.metric == 'c' then
      redis.call('HINCRBY', ctr, 'n:' .. r.rf, 1)
      slots[#slots + 1] = r.rf
      if r.fresh then redis.call('ZADD', gc, now + IDLE_MS, 'n:' .. r.rf) end
    else
      local cost = 1
      if r.metric == 't' then
        cost = est_tokens
        token_limiters[#token_limiters + 1] = r.rf .. ':' .. int(r.limit) .. ':' .. int(r.window)
      end
      -- 'l' never moves back, so a late clock reading cannot earn credit twice.
      local last = math.max(rnow, r.last or rnow)
      redis.call('HSET', ctr, 'd:' .. r.rf, int(r.debt + cost * r.window), 'l:' .. r.rf, int(last))
      if r.fresh then redis.call('ZADD', gc, now + IDLE_MS, 't:' .. r.rf) end
    end
  end
end
local lease_end = now + lease_ms
redis.call('HSET', res, rid, table.concat(
  {'H', int(lease_end), int(est), ARGV[6], ARGV[7], idem, table.concat(cids, ','), '', '', '',
   ARGV[9], '', '', table.concat(slots, ','), table.concat(token_limiters, ','),
   int(est_tokens), table.concat(alert_specs, ';')},
  '|'))
redis.call('ZADD', lease, lease_end, rid)
if idem ~= '' then redis.call('HSET', res, 'k:' .. idem, rid) end
return done(out)
