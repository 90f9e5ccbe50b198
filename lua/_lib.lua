-- _lib.lua: helpers prepended to every operation script in this folder (not an operation).
-- KEYS and ARGV: none of its own; each operation documents its own (below: what all take).
-- Returns: nothing; defines the functions below. Every operation's reply ends with two
-- extra elements, after those its header lists: how many leases this call found ended with
-- their hold still in place, and how many of those it charged (record field 22), each
-- counted exactly once, for the expiry metrics. When it charged some, one more element comes
-- before those two: an array of "provider\31model\31cost" (micro-USD), one per charge, so
-- the spend metrics count what a lease's end charged as they count a settle.
--   KEYS[1] ctr    hash  "u:<cid>" settled micro-USD, "h:<cid>" held micro-USD,
--                        "c:<cid>" calls (budgets with a call cap);
--                        rate limiters: "d:<rf>/<limit>/<window_ms>" debt and
--                        "l:<rf>/<limit>/<window_ms>" last update (ms), one pair per
--                        definition (sidecar/keys.py limiter_state),
--                        "n:<rf>" reservations in flight, "x:<rf>" (usd limiters) ms
--                        until which a trip is not alerted again
--   KEYS[2] lease  zset  reservation id -> lease end (ms)
--   KEYS[3] res    hash  reservation id -> record; "k:<idempotency key>" -> reservation id;
--                        "q:<idempotency key>" -> its attempt, "w:<idempotency key>" ->
--                        attempts lost before it charged (record.lua's own key space)
--   KEYS[4] gc     zset  "r:<rid>" | "q:<key>" -> ms after which it may go; "c:<cid>"
--                        a period-total counter, due its idle time after its last call.
--                        Calendar counters and
--                        rate limiter fields have no index: sweep.lua walks ctr (HSCAN)
--                        and deletes what is past its window or idle. ("c:", "t:", "n:"
--                        members written before that are still collected.)
-- The scripts that charge (settle, record) also take
--   KEYS[5] usage  stream the usage ledger: one entry per charge (see ledger())
--   KEYS[6] alerts stream threshold alerts (see check_alerts())
--   KEYS[7] agg    hash  the current UTC day's usage totals (see ledger())
--   KEYS[8] uagg   hash  the current UTC day's per-user totals (see ledger())
-- ctr also holds "a:<cid>": the thresholds of that counter already alerted, '.'-joined
-- ('f' among them: its forecast alert), and "w:<cid>": its recent spend, "k:cur:prev"
-- (see window_next; read by the decisions and status for the forecast; a period-total
-- counter, which has no forecast, keeps none).
--
-- Units: money in integer micro-USD, prices in integer pico-USD per token, time in Unix
-- milliseconds. Lua numbers are doubles, exact below 2^53 (9.007e15). What keeps them there:
-- the sidecar bounds each amount (a cost or an estimate given in dollars at most 1e12, one
-- priced from tokens at most 2e14: 1e8 tokens each way at 1e12 pico-USD a token; limits at
-- most 1e15); the sums nothing caps (the settled spend of a warn budget or of /v1/record,
-- the usage aggregates, the recent-spend windows) saturate at COUNTER_MAX (add_capped);
-- rate limiter debts are bounded (see the GCRA note). Not bounded here: a warn budget's
-- held amount, the sum of the estimates in flight, which Redis keeps exact (HINCRBY of
-- integer text) and Lua reads rounded once over 2^53 (more than 40 holds of the largest
-- estimate at once), for the figures it reports only; and the products a comparison makes
-- (a threshold times a limit in check_alerts, a forecast), which may pass 2^53 and then
-- decide within a relative 1e-16.
--
-- Why Lua and not MULTI: a decision reads counters and writes holds depending on what it
-- read; MULTI cannot branch on a read, and WATCH retries collapse under contention.
--
-- A reservation record is one string, fields joined by '|':
--   1 state   H held | E expired (hold already returned) | S settled | R released
--   2 lease end ms   3 estimate   4 input price   5 output price ('' = unpriced)
--   6 idempotency key ('' = none)   7 cids joined by ','   8 final cost
--   9 '1' if the lease had ended before settle/release   10 "u,h,..." counters at finish
--   11 meta: the call's ledger tuple, unit-separator (\31) joined: provider, model, org,
--      team, agent, workflow, user, step, run (run last: aggregates leave it out)
--   12 tokens in, 13 tokens out: what settle charged (0 when settled by cost)
--   14 concurrency fields it holds a slot of, joined by ','
--   15 token limiters it charged, 'rf:limit:window_ms' joined by ','
--   16 the token estimate those were charged
--   17 per cid (same order, ';'-joined) "limit:t1.t2...:mode": the budget's limit, alert
--      thresholds (percent) and mode ('b' | 'w' | 'd') at authorize, for the alerts and
--      the overshoot settle reports
--   18 the request's fingerprint: what an idempotency key is bound to ('' = no key)
--   19 '1' once a retry was handed this reservation (a cancel then leaves it alone)
--   20 overshoot: micro-USD of this settle's spend past the cap of its block budgets
--   21 what priced the charge: 't' tokens, 'c' a given cost, 'e' the held estimate
--   22 at the lease's end unsettled: 'c' charge the estimate (a proxied call nobody
--      settles did spend) | '' return the hold
--   23 the ledger config at authorize (see ledger()), for a charge at the lease's end
--   24 the learned-estimate series this call teaches when settled ('' = none; see learn())
--   25 the cids whose call count this call raised, ',' joined (release lowers them)
--   26 usd rate limiters it charged, 'rf:limit:window_ms' joined by ',' (settle corrects
--      them to the cost, release gives the estimate back), in USD_UNIT micro-USD units
--   27 the handouts of this reservation whose answer may have been delivered, ',' joined:
--      '*' its authorize, and the last 12 hex digits of each retry's own reservation id
--      that was handed it (authorize.lua verdict 2); a cancel (release.lua ARGV[4]) takes
--      its handout out, and the last one out releases it. '' = '*' alone (no retry was
--      handed it), or, with field 19 set, a record whose handouts are not known: a retry
--      was handed it by a version that kept none, or by more retries than it counts
--      (MAX_HANDOUTS): then no cancel releases it.
--   28 the spend metrics' count of this reservation's charge (settle.lua ARGV[14], each
--      settle call's attempt id): before the settle, the attempts whose answers were lost
--      before Redis ran them (settle_lost.lua), each as '~<id>', ',' joined; once settled
--      by settle.lua (a charge at the lease's end leaves it as it was), the attempt whose
--      answer counts the charge ('' = the answer counts it, a record of a version that kept
--      no attempt), that id and '!' when its answer was lost and its own sidecar counts it
--      (settle_lost.lua), '?' when nobody has counted it yet: the next settle of it does, or
--      the search for a lost one (settle_lost.lua).
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

-- A reservation record's fields (see the record layout above): one pattern of 28
-- captures (a literal: built at run time it would cost each call) instead of a split: a decision parses a record at every settle, release and
-- ended lease, and a split of 28 fields costs more than the rest of a settle's Lua. A
-- record of another length (a cancel's placeholder) is split.
local RECORD_PATTERN = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$'  -- RECORD_FIELDS captures
local function parse_record(rec)
  local r = {string.match(rec, RECORD_PATTERN)}
  if #r == 0 then return split(rec, '|') end
  return r
end

-- '%d' because tostring() of a double past 1e14 gives "1e+14", which HINCRBY refuses.
local function int(n)
  return string.format('%d', n)
end

-- Every sum of spend or tokens that nothing caps (a warn budget's or a /v1/record's
-- counter, a warn budget's hold, the usage aggregates, a recent-spend window) saturates at COUNTER_MAX
-- micro-USD ($8e9; tokens likewise): past every limit (at most $1e9) and below 2^53 with
-- any one charge on top (at most 2e14: 2 x 1e8 tokens at $1 a token), so Lua reads it
-- exactly; and far below 2^63, where HINCRBY answers an error, which in a script that has
-- written something already is a partial write. README "Limits of the numbers".
local COUNTER_MAX = 8000000000000000
local COUNTER_MAX_TEXT = '8000000000000000'

-- HINCRBY of a non-negative `amount` that saturates at COUNTER_MAX: the field ends at
-- min(value + amount, COUNTER_MAX), and no overflow error can stop the script half-way
-- (one written before this version past the maximum is brought back to it). Returns the
-- value after. pcall only to catch the overflow: any other error is raised as it was.
local function add_capped(key, field, amount)
  local v = redis.pcall('HINCRBY', key, field, amount)
  if type(v) == 'table' and not string.find(v.err or '', 'overflow', 1, true) then
    error(v)
  end
  if type(v) == 'number' and v <= COUNTER_MAX then return v end
  redis.call('HSET', key, field, COUNTER_MAX_TEXT)
  return COUNTER_MAX
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

-- Rate limits: GCRA kept as an integer "debt" per limiter. A limiter of `limit` units per
-- `window` ms adds cost * window to its debt per admitted call and pays back `limit` per
-- ms; a call is admitted while the debt is at most burst * window. Why GCRA: it is exact
-- (integers only, no approximation of a sliding window), needs two fields per limiter
-- whatever the traffic, and its bound is simple: at most limit + burst requests in ANY
-- interval of `window` ms. For tokens the last admitted call may carry the debt past the
-- bound by its own size. Debts stay below 2^53: the sidecar refuses limit * window > 1e15.
local IDLE_MS = 4 * 86400000  -- a limiter unused this long is back at zero: collectable

-- The limiters' clock: Redis TIME, the one clock every replica shares (so a limiter sees
-- calls in the order Redis runs them), unless the sidecar passes one (tests).
local function limiter_now(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function decayed(debt, last, now, limit)
  if debt <= 0 then return 0 end
  local elapsed = now - last
  if elapsed <= 0 then return debt end
  if elapsed > debt / limit + 1 then return 0 end
  local d = debt - elapsed * limit
  if d < 0 then return 0 end
  return d
end

-- Whether a limiter would refuse a call of `cost` now, how many units it has left
-- (requests: calls; tokens: whether the next call passes), ms until it admits again (-1:
-- not by waiting), and the limiter's debt now.
local function rate_eval(metric, a, b, now, limit, window, burst, cost)
  if metric == 't' and cost > limit + burst then
    return true, 0, -1, 0  -- larger than the limiter ever admits: never
  end
  if metric == 'u' then
    -- Dollars are strict: a call is admitted only if it fits whole, debt + cost * window
    -- <= burst * window, so the dollars admitted in ANY interval of `window` ms stay
    -- below limit + burst (no call's own size on top, as for tokens). A call above burst
    -- is never admitted. `left`: units that still fit now.
    if cost > burst then return true, 0, -1, 0 end
    local debt = decayed(tonumber(a) or 0, tonumber(b) or now, now, limit)
    local need = debt + cost * window - burst * window
    if need > 0 then return true, 0, math.ceil(need / limit), debt end
    return false, math.floor(-need / window), 0, debt
  end
  if metric == 'c' then
    local n = tonumber(a) or 0
    local left = limit + burst - n
    if left <= 0 then return true, 0, -1 end
    return false, left, 0
  end
  local debt = decayed(tonumber(a) or 0, tonumber(b) or now, now, limit)
  local room = burst * window - debt
  if room < 0 then
    return true, 0, math.ceil(-room / limit), debt
  end
  return false, math.floor(room / window) + 1, 0, debt
end

-- The rate limits in ARGV from `first` on (six values each: rf, metric, limit, window_ms,
-- burst, shadow), `count` of them (nil: to the end of ARGV), appending the two hash fields
-- each one reads to `fields` (nil: the caller has them).
local function rate_args(first, fields, count)
  local rates = {}
  local last = count and (first + 6 * count - 1) or #ARGV
  for i = first, last, 6 do
    local rf, metric = ARGV[i], ARGV[i + 1]
    rates[#rates + 1] = {
      rf = rf, metric = metric, limit = tonumber(ARGV[i + 2]), window = tonumber(ARGV[i + 3]),
      burst = tonumber(ARGV[i + 4]), shadow = ARGV[i + 5] == '1',
    }
    if not fields then
      -- the caller was given the field names
    elseif metric == 'c' then
      fields[#fields + 1] = 'n:' .. rf
      fields[#fields + 1] = 'n:' .. rf
    else
      local state = rf .. '/' .. ARGV[i + 2] .. '/' .. ARGV[i + 3]  -- as correct_tokens
      fields[#fields + 1] = 'd:' .. state
      fields[#fields + 1] = 'l:' .. state
    end
  end
  return rates
end

-- A slot count back at zero is deleted at once (absent reads as 0): no index needed.
local function free_slots(ctr, fields)
  if fields == nil or fields == '' then return end
  for _, rf in ipairs(split(fields, ',')) do
    if redis.call('HINCRBY', ctr, 'n:' .. rf, -1) <= 0 then redis.call('HDEL', ctr, 'n:' .. rf) end
  end
end

-- Take `est` off a counter's hold; a hold back at zero is deleted (absent reads as 0), so
-- a settled counter is one field, not two. Returns the hold left. A hold that saturated at
-- COUNTER_MAX (a warn budget's, authorize.lua) got less than its holds' sum: it ends at
-- zero, never below.
local function unhold(ctr, cid, est)
  local h = redis.call('HINCRBY', ctr, 'h:' .. cid, int(-est))  -- int: -0 prints "-0"
  if h <= 0 then
    redis.call('HDEL', ctr, 'h:' .. cid)
    h = 0
  end
  return h
end

-- Correct the token limiters a reservation charged by `diff` tokens (actual - estimate);
-- the usd limiters the same way, by `diff` USD units. Each entry is "rf:limit:window_ms"
-- as authorize charged it, and the fields corrected are that definition's own
-- ("d:<rf>/<limit>/<window_ms>", sidecar/keys.py limiter_state): a debt is in units of
-- its window and paid back at its limit, so a hold made before its limit was changed
-- corrects the old limiter, at the scale it was charged, and never the changed one.
local function correct_tokens(ctr, entries, diff, now)
  if entries == nil or entries == '' or diff == 0 then return end
  for _, entry in ipairs(split(entries, ',')) do
    local parts = split(entry, ':')
    local rf, limit, window = parts[1], tonumber(parts[2]), tonumber(parts[3])
    rf = rf .. '/' .. parts[2] .. '/' .. parts[3]
    local raw = redis.call('HMGET', ctr, 'd:' .. rf, 'l:' .. rf)
    local last = tonumber(raw[2]) or now
    local debt = decayed(tonumber(raw[1]) or 0, last, now, limit)
    debt = debt + diff * window
    if debt < 0 then debt = 0 end
    if debt > 4e15 then debt = 4e15 end  -- an absurd actual count must not pass 2^53
    redis.call('HSET', ctr, 'd:' .. rf, int(debt), 'l:' .. rf, int(math.max(now, last)))
  end
end

-- `now` as Redis takes it: the script's ARGV[1] where that is what it is (every operation
-- passes now_ms first), so no call formats it; a Lua number given to redis.call is
-- formatted with "%.17g" on every call.
local function now_text(now)
  if tonumber(ARGV[1]) == now then return ARGV[1] end
  return int(now)
end

local reclaimed_now = 0  -- leases this call found ended (see the header)
local charged_now = 0  -- of those, the ones charged their estimate
local charged_costs = {}  -- and what each charged (see the header)

-- Every reply goes out through done(): the expiry counts are its last two elements.
local function done(out)
  if charged_now > 0 then out[#out + 1] = charged_costs end
  out[#out + 1] = reclaimed_now
  out[#out + 1] = charged_now
  return out
end

-- The state marker (sidecar/state_loss.py): a decision names it as its last KEY, after
-- its `named` others, once the sidecar has seen it written. Gone means Redis lost its state
-- (restarted empty, flushed) since: the decision answers LOST (alone) and changes nothing,
-- and the sidecar puts back what it can (the stops, which live in ctr) before it asks
-- again, so no call passes a stop in the seconds before the background check would notice.
-- Only a key named as a marker is one: a caller may pass the learned estimates' hash to
-- a call that does not learn (keys.TenantKeys.learning), and that key must stay unread.
local LOST = -8
local function state_lost(named)
  local marker = KEYS[named + 1]
  return marker ~= nil and string.sub(marker, -6) == ':epoch'
    and redis.call('EXISTS', marker) == 0
end

-- Return the holds of leases that have ended, each exactly once (the ZREM is in the same
-- script as the HINCRBY). Bounded per call (RECLAIM_BATCH) so that no decision pays for a
-- backlog; returns true when ended leases are left over. Scripts that decide or report
-- counters then answer BACKLOG instead, and the sidecar drains the rest with reclaim.lua
-- before asking again: no decision counts a hold whose lease has ended.
local RECLAIM_BATCH = 32
local RECLAIM_LIMIT = '33'  -- RECLAIM_BATCH + 1, as text
local BACKLOG = -9
local charge_at_end  -- defined after ledger(), which it uses

-- End one held reservation (record `r`, parsed) whose lease has ended, as reclaim does:
-- its slots freed, its hold returned (state E) or, asked for (record field 22), charged
-- (state S); `r` is updated in place. The caller removes its lease entry.
local function end_lease(ctr, res, gc, rid, r, now, keep)
  free_slots(ctr, r[14])
  reclaimed_now = reclaimed_now + 1
  if r[22] == 'c' and KEYS[7] then
    charge_at_end(ctr, rid, r, now)
  else
    local est = tonumber(r[3])
    for _, cid in ipairs(split(r[7], ',')) do unhold(ctr, cid, est) end
    r[1] = 'E'
  end
  redis.call('HSET', res, rid, table.concat(r, '|'))
  redis.call('ZADD', gc, now + keep, 'r:' .. rid)
end

local function reclaim(ctr, lease, res, gc, now, keep, batch)
  batch = batch or RECLAIM_BATCH
  local due = redis.call('ZRANGEBYSCORE', lease, '-inf', now_text(now), 'LIMIT', '0',
    batch == RECLAIM_BATCH and RECLAIM_LIMIT or int(batch + 1))
  for n, rid in ipairs(due) do
    if n > batch then return true end
    local rec = redis.call('HGET', res, rid)
    if rec then
      local r = parse_record(rec)
      if r[1] == 'H' then end_lease(ctr, res, gc, rid, r, now, keep) end
    end
    redis.call('ZREM', lease, rid)
  end
  return false
end

-- A release of a hold whose lease ended and asked to be charged (record field 22), that
-- reclaim has not come to yet (it takes RECLAIM_BATCH a call): charged now, as reclaim
-- would have, so what a release finds does not depend on the backlog ahead of it.
-- Returns true when it ended the hold (the release then answers its first result).
local function charge_if_ended(ctr, lease, res, gc, rid, r, now, keep)
  if r[1] ~= 'H' or r[22] ~= 'c' or not KEYS[7] or tonumber(r[2]) > now then return false end
  end_lease(ctr, res, gc, rid, r, now, keep)
  redis.call('ZREM', lease, rid)
  return true
end

-- Delete what has outlived its use: counters of long-past windows, finished reservations
-- and their idempotency keys. Bounded per call, so no call pays for a backlog.
local function collect(ctr, res, gc, now, batch)
  local due = redis.call('ZRANGEBYSCORE', gc, '-inf', now_text(now), 'LIMIT', '0',
    batch and int(batch) or '8')
  for _, member in ipairs(due) do
    local kind, id = string.sub(member, 1, 1), string.sub(member, 3)
    if kind == 'c' then
      if redis.call('HEXISTS', ctr, 'h:' .. id) == 1 then
        -- A period-total counter still holding a call: not idle yet.
        redis.call('ZADD', gc, now + 60000, member)
        member = nil
      else
        redis.call('HDEL', ctr, 'u:' .. id, 'h:' .. id, 'a:' .. id, 'c:' .. id)
      end
    elseif kind == 't' then
      local last = tonumber(redis.call('HGET', ctr, 'l:' .. id))
      if last and now - last < IDLE_MS then
        redis.call('ZADD', gc, last + IDLE_MS, member)
      else
        redis.call('HDEL', ctr, 'd:' .. id, 'l:' .. id)
        redis.call('ZREM', gc, member)
      end
    elseif kind == 'n' then
      local n = tonumber(redis.call('HGET', ctr, 'n:' .. id))
      if n and n > 0 then
        redis.call('ZADD', gc, now + IDLE_MS, member)
      else
        redis.call('HDEL', ctr, 'n:' .. id)
        redis.call('ZREM', gc, member)
      end
    elseif kind == 'q' then
      redis.call('HDEL', res, 'q:' .. id, 'w:' .. id)
    else
      local rec = redis.call('HGET', res, id)
      if rec then
        local key = string.match(rec, '^[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|([^|]*)') or ''
        -- Only while the key still names this reservation: a cancel frees the key
        -- (release.lua), and a retry's reservation may hold it by now.
        if key ~= '' and redis.call('HGET', res, 'k:' .. key) == id then
          redis.call('HDEL', res, 'k:' .. key)
        end
        redis.call('HDEL', res, id)
      end
    end
    if member and kind ~= 't' and kind ~= 'n' then redis.call('ZREM', gc, member) end
  end
end

-- The reply settle.lua and release.lua give for a reservation already finished: its first
-- result, unchanged (status 2; see their Returns).
local function first_result(r)
  -- `or 0` everywhere: a cancel's record of an authorize not yet run ('R|0|0||||||0|',
  -- release.lua) has no cost; a nil would cut the reply there (Lua tables end at a nil).
  local out = {2, r[1], tonumber(r[8]) or 0, tonumber(r[3]) or 0, tonumber(r[9]) or 0, r[7],
    r[11] or '',
    tonumber(r[12]) or 0, tonumber(r[13]) or 0, tonumber(r[20]) or 0, r[21] or ''}
  for _, v in ipairs(split(r[10], ',')) do out[#out + 1] = tonumber(v) end
  return out
end

-- A budget's spec in record field 17: limit, alert thresholds, mode, and (a budget with
-- forecast_alert) its period window start and end ms: "limit:t1.t2:mode[:start:end]".
local function parse_spec(spec)
  -- One pattern, not a split: settle parses a spec per budget per call.
  local limit, thresholds, mode, fstart, fend =
    string.match(spec or '', '^([^:]*):([^:]*):([^:]*):?([^:]*):?([^:]*)')
  return tonumber(limit), thresholds or '', (mode ~= nil and mode ~= '') and mode or 'b',
    tonumber(fstart), tonumber(fend)
end

-- A budget's forecast-alert window as authorize and record take it, "start_ms:end_ms" (''
-- or anything else: no forecast alert; that slot once carried an unused gc time), as the
-- suffix of its spec.
local function forecast_suffix(arg)
  if arg and string.find(arg, ':', 1, true) then return ':' .. arg end
  return ''
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

-- Threshold alerts of one counter whose settled amount went from `before` to `after`
-- (micro-USD), for a budget of `limit` with `thresholds` ("t1.t2...", percent). A charge
-- alerts every threshold t with t% of limit <= after not alerted yet: crossed by this
-- charge, or already passed when a reload lowered the limit under the spend (no later
-- charge crosses it then, and the 100% alert of a budget past its new limit would never
-- come). Each (counter, threshold) alerts at most once, and a counter id names budget,
-- entity and period window, so that is once per budget, entity, period and threshold
-- however many calls cross together (they run one at a time here).
local ALERTS_MAX = 10000
local function check_alerts(ctr, stream, cid, limit, thresholds, before, after, now)
  if after <= before or not limit or limit <= 0 or thresholds == '' then return end
  -- The sidecar sorts the thresholds: nothing below the lowest one is crossed (the
  -- common case, worth one pattern instead of a loop over them).
  if after * 100 < tonumber(string.match(thresholds, '^%d+')) * limit then return end
  local fired
  for t in string.gmatch(thresholds, '[^.]+') do
    local at = tonumber(t) * limit / 100
    if at <= after then
      fired = fired or (redis.call('HGET', ctr, 'a:' .. cid) or '')
      if not string.find('.' .. fired .. '.', '.' .. t .. '.', 1, true) then
        fired = (fired == '') and t or (fired .. '.' .. t)
        redis.call('HSET', ctr, 'a:' .. cid, fired)
        redis.call('XADD', stream, 'MAXLEN', '~', ALERTS_MAX, '*',
          'cid', cid, 't', t, 'l', int(limit), 'u', int(after), 'at', int(now))
      end
    end
  end
end

-- The threshold alerts a denial sees: for each budget of `seen` ({cid, limit, thresholds
-- as check_alerts, settled, held}), every threshold its committed spend (settled + held
-- micro-USD) has passed that has not alerted yet in its counter (the same "a:<cid>" marks:
-- once per counter, threshold and window, whoever raises it). Why at a denial: no charge
-- follows a denied call, so a limit lowered under the spend (a reload, an admin PUT) or a
-- budget filled by holds would turn every call away without its 100% alert ever being
-- sent. Entries carry the held part as "h" (the alert says how much of it is held). Only
-- the denial path calls this: one HMGET of the marks when some budget passed its lowest
-- threshold, no Redis call otherwise.
local function alert_at_denial(ctr, stream, seen, now)
  local due, fields = {}, {}
  for _, b in ipairs(seen) do
    local limit, thresholds = b[2], b[3]
    if limit and limit > 0 and thresholds ~= ''
        and (b[4] + b[5]) * 100 >= tonumber(string.match(thresholds, '^%d+')) * limit then
      due[#due + 1] = b
      fields[#fields + 1] = 'a:' .. b[1]
    end
  end
  if #due == 0 then return end
  local marks = redis.call('HMGET', ctr, unpack(fields))
  local written = {}
  for n, b in ipairs(due) do
    local cid, limit, thresholds, settled, held = b[1], b[2], b[3], b[4], b[5]
    local fired = marks[n] or ''
    local was = '.' .. fired .. '.'
    for t in string.gmatch(thresholds, '[^.]+') do
      if tonumber(t) * limit <= (settled + held) * 100
          and not string.find(was, '.' .. t .. '.', 1, true) then
        fired = (fired == '') and t or (fired .. '.' .. t)
        redis.call('XADD', stream, 'MAXLEN', '~', ALERTS_MAX, '*', 'cid', cid, 't', t,
          'l', int(limit), 'u', int(settled), 'h', int(held), 'at', int(now))
      end
    end
    if fired ~= (marks[n] or '') then
      written[#written + 1] = fields[n]
      written[#written + 1] = fired
    end
  end
  if #written > 0 then redis.call('HSET', ctr, unpack(written)) end
end

-- Forecasts: the same arithmetic as sidecar/forecast.py (which documents the estimator),
-- step for step, so both agree to the micro-USD. WINDOW_S is forecast.WINDOW_S.
local WINDOW_S = 600

-- floor(a * b / c) for integers a >= 0, 0 <= b, c > 0, exact while the result and r * b
-- (r < c) stay below 2^53: the product a * b itself may not.
-- floor(a / c) exactly: the double quotient may round up to the next integer.
local function fdiv(a, c)
  local q = math.floor(a / c)
  local r = a - q * c
  if r < 0 then return q - 1, r + c end
  if r >= c then return q + 1, r - c end
  return q, r
end

local function muldiv(a, b, c)
  local q, r = fdiv(a, c)
  return q * b + (fdiv(r * b, c))
end

-- A counter's recent-spend window "k:cur:prev" (k: the bucket index, Unix seconds //
-- WINDOW_S; cur: spend in bucket k; prev: in bucket k - 1) after `cost` is added to
-- `raw`, the window as it was (nil: none). The caller reads and writes the windows of
-- all its counters with one HMGET and one HSET, whatever the traffic.
local function window_next(raw, cost, now)
  local k_now = math.floor(math.floor(now / 1000) / WINDOW_S)
  if raw then
    local k0, c0, p0 = string.match(raw, '^([^:]*):([^:]*):([^:]*)')
    local k = tonumber(k0) or 0
    -- This bucket (or a replica's whose clock is ahead): the texts it keeps are reused.
    if k >= k_now then
      return k0 .. ':' .. int(math.min((tonumber(c0) or 0) + cost, COUNTER_MAX)) .. ':' .. p0
    end
    if k == k_now - 1 then return int(k_now) .. ':' .. int(cost) .. ':' .. c0 end
  end
  return int(k_now) .. ':' .. int(cost) .. ':0'
end

-- Whether a recent-spend window has nothing left to say at `now` (both buckets past):
-- the sweep deletes it, so an idle counter is one field again.
local function stale_window(window, now)
  local k = tonumber(split(window or '', ':')[1]) or 0
  return k < math.floor(math.floor(now / 1000) / WINDOW_S) - 1
end

-- The projected spend at the period's end (forecast.forecast's forecast_micro).
local function forecast_of(used, held, window, start_ms, end_ms, now)
  local w = split(window or '', ':')
  local k, cur, prev = tonumber(w[1]) or 0, tonumber(w[2]) or 0, tonumber(w[3]) or 0
  local now_s = math.floor(now / 1000)
  local k_now = math.floor(now_s / WINDOW_S)
  local c, p = 0, 0
  if k >= k_now then c, p = cur, prev elseif k == k_now - 1 then p = cur end
  local e = now_s - k_now * WINDOW_S
  local recent = c + muldiv(p, WINDOW_S - e, WINDOW_S)
  local elapsed = math.max(now_s - math.floor(start_ms / 1000), WINDOW_S)
  local v2 = recent + muldiv(used, WINDOW_S, elapsed)
  local remaining = math.max(math.floor(end_ms / 1000) - now_s, 0)
  return used + held + muldiv(v2, remaining, 2 * WINDOW_S)
end

-- The forecast alert of one counter after a charge: the first time in its period window
-- (a counter id names the window) that the forecast reaches the limit, i.e. that
-- exhausted_at falls inside the period, one alert entry of kind 'f'. Once-ness as the
-- threshold alerts: 'f' joins "a:<cid>" in the same script that charged.
local function check_forecast(ctr, stream, cid, limit, start_ms, end_ms, used, held, window, now)
  if not start_ms or not end_ms or not limit or limit <= 0 then return end
  if forecast_of(used, held, window, start_ms, end_ms, now) < limit then return end
  local fired = redis.call('HGET', ctr, 'a:' .. cid) or ''
  if string.find('.' .. fired .. '.', '.f.', 1, true) then return end
  redis.call('HSET', ctr, 'a:' .. cid, (fired == '') and 'f' or (fired .. '.f'))
  redis.call('XADD', stream, 'MAXLEN', '~', ALERTS_MAX, '*', 'cid', cid, 'k', 'f',
    'l', int(limit), 'u', int(used), 'h', int(held), 'w', window, 's', int(start_ms),
    'e', int(end_ms), 'at', int(now))
end

-- One usage-ledger entry and the day's aggregates for a charge. `cfg` is
-- "max_records:max_age_ms:aggregate_ttl_s:user_aggregate_ttl_s" ('' = no ledger at all;
-- max_records 0 keeps aggregates only; a config of three parts, kept by a reservation made
-- before the fourth existed, keeps the user totals as long as the others). Entries: k kind
-- ('s' settle, 'r' record, 'x' charged at the lease's end), m meta (see record field 11),
-- q request id, i/o tokens, c cost (micro-USD), l latency ms ('' unknown), s success
-- ('1'/'0'), at created (ms), p what priced it ('t' tokens, 'c' a given cost, 'e' the held
-- estimate: the model had no price). The stream's own ids (Redis time) bound its age.
-- The aggregates come in two hashes per UTC day, because users and steps are many and
-- the rest are few (issue 16):
--   KEYS[7] agg   "c|" cost, "n|" requests, "i|" / "o|" tokens per (provider, model, org,
--                 team, agent, workflow): kept aggregate_ttl_s
--   KEYS[8] uagg  per (user, step), '\31'-joined, one field "cost:requests:in:out" (one
--                 field, not four: a quarter of the entries), only for calls that name a
--                 user or a step: kept user_aggregate_ttl_s counted from the day's start,
--                 shorter by default
local function ledger(usage, agg, cfg, kind, meta, request_id, tin, tout, cost, latency,
                      success, now, priced_by)
  if cfg == '' then return end
  local max_records, max_age, agg_ttl, user_ttl =
    string.match(cfg, '^([^:]*):([^:]*):([^:]*):?([^:]*)')
  -- Each figure made text once (Redis would format a Lua number for every call).
  local cost_text, tin_text, tout_text = int(cost), int(tin), int(tout)
  if tonumber(max_records) > 0 then
    local id = redis.call('XADD', usage, 'MAXLEN', max_records, '*', 'k', kind, 'm', meta,
      'q', request_id, 'i', tin_text, 'o', tout_text, 'c', cost_text, 'l', latency,
      's', success, 'at', int(now), 'p', priced_by or 'c')
    -- The entry's id is "<Redis time ms>-<sequence>": the age bound counts from its time
    -- (no TIME call), and is applied by the first entry of each millisecond only (sequence
    -- 0): every other one of that millisecond would trim to the same bound.
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    local oldest = tonumber(ms) - tonumber(max_age)
    if seq == '0' and oldest > 0 then redis.call('XTRIM', usage, 'MINID', int(oldest)) end
  end
  -- The tuple is the first six of meta's parts, then user and step (one pattern, not a
  -- split and a join: this runs at every charge). Fewer parts: a meta from before.
  local tuple, user, step =
    string.match(meta, '^([^\31]*\31[^\31]*\31[^\31]*\31[^\31]*\31[^\31]*\31[^\31]*)\31?([^\31]*)\31?([^\31]*)')
  if not tuple then tuple, user, step = meta, '', '' end
  add_capped(agg, 'c|' .. tuple, cost_text)
  -- A day's hash gets its time to live once, with its first field: kept aggregate_ttl_s
  -- from the day's first charge. (A count of calls: one a call, it cannot near 2^53.)
  if redis.call('HINCRBY', agg, 'n|' .. tuple, '1') == 1 then redis.call('EXPIRE', agg, agg_ttl) end
  if tin ~= 0 then add_capped(agg, 'i|' .. tuple, tin_text) end
  if tout ~= 0 then add_capped(agg, 'o|' .. tuple, tout_text) end
  local uagg = KEYS[8]
  if uagg and (user ~= '' or step ~= '') then
    local who = user .. '\31' .. step
    local was = redis.call('HGET', uagg, who)
    local c0, n0, i0, o0 = 0, 0, 0, 0
    if was then
      c0, n0, i0, o0 = string.match(was, '^([^:]*):([^:]*):([^:]*):([^:]*)')
      c0, n0, i0, o0 = tonumber(c0), tonumber(n0), tonumber(i0), tonumber(o0)
    end
    -- One format of the four ('%d' as int() writes each): a format per figure and the
    -- joins cost twice as much. Each sum saturates at COUNTER_MAX (see add_capped).
    local m = COUNTER_MAX
    redis.call('HSET', uagg, who, string.format('%d:%d:%d:%d', math.min(c0 + cost, m), n0 + 1,
      math.min(i0 + tin, m), math.min(o0 + tout, m)))
    if not was then
      -- Kept user_aggregate_ttl_s counted from the end of its day (the day's key lives the
      -- rest of today plus that): a retention of 2 days is today and yesterday. The same
      -- end for every field of the day, so set with each new one only.
      local ttl = tonumber(user_ttl ~= '' and user_ttl or agg_ttl) - 86400
        + math.ceil((86400000 - now % 86400000) / 1000)
      redis.call('EXPIRE', uagg, int(math.max(ttl, 1)))
    end
  end
end

-- Whether a cid names a period-total counter (window key "t": no calendar window, no
-- forecast, no recent-spend window).
local function has_total_window(cid)
  return string.sub(cid, -2) == '/t'
end

-- A period-total counter past its idle time is over even where collect's bounded batches
-- have not reached it yet (thousands of runs can fall due in one millisecond; a run that
-- calls again after its idle time must start from zero whatever the backlog): when the
-- counter of budget `b` (fields read into `raw` by the decision: u at 2b-1, h at 2b, its
-- call count at `ic`, nil without a cap) exists, holds nothing and its gc time ('c:<cid>')
-- is at or before now, its figures in `raw` are blanked and, when `collect_now`, it goes
-- as collect() would delete it. One ZSCORE per such counter, none for the others.
local function idle_over(ctr, gc, cid, now, raw, b, ic, collect_now)
  if not has_total_window(cid) or raw[2 * b] then return end
  if not (raw[2 * b - 1] or (ic and raw[ic])) then return end
  local due = tonumber(redis.call('ZSCORE', gc, 'c:' .. cid))
  if not due or due > now then return end
  raw[2 * b - 1] = false
  if ic then raw[ic] = false end
  if collect_now then
    redis.call('HDEL', ctr, 'u:' .. cid, 'a:' .. cid, 'c:' .. cid)
    redis.call('ZREM', gc, 'c:' .. cid)
  end
end

-- The recent-spend windows of `cids` before a charge, with one HMGET: the values, and per
-- counter index its place among them (nil: a period-total counter, which has no forecast
-- and keeps no window). The caller writes them back with one HSET.
local function read_windows(ctr, cids)
  local names, at = {}, {}
  for i, cid in ipairs(cids) do
    if not has_total_window(cid) then
      names[#names + 1] = 'w:' .. cid
      at[i] = #names
    end
  end
  if #names == 0 then return {}, at end
  return redis.call('HMGET', ctr, unpack(names)), at
end

-- Charge `cost` to every counter of reservation record `r` (dropping its hold of the
-- estimate first when `held`), raising the threshold alerts it crosses. Returns the
-- counters after it ("u,h,..." for record field 10) and the overshoot: the largest, over
-- the block and downgrade budgets, of what this charge added past the cap (record field 20).
local function charge(ctr, r, cost, held, now)
  local est, cids, specs = tonumber(r[3]), split(r[7], ','), split(r[17] or '', ';')
  local snapshot, overshoot = {}, 0
  local cost_text, minus_est = int(cost), int(-est)  -- int: -0 prints "-0"
  -- Every counter's recent-spend window is read with one HMGET and written with one HSET.
  local windows, at, written = {}, {}, {}
  if cost > 0 then windows, at = read_windows(ctr, cids) end
  for i, cid in ipairs(cids) do
    local h
    if held then
      local field = 'h:' .. cid
      h = redis.call('HINCRBY', ctr, field, minus_est)
      if h <= 0 then  -- as unhold()
        redis.call('HDEL', ctr, field)
        h = 0
      end
    else
      h = tonumber(redis.call('HGET', ctr, 'h:' .. cid)) or 0
    end
    local u = add_capped(ctr, 'u:' .. cid, cost_text)
    local limit, thresholds, mode, fstart, fend = parse_spec(specs[i])
    check_alerts(ctr, KEYS[6], cid, limit, thresholds, u - cost, u, now)
    if at[i] then
      local window = window_next(windows[at[i]] or nil, cost, now)
      written[#written + 1] = 'w:' .. cid
      written[#written + 1] = window
      if fstart then check_forecast(ctr, KEYS[6], cid, limit, fstart, fend, u, h, window, now) end
    end
    if limit and mode ~= 'w' and u > limit then
      local past = math.max(0, u - limit) - math.max(0, u - cost - limit)
      if past > overshoot then overshoot = past end
    end
    snapshot[#snapshot + 1] = u
    snapshot[#snapshot + 1] = h
  end
  if #written > 0 then redis.call('HSET', ctr, unpack(written)) end
  -- The figures as numbers (for the reply) and as record field 10's text.
  return snapshot, overshoot
end

-- Record field 10's text of charge()'s figures: one string.format of them all ('%d' as
-- int() writes each; a format per figure and a join cost three times as much).
local function snapshot_text(figures)
  if #figures == 0 then return '' end
  return string.format(string.rep('%d,', #figures - 1) .. '%d', unpack(figures))
end

-- A hold whose lease ended unsettled, on a reservation that asked for it (record field 22):
-- the estimate is charged as spend (the call went through a proxy that cannot settle), with
-- its alerts and a ledger entry of kind 'x', and the reservation ends settled, exactly
-- once. The charging scripts' KEYS[5..7] (usage, alerts, agg) must be given.
charge_at_end = function(ctr, rid, r, now)
  local est = tonumber(r[3])
  local figures, overshoot = charge(ctr, r, est, true, now)
  r[1], r[8], r[9], r[10] = 'S', int(est), '1', snapshot_text(figures)
  r[12], r[13], r[20], r[21] = '0', '0', int(overshoot), 'e'
  ledger(KEYS[5], KEYS[7], r[23] or '', 'x', r[11] or '', rid, 0, 0, est, '', '1', now, 'e')
  charged_now = charged_now + 1
  charged_costs[charged_now] = (string.match(r[11] or '', '^[^\31]*\31[^\31]*') or '\31')
    .. '\31' .. int(est)
end


-- ---- runaway guards: read and charged inside authorize.lua (check.lua reads them) ----

-- A usd rate limiter counts dollars in units of USD_UNIT micro-USD (sidecar.model), a
-- call's units rounded up so a limiter never admits more dollars than it says.
local USD_UNIT = 1000
local function usd_units(micro)
  return math.ceil(micro / USD_UNIT)
end

-- The stop switch: the first stop in force among the call's `n` stop fields, named from
-- ARGV[first_name] on (the sidecar names them among the fields a decision reads) and read
-- with its counters into `raw` from raw[first_value] on. Returns the field and its value,
-- or '' and '', and the ms left until its expiry on the stops' clock ('' = never, or none:
-- the sidecar's Retry-After, which the replica's own clock would skew). A value is
-- "<stop id>|<expires ms, 0 never>|<created ms>|<reason>" (lua/stops.lua writes them). The
-- expiry is a time on the stops' clock, the limiters'
-- one (limiter_now: Redis TIME, or `clock` from the sidecar in tests), so every replica
-- ends a stop at the same moment whatever its own clock says. That clock is read only
-- when a stop with an expiry is met (stops are rare: the call without one pays no TIME),
-- and not again when the call read it already (`rnow`, nil: not read).
local function active_stop(first_name, raw, first_value, n, clock, rnow)
  for i = 0, n - 1 do
    local value = raw[first_value + i]
    if value then
      local expires = tonumber(string.match(value, '^[^|]*|([^|]*)|')) or 0
      if expires == 0 then return ARGV[first_name + i], value, '' end
      rnow = rnow or limiter_now(clock)
      if expires > rnow then return ARGV[first_name + i], value, expires - rnow end
    end
  end
  return '', '', ''
end

-- A loop guard's memory of one entity: a hash per (guard, entity), one field per
-- fingerprint (a hex hash), "<alerted 0|1>|<ms>,<ms>,..." (its newest calls inside the
-- window, at most `repeats`), and one field "~": the time (ms, the decisions' clock) up to
-- which the key is kept. A write that finds less than a window left there keeps the key
-- two windows more (one PEXPIRE per window of traffic, not one per call), so the key is
-- gone one to two windows after the entity's newest call. At most LOOP_FIELDS
-- fingerprints per entity: a new one that finds them all there first evicts LOOP_EVICT at
-- random (one HRANDFIELD and one HDEL every LOOP_EVICT new fingerprints, not per call). A
-- loop's own field is rewritten at every repeat, so a loop is lost only if evicted between
-- two of its calls. One key per entity, not per call: thousands of distinct calls a
-- second keep one small hash per active run, read and written one field at a time.
local LOOP_FIELDS = 64
local LOOP_EVICT = 16

-- The calls of `fp` from this entity inside the window ending now, and the key's "~".
local function loop_read(key, now, window, fp)
  local got = redis.call('HMGET', key, fp, '~')
  local state = {times = {}, alerted = false, known = false, kept_until = tonumber(got[2])}
  local value = got[1]
  if not value then return state end
  state.known = true
  state.alerted = string.sub(value, 1, 1) == '1'
  for _, t in ipairs(split(string.sub(value, 3), ',')) do
    if tonumber(t) > now - window then state.times[#state.times + 1] = t end
  end
  return state
end

-- Write `fp`'s field back: with this call added (`called`: it went through), marked alerted
-- (`alerted`) or, called as no repeat, unmarked (its trip is over). `window`: the guard's
-- window_ms as text.
local function loop_write(key, state, now, window, fp, called, alerted, repeats)
  local times = state.times
  if called then times[#times + 1] = now_text(now) end
  local kept = {}
  for i = math.max(1, #times - repeats + 1), #times do kept[#kept + 1] = times[i] end
  local mark = (alerted or (state.alerted and not called)) and '1' or '0'
  if not state.known then
    local fingerprints = redis.call('HLEN', key) - (state.kept_until and 1 or 0)
    if fingerprints >= LOOP_FIELDS then
      local victims = {}
      for _, f in ipairs(redis.call('HRANDFIELD', key, LOOP_EVICT)) do
        if f ~= '~' then victims[#victims + 1] = f end
      end
      if #victims > 0 then redis.call('HDEL', key, unpack(victims)) end
    end
  end
  local value = mark .. '|' .. table.concat(kept, ',')
  local ms = tonumber(window)
  if state.kept_until and state.kept_until >= now + ms then
    redis.call('HSET', key, fp, value)
  else
    redis.call('HSET', key, fp, value, '~', int(now + 2 * ms))
    redis.call('PEXPIRE', key, int(2 * ms))
  end
end

-- One guard trip on the alerts stream (sidecar/alerts.py): kind 'stop' | 'loop' |
-- 'calls' | 'cap' | 'velocity', the guard's id (a budget's for calls and cap, a rate
-- limit's for velocity), the scope ('' where the sidecar knows it from the id), the
-- escaped entity, and a detail. Each kind alerts once per entity and trip (the callers
-- keep that).
local function guard_alert(kind, guard, scope, entity, detail, now)
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ALERTS_MAX, '*', 'k', kind, 'g', guard,
    's', scope, 'e', entity, 'r', detail, 'at', int(now))
end

-- Once per counter (budget, entity, window): a trip of its call cap ('c') or, for a
-- period-total budget, of its dollar cap ('x'), marked in "a:<cid>" beside the thresholds.
local function alert_once(ctr, cid, mark)
  local fired = redis.call('HGET', ctr, 'a:' .. cid) or ''
  if string.find('.' .. fired .. '.', '.' .. mark .. '.', 1, true) then return false end
  redis.call('HSET', ctr, 'a:' .. cid, fired == '' and mark or (fired .. '.' .. mark))
  return true
end

-- Learned estimates (issue 19). KEYS[9] of authorize, check and settle is a hash of one
-- field per series (a tenant's calls of one provider, model and agent, named by the
-- sidecar: sidecar/keys.py estimate_series): "count:p95:c1,c2,...:t1.t2", the number of
-- costs ever taught, the p95 of those in the ring, the ring of the last LEARN_RING settled
-- costs (micro-USD, oldest first) and its two largest (see learn()). The p95 is computed when
-- a cost is taught, so a decision reads one short prefix and sorts nothing.
local LEARN_RING = 32

-- The learned estimate of `series`: its p95 capped at `ceiling`, or nil while fewer than
-- `min_count` costs were taught (cold start: the caller's or the configured figure holds).
local function learned(key, series, ceiling, min_count)
  if series == '' or not key then return nil end
  local v = redis.call('HGET', key, series)
  if not v then return nil end
  local n, p = string.match(v, '^(%d+):(%d+):')
  if not n or tonumber(n) < min_count then return nil end
  return math.min(tonumber(p), ceiling)
end

-- Teach `series` one settled cost. `cfg` is "ttl_s:max_series" ('' = learn nothing): the
-- hash expires ttl_s after the last cost taught (an idle tenant's statistics go), and holds
-- at most max_series series: a new one past that evicts one at random (more when the
-- maximum was lowered; no index of the oldest is kept; each series is at most LEARN_RING
-- numbers, so the hash stays bounded).
-- The ring is kept oldest first, so a cost is taught by appending it and dropping the
-- first once the ring is full; and the ring's two largest costs are kept after it
-- (":t1.t2"), so the p95 (the k-th largest, k <= 2 for a ring of 32) is updated from them
-- without reading the ring, except when the cost dropped was one of them and the new one
-- is smaller (then the ring is scanned once). A value written before (no ":t1.t2"; ring
-- oldest at count % LEARN_RING) is scanned once and goes on in this form.
local function top_two(ring)
  local t1, t2
  for item in string.gmatch(ring, '%d+') do
    local x = tonumber(item)
    if not t1 or x > t1 then
      t1, t2 = x, t1
    elseif not t2 or x > t2 then
      t2 = x
    end
  end
  return t1, t2
end

local function learn(key, series, cost, cfg)
  if cfg == '' or series == nil or series == '' or not key then return end
  local ttl, max_series = string.match(cfg, '^([^:]*):([^:]*)')
  local v = redis.call('HGET', key, series)
  local n, ring, t1, t2 = 0, '', nil, nil
  -- A value not of this form (written by hand, cut short) starts the series afresh: an
  -- error here would fail every settle of the series, after its charge was written.
  local count, costs, tops
  if v then count, costs, tops = string.match(v, '^(%d+):%d+:([%d,]*)(.*)$') end
  if count and #count <= 15 and (tops == '' or string.find(tops, '^:%d*%.?%d*$')) then
    n, ring = tonumber(count), costs
    local a, b = string.match(tops, '^:(%d*)%.?(%d*)$')
    t1, t2 = tonumber(a), tonumber(b)
  elseif not v then
    -- A new series: evict at random down to one under the maximum. Usually that is one
    -- series; after a lowered estimate_max_series (a reload, a rollout) the hash may hold
    -- more, and it is brought to the maximum here, not left one past its old size. In
    -- batches: HDEL's fields are unpacked onto Lua's stack.
    local over = redis.call('HLEN', key) - tonumber(max_series) + 1
    while over > 0 do
      local victims = redis.call('HRANDFIELD', key, math.min(over, 1000))
      if #victims == 0 then break end
      redis.call('HDEL', key, unpack(victims))
      over = over - #victims
    end
  end
  local cost_text, dropped = int(cost), nil
  if ring == '' then
    ring = cost_text
  elseif n >= LEARN_RING then
    local comma = string.find(ring, ',', 1, true)
    if comma then
      dropped = tonumber(string.sub(ring, 1, comma - 1))
      ring = string.sub(ring, comma + 1) .. ',' .. cost_text
    else
      ring = ring .. ',' .. cost_text
    end
  else
    ring = ring .. ',' .. cost_text
  end
  n = n + 1
  if t1 == nil or (dropped and t2 and dropped >= t2 and cost < dropped) then
    t1, t2 = top_two(ring)
  else
    -- The dropped cost, if one of the two largest, leaves them (cost >= it here, so the
    -- two largest of what is left and the new cost are the ring's two largest).
    if dropped and t2 and dropped >= t2 then
      if t2 == dropped then t2 = nil else t1, t2 = t2, nil end
    end
    if cost > t1 then
      t1, t2 = cost, t1
    elseif not t2 or cost > t2 then
      t2 = cost
    end
  end
  -- p95 by nearest rank over the m costs held: the k-th largest, k = m - ceil(0.95 m) + 1
  -- (integer arithmetic: 0.95 * m in doubles is not exact); k <= 2 while LEARN_RING <= 39.
  local m = math.min(n, LEARN_RING)
  local k = m - math.floor((95 * m + 99) / 100) + 1
  local p = (k >= 2 and t2) or t1
  redis.call('HSET', key, series, int(n) .. ':' .. int(p) .. ':' .. ring .. ':' .. int(t1)
    .. (t2 and ('.' .. int(t2)) or ''))
  redis.call('EXPIRE', key, ttl)
end
