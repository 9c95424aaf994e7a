"""What users lose, end to end, when something dies or restarts: steady GET + POST load
through a replica of BlueKing's entry (per-app upstream, shipped snippets) on APPOs of their
own (127.0.0.5, 127.0.0.6 and, for the capacity tests, 127.0.0.7), each with its own dockerd,
app container, container-healthcheck and APPO Nginx (tests/e2e.py)."""
import os
import signal
import threading
import time
import urllib.request

import pytest

from e2e import cluster, healthy  # noqa: F401 (fixtures)
from e2e import (APP, KEEP_STALE, NAME, TEST_TIMING, Appo, _bk_entry_setting, _maintenance, _restore, entry_status,
                 start_bk_entry, stop_bk_entry, usable_at)
from support import LUA_DIR, child_pids, free_port, stop_nginx, wait_for

APPO_INDICES = (5, 6)  # the cluster's APPOs: 127.0.0.5, 127.0.0.6 (engines appo5, appo6)
THIRD_APPO = 7  # the capacity tests' third APPO: 127.0.0.7 (engine appo7)

# The loss tests' entries keep the shipped keep_stale: a hung or restarting service lives through it.
LOSS_TIMING = TEST_TIMING.replace("keep_stale = %d," % KEEP_STALE, "keep_stale = 30,")


# ---- Issue 18: what users lose when an app dies on one APPO, GET and POST ----
#
# An entry built as an operator's platform has it: BlueKing 6.x's per-app upstream (both APPOs
# primary) with the shipped snippets (the OpenResty path, ngx.upstream from its double), and
# steady user traffic through it: 40 GET/s and 10 POST/s. nginx retries a GET that failed on
# another APPO, never a POST that reached one: a POST failure is a user's lost request.

LOSS_UPSTREAM = """
upstream %(app)s {
    server %(a)s max_fails=1 fail_timeout=30s;
    server %(b)s max_fails=1 fail_timeout=30s;
}
"""
# BlueKing keeps nginx's 60 s proxy_read_timeout (apps take up to 600 s); the test shortens it
# so that requests a hung APPO swallowed end within the test.
READ_TIMEOUT = "proxy_read_timeout 4s;"
LOSS_EXTRA_INIT = ""  # more init({...}) options for the loss entry (the failover benchmark sets some)
ENTRY_LOG = "$msec $request_time $request_method \"$upstream_addr\" \"$upstream_status\" $status"


class Load(object):
    """Steady user traffic through the entry: GET and POST at fixed rates, each request on a
    thread of its own (one that hangs slows nobody). Records (start, method, status, body)."""

    def __init__(self, port, get_rate=40, post_rate=10, timeout_s=10):
        self.base = "http://127.0.0.1:%d/o/%s/" % (port, APP)
        self.records = []
        self._running = {}
        self._lock = threading.Lock()
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._pacers = [threading.Thread(target=self._pace, args=(m, r), daemon=True)
                        for m, r in (("GET", get_rate), ("POST", post_rate))]
        for pacer in self._pacers:
            pacer.start()

    def _pace(self, method, rate):
        due = time.monotonic()
        while not self._stop.is_set():
            due += 1.0 / rate
            self._stop.wait(max(0.0, due - time.monotonic()))
            threading.Thread(target=self._one, args=(method,), daemon=True).start()

    def _one(self, method):
        started = time.monotonic()
        with self._lock:
            self._running[id(threading.current_thread())] = started
        url, data = (self.base, None) if method == "GET" else (self.base + "post", b"order=1")
        try:
            with self._opener.open(urllib.request.Request(url, data=data, method=method),
                                   timeout=self._timeout_s) as response:
                record = (started, method, response.status, response.read().decode().strip())
        except urllib.error.HTTPError as exc:
            record = (started, method, exc.code, "")
        except Exception as exc:  # timeouts, resets: failures the test counts
            record = (started, method, 0, type(exc).__name__)
        with self._lock:
            self.records.append(record)
            self._running.pop(id(threading.current_thread()), None)

    def settled(self, until):
        """Every request started before `until` has ended."""
        with self._lock:
            return all(started >= until for started in self._running.values())

    def between(self, start, end):
        with self._lock:
            return [r for r in self.records if start <= r[0] < end]

    def stop(self):
        self._stop.set()
        for pacer in self._pacers:
            pacer.join(5)


