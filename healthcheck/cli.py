"""Entry point: parse flags, set up logging, wire the parts, serve or check; exit codes."""
import json
import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

from healthcheck import __version__, logs
from healthcheck.cache import TTLCache
from healthcheck.checker import Checker
from healthcheck.config import parse_args
from healthcheck.docker import DockerCLI
from healthcheck.errors import InvalidInput
from healthcheck.events import EventsWatcher
from healthcheck.matching import NamePattern, validate_app_code
from healthcheck.metrics import Metrics
from healthcheck.probe import probe_app
from healthcheck.snapshot import Snapshotter

log = logging.getLogger("healthcheck")

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNKNOWN = 0, 1, 2


class Service(object):
    """Everything one running instance owns, started and stopped together."""

    def __init__(self, args, metrics, refresh_s, max_stale_s, probe_ttl_s=0.0, probe_workers=0, events=False):
        self.metrics = metrics
        self.docker = DockerCLI(args.docker_bin, args.docker_timeout, env=os.environ,
                                observe=metrics.docker_call)
        self.snapshotter = Snapshotter(self.docker.list_containers, refresh_s, max_stale_s,
                                       wait_s=args.docker_timeout + 0.5)
        probe = _make_probe(args, metrics) if args.ngx_port else None
        self.pool = ThreadPoolExecutor(max_workers=probe_workers) if probe_workers else None
        self.checker = Checker(self.snapshotter, NamePattern(args.name_pattern), probe=probe,
                               probe_cache=TTLCache(probe_ttl_s, wait_s=args.probe_timeout + 1),
                               probe_pool=self.pool, observe=VerdictLog())
        self.events = EventsWatcher(self.docker, self.snapshotter.invalidate, metrics) if events else None
        metrics.set_sources(self.snapshotter.age_s, lambda: self.checker.all_answers()[2])

    def start(self):
        self.snapshotter.start()
        if self.events is not None:
            self.events.start()
        return self

    def stop(self):
        if self.events is not None:
            self.events.stop()
        self.snapshotter.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=False)


def _make_probe(args, metrics):
    def probe(app):
        result = probe_app(app, args.ngx_port, args.probe_timeout, args.probe_bad_status, args.ngx_host)
        metrics.probe_done(result)
        if not result.ok:
            log.warning("probe for %s: %s", app, result.describe())
        return result
    return probe


class VerdictLog(object):
    """Logs a verdict when it changes: a WARNING with the reason when an app turns (or is
    first seen) unhealthy, INFO when it recovers. Balancers poll every few seconds; repeating
    an unchanged verdict would bury the changes."""

    _MAX_APPS = 10000

    def __init__(self):
        self._last = {}

    def __call__(self, report):
        previous = self._last.get(report.app)
        # Docker's Status text ages every second; what matters is which containers are in
        # which state and what the probe said.
        probe = report.probe
        current = (report.healthy, tuple((c.name, c.state, c.health) for c in report.containers),
                   None if probe is None else (probe.ok, probe.status, probe.error))
        if previous == current:
            return
        if len(self._last) >= self._MAX_APPS:
            self._last.clear()
        self._last[report.app] = current
        if not report.healthy:
            log.warning("app %s is not healthy: %s", report.app, report.reason)
        elif previous is not None:
            log.info("app %s is healthy again: %s", report.app, report.chosen.name)


def serve(args):
    from healthcheck import server, web  # bottle and cheroot only where serving needs them

    file_handler = logs.configure(args.level, args.logpath)
    if shutil.which(args.docker_bin) is None:
        log.warning("docker CLI %r not found or not executable: every app check will answer 503 code 10 "
                    "until it is installed", args.docker_bin)
    if args.bind not in ("127.0.0.1", "::1", "localhost") and not args.allow:
        log.warning("listening on %s without --allow: any host that reaches this port learns which apps "
                    "run here; restrict it with --allow CIDR[,CIDR]", args.bind)
    metrics = Metrics()
    service = Service(args, metrics, args.refresh, args.max_stale, args.probe_ttl,
                      args.probe_concurrency, events=not args.no_events).start()
    access_log = logs.AccessLog().start()
    app = web.Instrumented(web.make_app(service.checker, metrics, args.prefix), metrics, args.allow, access_log)
    http = server.make_server(app, args.bind, args.port, threads=args.threads, backlog=args.backlog)
    log.warning("container-healthcheck %s: docker=%s refresh=%gs max-stale=%gs ngx-port=%d prefix=%s",
                __version__, args.docker_bin, args.refresh, args.max_stale, args.ngx_port, args.prefix or "/")
    try:
        server.serve_forever(http, on_hup=file_handler.reopen if file_handler else None)
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", args.bind, args.port, exc)
        return EXIT_UNKNOWN
    finally:
        service.stop()
        access_log.stop()
    log.warning("stopped")
    return 0


def check(args):
    logs.configure(args.level if args.level != "info" else "warning", args.logpath)
    try:
        validate_app_code(args.app_code)
    except InvalidInput as exc:
        print(json.dumps({"code": exc.code, "status": "error", "message": str(exc)}))
        return EXIT_UNKNOWN
    service = Service(args, Metrics(), refresh_s=0.0, max_stale_s=0.0).start()
    try:
        answer = service.checker.answer(args.app_code, args.all)
    finally:
        service.stop()
    sys.stdout.write(answer.body.decode("utf-8") + "\n")
    if answer.report is None:
        return EXIT_UNKNOWN
    return EXIT_HEALTHY if answer.report.healthy else EXIT_UNHEALTHY


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "check":
        return check(args)
    return serve(args)
