-- status.lua: read budget counters, after returning ended leases (so held is current).
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua; for holds charged at
--   lease's end by reclaim)
-- ARGV[1] now_ms
-- ARGV[2] keep_ms
-- ARGV[3..] cids
-- Returns: {1, u1, h1, u2, h2, ..., w1, w2, ...} settled and held micro-USD of each
--   counter, then each one's recent-spend window ('' = none; _lib.lua window_add), or
--   BACKLOG (-9, alone): more ended leases than one call returns (see _lib.lua reclaim).
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if reclaim(ctr, lease, res, gc, tonumber(ARGV[1]), tonumber(ARGV[2])) then
  return done({BACKLOG})
end
local cids = {}
for i = 3, #ARGV do cids[#cids + 1] = ARGV[i] end
local values = read_counters(ctr, cids)
table.insert(values, 1, 1)
local windows = {}
for i, cid in ipairs(cids) do windows[i] = 'w:' .. cid end
if #windows > 0 then
  for _, w in ipairs(redis.call('HMGET', ctr, unpack(windows))) do values[#values + 1] = w or '' end
end
return done(values)