def _entry_under_load(cluster, name, upstream, appos):
    """An entry as an operator's platform has it (BlueKing 6.x's per-app upstream with the
    shipped snippets and keep_stale), logging every request, under steady GET + POST load.
    Yields its state; stops it afterwards (no Lua error may have been logged)."""
    _, _, workdir = _bk_entry_setting(cluster, name)
    port = free_port()
    values = {"dir": workdir, "paas": free_port(), "port": port, "app": APP}
    values.update({key: appo.addr for key, appo in zip("abc", appos)})
    access_log = os.path.join(workdir, "entry-access.log")

    def with_log_and_read_timeout(nginx_conf, paas_conf):
        nginx_conf = nginx_conf.replace("    access_log off;", "    log_format loss '%s';\n    access_log %s loss;" % (
            ENTRY_LOG, access_log), 1)
        snippet = open(os.path.join(LUA_DIR, "entry-paas.conf")).read()
        paas_conf = paas_conf.replace("include %s/entry-paas.conf;" % LUA_DIR, snippet.replace(
            "proxy_connect_timeout 3;", "proxy_connect_timeout 3;\n    " + READ_TIMEOUT))
        return nginx_conf, paas_conf
    proc, error_log = start_bk_entry(workdir, name, upstream % values, values, "127.0.0.1 localhost\n",
                                     extra_init=LOSS_EXTRA_INIT, edit=with_log_and_read_timeout, timing=LOSS_TIMING)
    state = {"port": port, "proc": proc, "workdir": workdir, "access_log": access_log,
             "appo_addrs": [appo.addr for appo in appos], "error_log": error_log, "load": Load(port)}
    try:
        yield state
    finally:
        state["load"].stop()
        stop_bk_entry(proc, error_log)


@pytest.fixture(scope="module")
def loss_entry(cluster):
    yield from _entry_under_load(cluster, "loss", LOSS_UPSTREAM, cluster["appos"])


def _attempts_at(access_log, addr, since_wall):
    """Entry access-log lines of requests that began after since_wall (wall clock) and were
    sent to addr, on any attempt."""
    hits = []
    with open(access_log) as handle:
        for line in handle:
            fields = line.split(" ", 4)
            if len(fields) == 5 and float(fields[0]) - float(fields[1]) >= since_wall and addr in fields[3]:
                hits.append(line.strip())
    return hits


def _both_serving(entry):
    """The entry would send the app's requests to every one of its APPOs."""
    return all(usable_at(entry["port"], APP, addr) for addr in entry["appo_addrs"])


def trial(entry, name, event, watch_s, restore=None):
    """Run one everyday event under the steady load; return (GET failures, POST failures,
    records) for requests started from the event until watch_s after it, and print the counts."""
    load = entry["load"]
    assert wait_for(lambda: _both_serving(entry), 40), "both APPOs should serve before %s" % name
    started = time.monotonic()
    event()
    # a window of watch_s seconds' worth of requests (50 a second), counted, not slept
    assert wait_for(lambda: len(load.between(started, time.monotonic())) >= watch_s * 50, watch_s * 4 + 10)
    ended = time.monotonic()
    if restore is not None:
        restore()
    assert wait_for(lambda: load.settled(ended), 30)
    records = load.between(started, ended)
    gets = [r for r in records if r[1] == "GET"]
    posts = [r for r in records if r[1] == "POST"]
    get_failed = [r for r in gets if r[2] != 200]
    post_failed = [r for r in posts if r[2] != 200]
    print("\n%s: GET failed %d / %d, POST failed %d / %d" % (name, len(get_failed), len(gets), len(post_failed),
                                                             len(posts)))
    assert len(gets) > watch_s * 20 and len(posts) > watch_s * 5, (len(gets), len(posts))
    return get_failed, post_failed, records


@pytest.fixture
def loss(healthy, loss_entry):
    """Back to both APPOs serving the app (the healthy fixture), with the loss entry up."""
    yield loss_entry
    for appo in healthy["appos"]:
        _restore(appo)


