-- reclaim.lua: return the holds of ended leases in one larger batch, for a backlog that
-- the decision scripts refused to answer over (they answered BACKLOG; see _lib.lua).
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua; for holds charged at
--   lease's end by reclaim)
-- ARGV[1] now_ms
-- ARGV[2] keep_ms
-- ARGV[3] batch: at most this many leases this call (the sidecar calls again while more
--         are left, so Redis is never blocked for the whole backlog at once)
-- Returns: {left}: 1 if ended leases are still waiting, else 0 (then the expiry count).
local now, keep, batch = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local left = reclaim(KEYS[1], KEYS[2], KEYS[3], KEYS[4], now, keep, batch)
return done({left and 1 or 0})
