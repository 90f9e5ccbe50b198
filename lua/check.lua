-- check.lua: the pre-flight decision of authorize.lua without holding anything.
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc   (see _lib.lua)
-- ARGV[1] now_ms
-- ARGV[2] estimate, micro-USD (0 asks "is anything left")
-- ARGV[3] keep_ms
-- ARGV[4..] three per budget: cid, limit (micro-USD), mode ('b' | 'w' | 'd')
-- Returns: {verdict, u1, h1, u2, h2, ...}: verdict 1 if authorize would hold now, else 0.
-- It returns ended leases first (reclaim) so that its answer matches authorize's.
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local est = tonumber(ARGV[2])
reclaim(ctr, lease, res, gc, now, tonumber(ARGV[3]))

local cids, limits, modes = {}, {}, {}
for i = 4, #ARGV, 3 do
  cids[#cids + 1] = ARGV[i]
  limits[#limits + 1] = tonumber(ARGV[i + 1])
  modes[#modes + 1] = ARGV[i + 2]
end
local values = read_counters(ctr, cids)
local out = {1}
for i = 1, #cids do
  local u, h = values[2 * i - 1], values[2 * i]
  if modes[i] == 'b' and over(u, h, est, limits[i]) then out[1] = 0 end
  out[#out + 1] = u
  out[#out + 1] = h
end
return out
