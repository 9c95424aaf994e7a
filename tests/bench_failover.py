"""Benchmark (not collected by `make test`; run by scripts/bench-failover): how fast the entry
stops sending users to an APPO whose app died, and takes it back, under steady GET + POST load.

The same processes as the e2e tests: two APPOs (own dockerd with live-restore, app container,
container-healthcheck, APPO Nginx), an entry Nginx on BlueKing's per-app upstream with the
shipped Lua. For each kind of event, N times: from the event (docker kill, the app process
killed in its running container, SIGSTOP of the APPO's Nginx and service) to the last user
request the entry sent to that APPO (its access log), and from the app serving again to the
first request sent there. Prints p50 / p99 / max and the failed requests.
"""
import os
import signal
import statistics
import time

from e2e import EJECT_MEMORY, NAME, cluster, healthy  # noqa: F401 (fixtures)
from support import child_pids, wait_for
from test_e2e_loss import _both_serving, loss_entry  # noqa: F401 (fixtures)

APPO_INDICES = (2, 3)  # the cluster's APPOs: 127.0.0.2, 127.0.0.3 (engines appo2, appo3)

EVENTS = int(os.environ.get("BENCH_EVENTS", "20"))
# Events here are 10 to 20 s apart: with the default 60 s memory each would count as the same
# peer failing again and be held longer each time (1, 2, 4 ... 30 s), which is right for a
# flapping peer but is not what one incident costs. The tests' entries forget an ejection
# after EJECT_MEMORY seconds, which makes every event a first one.
assert EJECT_MEMORY < 5


def _requests_to(access_log, addr, since_wall):
    """Start times (wall clock) of entry requests begun after since_wall that went to addr."""
    starts = []
    with open(access_log) as handle:
        for line in handle:
            fields = line.split(" ", 4)
            if len(fields) == 5 and addr in fields[3]:
                start = float(fields[0]) - float(fields[1])
                if start >= since_wall:
                    starts.append(start)
    return starts


def _pct(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100.0 * (len(ordered) - 1))))]


def _kinds(appo):
    def kill():
        appo.docker("kill", NAME)

    def unkill():
        appo.docker("start", NAME)
        # serving again once its web server answers on the APPO
        assert wait_for(lambda: appo.docker("exec", NAME, "sh", "-c", "pidof httpd", check=False) != "", 10)

    def stop():
        for pid in [appo.nginx.pid] + child_pids(appo.nginx.pid) + [appo.service.proc.pid]:
            os.kill(pid, signal.SIGSTOP)

    def cont():
        for pid in [appo.nginx.pid] + child_pids(appo.nginx.pid) + [appo.service.proc.pid]:
            os.kill(pid, signal.SIGCONT)
    return [("docker kill", kill, unkill), ("app process killed", appo.kill_app_process, appo.restart_app_process),
            ("SIGSTOP (hung APPO)", stop, cont)]


def test_failover_timings(healthy, loss_entry):
    appo = healthy["appos"][0]
    load = loss_entry["load"]
    lines = []
    for kind, event, restore in _kinds(appo):
        out_s, back_s, get_failed, post_failed, posts = [], [], 0, 0, 0
        for _ in range(EVENTS):
            assert wait_for(lambda: _both_serving(loss_entry), 40), kind
            started_mono, started_wall = time.monotonic(), time.time()
            event()
            time.sleep(5)
            last = _requests_to(loss_entry["access_log"], appo.addr, started_wall)
            out_s.append(max(last) - started_wall if last else 0.0)
            time.sleep(5)  # past eject_memory: the next event is a first one again
            restore()
            serving_wall = time.time()  # the app serves again from here on
            assert wait_for(lambda: _requests_to(loss_entry["access_log"], appo.addr, serving_wall), 40), kind
            back_s.append(min(_requests_to(loss_entry["access_log"], appo.addr, serving_wall)) - serving_wall)
            ended = time.monotonic()
            assert wait_for(lambda: load.settled(ended), 30)
            records = load.between(started_mono, ended)
            get_failed += sum(1 for r in records if r[1] == "GET" and r[2] != 200)
            post_failed += sum(1 for r in records if r[1] == "POST" and r[2] != 200)
            posts += sum(1 for r in records if r[1] == "POST")
        lines.append("  %-22s event -> last request to A: p50 %.2f s, p99 %.2f s, max %.2f s; app serving -> "
                     "back in: p50 %.2f s, p99 %.2f s, max %.2f s; failed GET %d, POST %d of %d (%d events)" % (
                         kind, statistics.median(out_s), _pct(out_s, 99), max(out_s), statistics.median(back_s),
                         _pct(back_s, 99), max(back_s), get_failed, post_failed, posts, EVENTS))
    print("\ncontainer-healthcheck failover benchmark, %s, %d cores, 40 GET/s + 10 POST/s through the entry:\n%s"
          % (time.strftime("%Y-%m-%d"), os.cpu_count(), "\n".join(lines)))
