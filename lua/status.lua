-- status.lua: read budget counters, after returning ended leases (so held is current).
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua; for holds charged at
--   lease's end by reclaim)
-- ARGV[1] now_ms
-- ARGV[2] keep_ms
-- ARGV[3..] cids
-- Returns: {1, u1, h1, u2, h2, ..., w1, w2, ..., c1, c2, ...} settled and held micro-USD
--   of each counter, then each one's recent-spend window ('' = none; _lib.lua
--   window_next), then its calls (0 unless its budget caps calls), or
--   BACKLOG (-9, alone): more ended leases than one call returns (see _lib.lua reclaim).
local ctr, lease, res, gc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if reclaim(ctr, lease, res, gc, tonumber(ARGV[1]), tonumber(ARGV[2])) then
  return done({BACKLOG})
end
local cids = {}
for i = 3, #ARGV do cids[#cids + 1] = ARGV[i] end
local values = read_counters(ctr, cids)
table.insert(values, 1, 1)
-- One HMGET: the windows, then the call counts.
local fields = {}
for i, cid in ipairs(cids) do
  fields[i] = 'w:' .. cid
  fields[#cids + i] = 'c:' .. cid
end
if #fields > 0 then
  local raw = redis.call('HMGET', ctr, unpack(fields))
  for i = 1, #cids do values[#values + 1] = raw[i] or '' end
  for i = 1, #cids do values[#values + 1] = tonumber(raw[#cids + i]) or 0 end
end
-- A period-total counter past its idle time reads as none, as the decisions read it
-- (see _lib.lua idle_over): its collection may not have reached it yet.
for i, cid in ipairs(cids) do
  if has_total_window(cid) and values[2 * i + 1] == 0 then
    local due = tonumber(redis.call('ZSCORE', gc, 'c:' .. cid))
    if due and due <= tonumber(ARGV[1]) then
      values[2 * i] = 0
      values[1 + 3 * #cids + i] = 0
    end
  end
end
return done(values)
