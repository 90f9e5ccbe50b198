-- _lib.lua: helpers prepended to every operation script in this folder (not an operation).
-- KEYS and ARGV: none of its own; each operation documents its own, and all of them take
--   KEYS[1] ctr    hash  "u:<cid>" settled micro-USD, "h:<cid>" held micro-USD
--   KEYS[2] lease  zset  reservation id -> lease end (ms)
--   KEYS[3] res    hash  reservation id -> record; "k:<idempotency key>" -> reservation id;
--                        "q:<idempotency key>" -> 'recorded' (record.lua's own key space)
--   KEYS[4] gc     zset  "c:<cid>" | "r:<rid>" | "q:<key>" -> ms after which it may go
-- Returns: nothing; defines the functions below.
--
-- Units: money in integer micro-USD, prices in integer pico-USD per token, time in Unix
-- milliseconds. Lua numbers are doubles: every integer here stays below 2^53.
--
-- Why Lua and not MULTI: a decision reads counters and writes holds depending on what it
-- read; MULTI cannot branch on a read, and WATCH retries collapse under contention.
--
-- A reservation record is one string, fields joined by '|':
--   1 state   H held | E expired (hold already returned) | S settled | R released
--   2 lease end ms   3 estimate   4 input price   5 output price ('' = unpriced)
--   6 idempotency key ('' = none)   7 cids joined by ','   8 final cost
--   9 '1' if the lease had ended before settle/release   10 "u,h,..." counters at finish
--   11 meta: what the sidecar wants back at settle (provider, model, identity), opaque here
--   12 tokens in, 13 tokens out: what settle charged (0 when settled by cost)
-- Identifiers are validated and escaped by the sidecar, so none contains '|' or ','.

local function split(s, sep)
  local out, i = {}, 1
  if s == '' then return out end
  while true do
    local j = string.find(s, sep, i, true)
    if not j then
      out[#out + 1] = string.sub(s, i)
      return out
    end
    out[#out + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end

-- '%d' because tostring() of a double past 1e14 gives "1e+14", which HINCRBY refuses.
local function int(n)
  return string.format('%d', n)
end

-- The cost of `tokens` at `pico` pico-USD per token, rounded up to a micro-USD, exactly:
-- the price is split so that no product exceeds 2^53 (tokens <= 1e8, price <= 1e12).
local function cost_micro(tokens, pico)
  local q = math.floor(pico / 1000000)
  local r = pico - q * 1000000
  local part = tokens * r
  local extra = math.floor(part / 1000000)
  if part - extra * 1000000 > 0 then extra = extra + 1 end
  return tokens * q + extra
end

-- Would adding `est` to a counter pass its limit? A zero estimate asks "is anything left".
local function over(used, held, est, limit)
  if est == 0 then return used + held >= limit end
  return used + held + est > limit
end

-- Return the holds of leases that have ended, each exactly once (the ZREM is in the same
-- script as the HINCRBY). Bounded per call; what is left waits for the next call, and a
-- hold not yet returned only makes decisions stricter, never looser.
local function reclaim(ctr, lease, res, gc, now, keep)
  local due = redis.call('ZRANGEBYSCORE', lease, '-inf', now, 'LIMIT', 0, 32)
  for _, rid in ipairs(due) do
    local rec = redis.call('HGET', res, rid)
    if rec then
      local r = split(rec, '|')
      if r[1] == 'H' then
        local est = tonumber(r[3])
        for _, cid in ipairs(split(r[7], ',')) do
          redis.call('HINCRBY', ctr, 'h:' .. cid, int(-est))  -- -0 would print as "-0"
        end
        r[1] = 'E'
        redis.call('HSET', res, rid, table.concat(r, '|'))
        redis.call('ZADD', gc, now + keep, 'r:' .. rid)
      end
    end
    redis.call('ZREM', lease, rid)
  end
end

-- Delete what has outlived its use: counters of long-past windows, finished reservations
-- and their idempotency keys. Bounded per call, so no call pays for a backlog.
local function collect(ctr, res, gc, now)
  local due = redis.call('ZRANGEBYSCORE', gc, '-inf', now, 'LIMIT', 0, 8)
  for _, member in ipairs(due) do
    local kind, id = string.sub(member, 1, 1), string.sub(member, 3)
    if kind == 'c' then
      redis.call('HDEL', ctr, 'u:' .. id, 'h:' .. id)
    elseif kind == 'q' then
      redis.call('HDEL', res, 'q:' .. id)
    else
      local rec = redis.call('HGET', res, id)
      if rec then
        local key = split(rec, '|')[6]
        if key ~= '' then redis.call('HDEL', res, 'k:' .. key) end
        redis.call('HDEL', res, id)
      end
    end
    redis.call('ZREM', gc, member)
  end
end

-- Read the counters named by `cids`: a flat list u1, h1, u2, h2, ... (0 where absent)
-- and whether each counter existed.
local function read_counters(ctr, cids)
  local values, fresh = {}, {}
  if #cids == 0 then return values, fresh end
  local fields = {}
  for i, cid in ipairs(cids) do
    fields[2 * i - 1] = 'u:' .. cid
    fields[2 * i] = 'h:' .. cid
  end
  local raw = redis.call('HMGET', ctr, unpack(fields))
  for i = 1, #cids do
    local u, h = raw[2 * i - 1], raw[2 * i]
    fresh[i] = (not u) and (not h)
    values[2 * i - 1] = tonumber(u) or 0
    values[2 * i] = tonumber(h) or 0
  end
  return values, fresh
end
