-- definition_create.lua: store a new definition (a budget, a rate limit or a price the
-- admin API makes) unless the tenant has one of that id, or already has the most of its
-- kind.
--
-- KEYS[1]  bs:{T}:defs, the tenant's definitions hash
-- ARGV[1]  the field ("b:<id>", "rl:<id>", "p:<provider>/<model>")
-- ARGV[2]  the value
-- ARGV[3]  the kind's field prefix ("b:", "rl:", "p:")
-- ARGV[4]  the most definitions of that kind the tenant may have (settings.max_api_definitions)
-- ARGV[5]  '1': an existing field is replaced (a price's PUT), whatever the count; absent
--          or '': an existing field is left as it is
--
-- Returns 1: written; 0: the field exists (nothing written); 2: the field existed and was
-- replaced (ARGV[5] '1'); -1: the tenant has ARGV[4] of the kind already (nothing written).
--
-- Why: every decision of a tenant evaluates its budgets and limits in one script, which
-- blocks Redis for every tenant while it runs (about 7 us per organization budget; past a
-- few thousand the script cannot even unpack them). One key: atomic in a Redis Cluster
-- too, so replicas creating at once cannot pass the most between them. Counting is O(N) in
-- the hash, off the hot path. Not prefixed with _lib.lua (scripts.standalone).
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  if ARGV[5] ~= '1' then return 0 end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 2
end
local prefix, most, n = ARGV[3], tonumber(ARGV[4]), 0
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix then
    n = n + 1
    if n >= most then return -1 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
