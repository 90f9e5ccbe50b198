-- authorize.lua: hold an estimate on every budget counter that applies, or on none.
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc   (see _lib.lua)
-- ARGV[1] now_ms
-- ARGV[2] reservation id to create
-- ARGV[3] lease_ms: the hold returns to its budgets at now_ms + lease_ms unless settled
-- ARGV[4] estimate, micro-USD (>= 0)
-- ARGV[5] idempotency key ('' = none)
-- ARGV[6] input price, pico-USD per token ('' = unpriced: settle must give a cost)
-- ARGV[7] output price, pico-USD per token
-- ARGV[8] keep_ms: how long a finished reservation is remembered
-- ARGV[9] meta: kept in the record and returned by settle/release (no '|' inside)
-- ARGV[10..] four per budget: cid, limit (micro-USD), mode ('b' block, 'w' warn,
--           'd' downgrade), gc_at_ms (when the counter's window is long past)
-- Returns: {verdict, reservation id, state, u1, h1, u2, h2, ...}
--   (a reservation id that already exists was cancelled before this call ran: release.lua
--   with cancel; it returns {3, rid, 'R'} and holds nothing)
--   verdict 0: denied by a block budget, nothing held; 1: held on every counter;
--   2: an earlier authorize with this idempotency key, returned as it is (state H/E/S/R).
--   u, h: settled and held micro-USD of each counter before this hold.
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local lease_ms = tonumber(ARGV[3])
local est = tonumber(ARGV[4])
local idem = ARGV[5]
local keep = tonumber(ARGV[8])

if redis.call('HEXISTS', res, rid) == 1 then return {3, rid, 'R'} end
reclaim(ctr, lease, res, gc, now, keep)
collect(ctr, res, gc, now)

local cids, limits, modes, gc_at = {}, {}, {}, {}
for i = 10, #ARGV, 4 do
  cids[#cids + 1] = ARGV[i]
  limits[#limits + 1] = tonumber(ARGV[i + 1])
  modes[#modes + 1] = ARGV[i + 2]
  gc_at[#gc_at + 1] = ARGV[i + 3]
end
local values, fresh = read_counters(ctr, cids)

if idem ~= '' then
  local prior = redis.call('HGET', res, 'k:' .. idem)
  if prior then
    local rec = redis.call('HGET', res, prior)
    local state = rec and string.sub(rec, 1, 1) or 'R'
    local out = {2, prior, state}
    for _, v in ipairs(values) do out[#out + 1] = v end
    return out
  end
end

local out = {1, rid, 'H'}
for i = 1, #cids do
  local u, h = values[2 * i - 1], values[2 * i]
  if modes[i] == 'b' and over(u, h, est, limits[i]) then out[1] = 0 end
  out[#out + 1] = u
  out[#out + 1] = h
end
if out[1] == 0 then
  out[3] = ''
  return out
end

for i, cid in ipairs(cids) do
  if est ~= 0 then redis.call('HINCRBY', ctr, 'h:' .. cid, est) end
  if fresh[i] then redis.call('ZADD', gc, gc_at[i], 'c:' .. cid) end
end
local lease_end = now + lease_ms
redis.call('HSET', res, rid, table.concat(
  {'H', int(lease_end), int(est), ARGV[6], ARGV[7], idem, table.concat(cids, ','), '', '', '',
   ARGV[9]},
  '|'))
redis.call('ZADD', lease, lease_end, rid)
if idem ~= '' then redis.call('HSET', res, 'k:' .. idem, rid) end
return out
