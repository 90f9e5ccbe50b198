-- settle_lost.lua: a settle call whose answer was lost (Redis did not answer within the
-- timeout: its caller was told 503, "repeat it") may still have charged the reservation;
-- its sidecar sends this in the background so that the spend metrics count that charge
-- exactly once. The answer to a repeat of the settle is "replayed", which the metrics do
-- not count (the first answer did): the attempt that charged is found here instead.
-- KEYS[1] res (see _lib.lua)
-- ARGV[1] reservation id   ARGV[2] the lost settle call's attempt id (settle.lua ARGV[14])
-- Returns: {status, ...}
--   4 then the settle.lua result (its first result): that attempt charged it, nobody counted
--     it: the caller counts it now (record field 28 becomes "<id>!", so that a repeat of
--     this call, whose own answer was lost, answers 4 again and no other call does); or
--     charged by an attempt known lost that nobody counted yet ('?'): this lost attempt,
--     a repeat of the settle, would have counted it had Redis run it first, and may run
--     after this search or never, so the search counts it (a settle that finds "<id>!"
--     answers 2);
--   3: not charged yet (held, or its lease ended unsettled): the attempt is noted lost
--     (record field 28 '~<id>'), so that if Redis runs it later, the next settle of the
--     reservation counts its charge (settle.lua status 4);
--   2: charged by another attempt, or released: nothing to count here;
--   0: no such reservation.
local res = KEYS[1]
local rid, attempt = ARGV[1], ARGV[2]
-- How many lost attempts an unsettled record notes (more only come from a client that
-- repeats a settle many times while Redis is slow; the oldest are forgotten).
local MAX_LOST = 8

local rec = redis.call('HGET', res, rid)
if not rec or string.sub(rid, 1, 2) == 'k:' or attempt == '' then return done({0}) end
local r = parse_record(rec)
for i = #r + 1, 28 do r[i] = '' end
if r[1] == 'S' and (r[28] == attempt or r[28] == attempt .. '!' or r[28] == '?') then
  if r[28] ~= attempt .. '!' then
    r[28] = attempt .. '!'
    redis.call('HSET', res, rid, table.concat(r, '|'))
  end
  local out = first_result(r)
  out[1] = 4
  return done(out)
end
if r[1] == 'H' or r[1] == 'E' then
  local lost = split(r[28], ',')
  for _, a in ipairs(lost) do
    if a == '~' .. attempt then return done({3}) end
  end
  lost[#lost + 1] = '~' .. attempt
  if #lost > MAX_LOST then table.remove(lost, 1) end
  r[28] = table.concat(lost, ',')
  redis.call('HSET', res, rid, table.concat(r, '|'))
  return done({3})
end
return done({2})
