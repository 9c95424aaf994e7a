"""Entry point: parse flags, set up logging, wire the parts, serve or check; exit codes."""
import io
import json
import logging
import os
import shutil
import sys
import time

from healthcheck import __version__, drain, logs, terminal, text
from healthcheck.apps_answer import reports_from_apps_answer
from healthcheck.checker import Checker
from healthcheck.config import parse_args
from healthcheck.docker import DockerCLI
from healthcheck.errors import HealthcheckError, InvalidInput
from healthcheck.events import EventsWatcher
from healthcheck.feed import Feed
from healthcheck.matching import NamePattern, validate_app_code
from healthcheck.metrics import Metrics
from healthcheck.probe_loop import ProbeLoop
from healthcheck.prober import Prober
from healthcheck.render import Renderer, render_error
from healthcheck.snapshot import Snapshotter
from healthcheck.verdict_log import VerdictLog

log = logging.getLogger("healthcheck")

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNKNOWN = 0, 1, 2


class Service(object):
    """Everything one running instance owns, started and stopped together."""

    def __init__(self, args, metrics, refresh_s, max_stale_s, probe_ttl_s=2.0, probe_workers=1,
                 events=False, safety_refresh_s=60.0, probe_wait_s=None, feed_waiters=None):
        self.metrics = metrics
        self.feed = None  # made below once the checker exists; pokes before that are dropped
        self.drains = drain.DrainWatcher(drain.state_path(args.state_dir))
        self.docker = DockerCLI(args.docker_bin, args.docker_timeout, env=os.environ,
                                observe=metrics.docker_call)
        self.snapshotter = Snapshotter(self.docker.list_containers, refresh_s, max_stale_s,
                                       wait_s=args.docker_timeout + 0.5, safety_refresh_s=safety_refresh_s,
                                       on_change=self._poke_feed)
        self.prober = _make_prober(args, metrics, probe_ttl_s, probe_workers, self._poke_feed) \
            if args.ngx_port else None
        self.checker = Checker(self.snapshotter, NamePattern(args.name_pattern), prober=self.prober,
                               probe_wait_s=args.probe_timeout if probe_wait_s is None else probe_wait_s,
                               observe=VerdictLog(), drains=self.drains)
        self.events = EventsWatcher(self.docker, self.snapshotter.invalidate, metrics,
                                    on_up=self.snapshotter.set_events_up) if events else None
        if feed_waiters is not None:
            self.feed = Feed(lambda: self.checker.check_all(False), self.checker.probe_evidence, feed_waiters,
                             watch=self.drains.current, settle_s=args.probe_timeout + 0.5 if self.prober else 0.0)
        metrics.set_sources(self.snapshotter.age_s, self.checker.current_reports, self.checker.probe_ages,
                            (lambda: self.feed.holding) if self.feed is not None else None)

    def _poke_feed(self):
        if self.feed is not None:
            self.feed.poke()

    def start(self):
        if self.feed is not None:
            self.feed.start()
        self.snapshotter.start()
        if self.prober is not None:
            self.prober.start()
        if self.events is not None:
            self.events.start()
        return self

    def stop(self):
        if self.events is not None:
            self.events.stop()
        if self.prober is not None:
            self.prober.stop()
        self.snapshotter.stop()
        if self.feed is not None:
            self.feed.stop()


