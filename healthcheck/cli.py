"""The commands: serve, check, apps, drain and undrain, and their exit codes. The service's
wiring is service.py's; output in any locale, console.py's; asking a running service, client.py's."""
import json
import logging
import shutil
import sys
import time

from healthcheck import __version__, client, drain, logs, terminal, text
from healthcheck.apps_answer import reports_from_apps_answer
from healthcheck.config import parse_args
from healthcheck.console import never_raising_std_streams, write_json
from healthcheck.errors import HealthcheckError, InvalidInput
from healthcheck.matching import validate_app_code
from healthcheck.metrics import Metrics
from healthcheck.render import Renderer, render_error
from healthcheck.service import Service

log = logging.getLogger("healthcheck")

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNKNOWN = 0, 1, 2


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
        body, problem = client.apps_answer(args.url, args.all, args.docker_timeout + 2)
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


def main(argv=None):
    """Run a command; its exit code always means what README says (0 healthy, 1 unhealthy,
    2 could not tell), even when something unforeseen fails."""
    never_raising_std_streams()
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
