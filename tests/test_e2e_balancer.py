"""End to end with real processes: an entry Nginx running the Lua balancer, two APPOs on
127.0.0.2 and 127.0.0.3 (each its own dockerd, app container, container-healthcheck and APPO
Nginx), steady client traffic; HAProxy's httpchk against the same APPOs; and BlueKing's own
OpenResty path (ngx.upstream, per-app upstreams, /t/ routes, backup peers, 5.x's shared
upstream) built from the shipped snippets pasted into a replica of BlueKing's paas.conf.
What users lose under load when something dies: tests/test_e2e_loss.py."""
import os
import socket
import subprocess
import time
import urllib.request

import pytest

from e2e import cluster, healthy  # noqa: F401 (fixtures)
from e2e import (APP, FALL, INTERVAL, KEEP_STALE, NAME, RISE, Traffic, _bk_entry_setting, _maintenance, _need,
                 _nginx_main, _openresty_modules, _run_nginx, apply_readme_steps, entry_status, start_bk_entry,
                 stop_bk_entry, usable_at, with_double)
from support import IMAGE, LUA_DIR, LoopbackServer, free_port, stop_nginx, wait_for

APPO_INDICES = (2, 3)  # the cluster's APPOs: 127.0.0.2, 127.0.0.3 (engines appo2, appo3)


def observe(traffic, count, start=None):
    """The requests the steady traffic sent from start (default: now) until there are count of
    them: a window measured in requests, not in seconds."""
    start = time.monotonic() if start is None else start
    assert wait_for(lambda: len(traffic.since(start)) >= count, count / 10.0 + 10), "the traffic stalled"
    return traffic.since(start)


def all_stale(port):
    return not any(appo["fresh"] for appo in entry_status(port)["appos"].values())


def served_by(records):
    return {body for _, status, body in records if status == 200}


def failures(records):
    return [r for r in records if r[1] != 200]


def test_1_both_appos_share_traffic(healthy):
    cluster = healthy
    records = observe(cluster["traffic"], 120)
    assert not failures(records), failures(records)[:5]
    counts = {label: sum(1 for r in records if r[2] == label) for label in ("appo2", "appo3")}
    assert min(counts.values()) >= len(records) * 0.3, counts


def test_2_dead_container_is_routed_around(healthy):
    cluster = healthy
    appo2 = cluster["appos"][0]
    appo2.docker("kill", NAME)
    assert wait_for(lambda: not usable_at(cluster["entry_port"], APP, appo2.addr), 10)
    after = observe(cluster["traffic"], 100)
    assert not failures(after), failures(after)[:5]
    assert served_by(after) == {"appo3"}


def test_3_restarted_container_gets_traffic_back(healthy):
    cluster = healthy
    appo2 = cluster["appos"][0]
    appo2.docker("kill", NAME)
    assert wait_for(lambda: not usable_at(cluster["entry_port"], APP, appo2.addr), 10)
    assert served_by(observe(cluster["traffic"], 60)) == {"appo3"}
    appo2.docker("start", NAME)
    assert wait_for(lambda: usable_at(cluster["entry_port"], APP, appo2.addr), 15)
    records = observe(cluster["traffic"], 120)
    assert served_by(records) == {"appo2", "appo3"} and not failures(records)


def test_4_a_silent_service_keeps_its_verdicts_for_keep_stale_then_its_appo_is_out_and_all_down_fails_open(healthy):
    """A's service stops while A's Nginx and app serve users: A keeps its share, its verdicts
    shown stale, for keep_stale seconds after its last answer; then A is out. With both out,
    the entry fails open to both."""
    cluster = healthy
    appo2, appo3 = cluster["appos"]
    port = cluster["entry_port"]
    appo2.stop_service()
    stopped = time.monotonic()
    assert wait_for(lambda: entry_status(port)["appos"][appo2.addr]["stale_since"] is not None, 10)
    assert entry_status(port)["appos"][appo2.addr]["up"] is False  # its feed is down, and said so
    kept = observe(cluster["traffic"], 60)
    assert served_by(kept) == {"appo2", "appo3"} and not failures(kept), failures(kept)[:5]
    assert wait_for(lambda: not entry_status(port)["appos"][appo2.addr]["fresh"], KEEP_STALE + 10)
    assert time.monotonic() - stopped > KEEP_STALE - 1.5  # not before its last answer was keep_stale old
    # out for every worker (each re-reads its choice when the APPO's version moves), and stays out
    assert wait_for(lambda: served_by(observe(cluster["traffic"], 20)) == {"appo3"}, 10)
    after = observe(cluster["traffic"], 100)
    assert served_by(after) == {"appo3"} and not failures(after)
    appo3.stop_service()
    assert wait_for(lambda: all_stale(port), KEEP_STALE + 10)
    open_records = observe(cluster["traffic"], 150)
    assert not failures(open_records), failures(open_records)[:5]
    assert served_by(open_records) == {"appo2", "appo3"}


