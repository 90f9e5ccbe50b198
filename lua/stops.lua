-- stops.lua: make, read, lift and list stops (sidecar.stops); authorize.lua and check.lua
-- read the same hash inside every decision.
-- KEYS[1] stops  hash  "<scope>:<escaped entity>" -> "<id>|<expires_at ms, 0 never>|
--                      <created ms>|<reason>" (reason last: it may hold '|');
--                      "#<id>" -> "<scope>:<escaped entity>" (a lift by id is one lookup)
-- KEYS[2] alerts stream the tenant's alerts: a made stop adds one entry (k = stop)
-- KEYS[3] ctr    hash  the tenant's counters: each stop in force is mirrored there as
--                      "s:<field>" -> the same value, where the decision scripts read it
-- ARGV[1] op: 'create' | 'get' | 'delete' | 'list' | 'restore'
-- ARGV[2] the stops' clock, ms ('' = Redis TIME; below): a stop with 0 < expires_at <= it
--   is over (ignored and collected)
-- create: ARGV[3] field  ARGV[4] id  ARGV[5] ttl ms (0 never)  ARGV[6] reason
--   ARGV[7] scope  ARGV[8] escaped entity  ARGV[9] the most in force (settings.max_stops)
-- get, delete: ARGV[3] id;  restore: ARGV[3] field  ARGV[4] its value (state_loss)
-- Returns: create {1, id it replaced or '', created ms, expires_at ms (0 never)}, or
--   {-1, ''} when the entity has no stop in force and the tenant has ARGV[9] already
--   (nothing written); get {field, value} or {} (none or over); delete {1} if a stop in
--   force was lifted, else {0}; list {field1, value1, ...} of every stop in force; restore
--   {1} put back (or the entity's stop, whose record stayed, mirrored into ctr again: its
--   mirror alone was gone), {0} the entity has a stop again (made since the loss: it
--   stands, mirrored) or this one ended. No lease is touched (no expiry counts).
-- The stops' clock is the limiters' one (limiter_now: Redis TIME, or the sidecar's reading
-- in tests), and a stop's times (created, expires_at = created + ttl) are on it: every
-- decision compares the expiry with the same clock (_lib.lua active_stop), so a replica
-- whose own clock is off by the ttl or more neither ignores a stop another made nor keeps
-- one that ended. It is read only when needed (a create; a stop with an expiry met).
-- One stop per entity: a new one replaces the old (whose "#id" goes). Each call is one
-- script, so no reader ever sees half a stop.
local stops, alerts, ctr = KEYS[1], KEYS[2], KEYS[3]
local op = ARGV[1]
local clock_now  -- the stops' clock, once read
local function now()
  if not clock_now then clock_now = limiter_now(ARGV[2]) end
  return clock_now
end
-- At most this many ended stops collected by one list: a list after a long quiet spell
-- must not block Redis for every stop ever made (the next lists go on).
local COLLECT_MAX = 100

local function parts(value)
  local a = string.find(value, '|', 1, true)
  local b = string.find(value, '|', a + 1, true)
  local c = string.find(value, '|', b + 1, true)
  return string.sub(value, 1, a - 1), tonumber(string.sub(value, a + 1, b - 1)),
    tonumber(string.sub(value, b + 1, c - 1))
end

local function ended(expires)
  return expires > 0 and expires <= now()
end

-- Remove the stop held in `field` (value `value`) and its "#id".
local function forget(field, value)
  local id = parts(value)
  redis.call('HDEL', stops, field)
  redis.call('HDEL', ctr, 's:' .. field)
  if redis.call('HGET', stops, '#' .. id) == field then
    redis.call('HDEL', stops, '#' .. id)
  end
end

