-- record_lost.lua: a /v1/record call with an idempotency key whose answer was lost (Redis
-- did not answer within the timeout: its caller was told 503, "repeat it") may still have
-- charged; its sidecar sends this in the background so that the spend metrics count that
-- charge exactly once. A repeat of the record with the key answers "replayed", which the
-- metrics do not count: the attempt that charged is found here instead (as settle_lost.lua
-- does for a settle).
-- KEYS[1] res  KEYS[2] gc  (see _lib.lua)
-- ARGV[1] the idempotency key   ARGV[2] the lost call's attempt id (record.lua ARGV[11])
-- ARGV[3] now_ms   ARGV[4] keep_ms: how long the key's field is remembered
-- Returns: {status}
--   4: that attempt charged it and nobody counted it, or it was charged by an attempt known
--      lost that nobody counted ('?'): the caller counts it now (the field becomes
--      "<id>!", so that a repeat of this search, whose own answer was lost, answers 4 again
--      and no other call does);
--   3: not charged yet: the attempt is noted lost (in the field "w:<key>"), so that if
--      Redis runs it later, the next call with the key counts its charge (record.lua
--      status 4);
--   2: charged by another attempt (whose answer counts it): nothing to count here.
local res, gc = KEYS[1], KEYS[2]
local field, attempt = 'q:' .. ARGV[1], ARGV[2]
-- How many lost attempts an uncharged key notes (the oldest are forgotten).
local MAX_LOST = 8

if ARGV[1] == '' or attempt == '' then return done({2}) end
local seen = redis.call('HGET', res, field)
if seen == attempt or seen == attempt .. '!' or seen == '?' then
  if seen ~= attempt .. '!' then redis.call('HSET', res, field, attempt .. '!') end
  return done({4})
end
if seen then return done({2}) end
local noted = redis.call('HGET', res, 'w:' .. ARGV[1])
local lost = split(noted or '', ',')
for _, a in ipairs(lost) do
  if a == attempt then return done({3}) end
end
lost[#lost + 1] = attempt
if #lost > MAX_LOST then table.remove(lost, 1) end
redis.call('HSET', res, 'w:' .. ARGV[1], table.concat(lost, ','))
-- Collected with the key's "q:" (collect() deletes both): a key nobody charges must not stay.
if not noted then redis.call('ZADD', gc, tonumber(ARGV[3]) + tonumber(ARGV[4]), field) end
return done({3})