def test_5_paused_and_unhealthy_are_routed_around(healthy):
    cluster = healthy
    appo2, appo3 = cluster["appos"]
    port = cluster["entry_port"]
    appo3.docker("pause", NAME)
    assert wait_for(lambda: not usable_at(port, APP, appo3.addr), 10)
    after = observe(cluster["traffic"], 100)
    assert served_by(after) == {"appo2"} and not failures(after), failures(after)[:5]
    appo3.docker("unpause", NAME)
    assert wait_for(lambda: usable_at(port, APP, appo3.addr), 15)
    assert served_by(observe(cluster["traffic"], 80)) == {"appo2", "appo3"}
    appo3.docker("exec", NAME, "touch", "/tmp/sick")
    assert wait_for(lambda: appo3.docker("inspect", "-f", "{{.State.Health.Status}}", NAME) == "unhealthy", 10)
    assert wait_for(lambda: not usable_at(port, APP, appo3.addr), 10)
    after = observe(cluster["traffic"], 100)
    assert served_by(after) == {"appo2"} and not failures(after)


def _haproxy_stat(sock_path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(sock_path)
        sock.sendall(b"show stat\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = {}
    for line in data.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == APP and fields[1] not in ("FRONTEND", "BACKEND"):
            status[fields[1]] = fields[17]
    return status


def _start_haproxy(cluster):
    """HAProxy with httpchk against both APPOs; returns (process, stats socket path)."""
    appo2, appo3 = cluster["appos"]
    workdir = cluster["workdir"]
    sock_path = os.path.join(workdir, "haproxy-%d.sock" % free_port())
    conf = sock_path.replace(".sock", ".cfg")
    with open(conf, "w") as handle:
        handle.write("""
global
    stats socket %(sock)s mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend entry
    bind 127.0.0.1:%(port)d
    default_backend %(app)s
backend %(app)s
    option httpchk GET /container-healthcheck/apps/health/%(app)s
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
    server appo2 %(a)s check
    server appo3 %(b)s check
""" % {"sock": sock_path, "port": free_port(), "app": APP, "a": appo2.addr, "b": appo3.addr})
    proc = subprocess.Popen(["haproxy", "-db", "-f", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    both_up = {"appo2": "UP", "appo3": "UP"}
    assert wait_for(lambda: os.path.exists(sock_path) and _haproxy_stat(sock_path) == both_up, 15), \
        _haproxy_stat(sock_path) if os.path.exists(sock_path) else "no socket"
    return proc, sock_path


def test_6_haproxy_httpchk_marks_the_server_down(healthy):
    _need("haproxy")
    appo2 = healthy["appos"][0]
    proc, sock_path = _start_haproxy(healthy)
    try:
        appo2.docker("kill", NAME)
        assert wait_for(lambda: _haproxy_stat(sock_path).get("appo2") == "DOWN", 10), _haproxy_stat(sock_path)
        assert _haproxy_stat(sock_path)["appo3"] == "UP"
        appo2.docker("start", NAME)
        assert wait_for(lambda: _haproxy_stat(sock_path).get("appo2") == "UP", 15), _haproxy_stat(sock_path)
    finally:
        stop_nginx(proc)


def test_12_drain_before_maintenance_loses_no_request(healthy):
    cluster = healthy
    appo2 = cluster["appos"][0]
    said = _maintenance(appo2, "drain", "--reason", "kernel update", "--wait",
                        "--entry-interval", str(INTERVAL), "--entry-fall", str(FALL))
    assert "waiting" in said and "sends no new requests here" in said
    drained, offset = time.monotonic(), appo2.access_log_size()
    appo2.docker("stop", "-t", "1", NAME)  # the maintenance itself
    after = observe(cluster["traffic"], 150, drained)
    assert not failures(after), failures(after)[:5]  # zero failed requests, not even one retry away
    assert served_by(after) == {"appo3"}
    # Not even a request retried elsewhere: none reached the drained APPO once the wait ended.
    assert appo2.user_requests_since(offset) == []
    appo2.docker("start", NAME)
    said = _maintenance(appo2, "undrain", "--wait", "--entry-interval", str(INTERVAL), "--entry-rise", str(RISE))
    assert wait_for(lambda: usable_at(cluster["entry_port"], APP, appo2.addr), 15)
    assert "appo2" in served_by(observe(cluster["traffic"], 60))
    assert not failures(cluster["traffic"].since(drained))


def test_13_haproxy_marks_a_drained_server_down(healthy):
    _need("haproxy")
    appo2 = healthy["appos"][0]
    proc, sock_path = _start_haproxy(healthy)
    try:
        _maintenance(appo2, "drain", "--reason", "disk swap")
        assert wait_for(lambda: _haproxy_stat(sock_path).get("appo2") == "DOWN", 10), _haproxy_stat(sock_path)
        assert _haproxy_stat(sock_path)["appo3"] == "UP"
        _maintenance(appo2, "undrain")
        assert wait_for(lambda: _haproxy_stat(sock_path).get("appo2") == "UP", 15), _haproxy_stat(sock_path)
    finally:
        stop_nginx(proc)


# ---- BlueKing's OpenResty path (tests/e2e.py has the replica of its entry files) ----

BOTH_NAME = "appos-both.test"  # resolves to both APPOs through a private /etc/hosts
BK_APP_UPSTREAM = """
upstream %(app)s {
    server %(a)s max_fails=1 fail_timeout=30s;
    server %(b)s max_fails=1 fail_timeout=30s backup;
}
upstream t.%(app)s {
    server %(both)s:%(ngx)d max_fails=1 fail_timeout=30s;
}
upstream t.gone {
    server 127.0.0.10:%(down)d down;
}
"""


BK5_PAAS_CONF = """
location ~ ^/o/ {
    proxy_pass http://PAAS_AGENT_PROD;
}
location / {
    proxy_pass http://PAAS;
}
"""
BK5_APP_LOCATION = r"location ~ \^/o/ \{.*?\n\}\n"


class Counter(LoopbackServer):
    """A loopback server that counts what reaches it (the PaaS upstream, the placeholder)."""

    def __init__(self, host, port):
        self.requests = []
        LoopbackServer.__init__(self, host, port, backlog=64)

    def handle(self, conn):
        try:
            data = conn.recv(4096)
            if data:
                self.requests.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npaas")
        finally:
            conn.close()


@pytest.fixture(scope="module")
def bk_entry(cluster):
    appo2, appo3, workdir = _bk_entry_setting(cluster, "bk")
    paas = Counter("127.0.0.9", 0)
    down = Counter("127.0.0.10", 0)  # a server marked down: must see nothing
    # The shipped placeholder peer, listened on so that a connection to it would be seen (the
    # tests run as root, as CI does: port 1 can be bound).
    placeholder = Counter("127.0.0.1", 1)
    port = free_port()
    values = {"dir": workdir, "paas": paas.port, "port": port, "app": APP, "a": appo2.addr, "b": appo3.addr,
              "both": BOTH_NAME, "ngx": appo2.ngx_port, "down": down.port}
    proc, error_log = start_bk_entry(workdir, "bkentry", BK_APP_UPSTREAM % values, values,
                                     "127.0.0.1 localhost\n%s %s\n%s %s\n" % (appo2.ip, BOTH_NAME, appo3.ip, BOTH_NAME))
    state = {"port": port, "paas": paas, "placeholder": placeholder, "workdir": workdir, "down": down,
             "error_log": error_log, "proc": proc,
             "o": Traffic(port), "t": Traffic(port, "/t/%s/" % APP), "bare": Traffic(port, "/o/%s" % APP)}
    try:
        yield state
    finally:
        for key in ("o", "t", "bare"):
            state[key].stop()
        stop_bk_entry(proc, error_log)
        paas.close()
        down.close()
        placeholder.close()


def test_7_openresty_path_routes_primary_and_test_hosts(healthy, bk_entry):
    bk = bk_entry
    assert wait_for(lambda: served_by(observe(bk["o"], 40)) == {"appo2"}, 20)
    start = time.monotonic()
    routed, tested, bare = observe(bk["o"], 100, start), observe(bk["t"], 100, start), observe(bk["bare"], 40, start)
    # /o/: the primary only (appo3 is a backup); /t/: both addresses of the two-address name.
    assert served_by(routed) == {"appo2"} and not failures(routed)
    assert served_by(tested) == {"appo2", "appo3"} and not failures(tested)
    # /o/<app> without the trailing slash goes through the balancer too (the APPO answers it).
    assert all(r[1] in (200, 301) for r in bare)


def test_8_backup_only_when_the_primary_dies_and_test_route_follows_health(healthy, bk_entry):
    bk = bk_entry
    appo2 = healthy["appos"][0]
    assert wait_for(lambda: served_by(observe(bk["o"], 40)) == {"appo2"}, 20)
    appo2.docker("kill", NAME)
    assert wait_for(lambda: not usable_at(bk["port"], APP, appo2.addr), 10)
    start = time.monotonic()
    after_o, after_t = observe(bk["o"], 100, start), observe(bk["t"], 100, start)
    assert served_by(after_o) == {"appo3"} and not failures(after_o), failures(after_o)[:5]
    assert served_by(after_t) == {"appo3"} and not failures(after_t), failures(after_t)[:5]
    appo2.docker("start", NAME)
    assert wait_for(lambda: usable_at(bk["port"], APP, appo2.addr), 15)
    back = observe(bk["o"], 60)
    assert served_by(back) == {"appo2"} and not failures(back)


def test_9_openresty_path_fails_open_quietly(healthy, bk_entry):
    bk = bk_entry
    appo2, appo3 = healthy["appos"]
    appo2.stop_service()
    appo3.stop_service()
    both = time.monotonic()
    log_before = open(bk["error_log"]).read().count("failing open")
    assert wait_for(lambda: all_stale(bk["port"]), KEEP_STALE + 10)
    open_records = observe(bk["o"], 200)
    assert not failures(open_records), failures(open_records)[:5]
    seconds = time.monotonic() - both
    lines = open(bk["error_log"]).read().count("failing open") - log_before
    # at most one line per app per interval across workers (/o/demo and /t/demo: one app each)
    # said, and at most one line per app per interval across workers
    assert 1 <= lines <= 2 * (seconds / INTERVAL + 2), (lines, seconds)


def _rounds_later(port, rounds=2):
    """Once the supervisor looked for APPOs `rounds` more times (its time in the status JSON)."""
    first = entry_status(port)["last_round"]["at"]
    return wait_for(lambda: entry_status(port)["last_round"]["at"] >= first + rounds * INTERVAL - 0.1, 10)


def test_10_openresty_path_polls_only_appos_and_never_errors(healthy, bk_entry):
    bk = bk_entry
    assert _rounds_later(bk["port"])
    polls = [r for r in bk["paas"].requests if "/container-healthcheck" in r]
    assert polls == [], polls[:5]
    assert bk["placeholder"].connections == 0
    status = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        "http://127.0.0.1:%d/container-healthcheck-status" % bk["port"], timeout=5)
    assert status.status == 200
    # An upstream whose only server is marked down: no peer, a 502, and nothing connects to it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open("http://127.0.0.1:%d/t/gone/" % bk["port"], timeout=5)
    assert info.value.code == 502
    # An app nginx has no upstream for: nginx's own 502, as without the Lua; never a 500; and
    # the invented names leave nothing behind (no registry entry, no key).
    for number in range(50):
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open("http://127.0.0.1:%d/o/invented%d/" % (bk["port"], number), timeout=5)
        assert info.value.code == 502
    status = entry_status(bk["port"])
    assert not any(app.startswith("invented") for app in status["apps"]), status["apps"]
    assert _rounds_later(bk["port"])
    assert bk["down"].connections == 0
    # (no Lua error over the whole run: checked when the entry stops, whatever the order)


def scrape(port):
    """The entry's /container-healthcheck-metrics, read by prometheus_client's own parser:
    {(name, labels as a sorted tuple): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    answer = opener.open("http://127.0.0.1:%d/container-healthcheck-metrics" % port, timeout=5)
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(answer.read().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def _metrics_agree_with_status(port, addrs):
    """What /container-healthcheck-metrics says of the app and the APPOs is what the status
    JSON says, read at one moment (retried until both were read between two changes)."""
    samples, status = scrape(port), entry_status(port)
    for addr in addrs:
        usable = 1 if usable_at(port, APP, addr) else 0
        if _value(samples, "container_healthcheck_peer_up", app=APP, appo=addr) != usable:
            return False
        appo = status["appos"].get(addr) or {}
        if _value(samples, "container_healthcheck_appo_up", appo=addr) != (1 if appo.get("up") else 0):
            return False
    failing = _value(samples, "container_healthcheck_app_usable_appos", app=APP) == 0
    return failing == (APP in status["open"])


def test_27_the_entry_s_metrics_agree_with_its_status_and_count_what_happened(healthy, bk_entry):
    """After an ejection, a container death and a fail-open: the families parse, agree with the
    status JSON, and the counters moved by what happened."""
    bk = bk_entry
    port = bk["port"]
    appo2, appo3 = healthy["appos"]
    addrs = [appo2.addr, appo3.addr]
    assert wait_for(lambda: _metrics_agree_with_status(port, addrs), 10)
    before = scrape(port)
    assert _value(before, "container_healthcheck_appo_up", appo=appo2.addr) == 1
    appo2.docker("kill", NAME)  # the primary's container dies: an ejection, then its death
    assert wait_for(lambda: not usable_at(port, APP, appo2.addr), 10)
    appo3.docker("kill", NAME)  # and the backup's: no APPO usable, the app fails open
    assert wait_for(lambda: APP in entry_status(port)["open"], 10)
    assert wait_for(lambda: len(observe(bk["o"], 10)) >= 10, 10)  # requests sent while failing open

    def moved():
        now = scrape(port)
        ejections = sum(v for (name, labels), v in now.items() if name == "container_healthcheck_ejections_total"
                        and dict(labels).get("app") == APP) - \
            sum(v for (name, labels), v in before.items() if name == "container_healthcheck_ejections_total"
                and dict(labels).get("app") == APP)
        opened = _value(now, "container_healthcheck_fail_open_total", app=APP) - \
            _value(before, "container_healthcheck_fail_open_total", app=APP)
        return ejections >= 1 and opened >= 1
    assert wait_for(moved, 10), scrape(port)
    assert wait_for(lambda: _metrics_agree_with_status(port, addrs), 10)
    samples = scrape(port)
    assert _value(samples, "container_healthcheck_app_usable_appos", app=APP) == 0
    assert _value(samples, "container_healthcheck_app_failing_open", app=APP, to="all") == 1
    free = _value(samples, "container_healthcheck_dict_free_bytes")
    assert _value(samples, "container_healthcheck_dict_capacity_bytes") > free > 0
    assert _value(samples, "container_healthcheck_lua_errors_total", where="balance") == 0
    # heartbeats are counted by the channel and added to the dict every 5 s
    assert wait_for(lambda: _value(scrape(port), "container_healthcheck_heartbeat_lateness_seconds_count",
                                   appo=appo3.addr) >= 1, 15)
    samples = scrape(port)
    heartbeats = _value(samples, "container_healthcheck_heartbeat_lateness_seconds_count", appo=appo3.addr)
    assert _value(samples, "container_healthcheck_heartbeat_lateness_seconds_bucket", appo=appo3.addr,
                  le="+Inf") == heartbeats


def test_11_bluekings_5x_shared_upstream_recipe(healthy):
    cluster = healthy
    appo2, appo3 = cluster["appos"]
    workdir = os.path.join(cluster["workdir"], "bk5")
    os.makedirs(workdir, exist_ok=True)
    paas = Counter("127.0.0.9", 0)
    port = free_port()
    # 5.x: no per-app upstreams, one PAAS_AGENT_PROD with every APPO, and `location ~ ^/o/`.
    nginx_conf = """
http {
    access_log off;
    lua_package_path "/usr/share/lua/5.1/?.lua;;";
    upstream PAAS { server 127.0.0.9:%(paas)d; }
    upstream PAAS_AGENT_PROD {
        server %(a)s max_fails=1 fail_timeout=30s;
        server %(b)s max_fails=1 fail_timeout=30s;
    }
    include %(dir)s/app_upstream.conf;
    server {
        listen 127.0.0.1:%(port)d;
        include %(dir)s/paas.conf;
    }
}
""" % {"paas": paas.port, "a": appo2.addr, "b": appo3.addr, "dir": workdir, "port": port}
    with open(os.path.join(workdir, "app_upstream.conf"), "w") as handle:
        handle.write("")
    nginx_conf, paas_conf = apply_readme_steps(
        workdir, nginx_conf, BK5_PAAS_CONF, LUA_DIR, extra_init='shared_upstream = "PAAS_AGENT_PROD",',
        replace=BK5_APP_LOCATION)
    with open(os.path.join(workdir, "paas.conf"), "w") as handle:
        handle.write(paas_conf)
    conf = os.path.join(workdir, "bk5.conf")
    with open(conf, "w") as handle:
        handle.write(_openresty_modules())
        handle.write(_nginx_main(workdir, "bk5"))
        handle.write(with_double(nginx_conf))
    proc = _run_nginx(conf)
    traffic = Traffic(port)
    try:
        assert wait_for(lambda: served_by(observe(traffic, 40)) == {"appo2", "appo3"}, 20)
        appo2.docker("kill", NAME)
        assert wait_for(lambda: not usable_at(port, APP, appo2.addr), 10)
        after = observe(traffic, 100)
        assert served_by(after) == {"appo3"} and not failures(after), failures(after)[:5]
        assert [r for r in paas.requests if "/container-healthcheck" in r] == []
        assert "runtime error" not in open(os.path.join(workdir, "bk5-error.log")).read()
    finally:
        traffic.stop()
        stop_nginx(proc)
        paas.close()


# ---- The operators' pages in a real browser (headless Chromium over DevTools) ----

EVIL_COMMAND = "sleep 3600 # <script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>"


@pytest.fixture
def browser():
    from browser import CHROMIUM, Browser
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("chromium missing (scripts/install-deps)")
        pytest.skip("chromium missing")
    instance = Browser()
    yield instance
    instance.close()


def test_14_host_page_in_a_browser(healthy, browser):
    from browser import artifact_path
    appo2 = healthy["appos"][0]
    evil = "evil-1700000000"
    appo2.docker("rm", "-f", evil, check=False)
    appo2.docker("run", "-d", "--name", evil, "--network", "none", IMAGE, "sh", "-c", EVIL_COMMAND)
    page = browser.new_page()
    try:
        url = "http://%s:%d/container-healthcheck/" % (appo2.ip, appo2.hc_port)

        def rows():
            page.navigate(url)
            return page.evaluate("Array.from(document.querySelectorAll('tbody tr')).map(function(r){return ["
                                 "r.getAttribute('data-app'), r.cells[1].textContent, r.cells[2].textContent]})")
        # the new app's first probe runs in the background: pending (not healthy) until it ends
        assert wait_for(lambda: len(rows()) == 2 and all(r[1] == "healthy" for r in rows()), 10), rows()
        page.settle()
        rows = rows()
        assert sorted(r[0] for r in rows) == ["demo", "evil"]
        assert all(r[1] == "healthy" for r in rows), rows
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert EVIL_COMMAND[:40] in page.evaluate("document.body.textContent")  # shown, as text
        assert page.problems == [], page.problems
        page.screenshot(artifact_path("host-page.png"), 1400, 400)
        # a browser asking /apps gets the same page
        page.navigate("http://%s:%d/container-healthcheck/apps" % (appo2.ip, appo2.hc_port))
        assert page.evaluate("document.querySelectorAll('tbody tr').length") == 2
    finally:
        page.close()
        appo2.docker("rm", "-f", evil, check=False)


def test_15_entry_matrix_in_a_browser(healthy, browser):
    from browser import artifact_path
    appo3 = healthy["appos"][1]
    _maintenance(appo3, "drain", "--app", APP, "--reason", "disk <img src=x onerror=window.__pwned=3>")
    page = browser.new_page()
    try:
        url = "http://127.0.0.1:%d/container-healthcheck-status" % healthy["entry_port"]

        def cells():
            page.navigate(url)
            return page.evaluate(
                "Array.from(document.querySelectorAll('tbody tr')).map(function(r){return [r.getAttribute('data-app'),"
                "Array.from(r.querySelectorAll('td')).map(function(c){return c.className+'='+c.textContent})]})")

        def demo_drained():
            rows = dict(cells())
            return rows[APP] if APP in rows and any("bad=draining" in x for x in rows[APP]) else None
        row = wait_for(demo_drained, 15)
        assert row, cells()
        heads = page.evaluate("Array.from(document.querySelectorAll('thead th'))"
                              ".map(function(h){return h.textContent})")
        by_appo = dict(zip(heads[1:], row))
        assert by_appo[[h for h in heads if h.startswith(healthy["appos"][0].addr)][0]].startswith("ok=healthy")
        assert by_appo[[h for h in heads if h.startswith(appo3.addr)][0]].startswith("bad=draining: disk <img")
        page.settle()
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.problems == [], page.problems
        page.screenshot(artifact_path("entry-matrix.png"), 1200, 300)
    finally:
        page.close()
        _maintenance(appo3, "undrain")
