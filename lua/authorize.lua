-- authorize.lua: hold an estimate on every budget, and charge every rate limit, that
-- applies to a call, or do nothing at all (invariant 2).
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua; for holds charged at
--   lease's end by reclaim, and the alerts for guard trips)
-- KEYS[9..8+ng] one per loop guard: its key for this call's entity (see _lib.lua,
--   loop_read); then KEYS[9+ng] est, the learned estimates, named only when this call
--   learns (see _lib.lua learned()); last, the tenant's state marker once the sidecar
--   has seen it written (see _lib.lua state_lost)
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
-- ARGV[20] the learned-estimate series of this call ('' = estimate fixed: ARGV[4] as it is)
-- ARGV[21] the ceiling of a learned estimate, micro-USD   ARGV[22] the costs a series must
--          have been taught before its p95 is held (until then ARGV[4] holds: cold start)
-- ARGV[23] nl: the number of rate limits   ARGV[24] ns: the number of the call's stop
--          fields (see below)   ARGV[25] ng: the number of loop guards
-- ARGV[26..31] what the record keeps of the budgets and limiters, built by the sidecar
--          once per resolution (record fields 7, 17, 25, 14, 15, 26): the cids ','-joined;
--          per cid, ';'-joined, "limit:thresholds:mode[:start_ms:end_ms]" (thresholds in
--          percent, '.'-joined, ascending; the forecast alert's period window when asked
--          for; kept for settle's alerts); the cids with a call cap; and, for a call every
--          rate limit charges, the concurrency rfs, the token limiters "rf:limit:window_ms"
--          and the usd limiters "rf:limit:window_ms", each ','-joined
-- then four per budget: limit (micro-USD), mode ('b' block, 'w' warn, 'd' downgrade),
--           call cap ('' = none), idle ms of a period-total counter ('' = a calendar
--           window)
-- then six per rate limit: rf, metric ('r' requests, 't' tokens, 'c' concurrent, 'u'
--           USD_UNIT micro-USD), limit, window_ms, burst, shadow ('1': evaluate and
--           report, never deny)
-- then six per loop guard: guard id, repeats, window_ms, shadow, scope, entity
-- then the ctr fields the decision reads, in this order (one HMGET; the sidecar names
--           them, so the script builds no field name to read): "u:<cid>" "h:<cid>" per
--           budget; per rate limit "d:<st>" "l:<st>" (st: keys.limiter_state; concurrent: "n:<rf>"
--           twice); "c:<cid>"
--           per budget with a call cap; the ns stop fields "s:<scope>:<entity>"; "w:<cid>"
--           per budget
-- and last, when ng > 0, the call's fingerprint (a hash, hex)
-- The reply: {verdict, reservation id, state, held, weighed, u1, h1, ..., w1, ..., then per
--           rate limit: would_deny (0/1), remaining, retry_after_ms (-1: unknown); then per budget
--           its calls before this one; then the stop in force ('' '' '' = none: its field,
--           value and ms left, '' never: _lib.lua active_stop); then per loop guard: would_deny (0/1), its calls in the window}
--   weighed: the estimate the budgets were weighed against before any downgrade: ARGV[4],
--   or the series' learned figure where that is larger (whether held or denied)
--   w: each budget counter's recent-spend window "k:cur:prev" ('' = none; see _lib.lua
--   window_next), for the forecast
--   verdict 0: denied (by a stop, a block budget's dollars or calls, a downgrade that does
--   not fit, an enforced rate limit or loop guard), nothing changed but the alerts of a
--   guard's trip and of the thresholds the budgets' settled + held spend has passed and
--   not alerted yet (a limit lowered under the spend: see _lib.lua alert_at_denial); 1: held and charged everywhere (held = ARGV[4], or
--   ARGV[14] when downgraded); 2: a retry: this idempotency key's reservation, made by
--   the same request and still held, returned as it is (counters as they are now, no rate
--   figures, nor anything after them) and marked claimed: its handout (the last 12 hex
--   digits of ARGV[2]) is added to record field 27, so that a cancel releases it only once
--   every handout of it was cancelled (see release.lua; a retry while a stop of the call's
--   entities is in force is a 0 instead, like any call);
--   3: this reservation id was cancelled before this call ran (see release.lua); 4: the key was made by a different
--   request; 5: the key's reservation is no longer held (state E, S or R): nothing
--   changed in 4 and 5. BACKLOG (-9, alone): more ended leases than one call returns.
--   LOST (-8, alone): the state marker is gone, nothing changed (see _lib.lua state_lost).
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
local fingerprint = ARGV[13]
local est_down = tonumber(ARGV[14])
local nl, ns, ng = tonumber(ARGV[23]), tonumber(ARGV[24]), tonumber(ARGV[25])
local rnow = 0  -- read only if a rate limit applies
local FIRST_BUDGET = 32
local MAX_HANDOUTS = 16  -- handouts a record counts (record field 27)

