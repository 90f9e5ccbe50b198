-- authorize.lua: hold an estimate on every budget, and charge every rate limit, that
-- applies to a call, or do nothing at all (invariant 2).
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua; for holds charged at
--   lease's end by reclaim)
-- Returns: {verdict, reservation id, state, held estimate, budget figures..., rate
--   figures...}: below.
-- ARGV[1] now_ms
-- ARGV[2] reservation id to create
-- ARGV[3] lease_ms: the hold returns to its budgets at now_ms + lease_ms unless settled
-- ARGV[4] estimate, micro-USD (> 0; the sidecar applies its floor)
-- ARGV[5] idempotency key ('' = none)
-- ARGV[6] input price, pico-USD per token ('' = unpriced: settle must give a cost)
-- ARGV[7] output price, pico-USD per token
-- ARGV[8] keep_ms: how long a finished reservation is remembered
-- ARGV[9] meta: the ledger tuple (see _lib.lua, record field 11), returned by settle/release
-- ARGV[10] token estimate (what token limiters are charged)
-- ARGV[11] nb: the number of budgets
-- ARGV[12] the rate limiters' clock, ms ('' = Redis TIME; see limiter_now)
-- ARGV[13] the request's fingerprint: an idempotency key is bound to it
-- ARGV[14] the estimate re-priced for the downgrade model, micro-USD ('' = none: a
--          downgrade budget that the estimate would pass then blocks)
-- ARGV[15] ARGV[16] that model's input and output price   ARGV[17] its meta
-- ARGV[18] at the lease's end unsettled: 'c' charge the estimate, '' return it
-- ARGV[19] the ledger config (see settle.lua), kept for that charge
-- ARGV[20..] five per budget: cid, limit (micro-USD), mode ('b' block, 'w' warn,
--           'd' downgrade), the forecast alert's period window "start_ms:end_ms" ('' or
--           a number, the gc time this slot once carried: no forecast alert), alert
--           thresholds in percent, '.'-joined ('' = none; kept for settle's alerts)
-- then six per rate limit: rf, metric ('r' requests, 't' tokens, 'c' concurrent), limit,
--           window_ms, burst, shadow ('1': evaluate and report, never deny)
-- The reply: {verdict, reservation id, state, held, u1, h1, ..., w1, ..., then per rate
--           limit: would_deny (0/1), remaining, retry_after_ms (-1: unknown)}
--   verdict 0: denied (by a block budget, a downgrade that does not fit, or an enforced
--   rate limit), nothing changed; 1: held and charged everywhere (held = ARGV[4], or
--   ARGV[14] when downgraded); 2: a retry: this idempotency key's reservation, made by
--   the same request and still held, returned as it is (counters as they are now, no rate
--   figures) and marked claimed so that no cancel releases it; 3: this reservation id was
--   cancelled before this call ran (see release.lua); 4: the key was made by a different
--   request; 5: the key's reservation is no longer held (state E, S or R): nothing
--   changed in 4 and 5. BACKLOG (-9, alone): more ended leases than one call returns.
--   u, h: settled and held micro-USD of each budget counter before this call; w: its
--   recent-spend window "k:cur:prev" ('' = none; see _lib.lua window_add), for the forecast.
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local lease_ms = tonumber(ARGV[3])
local est = tonumber(ARGV[4])
local idem = ARGV[5]
local keep = tonumber(ARGV[8])
local est_tokens = tonumber(ARGV[10])
local nb = tonumber(ARGV[11])
local fingerprint = ARGV[13]
local est_down = tonumber(ARGV[14])

if redis.call('HEXISTS', res, rid) == 1 then return done({3, rid, 'R', 0}) end
if reclaim(ctr, lease, res, gc, now, keep) then return done({BACKLOG}) end
collect(ctr, res, gc, now)

-- One HMGET for every field the decision reads: budgets first, then limiters.
local fields = {}
local cids, limits, modes, alert_specs = {}, {}, {}, {}
local rnow = 0  -- read only if a rate limit applies
local last_budget = 19 + 5 * nb
for i = 20, last_budget, 5 do
  local cid = ARGV[i]
  cids[#cids + 1] = cid
  limits[#limits + 1] = tonumber(ARGV[i + 1])
  modes[#modes + 1] = ARGV[i + 2]
  alert_specs[#alert_specs + 1] = ARGV[i + 1] .. ':' .. ARGV[i + 4] .. ':' .. ARGV[i + 2]
    .. forecast_suffix(ARGV[i + 3])
  fields[#fields + 1] = 'u:' .. cid
  fields[#fields + 1] = 'h:' .. cid
end
local rates = rate_args(last_budget + 1, fields)
-- The budgets' recent-spend windows (for the forecast), after the limiters' fields.
local wfirst = #fields
for _, cid in ipairs(cids) do fields[#fields + 1] = 'w:' .. cid end
local raw = {}
if #fields > 0 then raw = redis.call('HMGET', ctr, unpack(fields)) end
if #rates > 0 then rnow = limiter_now(ARGV[12]) end

if idem ~= '' then
  local prior = redis.call('HGET', res, 'k:' .. idem)
  if prior then
    local rec = redis.call('HGET', res, prior)
    if not rec then return done({5, prior, 'R', 0}) end
    local r = split(rec, '|')
    if (r[18] or '') ~= fingerprint then return done({4, prior, r[1], 0}) end
    if r[1] ~= 'H' or tonumber(r[2]) <= now then return done({5, prior, r[1], 0}) end
    if r[19] ~= '1' then
      r[19] = '1'
      redis.call('HSET', res, prior, table.concat(r, '|'))
    end
    local out = {2, prior, 'H', tonumber(r[3])}
    for i = 1, 2 * nb do out[#out + 1] = tonumber(raw[i]) or 0 end
    for i = 1, nb do out[#out + 1] = raw[wfirst + i] or '' end
    return done(out)
  end
end

-- The budgets: a block budget the estimate would pass denies; a downgrade budget it would
-- pass re-prices the call for the cheaper model, which must then fit every budget that
-- blocks or downgrades, or the call is denied.
local out = {1, rid, 'H', est}
local deny, downgrade = false, false
for i = 1, nb do
  local u, h = tonumber(raw[2 * i - 1]) or 0, tonumber(raw[2 * i]) or 0
  if over(u, h, est, limits[i]) then
    if modes[i] == 'b' then deny = true elseif modes[i] == 'd' then downgrade = true end
  end
  out[#out + 1] = u
  out[#out + 1] = h
end
for i = 1, nb do out[#out + 1] = raw[wfirst + i] or '' end
if downgrade and not deny then
  if not est_down then
    deny = true
  else
    for i = 1, nb do
      if modes[i] ~= 'w' and over(out[3 + 2 * i], out[4 + 2 * i], est_down, limits[i]) then
        deny = true
      end
    end
  end
end
if deny then out[1] = 0 end
local price_in, price_out, meta = ARGV[6], ARGV[7], ARGV[9]
if downgrade and not deny then
  est, price_in, price_out, meta = est_down, ARGV[15], ARGV[16], ARGV[17]
  out[4] = est
end

local charge = {}
for j, r in ipairs(rates) do
  local a, b = raw[2 * nb + 2 * j - 1], raw[2 * nb + 2 * j]
  local cost = r.metric == 't' and est_tokens or 1
  local deny_rate, left, retry, debt =
    rate_eval(r.metric, a, b, rnow, r.limit, r.window, r.burst, cost)
  r.debt, r.last = debt, tonumber(b)
  if deny_rate and not r.shadow then out[1] = 0 end
  -- A shadow limiter that would deny is not charged: it keeps counting what enforcing
  -- it would have let through.
  charge[j] = not deny_rate
  out[#out + 1] = deny_rate and 1 or 0
  out[#out + 1] = left
  out[#out + 1] = retry
end
if out[1] == 0 then
  out[3], out[4] = '', 0
  return done(out)
end

-- Counters and limiter fields are not indexed: sweep.lua finds them by walking ctr.
for _, cid in ipairs(cids) do redis.call('HINCRBY', ctr, 'h:' .. cid, est) end
local slots, token_limiters = {}, {}
for j, r in ipairs(rates) do
  if charge[j] then
    if r.metric == 'c' then
      redis.call('HINCRBY', ctr, 'n:' .. r.rf, 1)
      slots[#slots + 1] = r.rf
    else
      local cost = 1
      if r.metric == 't' then
        cost = est_tokens
        token_limiters[#token_limiters + 1] = r.rf .. ':' .. int(r.limit) .. ':' .. int(r.window)
      end
      -- 'l' never moves back, so a late clock reading cannot earn credit twice.
      local last = math.max(rnow, r.last or rnow)
      redis.call('HSET', ctr, 'd:' .. r.rf, int(r.debt + cost * r.window), 'l:' .. r.rf, int(last))
    end
  end
end
local lease_end = now + lease_ms
redis.call('HSET', res, rid, table.concat(
  {'H', int(lease_end), int(est), price_in, price_out, idem, table.concat(cids, ','), '', '',
   '', meta, '', '', table.concat(slots, ','), table.concat(token_limiters, ','),
   int(est_tokens), table.concat(alert_specs, ';'), idem ~= '' and fingerprint or '', '',
   '', '', ARGV[18], ARGV[18] == 'c' and ARGV[19] or ''},
  '|'))
redis.call('ZADD', lease, lease_end, rid)
if idem ~= '' then redis.call('HSET', res, 'k:' .. idem, rid) end
return done(out)
