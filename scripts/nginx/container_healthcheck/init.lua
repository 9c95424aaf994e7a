-- container_healthcheck: entry-Nginx balancer for BlueKing /o/<app>/ and /t/<app>/ that
-- routes only to APPOs whose container-healthcheck says the app is healthy, and takes an APPO
-- out for an app on the first user request that failed there.
--
-- * Which hosts serve an app: the servers of its own upstream (`<app>` for /o/, `t.<app>` for
--   /t/, as BlueKing 6.x renders them from consul) through ngx.upstream where OpenResty has it,
--   or one shared upstream (BlueKing 5.x: PAAS_AGENT_PROD), or the `apps`/`appos` lists. A server
--   marked `down` is never used; `backup` servers only when no primary is healthy; a name that
--   resolved to several addresses gives one peer per address.
-- * Only APPOs are asked: the configured ones and the servers of app upstreams that requests
--   asked for (learned on the request path from nginx's own tables, no socket).
-- * Pushed, not polled: one channel per APPO (a timer loop owned by one worker through a
--   shared-dict lock) long-polls the service's feed, GET /container-healthcheck/apps/feed
--   ?index=N&wait=1 (Consul-style blocking queries): a verdict change arrives at once, and a
--   heartbeat at least every `wait` seconds, so an APPO whose heartbeat is `grace` late (hung,
--   unreachable) is out. A service without the feed (2.1 and older) is polled at /apps every
--   `interval` with fall/rise, as before.
-- * Passive health: a user request whose attempt at an APPO failed the way proxy_next_upstream
--   counts failure (refused, reset, timed out, 502, 504), retried or not, POST included, takes
--   that APPO out for that app at once for every worker, until a health answer based on a probe
--   newer than the failure says the app is healthy there (and at least eject_hold seconds,
--   doubling for a peer that keeps failing). nginx's own max_fails does this for plain
--   upstreams; balancer_by_lua replaces that accounting, so it is done here.
-- * balance() (balancer_by_lua) picks round-robin among the usable peers, retries the next
--   one, and FAILS OPEN to all the app's peers when none is usable, so a health-service outage
--   never becomes a site outage.
-- * Nothing on the request path opens a socket; every timer body runs under xpcall; log lines
--   are at most one per app or APPO per interval; shared-dict entries expire when unused.
--
-- The package (one folder, container_healthcheck/): config (options, checked at init), state
-- (the shared dict's records and rules), feed (the service's answers, parsed), discovery
-- (which APPOs serve an app), poller (one channel per APPO), balancer (the request path),
-- status (the operators' page), metrics (Prometheus); records (the dict's key schema and
-- record formats). Operators use only this module's functions.
-- Needs lua-nginx-module and lua-resty-core (ngx.balancer).
local config = require "container_healthcheck.config"
local state = require "container_healthcheck.state"
local poller = require "container_healthcheck.poller"
local balancer = require "container_healthcheck.balancer"
local status = require "container_healthcheck.status"
local metrics = require "container_healthcheck.metrics"

local ngx = ngx

local M = { _VERSION = "2.4.2" }
metrics.version = M._VERSION

-- init_by_lua: the options (see container_healthcheck/config.lua). An unknown or wrong-typed
-- option, or an undeclared dict, is an error there, so `nginx -t` says so.
function M.init(options)
    ngx.update_time()
    config.apply(options, ngx.shared, ngx.now())
end

M.init_worker = poller.start   -- init_worker_by_lua
M.choose = balancer.choose     -- the peers a request may use (balance() uses it)
M.balance = balancer.balance   -- balancer_by_lua: balance(app, kind)
M.log = balancer.log           -- log_by_lua
M.status = status.handle       -- content_by_lua: the operators' page
M.metrics = metrics.handle     -- content_by_lua: Prometheus text format 0.0.4

-- The pure parts and the dict rules, for the unit tests (tests/lua/test_units.lua).
M._units = { config = config, state = state, poller = poller, feed = require "container_healthcheck.feed",
             records = require "container_healthcheck.records", balancer = balancer,
             discovery = require "container_healthcheck.discovery" }

return M