if state_lost(8 + ng + (ARGV[20] ~= '' and 1 or 0)) then return done({LOST}) end
if redis.call('HEXISTS', res, rid) == 1 then return done({3, rid, 'R', 0}) end
if reclaim(ctr, lease, res, gc, now, keep) then return done({BACKLOG}) end
collect(ctr, res, gc, now)

local limits, modes, caps, idles = {}, {}, {}, {}
local ncap = 0
for b = 1, nb do
  local i = FIRST_BUDGET + 4 * (b - 1)
  -- caps[b] and idles[b] are nil for none: indexed by b, never appended.
  limits[b], modes[b], caps[b], idles[b] =
    tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  if caps[b] then ncap = ncap + 1 end
end
local last_budget = FIRST_BUDGET - 1 + 4 * nb
local rates = rate_args(last_budget + 1, nil, nl)
local first_loop = last_budget + 6 * nl + 1
-- The fields read: budgets first, then limiters, then the call counts of budgets with a
-- call cap, the stop fields, the recent-spend windows (see the header).
local F = first_loop + 6 * ng
local first_calls = 2 * nb + 2 * nl
local first_stop = first_calls + ncap
local wfirst = first_stop + ns
local raw = {}
if wfirst + nb > 0 then raw = redis.call('HMGET', ctr, unpack(ARGV, F, F + wfirst + nb - 1)) end
if #rates > 0 then rnow = limiter_now(ARGV[12]) end
-- A budget's cid, from its "u:<cid>" field.
local function cid_of(b) return string.sub(ARGV[F + 2 * (b - 1)], 3) end
do
  local ic = first_calls
  for b = 1, nb do
    if caps[b] then ic = ic + 1 end
    if idles[b] then idle_over(ctr, gc, cid_of(b), now, raw, b, caps[b] and ic, true) end
  end
end