def test_16_container_killed_costs_no_get_and_at_most_one_post(healthy, loss):
    appo_a = healthy["appos"][0]
    killed_wall = []

    def kill():
        killed_wall.append(time.time())
        appo_a.docker("kill", NAME)
    get_failed, post_failed, _ = trial(loss, "container killed", kill, 5)
    assert get_failed == [] and len(post_failed) <= 1, (get_failed, post_failed)
    # Out for good within a second and a half: no user request reached A after that.
    assert _attempts_at(loss["access_log"], appo_a.addr, killed_wall[0] + 1.5) == []
    appo_a.docker("start", NAME)
    assert wait_for(lambda: _both_serving(loss), 15), "A serves again after its container restarts"


def test_17_app_process_dead_in_a_running_container_costs_at_most_one_post(healthy, loss):
    appo_a = healthy["appos"][0]
    get_failed, post_failed, _ = trial(loss, "app process killed", appo_a.kill_app_process, 5)
    assert get_failed == [] and len(post_failed) <= 1, (get_failed, post_failed)
    assert appo_a.docker("inspect", "-f", "{{.State.Status}}", NAME) == "running"
    appo_a.restart_app_process()
    assert wait_for(lambda: _both_serving(loss), 15)


def test_18_hung_appo_loses_only_requests_sent_before_it_was_out(healthy, loss):
    appo_a = healthy["appos"][0]
    pids = [appo_a.nginx.pid] + child_pids(appo_a.nginx.pid) + [appo_a.service.proc.pid]
    moments = {}

    def hang():
        moments["stopped"] = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)  # connections still accepted by the kernel, never answered
        out = wait_for(lambda: not entry_status(loss["port"])["appos"][appo_a.addr]["fresh"], 10, 0.02)
        moments["out"] = time.monotonic() if out else None

    def resume():
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    get_failed, post_failed, _ = trial(loss, "APPO hung (SIGSTOP)", hang, 6, restore=resume)
    assert moments["out"], "the entry never took the hung APPO out"
    print("hung APPO out after %.2f s" % (moments["out"] - moments["stopped"]))
    # GET: the entry's read timeout ends it and it is retried on the other APPO; a POST sent to
    # A before A was out is lost, and only those.
    assert get_failed == [], get_failed
    late = [r for r in post_failed if r[0] > moments["out"] + 0.05]
    assert late == [], (late, moments)
    assert wait_for(lambda: _both_serving(loss), 15)


def _no_loss(entry, name, event, watch_s, restore=None):
    get_failed, post_failed, _ = trial(entry, name, event, watch_s, restore)
    assert get_failed == [] and post_failed == [], (name, get_failed[:3], post_failed[:3])


def test_19_service_restarts_lose_nothing(healthy, loss):
    appo_a, appo_b = healthy["appos"]

    def restart_one():
        appo_a.stop_service()
        appo_a.start_service()

    def restart_both():
        appo_a.stop_service()
        appo_b.stop_service()
        appo_a.start_service()
        appo_b.start_service()
    _no_loss(loss, "service restart on one APPO", restart_one, 4)
    _no_loss(loss, "service restart on both APPOs", restart_both, 4)


def test_20_entry_reloads_lose_nothing(healthy, loss):
    def reload_twice():
        for _ in range(2):
            workers = set(child_pids(loss["proc"].pid))
            os.kill(loss["proc"].pid, signal.SIGHUP)
            assert wait_for(lambda: set(child_pids(loss["proc"].pid)) - workers, 10)  # new workers up
    _no_loss(loss, "entry reload twice", reload_twice, 5)
    text = open(loss["error_log"]).read()
    assert "runtime error" not in text and "failed, retrying" not in text, text[-3000:]


def test_21_dockerd_restart_with_live_restore_loses_nothing(healthy, loss):
    appo_a = healthy["appos"][0]

    def restart_dockerd():
        appo_a.dockerd_down()
        appo_a.dockerd_up()
    _no_loss(loss, "dockerd restart (live-restore)", restart_dockerd, 4)
    assert appo_a.docker("inspect", "-f", "{{.State.Status}}", NAME) == "running"


