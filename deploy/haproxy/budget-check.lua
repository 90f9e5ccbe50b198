-- budget-sidecar's check for HAProxy 2.6+, written on HAProxy's built-in core.httpclient().
-- Loaded by haproxy.cfg (`lua-load`) and run as `http-request lua.budget_check`.
--
-- For each client request it sends the sidecar GET /ext_authz with the client's headers,
-- X-Forwarded-Uri (path and query) and X-Forwarded-Method as HAProxy parsed them
-- (overwriting a client's copies), and the X-Request-ID haproxy.cfg set from its own
-- unique-id. Then:
--   2xx: the x-budget-* headers of the answer are set on the request (haproxy.cfg has
--        already deleted a client's own), and it goes on to the upstream;
--   any other status: the client gets the sidecar's status, headers and body (429 with
--        Retry-After and the JSON decision, 403, 400 problem+json, 503);
--   no answer from the sidecar (down, or slower than CHECK_TIMEOUT_MS): 503
--        problem+json with Retry-After: 1, as the nginx example answers; nothing
--        reaches the upstream. HAProxy 2.6's httpclient re-sends a check that got no
--        answer in time, up to 3 more times on new connections: a stopped or hung
--        sidecar costs the client about 4 x CHECK_TIMEOUT_MS.

local SIDECAR = "http://127.0.0.1:8787/ext_authz"
local CHECK_TIMEOUT_MS = 1000

-- Not copied from the client's request to the check, nor from the answer to the client.
local HOP = {
  ["connection"] = true, ["keep-alive"] = true, ["transfer-encoding"] = true,
  ["content-length"] = true, ["te"] = true, ["upgrade"] = true, ["trailer"] = true,
  ["proxy-connection"] = true, ["host"] = true,
  -- Set by this action from what HAProxy parsed: never a client's copy.
  ["x-forwarded-uri"] = true, ["x-forwarded-method"] = true,
}

-- What the upstream may receive from an allow.
local UPSTREAM = {
  "x-budget-reservation-id", "x-budget-remaining-usd", "x-budget-action",
  "x-budget-downgrade-model", "x-budget-degraded",
}

local UNREACHABLE = '{"type":"https://budget-sidecar.dev/problems/service-unavailable",'
  .. '"title":"Service Unavailable","status":503,"detail":"budget sidecar unreachable"}'

-- HAProxy hands header values as {[0] = v1, [1] = v2, ...}; httpclient takes {v1, v2}.
local function values(list)
  local out = {}
  local i = 0
  while list[i] ~= nil do
    out[#out + 1] = list[i]
    i = i + 1
  end
  return out
end

local function first(headers, name)
  local v = headers and headers[name]
  if v == nil then return nil end
  return v[0] or v[1]
end

local function check(txn)
  local headers = {}
  for name, list in pairs(txn.http:req_get_headers()) do
    if not HOP[name] then headers[name] = values(list) end
  end
  headers["x-forwarded-uri"] = { txn.sf:pathq() }
  headers["x-forwarded-method"] = { txn.sf:method() }

  local client = core.httpclient()
  local ok, res = pcall(client.get, client,
    { url = SIDECAR, headers = headers, timeout = CHECK_TIMEOUT_MS })
  -- When it cannot connect, the httpclient makes up a 503 (HTML) of its own. Every answer
  -- of the sidecar's but an allow carries x-budget-denial; one without it is not the
  -- sidecar's.
  local answered = ok and res ~= nil and res.status ~= nil and res.status ~= 0
  if answered and not (res.status >= 200 and res.status < 300) then
    answered = first(res.headers, "x-budget-denial") ~= nil
  end
  if not answered then
    txn:done(txn:reply({
      status = 503,
      headers = { ["content-type"] = { "application/problem+json" },
                  ["retry-after"] = { "1" } },
      body = UNREACHABLE,
    }))
    return
  end

  if res.status >= 200 and res.status < 300 then
    for _, name in ipairs(UPSTREAM) do
      local v = first(res.headers, name)
      if v ~= nil and v ~= "" then txn.http:req_set_header(name, v) end
    end
    return
  end

  local out = {}
  for name, list in pairs(res.headers or {}) do
    if not HOP[name] then out[name] = values(list) end
  end
  txn:done(txn:reply({ status = res.status, headers = out, body = res.body or "" }))
end

core.register_action("budget_check", { "http-req" }, check, 0)
