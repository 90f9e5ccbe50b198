-- wrk script: the proxy hook as Envoy calls it (client method + /ext_authz + original
-- path, identity in headers, no body), for the same identity and estimate as
-- wrk_authorize.lua (500 + 200 gpt-4o tokens = $0.00325) under three stacked budgets.
-- No x-request-id: every check is a new hold, as every client request is.
wrk.method = "POST"
wrk.headers["x-org-id"] = "org-1"
wrk.headers["x-team-id"] = "team-1"
wrk.headers["x-user-id"] = "user-1"
wrk.headers["x-provider"] = "openai"
wrk.headers["x-model"] = "gpt-4o"
wrk.headers["x-budget-estimate-usd"] = "0.00325"
