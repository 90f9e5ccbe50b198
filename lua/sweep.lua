-- sweep.lua: the background collection of one tenant (sidecar/sweep.py calls it once per
-- tenant per interval), so that what a tenant wrote goes after its retention even when the
-- tenant sends nothing more. Bounded per call: at most ARGV[5] ended leases, ARGV[6] due
-- gc members, and one HSCAN step of ARGV[4] counter fields.
-- KEYS[1] ctr  KEYS[2] lease  KEYS[3] res  KEYS[4] gc
-- KEYS[5] usage  KEYS[6] alerts  KEYS[7] agg  KEYS[8] uagg  (see _lib.lua; for holds charged at
--   their lease's end by reclaim)
-- KEYS[9] sweep  string  where the walk over ctr is: the HSCAN cursor ('0' or absent: start)
-- KEYS[10] stops  hash  the stop switch's records (lua/stops.lua; see the s: mirror below)
-- ARGV[1] now_ms   ARGV[2] keep_ms   ARGV[3] the rate limiters' and stops' clock ('' = Redis TIME)
-- ARGV[4] fields per HSCAN step   ARGV[5] leases per call   ARGV[6] gc members per call
-- ARGV[7..11] per period letter d, w, m, q, y: the start date (yyyymmdd) of the oldest
--   window whose counters are kept   ARGV[12] the ledger's max age, ms   ARGV[13] the
--   alerts' max age, ms ('' = none)   ARGV[14] '1': the tenant is not configured (below)
-- Returns: {walked, leases_left, deleted, due_left, alerts_dropped}: walked 1 when this
--   call finished a walk over the whole of ctr; leases_left 1 when ended leases still wait; deleted:
--   counter and limiter fields deleted by this call; due_left: gc members (finished
--   reservations, idempotency keys) past their time still waiting, plus one while ledger
--   records past their age may still wait; alerts_dropped: alerts of a tenant that is not
--   configured that no webhook's group had read when their stream went (see below).
-- The sidecar computes ARGV[7..11] so that a window goes only once its end, in any time
-- zone, lies further back than the longest a late settle can still charge it
-- (sidecar/sweep.py).
--
-- The usage ledger's records older than ARGV[12] ('' = none) by their stream ids (Redis
-- time) go here too, at most ARGV[4] whole stream nodes' entries per call: each charge's
-- own entry applies the bound (_lib.lua ledger()), and an idle tenant writes none. The
-- alerts older than ARGV[13] the same way. And the streams themselves, so that a tenant
-- gone idle or out of the config leaves no key for ever (a trimmed stream stays, empty):
-- a stream no consumer group reads (the ledger; the alerts of a tenant without webhooks)
-- expires when its newest entry passes the age (PEXPIRE, set again when it is a minute
-- or more short: new entries keep it on), or goes at once when empty. The alerts that
-- webhooks' groups read are never expired whole (it would delete the groups with what
-- they have not read): past their age they are trimmed, which lua/alert_drops.lua counts
-- as dropped for the groups that had not read them, as it counts the cap's trims. Only a
-- tenant no longer configured, whose groups nobody reads, loses its alerts stream with
-- its groups, whole, once its newest entry is past the age: what its groups had not read
-- is returned as alerts_dropped (the sidecar counts and logs it).
--
-- What goes, found by walking ctr (counters and limiters have no index, which would cost
-- more than what it indexes):
--   u:/h:/a:/c:<cid>  when the cid's window key starts before its letter's cutoff (a
--                  period-total counter's key has no date: its idle time collects it,
--                  through gc)
--   x:<rf>         a usd limiter's alert quiet time, once past
--   s:<stop field>  a stop's mirror past its ttl (lua/stops.lua), and the stop's record
--                  in KEYS[10] with its "#<id>" (a list collects them too, but none may
--                  come)
--   u:/h:/a:/c:/w:<cid> when the cid's window key starts before its letter's cutoff
--                  (w:<cid> sooner: once both its buckets are past, it says nothing),
--                  and no reservation holds it any more (no "h:<cid>" above 0)
--   d:/l:<st>      a rate limiter back at zero (st: "<rf>/<limit>/<window_ms>", one pair per
--                  definition: that of a changed limit goes the same way once paid back):
--                  its debt has been paid back. A limiter pays back `limit` units per
--                  ms (limit >= 1), so a debt of D is zero at the latest D ms after its
--                  last update (and after IDLE_MS in any case)
--   n:<rf>         a concurrency count at zero or below (release deletes it at zero too)
local ctr, lease, res, gc, sweep = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[9]
local now, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local left = reclaim(ctr, lease, res, gc, now, keep, tonumber(ARGV[5]))
collect(ctr, res, gc, now, tonumber(ARGV[6]))