-- Whether the tenant has `most` stops in force (collecting the ended ones it meets). Each
-- stop is two fields (its record and its "#id"), so below 2 * most fields it cannot have
-- them: the common case is one HLEN. Otherwise HSCAN steps until `most` are found in
-- force, or the walk ends: the work is the stops in force up to `most` plus the ended ones
-- met (each collected once), not the whole hash of a tenant that had more before the cap.
local function full(most)
  if redis.call('HLEN', stops) < 2 * most then return false end
  local cursor, live = '0', 0
  repeat
    local step = redis.call('HSCAN', stops, cursor, 'COUNT', 200)
    cursor = step[1]
    local fields = step[2]
    for i = 1, #fields, 2 do
      local field, value = fields[i], fields[i + 1]
      if string.sub(field, 1, 1) ~= '#' then
        if ended(select(2, parts(value))) then
          forget(field, value)
        else
          live = live + 1
          if live >= most then return true end
        end
      end
    end
  until cursor == '0'
  return false
end

if op == 'create' then
  local field, id, ttl, reason = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local old = redis.call('HGET', stops, field)
  -- A stop replacing the entity's own in force adds none: allowed at the cap.
  if not (old and not ended(select(2, parts(old)))) and full(tonumber(ARGV[9])) then
    return {-1, ''}
  end
  local replaced = ''
  if old then
    local old_id, old_expires = parts(old)
    if not ended(old_expires) then replaced = old_id end
    forget(field, old)
  end
  local created = now()
  local expires = ttl > 0 and created + ttl or 0
  local value = id .. '|' .. int(expires) .. '|' .. int(created) .. '|' .. reason
  redis.call('HSET', stops, field, value, '#' .. id, field)
  redis.call('HSET', ctr, 's:' .. field, value)
  redis.call('XADD', alerts, 'MAXLEN', '~', ALERTS_MAX, '*',
    'k', 'stop', 'g', id, 's', ARGV[7], 'e', ARGV[8], 'r', reason, 'x', int(expires),
    'at', int(created))
  return {1, replaced, created, expires}
end

if op == 'get' or op == 'delete' then
  local id = ARGV[3]
  local field = redis.call('HGET', stops, '#' .. id)
  if not field then return op == 'get' and {} or {0} end
  local value = redis.call('HGET', stops, field)
  local mine = value and parts(value) == id
  local live = mine and not ended(select(2, parts(value)))
  if op == 'get' then
    return live and {field, value} or {}
  end
  if mine then
    redis.call('HDEL', stops, field)
    redis.call('HDEL', ctr, 's:' .. field)
  end
  redis.call('HDEL', stops, '#' .. id)
  return {live and 1 or 0}
end

if op == 'list' then
  local all = redis.call('HGETALL', stops)
  local out, collected = {}, 0
  for i = 1, #all, 2 do
    local field, value = all[i], all[i + 1]
    if string.sub(field, 1, 1) ~= '#' then
      local _, expires = parts(value)
      if not ended(expires) then
        out[#out + 1] = field
        out[#out + 1] = value
      elseif collected < COLLECT_MAX then
        forget(field, value)
        collected = collected + 1
      end
    end
  end
  return out
end

if op == 'restore' then
  -- As it was (its id, expiry, creation and reason), without a new alert: the loss's
  -- own alert names what was put back.
  local field, value = ARGV[3], ARGV[4]
  local current = redis.call('HGET', stops, field)
  if current then
    -- The entity has a stop (this one, or one made since: it stands). Its mirror alone
    -- may be gone (Redis evicted the counters hash at its maxmemory, the record kept), and
    -- decisions read only the mirror: written again from the record.
    if redis.call('HEXISTS', ctr, 's:' .. field) == 0 and not ended(select(2, parts(current))) then
      redis.call('HSET', ctr, 's:' .. field, current)
      return {1}
    end
    return {0}
  end
  if ended(select(2, parts(value))) then
    return {0}
  end
  redis.call('HSET', stops, field, value, '#' .. parts(value), field)
  redis.call('HSET', ctr, 's:' .. field, value)
  return {1}
end

return redis.error_reply('stops.lua: unknown op ' .. tostring(op))