def _make_prober(args, metrics, ttl_s, workers, on_change):
    """Probes from one thread over at most `workers` keep-alive connections to the APPO Nginx."""
    loop = ProbeLoop(args.ngx_host, args.ngx_port, args.probe_timeout, args.probe_bad_status,
                     max_connections=workers)

    def observe(app, result, changed):
        metrics.probe_done(result)
        if changed:
            on_change()
            if not result.ok:
                log.warning("probe for %s: %s", app, result.describe())

    return Prober(loop, ttl_s, workers, observe=observe, url_of=loop.url_of)


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
                      args.probe_concurrency, events=not args.no_events,
                      safety_refresh_s=args.safety_refresh,
                      feed_waiters=min(args.feed_waiters, args.threads - 1)).start()
    access_log = logs.AccessLog().start()
    app = web.Instrumented(web.make_app(service.checker, metrics, args.prefix, feed=service.feed), metrics,
                           args.allow, access_log)
    http = server.make_server(app, args.bind, args.port, threads=args.threads, backlog=args.backlog)
    log.warning("container-healthcheck %s: docker=%s refresh=%gs max-stale=%gs ngx-port=%d prefix=%s",
                __version__, args.docker_bin, args.refresh, args.max_stale, args.ngx_port, args.prefix or "/")
    try:
        # Held feed requests are answered at once on SIGTERM: the entries learn now, not a
        # heartbeat later, and the stop does not wait for them.
        server.serve_forever(http, on_hup=file_handler.reopen if file_handler else None,
                             on_stop=service.feed.release if service.feed is not None else None)
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
        write_json(render_error(exc).body)
        return EXIT_UNKNOWN
    # One probe, awaited until its own deadline: a command has no later request to wait for.
    service = Service(args, Metrics(), refresh_s=0.0, max_stale_s=0.0,
                      probe_wait_s=args.probe_timeout + 1.0).start()
    report = None
    try:
        report, stale_s = service.checker.check(args.app_code, args.all)
        answer = Renderer().report(report, args.all, stale_s)
    except HealthcheckError as exc:
        answer = render_error(exc)
    finally:
        service.stop()
    write_json(answer.body)
    if report is None:
        return EXIT_UNKNOWN
    return EXIT_HEALTHY if report.healthy else EXIT_UNHEALTHY


# Seconds the running service may take to see a new state file (DrainWatcher checks every 0.5 s).
_PICKUP_S = 1.0


def maintain(args):
    """drain / undrain: write the state file (atomically) that every running instance on this
    host reads; optionally wait until the entry balancer can have acted on it."""
    logs.configure("warning", None)
    try:
        for app in args.app:
            validate_app_code(app)
    except InvalidInput as exc:
        sys.stderr.write("container-healthcheck %s: %s\n" % (args.command, exc))
        return EXIT_UNKNOWN
    path = drain.state_path(args.state_dir)
    state, problem = drain.load(path)
    if problem:
        sys.stderr.write("container-healthcheck %s: %s; starting from an empty state\n" % (args.command, problem))
    if args.command == "drain":
        state.drain(args.app, args.reason, time.time())
    else:
        state.undrain(args.app)
    try:
        drain.save(path, state)
    except OSError as exc:
        sys.stderr.write("container-healthcheck %s: cannot write %s: %s (run it as root or as the "
                         "container-healthcheck user)\n" % (args.command, path, exc.strerror or exc))
        return EXIT_UNKNOWN
    what = ", ".join(args.app) if args.app else ("this host (all apps)" if args.command == "drain" else "everything")
    print("%s: %s" % ("drained" if args.command == "drain" else "undrained", what))
    print("now drained: %s" % (", ".join("%s (%s)" % ("all apps" if app == drain.ALL_APPS else app, d.describe())
                                         for app, d in sorted(state.drains.items())) or "nothing"))
    if args.wait:
        rounds = (args.entry_fall if args.command == "drain" else args.entry_rise) + 1
        seconds = _PICKUP_S + args.entry_interval * rounds
        print("waiting %.1f s: the service sees the file within %.1f s, then the entry balancer needs %d polls "
              "%.1f s apart (%s %d, plus the poll under way)" % (
                  seconds, _PICKUP_S, rounds, args.entry_interval,
                  "fall" if args.command == "drain" else "rise", rounds - 1))
        sys.stdout.flush()
        time.sleep(seconds)
        print("done: the entry balancer %s" % ("sends no new requests here" if args.command == "drain"
                                               else "can send requests here again"))
    return 0