local cutoff = {d = ARGV[7], w = ARGV[8], m = ARGV[9], q = ARGV[10], y = ARGV[11]}
local rnow = limiter_now(ARGV[3])
local cursor = redis.call('GET', sweep) or '0'
local step = redis.call('HSCAN', ctr, cursor, 'COUNT', ARGV[4])
local deleted = 0
local fields = step[2]
for i = 1, #fields, 2 do
  local name, value = fields[i], fields[i + 1]
  local kind, id = string.sub(name, 1, 1), string.sub(name, 3)
  if kind == 'w' and stale_window(value, now) then
    deleted = deleted + redis.call('HDEL', ctr, name)
  elseif kind == 'u' or kind == 'h' or kind == 'a' or kind == 'c' or kind == 'w' then
    local window = string.match(id, '/([^/]*)$') or ''
    local letter, start = string.sub(window, 1, 1), string.sub(window, 2)
    local keep_from = cutoff[letter]
    -- A counter still holding a reservation stays, however old its window: the cutoffs
    -- follow the settings in force, and a reload that shortened max_lease_ms leaves holds
    -- made under the longer lease in flight (their settle or lease end takes the hold off:
    -- a deleted field would go negative). The next walk after their end collects it.
    if keep_from and #start == 8 and start < keep_from
      and ((kind == 'h' and (tonumber(value) or 0) <= 0)
        or (kind ~= 'h' and redis.call('HEXISTS', ctr, 'h:' .. id) == 0)) then
      deleted = deleted + redis.call('HDEL', ctr, name)
    end
  elseif kind == 'd' then
    local debt = tonumber(value) or 0
    local last = tonumber(redis.call('HGET', ctr, 'l:' .. id)) or 0
    if rnow - last >= math.min(debt, IDLE_MS) then
      deleted = deleted + redis.call('HDEL', ctr, name, 'l:' .. id)
    end
  elseif kind == 'l' then
    -- A last-update stamp without its debt (the debt went first in an earlier step).
    if redis.call('HEXISTS', ctr, 'd:' .. id) == 0 then
      deleted = deleted + redis.call('HDEL', ctr, name)
    end
  elseif kind == 'n' then
    if (tonumber(value) or 0) <= 0 then deleted = deleted + redis.call('HDEL', ctr, name) end
  elseif kind == 'x' then
    if (tonumber(value) or 0) <= now then deleted = deleted + redis.call('HDEL', ctr, name) end
  elseif string.sub(name, 1, 2) == 's:' then
    -- A stop's mirror past its ttl, and the same stop's record (a stop made since for the
    -- entity has another value, and stays).
    local id, expires = string.match(value, '^([^|]*)|([^|]*)|')
    expires = tonumber(expires) or 0
    if expires > 0 and expires <= rnow then  -- the stops' clock (_lib.lua active_stop)
      deleted = deleted + redis.call('HDEL', ctr, name)
      local field = string.sub(name, 3)
      if redis.call('HGET', KEYS[10], field) == value then
        redis.call('HDEL', KEYS[10], field)
        if redis.call('HGET', KEYS[10], '#' .. id) == field then
          redis.call('HDEL', KEYS[10], '#' .. id)
        end
      end
    end
  end
end
local next_cursor = step[1]
if next_cursor == '0' then
  redis.call('DEL', sweep)
else
  redis.call('SET', sweep, next_cursor)
end
local due_left = redis.call('ZCOUNT', gc, '-inf', now)

-- Trim `stream`'s entries older than `age` ms of Redis time `rtime`: whole stream nodes
-- first (at most ARGV[4] entries), then, once no whole node is past the age, the old
-- entries of the node holding the boundary: bounded by a node's size. True while more
-- may wait.
local function trim_by_age(stream, age, rtime)
  local oldest = rtime - age
  if oldest <= 0 then return false end
  local minid = int(oldest)
  if redis.call('XTRIM', stream, 'MINID', '~', minid, 'LIMIT', ARGV[4]) > 0 then return true end
  redis.call('XTRIM', stream, 'MINID', minid)
  return false
end

-- The stream goes when its newest entry is `age` ms old (see the header): gone now if
-- empty, else a time to live set to that (again once it is a minute or more short).
local function expire_by_age(stream, age, rtime)
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if not newest then
    redis.call('DEL', stream)
    return
  end
  local ttl = math.max(tonumber(string.match(newest[1], '^(%d+)')) + age - rtime, 1)
  local kept = redis.call('PTTL', stream)
  if kept < 0 or kept < ttl - 60000 then redis.call('PEXPIRE', stream, int(ttl)) end
end

local alerts_dropped = 0
local usage_age, alerts_age = tonumber(ARGV[12] or ''), tonumber(ARGV[13] or '')
if (usage_age or alerts_age) then
  local t = redis.call('TIME')
  local rtime = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if usage_age and redis.call('EXISTS', KEYS[5]) == 1 then
    if trim_by_age(KEYS[5], usage_age, rtime) then due_left = due_left + 1 end
    expire_by_age(KEYS[5], usage_age, rtime)
  end
  if alerts_age and redis.call('EXISTS', KEYS[6]) == 1 then
    local groups = redis.call('XINFO', 'GROUPS', KEYS[6])
    if #groups > 0 and ARGV[14] == '1' then
      -- Nobody reads these groups any more: the stream is kept whole (a partial trim would
      -- leave Redis unable to say what a group that never read had not read) until its
      -- newest entry is past the age, then goes with its groups, and what each had not read
      -- is told, as lua/alert_drops.lua tells it per group.
      local newest = redis.call('XREVRANGE', KEYS[6], '+', '-', 'COUNT', 1)[1]
      if not newest or tonumber(string.match(newest[1], '^(%d+)')) <= rtime - alerts_age then
        for _, g in ipairs(groups) do
          local f = {}
          for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
          if type(f['lag']) == 'number' then
            alerts_dropped = alerts_dropped + f['lag']
          else
            alerts_dropped = alerts_dropped
              + #redis.call('XRANGE', KEYS[6], '(' .. f['last-delivered-id'], '+')
          end
        end
        redis.call('DEL', KEYS[6])
      end
    else
      if trim_by_age(KEYS[6], alerts_age, rtime) then due_left = due_left + 1 end
      if #groups == 0 then expire_by_age(KEYS[6], alerts_age, rtime) end
    end
  end
end
return done({next_cursor == '0' and 1 or 0, left and 1 or 0, deleted, due_left, alerts_dropped})
