-- state_marker.lua: read and advance one slot's state marker (sidecar.state_loss), off the
-- hot path: every sidecar's check runs it on each marker every few seconds.
--
-- KEYS[1]  bs:{T}:epoch (or bs:{defs}:epoch), a hash: id -> the slot's random id,
--          gen -> its generation, one more at every check of every sidecar
-- ARGV[1]  the marker's expiry (s), pushed out by every check
-- ARGV[2]  a fresh id: the marker's if it is absent (written with generation 1), or its
--          replacement when ARGV[3] matches
-- ARGV[3]  '' (a check), or the id a sidecar found rolled back: if the marker still holds
--          it, it takes ARGV[2] instead, so every other sidecar finds the id changed
-- ARGV[4]  '1': an absent marker stays absent, Returns {'', 0, 0} (see the end)
-- Returns {id, generation, created}: the id and generation the marker holds now; created 1
-- when this call wrote a marker that was absent.
--
-- ARGV[4] '1' is a check's for a marker its sidecar knew: gone, the slot lost its state,
-- and the sidecar writes the marker again (ARGV[4] '') only once it has put the stops
-- back, so the decisions that name the marker meanwhile find it gone and wait for that.
--
-- Why a generation: a Redis restored from an older dump (a backup, a replica far behind)
-- holds the same id as before, but the generation it had when the dump was taken, lower
-- than one a sidecar that checked since saw. Generations only grow, by one per check, so
-- another sidecar's checks never look like going back. A marker of an older sidecar (a
-- string: the id alone) becomes a hash with generation 1, keeping its id. One key:
-- atomic in a Redis Cluster too. Not prefixed with _lib.lua (scripts.standalone).
local marker, ttl, fresh, replace = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local kind = redis.call('TYPE', marker)['ok']
local id, gen = false, 0
if kind == 'hash' then
  id = redis.call('HGET', marker, 'id')
  gen = tonumber(redis.call('HGET', marker, 'gen') or '0') or 0
elseif kind == 'string' then
  id = redis.call('GET', marker)
  redis.call('DEL', marker)
elseif kind ~= 'none' then
  return redis.error_reply('state marker ' .. marker .. ' is a ' .. kind)
end
local created = 0
if not id and ARGV[4] == '1' then
  return {'', 0, 0}
end
if not id then
  id, gen, created = fresh, 0, 1
elseif replace ~= '' and id == replace then
  id = fresh
end
gen = gen + 1
redis.call('HSET', marker, 'id', id, 'gen', gen)
redis.call('EXPIRE', marker, ttl)
return {id, gen, created}
