-- record.lua: charge a cost after the fact, without a reservation (usage reporting); the
-- charge writes one usage-ledger entry and raises the threshold alerts it crosses.
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua)
-- Returns: {status, u1, h1, u2, h2, ...}: status 1 charged now, 2 key seen before (nothing
-- charged; the counters as they are now), 4 key seen before and charged by a call whose
-- answer no caller counted in the spend metrics: nothing charged, the caller counts it
-- (this attempt's own earlier call, re-sent because its answer was lost; or '?' below).
-- ARGV[1] now_ms
-- ARGV[2] cost, micro-USD
-- ARGV[3] idempotency key ('' = none): a repeated key charges nothing the second time
--         (its own key space 'q:', apart from authorize's 'k:')
-- ARGV[4] keep_ms: how long the idempotency key is remembered
-- ARGV[5] meta: the ledger tuple (see _lib.lua, record field 11)
-- ARGV[6] tokens in   ARGV[7] tokens out
-- ARGV[8] ledger config (see settle.lua)   ARGV[9] latency ms ('' = unknown)
-- ARGV[10] success '1' | '0'
-- ARGV[11] this call's attempt id ('' = none; with a key only): who counts the charge in
--         the spend metrics. The key's field "q:<key>" holds, once charged, the attempt
--         that charged it (its answer counts it), that id and '!' once an answer of it
--         that came later counted it (its first was lost: a re-send of the same attempt,
--         or record_lost.lua), '?' when charged by an attempt already known lost that
--         nobody counted yet (the next call with the key counts it, status 4), or
--         'recorded' (a version that kept no attempt). Before the charge, the attempts
--         whose answers were lost before Redis ran them are in "w:<key>", ',' joined
--         (record_lost.lua); the charge deletes that field.
-- ARGV[12..] four per budget: cid, the forecast alert's period window "start_ms:end_ms"
--           ('' = none; a number without ':' = a period-total counter's idle ms: a charge
--           collects it that long after, as authorize does), limit (micro-USD), alert
--           thresholds ('.'-joined percent, '' = none)
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local idem = ARGV[3]
local keep = tonumber(ARGV[4])
reclaim(ctr, lease, res, gc, now, keep)
collect(ctr, res, gc, now)

local cids, limits, thresholds, windows, idles = {}, {}, {}, {}, {}
local attempt = ARGV[11]
for i = 12, #ARGV, 4 do
  cids[#cids + 1] = ARGV[i]
  idles[#cids] = tonumber(ARGV[i + 1])  -- nil for '' and "start:end"
  limits[#limits + 1] = tonumber(ARGV[i + 2])
  thresholds[#thresholds + 1] = ARGV[i + 3]
  windows[#windows + 1] = split(string.sub(forecast_suffix(ARGV[i + 1]), 2), ':')
end
local values = read_counters(ctr, cids)

local status = 1
if idem ~= '' then
  local seen = redis.call('HGET', res, 'q:' .. idem)
  local mark = attempt ~= '' and attempt or 'recorded'
  if seen and attempt ~= '' and (seen == attempt or seen == attempt .. '!' or seen == '?') then
    status, mark = 4, attempt .. '!'
  elseif seen then
    status = 2
  else
    -- Not charged yet. If this attempt was noted lost (record_lost.lua, in "w:<key>"),
    -- its answer goes nowhere: '?'. The notes stay out of "q:<key>", where a previous
    -- version's HSETNX would read them as "charged" and skip a retry's charge.
    local lost = redis.call('HGET', res, 'w:' .. idem)
    if lost then
      for _, a in ipairs(split(lost, ',')) do
        if a == attempt then mark = '?' end
      end
      redis.call('HDEL', res, 'w:' .. idem)
    end
  end
  if status ~= 2 then redis.call('HSET', res, 'q:' .. idem, mark) end
end
local out = {status}
-- The counters' recent-spend windows: one HMGET, one HSET (see read_windows).
local recent, at, written = {}, {}, {}
if status == 1 and cost > 0 then recent, at = read_windows(ctr, cids) end
for i, cid in ipairs(cids) do
  local u, h = values[2 * i - 1], values[2 * i]
  if status == 1 then
    u = add_capped(ctr, 'u:' .. cid, ARGV[2])
    if idles[i] then redis.call('ZADD', gc, int(now + idles[i]), 'c:' .. cid) end
    check_alerts(ctr, KEYS[6], cid, limits[i], thresholds[i], u - cost, u, now)
    if at[i] then
      local window = window_next(recent[at[i]] or nil, cost, now)
      written[#written + 1] = 'w:' .. cid
      written[#written + 1] = window
      check_forecast(ctr, KEYS[6], cid, limits[i], tonumber(windows[i][1]),
        tonumber(windows[i][2]), u, h, window, now)
    end
  end
  out[#out + 1] = u
  out[#out + 1] = h
end
if #written > 0 then redis.call('HSET', ctr, unpack(written)) end
if status == 1 then
  if idem ~= '' then redis.call('ZADD', gc, now + keep, 'q:' .. idem) end
  ledger(KEYS[5], KEYS[7], ARGV[8], 'r', ARGV[5], idem, tonumber(ARGV[6]),
    tonumber(ARGV[7]), cost, ARGV[9], ARGV[10], now, 'c')
end
return done(out)