def test_22_drain_then_maintenance_loses_nothing(healthy, loss):
    appo_a = healthy["appos"][0]

    def drain_and_stop():
        _maintenance(appo_a, "drain", "--reason", "kernel update", "--wait", "--entry-interval", "1")
        appo_a.docker("stop", "-t", "1", NAME)
    _no_loss(loss, "drain --wait, then the container stopped", drain_and_stop, 3)
    appo_a.docker("start", NAME)
    _maintenance(appo_a, "undrain")


def test_23_redeploy_loses_nothing(healthy, loss):
    appo_a = healthy["appos"][0]
    new_name = "%s-1700000001" % APP

    def redeploy():
        # BlueKing: the new container starts, serves, then the old one is removed.
        appo_a.start_app(new_name, 9001)
        assert wait_for(lambda: appo_a.docker("inspect", "-f", "{{.State.Health.Status}}", new_name) == "healthy", 15)
        appo_a.docker("rm", "-f", NAME)
    try:
        _no_loss(loss, "redeploy", redeploy, 3)
    finally:
        appo_a.start_app()  # back to the usual container on its usual port
        appo_a.docker("rm", "-f", new_name, check=False)


def test_24_appo_refusing_connections_loses_nothing(healthy, loss):
    appo_a = healthy["appos"][0]

    def stop_appo():
        stop_nginx(appo_a.nginx)
        appo_a.stop_service()

    def start_appo():
        appo_a.start_nginx()
        appo_a.start_service()
    _no_loss(loss, "APPO refusing (nginx and service stopped)", stop_appo, 4, restore=start_appo)


# ---- Issue 24: never hurt a healthy app. Capacity, with a third APPO ----
#
# The same entry as the loss tests, on an app upstream of three APPOs: events where nothing
# users reach is wrong (one endpoint broken everywhere, a hung or restarting health service)
# must not take capacity out, and must not let a real death cost more than before.

CAPACITY_UPSTREAM = """
upstream %(app)s {
    server %(a)s max_fails=1 fail_timeout=30s;
    server %(b)s max_fails=1 fail_timeout=30s;
    server %(c)s max_fails=1 fail_timeout=30s;
}
"""


@pytest.fixture(scope="module")
def third_appo(cluster):
    """A third APPO (THIRD_APPO: its own dockerd, app container, service and APPO Nginx)."""
    first = cluster["appos"][0]
    appo = Appo(THIRD_APPO, cluster["workdir"], first.ngx_port, first.hc_port)
    try:
        appo.start_app()
        appo.start_service()
        appo.start_nginx()
        yield appo
    finally:
        appo.stop_service()
        if appo.nginx:
            stop_nginx(appo.nginx)
        appo.docker("rm", "-f", NAME, check=False)
        appo.dockerd_down()


@pytest.fixture(scope="module")
def capacity_entry(cluster, third_appo):
    yield from _entry_under_load(cluster, "capacity", CAPACITY_UPSTREAM, cluster["appos"] + [third_appo])


@pytest.fixture
def three(healthy, third_appo, capacity_entry):
    """All three APPOs serving the app through the capacity entry."""
    _restore(third_appo)
    assert wait_for(lambda: _both_serving(capacity_entry), 40), entry_status(capacity_entry["port"])
    yield capacity_entry
    for appo in healthy["appos"] + [third_appo]:
        _restore(appo)


class Caller(object):
    """One client calling one URL at a steady rate (a page's broken widget): its statuses."""

    def __init__(self, port, path, every_s=1.0):
        self.url = "http://127.0.0.1:%d%s" % (port, path)
        self.statuses = []
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s):
        while not self._stop.is_set():
            try:
                with self._opener.open(self.url, timeout=10) as response:
                    self.statuses.append(response.status)
            except urllib.error.HTTPError as exc:
                self.statuses.append(exc.code)
            except Exception:  # a timeout or reset: counted as 0
                self.statuses.append(0)
            self._stop.wait(every_s)

    def stop(self):
        self._stop.set()
        self._thread.join(15)


def _window(load, seconds):
    """Let the steady load run for `seconds` worth of requests (50 a second): (start, end)."""
    start = time.monotonic()
    assert wait_for(lambda: len(load.between(start, time.monotonic())) >= seconds * 50, seconds * 4 + 10)
    return start, time.monotonic()


def _shares(records, labels):
    """Each APPO's share (percent) of the requests that got an answer, by the label it answered."""
    served = [r[3] for r in records if r[2] == 200]
    return {label: 100.0 * served.count(label) / max(1, len(served)) for label in labels}


