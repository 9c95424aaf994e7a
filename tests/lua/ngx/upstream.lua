-- TEST DOUBLE of OpenResty's ngx.upstream (lua-upstream-nginx-module), which no Debian package
-- carries. It implements that module's documented API (README of openresty/lua-upstream-
-- nginx-module: get_upstreams, get_servers, get_primary_peers, get_backup_peers,
-- set_peer_down, current_upstream_name) from the upstream { } blocks of the very nginx
-- configuration the test renders: the file named by NGX_UPSTREAM_DOUBLE_CONF (declare it with
-- `env NGX_UPSTREAM_DOUBLE_CONF;`), its `include`s followed, parsed once at require time (in
-- init_by_lua, like nginx's own parse). As nginx does at start, a server name is resolved to
-- every address it has, here from /etc/hosts only (no DNS query ever leaves the test), and a
-- name that does not resolve fails the load ("host not found in upstream").
local _M = { _VERSION = "0.07-double" }

local upstreams, order = {}, {}

local function read(path)
    local handle, err = io.open(path, "r")
    if not handle then error("ngx.upstream double: cannot read " .. path .. ": " .. tostring(err)) end
    local text = handle:read("*a")
    handle:close()
    return (text:gsub("#[^\n]*", ""))
end

-- The text with every `include <file>;` replaced by that file's text (paths relative to dir).
local function expand(text, dir, depth)
    if depth > 10 then error("ngx.upstream double: includes nested too deep") end
    return (text:gsub("include%s+([^;%s]+)%s*;", function(path)
        if path:sub(1, 1) ~= "/" then path = dir .. "/" .. path end
        if path:find("[*?]") then return "" end  -- globs (mime.types, conf.d/*) hold no upstreams here
        return expand(read(path), path:match("^(.*)/[^/]*$") or ".", depth + 1)
    end))
end

local hosts
local function resolve(host)
    if host:match("^%d+%.%d+%.%d+%.%d+$") then return { host } end
    if not hosts then
        hosts = {}
        local handle = io.open("/etc/hosts", "r")
        for line in (handle and handle:read("*a") or ""):gmatch("[^\n]+") do
            local fields = {}
            for field in line:gsub("#.*", ""):gmatch("%S+") do fields[#fields + 1] = field end
            if fields[1] and fields[1]:match("^%d+%.%d+%.%d+%.%d+$") then
                for i = 2, #fields do
                    hosts[fields[i]] = hosts[fields[i]] or {}
                    table.insert(hosts[fields[i]], fields[1])
                end
            end
        end
        if handle then handle:close() end
    end
    return hosts[host]
end

-- The body of a block with every nested { } removed (balancer_by_lua_block, ...).
local function top_level(body)
    local out, depth = {}, 0
    for i = 1, #body do
        local c = body:sub(i, i)
        if c == "{" then depth = depth + 1
        elseif c == "}" then depth = depth - 1
        elseif depth == 0 then out[#out + 1] = c end
    end
    return table.concat(out)
end

local function parse_server(spec)
    local words = {}
    for word in spec:gmatch("%S+") do words[#words + 1] = word end
    local name = words[1]
    if name:sub(1, 5) == "unix:" then return nil end
    local host, port = name:match("^(.-):(%d+)$")
    if not host then host, port = name, "80" end
    local ips = resolve(host)
    if not ips then error("ngx.upstream double: host not found in upstream \"" .. name .. "\"") end
    local server = { name = name, weight = 1, max_fails = 1, fail_timeout = 10 }
    for i = 2, #words do
        local key, value = words[i]:match("^([%w_]+)=(.+)$")
        if key == "weight" or key == "max_fails" then server[key] = tonumber(value)
        elseif key == "fail_timeout" then server[key] = tonumber((value:gsub("s$", "")))
        elseif words[i] == "backup" then server.backup = true
        elseif words[i] == "down" then server.down = true end
    end
    local addrs = {}
    for _, ip in ipairs(ips) do addrs[#addrs + 1] = ip .. ":" .. port end
    server.addr = #addrs == 1 and addrs[1] or addrs
    return server
end

local function load(path)
    local text = expand(read(path), path:match("^(.*)/[^/]*$") or ".", 0)
    local at = 1
    while true do
        local s, e, name = text:find("upstream%s+([^%s{]+)%s*{", at)
        if not s then break end
        local depth, i = 1, e + 1
        while depth > 0 and i <= #text do
            local c = text:sub(i, i)
            if c == "{" then depth = depth + 1 elseif c == "}" then depth = depth - 1 end
            i = i + 1
        end
        local servers = {}
        for spec in top_level(text:sub(e + 1, i - 2)):gmatch("server%s+([^;]+);") do
            servers[#servers + 1] = parse_server(spec)
        end
        if not upstreams[name] then order[#order + 1] = name end
        upstreams[name] = servers
        at = i
    end
end

local conf = os.getenv("NGX_UPSTREAM_DOUBLE_CONF")
if not conf then error("ngx.upstream double: set NGX_UPSTREAM_DOUBLE_CONF (and `env NGX_UPSTREAM_DOUBLE_CONF;`)") end
load(conf)

local down_marks = {}  -- set_peer_down, per worker as in the real module

function _M.get_upstreams()
    local names = {}
    for i, name in ipairs(order) do names[i] = name end
    return names
end

function _M.get_servers(name)
    local servers = upstreams[name]
    if not servers then return nil, "upstream not found" end
    local copy = {}
    for i, server in ipairs(servers) do
        local entry = {}
        for k, v in pairs(server) do entry[k] = v end
        copy[i] = entry
    end
    return copy
end

local function peers(name, backup)
    local servers = upstreams[name]
    if not servers then return nil, "upstream not found" end
    local list, id = {}, 0
    for _, server in ipairs(servers) do
        if (server.backup or false) == backup then
            local addrs = type(server.addr) == "table" and server.addr or { server.addr }
            for _, addr in ipairs(addrs) do
                local down = down_marks[name .. "|" .. tostring(backup) .. "|" .. id]
                if down == nil then down = server.down end
                list[#list + 1] = { id = id, name = addr, weight = server.weight, current_weight = 0,
                                    effective_weight = server.weight, conns = 0, fails = 0,
                                    max_fails = server.max_fails, fail_timeout = server.fail_timeout,
                                    down = down or nil }
                id = id + 1
            end
        end
    end
    return list
end

function _M.get_primary_peers(name) return peers(name, false) end

function _M.get_backup_peers(name) return peers(name, true) end

function _M.set_peer_down(name, is_backup, id, value)
    local list, err = peers(name, is_backup and true or false)
    if not list then return nil, err end
    if not list[id + 1] then return nil, "bad peer id" end
    down_marks[name .. "|" .. tostring(is_backup and true or false) .. "|" .. id] = value and true or false
    return true
end

function _M.current_upstream_name()
    local ok, name = pcall(function() return ngx.var.proxy_host end)
    if ok and name and upstreams[name] then return name end
    return nil
end

return _M