-- The stop switch, read before the idempotency key: a retry sent after a stop is a call
-- sent after it, denied below like any other.
local stop_field, stop_value, stop_left =
  active_stop(F + first_stop, raw, first_stop + 1, ns, ARGV[12], #rates > 0 and rnow or nil)

if idem ~= '' then
  local prior = redis.call('HGET', res, 'k:' .. idem)
  if prior then
    local rec = redis.call('HGET', res, prior)
    if not rec then return done({5, prior, 'R', 0}) end
    local r = parse_record(rec)
    if (r[18] or '') ~= fingerprint then return done({4, prior, r[1], 0}) end
    if r[1] ~= 'H' or tonumber(r[2]) <= now then return done({5, prior, r[1], 0}) end
    if stop_field == '' then
      -- This handout is counted in the record (field 27: '*' stands for the authorize that
      -- made it), so that only the cancel of every handout releases it: a background cancel
      -- never undoes what a retry was handed. Past MAX_HANDOUTS the record stops counting
      -- ('' with field 19 set): no cancel releases it then, its lease ends it.
      for i = #r + 1, 28 do r[i] = '' end
      local handouts = r[19] == '1' and r[27] or '*'
      if handouts ~= '' then
        local _, commas = string.gsub(handouts, ',', ',')
        if commas + 1 >= MAX_HANDOUTS then
          handouts = ''
        else
          handouts = handouts .. ',' .. string.sub(rid, -12)
        end
      end
      r[19], r[27] = '1', handouts
      redis.call('HSET', res, prior, table.concat(r, '|'))
      local out = {2, prior, 'H', tonumber(r[3]), tonumber(r[3])}
      for i = 1, 2 * nb do out[#out + 1] = tonumber(raw[i]) or 0 end
      for i = 1, nb do out[#out + 1] = raw[wfirst + i] or '' end
      return done(out)
    end
  end
end

-- The budgets: a block budget the estimate would pass denies; a downgrade budget it would
-- pass re-prices the call for the cheaper model, which must then fit every budget that
-- blocks or downgrades, or the call is denied.
-- A learned estimate: a warm series' p95 (capped) holds where it is more than ARGV[4].
if ARGV[20] ~= '' then
  local learned_est = learned(KEYS[9 + ng], ARGV[20], tonumber(ARGV[21]), tonumber(ARGV[22]))
  if learned_est and learned_est > est then est = learned_est end
end

local out = {1, rid, 'H', est, est}
local deny, downgrade = false, false
local usd_tripped = {}
for i = 1, nb do
  local u, h = tonumber(raw[2 * i - 1]) or 0, tonumber(raw[2 * i]) or 0
  if over(u, h, est, limits[i]) then
    if modes[i] == 'b' then
      deny = true
      usd_tripped[i] = true
    elseif modes[i] == 'd' then
      downgrade = true
    end
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
      if modes[i] ~= 'w' and over(out[4 + 2 * i], out[5 + 2 * i], est_down, limits[i]) then
        deny = true
      end
    end
  end
end
local price_in, price_out, meta = ARGV[6], ARGV[7], ARGV[9]
if downgrade and not deny then
  est, price_in, price_out, meta = est_down, ARGV[15], ARGV[16], ARGV[17]
  out[4] = est
end

local charge = {}
local units = usd_units(est)
for j, r in ipairs(rates) do
  local a, b = raw[2 * nb + 2 * j - 1], raw[2 * nb + 2 * j]
  local cost = 1
  if r.metric == 't' then cost = est_tokens elseif r.metric == 'u' then cost = units end
  local deny_rate, left, retry, debt =
    rate_eval(r.metric, a, b, rnow, r.limit, r.window, r.burst, cost)
  r.debt, r.last, r.cost = debt, tonumber(b), cost
  if deny_rate and not r.shadow then
    deny = true
    r.tripped = true
  end
  -- A shadow limiter that would deny is not charged: it keeps counting what enforcing
  -- it would have let through.
  charge[j] = not deny_rate
  out[#out + 1] = deny_rate and 1 or 0
  out[#out + 1] = left
  out[#out + 1] = retry
end

-- Call caps: a block budget whose entity made its calls denies (a warn budget reports).
local calls, calls_tripped, at = {}, {}, first_calls
for i = 1, nb do
  calls[i] = 0
  if caps[i] then
    at = at + 1
    calls[i] = tonumber(raw[at]) or 0
    if calls[i] >= caps[i] and modes[i] == 'b' then
      deny = true
      calls_tripped[i] = true
    end
  end
  out[#out + 1] = calls[i]
end

-- The stop switch (read above), then the loop guards.
if stop_field ~= '' then deny = true end
out[#out + 1] = stop_field
out[#out + 1] = stop_value
out[#out + 1] = stop_left
local loops = {}
local fp = ng > 0 and ARGV[#ARGV] or ''
for g = 1, ng do
  local i = first_loop + 6 * (g - 1)
  local repeats, window = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local state = loop_read(KEYS[8 + g], now, window, fp)
  local would = #state.times >= repeats
  local shadow = ARGV[i + 3] == '1'
  if would and not shadow then deny = true end
  loops[g] = {key = KEYS[8 + g], state = state, window = window, would = would,
    shadow = shadow, at = i, repeats = repeats}
  out[#out + 1] = would and 1 or 0
  out[#out + 1] = #state.times
end

if deny then
  -- Nothing is held or counted. Each guard that tripped says so once per trip.
  out[1], out[3], out[4] = 0, '', 0
  -- The thresholds this denial sees passed (see _lib.lua alert_at_denial): the budgets'
  -- specs (limit and thresholds, ARGV[27]) are read on this path only.
  if nb > 0 then
    local specs, seen = split(ARGV[27], ';'), {}
    for i = 1, nb do
      local limit, thresholds = parse_spec(specs[i])
      seen[i] = {cid_of(i), limit, thresholds, out[4 + 2 * i], out[5 + 2 * i]}
    end
    alert_at_denial(ctr, KEYS[6], seen, now)
  end
  for i = 1, nb do
    -- A cid is "<budget id>/<entity>/<window>", both escaped.
    local cid = cid_of(i)
    local budget, entity = string.match(cid, '^([^/]*)/([^/]*)/')
    if calls_tripped[i] and alert_once(ctr, cid, 'c') then
      guard_alert('calls', budget, '', entity, int(caps[i]) .. ' calls', now)
    elseif usd_tripped[i] and idles[i] and alert_once(ctr, cid, 'x') then
      guard_alert('cap', budget, '', entity, int(limits[i]) .. ' micro-USD', now)
    end
  end
  for _, r in ipairs(rates) do
    if r.tripped and r.metric == 'u' then
      local quiet = tonumber(redis.call('HGET', ctr, 'x:' .. r.rf)) or 0
      if quiet <= now then
        redis.call('HSET', ctr, 'x:' .. r.rf, int(now + r.window))
        local limit_id, entity = string.match(r.rf, '^([^/]*)/(.*)$')
        guard_alert('velocity', limit_id, '', entity, int(r.limit * USD_UNIT) .. ' micro-USD per '
          .. int(r.window) .. ' ms', now)
      end
    end
  end
  for _, l in ipairs(loops) do
    if l.would and not l.shadow and not l.state.alerted then
      local calls = #l.state.times
      loop_write(l.key, l.state, now, ARGV[l.at + 2], fp, false, true, l.repeats)
      guard_alert('loop', ARGV[l.at], ARGV[l.at + 4], ARGV[l.at + 5],
        int(calls) .. ' identical calls within ' .. int(l.window) .. ' ms', now)
    end
  end
  return done(out)
end

-- Counters and limiter fields are not indexed: sweep.lua finds them by walking ctr.
-- Written through the field names the sidecar gave (see the header), with the figures
-- as text made once (Redis would format a Lua number for every call that takes it).
local est_text = (est == tonumber(ARGV[4])) and ARGV[4] or int(est)
local at_cap = F + first_calls
for i = 1, nb do
  -- A warn budget's hold has no cap but COUNTER_MAX (a block budget's is below its limit).
  add_capped(ctr, ARGV[F + 2 * i - 1], est_text)
  local calls_field
  if caps[i] then
    calls_field = ARGV[at_cap]
    at_cap = at_cap + 1
    redis.call('HINCRBY', ctr, calls_field, '1')
  end
  if idles[i] then redis.call('ZADD', gc, now + idles[i], calls_field or ('c:' .. cid_of(i))) end
end
-- The limiters this call charged, for the record: as the sidecar joined them when every
-- limiter charges (a shadow limiter that would deny is not charged: then built here).
local slots, token_limiters, usd_limiters = ARGV[29], ARGV[30], ARGV[31]
local every = true
for j = 1, #rates do every = every and charge[j] end
if not every then slots, token_limiters, usd_limiters = {}, {}, {} end
for j, r in ipairs(rates) do
  if charge[j] then
    if r.metric == 'c' then
      local f = F + 2 * nb + 2 * (j - 1)
      redis.call('HINCRBY', ctr, ARGV[f], '1')
      if not every then slots[#slots + 1] = r.rf end
    else
      if not every then
        local entry = r.rf .. ':' .. int(r.limit) .. ':' .. int(r.window)
        if r.metric == 't' then
          token_limiters[#token_limiters + 1] = entry
        elseif r.metric == 'u' then
          usd_limiters[#usd_limiters + 1] = entry
        end
      end
      -- 'l' never moves back, so a late clock reading cannot earn credit twice.
      local last = math.max(rnow, r.last or rnow)
      local f = F + 2 * nb + 2 * (j - 1)
      redis.call('HSET', ctr, ARGV[f], int(r.debt + r.cost * r.window), ARGV[f + 1], int(last))
    end
  end
end
-- A loop guard counts the calls it let through; a shadow one counts them all.
for _, l in ipairs(loops) do
  loop_write(l.key, l.state, now, ARGV[l.at + 2], fp, true, l.would and l.state.alerted,
    l.repeats)
end
local lease_end = int(now + lease_ms)
if not every then
  slots, token_limiters, usd_limiters =
    table.concat(slots, ','), table.concat(token_limiters, ','), table.concat(usd_limiters, ',')
end
redis.call('HSET', res, rid, table.concat(
  {'H', lease_end, est_text, price_in, price_out, idem, ARGV[26], '', '', '', meta, '',
   '', slots, token_limiters, ARGV[10], ARGV[27], idem ~= '' and fingerprint or '', '', '', '',
   ARGV[18], ARGV[18] == 'c' and ARGV[19] or '', ARGV[20], ARGV[28], usd_limiters, '', ''},
  '|'))
redis.call('ZADD', lease, lease_end, rid)
if idem ~= '' then redis.call('HSET', res, 'k:' .. idem, rid) end
return done(out)
