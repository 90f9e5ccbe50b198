-- definition_put.lua: replace one stored definition (a budget or a rate limit the admin API
-- made) only if it is still there and, given the value read, still that value.
--
-- KEYS[1]  bs:{T}:defs, the tenant's definitions hash
-- ARGV[1]  the field ("b:<id>", "rl:<id>")
-- ARGV[2]  the value read before the change ('': whatever the field holds)
-- ARGV[3]  the new value
--
-- Returns 1: written; 0: the field changed since it was read (nothing written);
--        -1: the field is gone (nothing written).
--
-- Why: a replica whose copy lags (it has not yet seen another replica's delete, re-create
-- or update) must not bring a deleted definition back, nor write stale fields over a newer
-- write (sidecar/definitions.py, DefinitionStore.merge_budget). One key: atomic in a Redis
-- Cluster too. Not prefixed with _lib.lua (scripts.standalone): it shares nothing with it.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return -1 end
if ARGV[2] ~= '' and current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
