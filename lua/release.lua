-- release.lua: give a reservation's hold back without charging anything, exactly once.
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua; for holds charged at
--   lease's end by reclaim)
-- Returns: the settle.lua result shape, {status, state, cost, ...}: see below the ARGV.
-- ARGV[1] now_ms
-- ARGV[2] reservation id
-- ARGV[3] keep_ms
-- ARGV[4] '1' to cancel: the sidecar gave up waiting for the authorize that sent ARGV[2]
--         as its reservation id (Redis timed out, or its answer never reached the caller),
--         so its caller was told no hold exists. That authorize's handout is taken out of
--         the reservation it made or, a retry, was handed (record field 27; with ARGV[6]);
--         when no handout is left, the reservation is released and its idempotency key
--         forgotten (only while the key still names it). An authorize that has not run yet
--         gets a released record under its id, so that it holds and is handed nothing when
--         it does. A reservation some handout of which stands, or whose handouts are not
--         known (field 19 set, field 27 ''), or that is already finished, is left as it is:
--         the cancel is only for the hold nobody was told of.
-- ARGV[5] the rate limiters' clock, ms ('' = Redis TIME)
-- ARGV[6] with a cancel: the authorize's idempotency key ('' = none); a retry's own
--         reservation id names no record, the reservation the key names holds its handout
-- Returns: {status, state, cost, estimate, lease_ended, cids, meta, tokens_in, tokens_out,
--           overshoot, priced_by, u1, h1, u2, h2, ...} (as settle.lua)
--   cids: the record's counter ids joined by ',' (u, h follow in the same order);
--   meta: what authorize stored with the reservation.
--   status 1: released now; 2: already finished, the first result unchanged;
--   0: no such reservation; 3: a cancel that left a claimed reservation standing (another
--   handout of it stands, or its handouts are not known). A hold whose
--   lease ended was returned then (its budgets, its slots); releasing it afterwards gives
--   back only what a lease's end keeps: its tokens and dollars to the rate limiters and
--   its call to the call caps, once. One that asked to be charged at its lease's end
--   (on_expiry charge) is charged (status 2, settled), whether or not reclaim came to it.
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local keep = tonumber(ARGV[3])
reclaim(ctr, lease, res, gc, now, keep)
collect(ctr, res, gc, now)

local cancel = ARGV[4] == '1'
local rec = redis.call('HGET', res, rid)
if string.sub(rid, 1, 2) == 'k:' then return done({0}) end

-- A handout's place in record field 27, and the list without it.
local function without(list, handout)
  local left, found = {}, false
  for _, h in ipairs(split(list, ',')) do
    if h == handout and not found then found = true else left[#left + 1] = h end
  end
  return table.concat(left, ','), found
end

-- The handout this cancel takes back: the authorize's own ('*'), or a retry's.
local handout = '*'
if not rec and cancel and (ARGV[6] or '') ~= '' then
  local prior = redis.call('HGET', res, 'k:' .. ARGV[6])
  local prec = prior and redis.call('HGET', res, prior)
  if prec then
    local tag = string.sub(rid, -12)
    local _, found = without(parse_record(prec)[27] or '', tag)
    if found then rid, rec, handout = prior, prec, tag end
  end
end
if not rec then
  if not cancel then return done({0}) end
  redis.call('HSET', res, rid, 'R|0|0||||||0|')
  redis.call('ZADD', gc, now + keep, 'r:' .. rid)
  return done({1, 'R', 0, 0, 0, '', '', 0, 0, 0, ''})
end
local r = parse_record(rec)
if r[1] == 'S' or r[1] == 'R' then return done(first_result(r)) end
if cancel then
  if r[19] == '1' then
    local left, found = without(r[27] or '', handout)
    if not found or left ~= '' then
      if found then
        r[27] = left
        redis.call('HSET', res, rid, table.concat(r, '|'))
      end
      return done({3, r[1], 0, tonumber(r[3]), 0, r[7], r[11] or '', 0, 0, 0, ''})
    end
    r[27] = ''  -- the last handout: released below
  end
  if r[6] ~= '' and redis.call('HGET', res, 'k:' .. r[6]) == rid then
    redis.call('HDEL', res, 'k:' .. r[6])
  end
end

if not cancel and charge_if_ended(ctr, lease, res, gc, rid, r, now, keep) then
  return done(first_result(r))
end
local est, held = tonumber(r[3]), r[1] == 'H'
-- The call did not happen: free its concurrency slots (unless expiry did) and give its
-- estimated tokens back to the token limiters. A request limiter keeps the request.
if held then free_slots(ctr, r[14]) end
if r[15] and r[15] ~= '' then
  correct_tokens(ctr, r[15], -(tonumber(r[16]) or 0), limiter_now(ARGV[5]))
end
-- Nor did it spend: the usd limiters get the estimate back, the call caps the call.
if r[26] and r[26] ~= '' then
  correct_tokens(ctr, r[26], -usd_units(tonumber(r[3])), limiter_now(ARGV[5]))
end
for _, cid in ipairs(split(r[25] or '', ',')) do
  if redis.call('HINCRBY', ctr, 'c:' .. cid, -1) <= 0 then redis.call('HDEL', ctr, 'c:' .. cid) end
end
-- Ended, whether or not reclaim has come to it yet (it returns at most 32 per call).
local ended = (not held) or tonumber(r[2]) <= now
-- An ended lease reclaim has not come to yet ends here: counted once, as reclaim would.
if held and ended then reclaimed_now = reclaimed_now + 1 end
local snapshot = {}
for _, cid in ipairs(split(r[7], ',')) do
  local h
  if held then
    h = unhold(ctr, cid, est)
  else
    h = tonumber(redis.call('HGET', ctr, 'h:' .. cid)) or 0
  end
  snapshot[#snapshot + 1] = int(tonumber(redis.call('HGET', ctr, 'u:' .. cid)) or 0)
  snapshot[#snapshot + 1] = int(h)
end
redis.call('ZREM', lease, rid)
r[1], r[8], r[9], r[10] = 'R', '0', ended and '1' or '0', table.concat(snapshot, ',')
redis.call('HSET', res, rid, table.concat(r, '|'))
redis.call('ZADD', gc, now + keep, 'r:' .. rid)

local out = {1, 'R', 0, est, tonumber(r[9]), r[7], r[11] or '', 0, 0, 0, ''}
for _, v in ipairs(snapshot) do out[#out + 1] = tonumber(v) end
return done(out)