def _apps_from_service(url, include_all, timeout_s):
    """(answer bytes or None, problem) from the running service's /apps."""
    import urllib.request
    target = url.rstrip("/") + "/apps" + ("?all=true" if include_all else "")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(urllib.request.Request(target, headers={"Accept": "application/json"}),
                         timeout=timeout_s) as response:
            return response.read(), None
    except urllib.error.HTTPError as exc:
        try:
            return None, json.loads(exc.read().decode("utf-8")).get("message", str(exc))
        except (ValueError, AttributeError):
            return None, str(exc)
    except (OSError, ValueError) as exc:  # ValueError: a URL http.client cannot send
        return None, "cannot ask %s: %s" % (target, exc)


def _apps_direct(args):
    """(AppsView or None, problem), asking docker and probing here, each app's probe awaited."""
    service = Service(args, Metrics(), refresh_s=60.0, max_stale_s=0.0, probe_workers=32,
                      probe_wait_s=args.probe_timeout + 1.0).start()
    try:
        view = service.checker.check_all(args.all)  # every app's probe starts now, in parallel
        reports = [service.checker.check(r.app, args.all)[0] for r in view.reports]
        return view._replace(reports=reports), None
    except HealthcheckError as exc:
        return None, str(exc)
    finally:
        service.stop()


def apps_table(args):
    """The apps as a table (or the /apps JSON), from the service or, with --direct, from
    docker here; both become the same reports before anything is printed."""
    logs.configure("warning", None)
    if args.direct:
        view, problem = _apps_direct(args)
        body = Renderer().apps(view, args.all).body if view is not None else None
        reports = view.reports if view is not None else None
    else:
        body, problem = _apps_from_service(args.url, args.all, args.docker_timeout + 2)
        reports = None
        if body is not None:
            try:
                reports = reports_from_apps_answer(json.loads(body.decode("utf-8")))
            except (ValueError, AttributeError, TypeError) as exc:
                reports, problem = None, "%s did not give a /apps answer: %s" % (args.url, exc)
    if reports is None:
        sys.stderr.write("container-healthcheck apps: %s\n" % problem)
        return EXIT_UNKNOWN
    if args.json:
        write_json(body)
    else:
        sys.stdout.write(terminal.render_table(terminal.rows(reports), sys.stdout.encoding))
    return EXIT_HEALTHY if all(r.healthy for r in reports) else EXIT_UNHEALTHY


def write_json(body):
    """JSON bytes as they are (UTF-8, as JSON is), whatever the locale's encoding."""
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a text-only stream (tests): give it text
        sys.stdout.write(body.decode("utf-8") + "\n")
    else:
        out.write(body + b"\n")
        out.flush()


def _never_raising_std_streams():
    """stdout and stderr that show what their encoding cannot (the C locale's ASCII) as
    \\uXXXX escapes instead of raising, so no output can turn an answer into a crash."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        buffer = getattr(stream, "buffer", None)
        if buffer is None or getattr(stream, "errors", None) == "backslashreplace":
            continue
        stream.flush()
        setattr(sys, name, io.TextIOWrapper(buffer, encoding=stream.encoding or "utf-8", errors="backslashreplace",
                                            line_buffering=True))


def main(argv=None):
    """Run a command; its exit code always means what README says (0 healthy, 1 unhealthy,
    2 could not tell), even when something unforeseen fails."""
    _never_raising_std_streams()
    argv = [text.from_argv(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    try:
        if args.command == "check":
            return check(args)
        if args.command == "apps":
            return apps_table(args)
        if args.command in ("drain", "undrain"):
            return maintain(args)
        return serve(args)
    except Exception as exc:  # a crash must not exit 1, which means "unhealthy"
        log.exception("container-healthcheck %s failed", args.command)
        sys.stderr.write("container-healthcheck %s: internal error: %s: %s\n" % (
            args.command, type(exc).__name__, exc))
        return EXIT_UNKNOWN