def _failed(records, method):
    return [r for r in records if r[1] == method and r[2] != 200]


def test_25_one_endpoint_broken_everywhere_takes_no_appo_out_then_a_dead_container_costs_at_most_one_post(
        healthy, third_appo, three):
    entry = three
    load = entry["load"]
    appo_a = healthy["appos"][0]
    labels = [appo.label for appo in healthy["appos"] + [third_appo]]
    buggy = Caller(entry["port"], "/o/%s/broken" % APP)
    try:
        start, end = _window(load, 7)
        assert wait_for(lambda: load.settled(end), 30)
        buggy_phase = load.between(start, end)
        shares = _shares(buggy_phase, labels)
        print("\nbroken endpoint (502 on every APPO, 1 call/s), %d calls: GET failed %d / %d, POST failed %d / %d, "
              "shares %s" % (len(buggy.statuses), len(_failed(buggy_phase, "GET")),
                             len([r for r in buggy_phase if r[1] == "GET"]), len(_failed(buggy_phase, "POST")),
                             len([r for r in buggy_phase if r[1] == "POST"]),
                             ", ".join("%s %.0f%%" % (k, v) for k, v in sorted(shares.items()))))
        assert buggy.statuses and set(buggy.statuses) == {502}  # the endpoint's own failure, every time
        assert _failed(buggy_phase, "GET") == [] and _failed(buggy_phase, "POST") == []
        assert all(share >= 20 for share in shares.values()), shares
        killed = time.monotonic()
        appo_a.docker("kill", NAME)
        _, after_end = _window(load, 4)
        assert wait_for(lambda: load.settled(after_end), 30)
        after = load.between(killed, after_end)
        get_failed, post_failed = _failed(after, "GET"), _failed(after, "POST")
        print("then A's container killed: GET failed %d / %d, POST failed %d / %d" % (
            len(get_failed), len([r for r in after if r[1] == "GET"]), len(post_failed),
            len([r for r in after if r[1] == "POST"])))
        assert get_failed == [] and len(post_failed) <= 1, (get_failed, post_failed)
    finally:
        buggy.stop()


def _keeps_its_share(name, records, labels, mine):
    """Print what was lost and each APPO's share; assert nothing lost and `mine` within 10
    points of the others' mean."""
    shares = _shares(records, labels)
    print("%s: GET failed %d, POST failed %d, shares %s" % (
        name, len(_failed(records, "GET")), len(_failed(records, "POST")),
        ", ".join("%s %.0f%%" % (k, v) for k, v in sorted(shares.items()))))
    assert _failed(records, "GET") == [] and _failed(records, "POST") == []
    others = [share for label, share in shares.items() if label != mine]
    assert abs(shares[mine] - sum(others) / len(others)) <= 10, shares


def test_26_a_hung_or_restarting_health_service_keeps_its_appo_s_share(healthy, third_appo, three):
    entry = three
    load = entry["load"]
    appo_a = healthy["appos"][0]
    labels = [appo.label for appo in healthy["appos"] + [third_appo]]
    os.kill(appo_a.service.proc.pid, signal.SIGSTOP)  # the service hangs; A's Nginx and app serve
    try:
        assert wait_for(lambda: entry_status(entry["port"])["appos"][appo_a.addr]["stale_since"] is not None, 10)
        start, end = _window(load, 6)
        assert entry_status(entry["port"])["appos"][appo_a.addr]["fresh"]  # still in, verdicts kept
    finally:
        os.kill(appo_a.service.proc.pid, signal.SIGCONT)
    assert wait_for(lambda: load.settled(end), 30)
    _keeps_its_share("\nA's health service hung (SIGSTOP) 6 s", load.between(start, end), labels, appo_a.label)
    assert wait_for(lambda: entry_status(entry["port"])["appos"][appo_a.addr]["stale_since"] is None, 15)

    def restart():
        appo_a.stop_service()
        appo_a.start_service()
    start = time.monotonic()
    restart()
    _, end = _window(load, 3)
    assert wait_for(lambda: load.settled(end), 30)
    _keeps_its_share("A's health service restarted", load.between(start, end), labels, appo_a.label)
