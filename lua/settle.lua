-- settle.lua: charge a reservation's actual cost and drop its hold, exactly once; the
-- charge writes one usage-ledger entry and raises the threshold alerts it crosses.
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua)
-- KEYS[9] est: the learned estimates, taught this charge (see _lib.lua learn())
-- Returns: the settle result, {status, state, cost, ...}: see below the ARGV.
-- ARGV[1] now_ms
-- ARGV[2] reservation id
-- ARGV[3] keep_ms
-- ARGV[4] 't' to price tokens with the prices held in the record (a reservation with no
--         price charges its held estimate), 'c' for a given cost, 'p' for a cost the
--         sidecar priced from tokens (recorded as 't'), 'e' to charge the held estimate
--         (the model has no price anywhere)
-- ARGV[5] tokens in   ARGV[6] tokens out   ('' = unknown; always given for 't')
-- ARGV[7] cost, micro-USD (for 'c')
-- ARGV[8] the rate limiters' clock, ms ('' = Redis TIME)
-- ARGV[9] ledger config "max_records:max_age_ms:aggregate_ttl_s" ('' = no ledger)
-- ARGV[10] latency ms ('' = unknown)   ARGV[11] success '1' | '0'
-- ARGV[12] provider and model, '\31'-joined, replacing the reservation's ('' = keep)
-- ARGV[13] the learned estimates' config "ttl_s:max_series" ('' = teach nothing): a cost
--          that was measured (priced tokens or a given cost, not the held estimate)
--          teaches the series the reservation names (record field 24)
-- ARGV[14] this settle call's attempt id, new for each call the sidecar sends ('' = none:
--          the answer counts the charge, as ever): kept in record field 28, so that the
--          spend metrics count a charge whose answer was lost once (see settle_lost.lua)
-- The result: {status, state, cost, estimate, lease_ended, cids, meta, tokens_in,
--           tokens_out, overshoot, priced_by, u1, h1, u2, h2, ...}
--   cids: the record's counter ids joined by ',' (u, h follow in the same order);
--   meta: the ledger tuple kept with the reservation (record field 11);
--   overshoot: micro-USD of this charge past the cap of a block or downgrade budget (the
--   largest over its budgets): per budget, what the settled amount passed the limit by
--   after this charge less what it already had before, so summed over every settle it is
--   exactly the settled spend past the cap; priced_by: 't' | 'c' | 'e' (record field 21).
--   status 1: settled now; 2: already finished, the first result returned unchanged;
--   4: as 2, and this answer counts the charge in the spend metrics: the attempt that
--   charged it had its answer lost (record field 28 '?'), and nobody counted it yet (the
--   first settle to find it so counts it, and marks it, so no other does);
--   0: no such reservation.
--   A reservation whose lease ended is still charged (the call did spend); its hold had
--   already gone back, so only the cost is added, and lease_ended says so.
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local keep = tonumber(ARGV[3])
reclaim(ctr, lease, res, gc, now, keep)
collect(ctr, res, gc, now)

local rec = redis.call('HGET', res, rid)
if not rec or string.sub(rid, 1, 2) == 'k:' then return done({0}) end
local r = parse_record(rec)
local attempt = ARGV[14] or ''
if r[1] == 'S' or r[1] == 'R' then
  local out = first_result(r)
  if r[1] == 'S' and r[28] == '?' and attempt ~= '' then
    r[28] = attempt
    redis.call('HSET', res, rid, table.concat(r, '|'))
    out[1] = 4
  end
  return done(out)
end

local cost, priced_by = 0, ARGV[4]
local tokens_in, tokens_out = tonumber(ARGV[5]), tonumber(ARGV[6])
if priced_by == 't' and r[4] == '' then priced_by = 'e' end
if priced_by == 't' then
  cost = cost_micro(tokens_in, tonumber(r[4])) + cost_micro(tokens_out, tonumber(r[5]))
elseif priced_by == 'e' then
  cost = tonumber(r[3])
else
  cost = tonumber(ARGV[7])
  if priced_by == 'p' then priced_by = 't' end
end

local est, held = tonumber(r[3]), r[1] == 'H'
-- A held reservation frees its concurrency slots now (an expired one freed them then);
-- token limiters are corrected to the actual count whenever tokens are known.
if held then free_slots(ctr, r[14]) end
if tokens_in and tokens_out then
  local diff = tokens_in + tokens_out - (tonumber(r[16]) or 0)
  if diff ~= 0 and r[15] and r[15] ~= '' then
    correct_tokens(ctr, r[15], diff, limiter_now(ARGV[8]))
  end
end
-- usd limiters were charged the estimate: corrected to the cost (record field 26).
if r[26] and r[26] ~= '' then
  local diff = usd_units(cost) - usd_units(tonumber(r[3]))
  if diff ~= 0 then correct_tokens(ctr, r[26], diff, limiter_now(ARGV[8])) end
end
tokens_in, tokens_out = tokens_in or 0, tokens_out or 0
-- Ended, whether or not reclaim has come to it yet (it returns at most 32 per call).
local ended = (not held) or tonumber(r[2]) <= now
-- An ended lease reclaim has not come to yet ends here: counted once, as reclaim would.
if held and ended then reclaimed_now = reclaimed_now + 1 end
local figures, overshoot = charge(ctr, r, cost, held, now)
redis.call('ZREM', lease, rid)
local meta = r[11] or ''
if ARGV[12] ~= '' then
  meta = ARGV[12] .. (string.match(meta, '^[^\31]*\31[^\31]*(.*)$') or '')
end
r[1], r[8], r[9], r[10] = 'S', int(cost), ended and '1' or '0', snapshot_text(figures)
r[11], r[12], r[13] = meta, int(tokens_in), int(tokens_out)
for i = #r + 1, 27 do r[i] = '' end
r[20], r[21] = int(overshoot), priced_by
-- Who counts this charge in the spend metrics: this answer, unless it was already known
-- lost (settle_lost.lua ran before this call did): then the next settle that finds it.
local lost = false
for _, a in ipairs(split(r[28] or '', ',')) do lost = lost or a == '~' .. attempt end
r[28] = (lost and attempt ~= '') and '?' or attempt
redis.call('HSET', res, rid, table.concat(r, '|'))
redis.call('ZADD', gc, int(now + keep), 'r:' .. rid)
if priced_by ~= 'e' then learn(KEYS[9], r[24], cost, ARGV[13] or '') end
ledger(KEYS[5], KEYS[7], ARGV[9], 's', meta, rid, tokens_in, tokens_out, cost, ARGV[10],
  ARGV[11], now, priced_by)

-- The figures unpacked into the one table constructor: the reply is made at its size, not
-- grown (a rehash at each power of two) one figure at a time.
return done({1, 'S', cost, est, tonumber(r[9]), r[7], r[11], tokens_in, tokens_out, overshoot,
  priced_by, unpack(figures)})
