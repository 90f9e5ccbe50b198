-- alert_drops.lua: how many alerts the stream's cap (lua/_lib.lua ALERTS_MAX) trimmed
-- before a webhook's consumer group read them, counted once (sidecar.webhooks, off the
-- hot path, every few seconds per group).
--
-- KEYS[1]  bs:{T}:alerts, the tenant's alerts stream
-- ARGV[1]  the group's name (webhook:<name>)
-- Returns  the number trimmed unread since the last call on this group (0: none, or a
--          Redis without the group's read counter: before 7.0).
--
-- How: Redis 7 counts the entries ever added to the stream and the ones the group has
-- read; their difference (the group's lag) is what it still has to read. An entry the cap
-- trimmed unread stays in that difference, but not in the stream: the lag minus the
-- entries after the group's last-delivered id is the number dropped. The group's read
-- counter is then moved on by that many (XGROUP SETID at the same id, ENTRIESREAD), in
-- this same script, so every replica's next call finds none: each drop reported once.
local function id_after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local info
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #g, 2 do fields[g[i]] = g[i + 1] end
  if fields['name'] == ARGV[1] then info = fields end
end
if not info then return 0 end
local lag, read, last = info['lag'], info['entries-read'], info['last-delivered-id']
if type(lag) ~= 'number' or type(read) ~= 'number' or lag <= 0 then return 0 end
-- The entries still there after the group's position, at most `lag` of them.
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local after
if first and id_after(first[1], last) then
  after = redis.call('XLEN', KEYS[1])  -- all of them: nothing kept is at or before it
else
  after = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', lag)
end
local dropped = lag - after
if dropped <= 0 then return 0 end
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', read + dropped)
return dropped
