"""The HTTP layer: Bottle routes over a Checker; the only module that imports bottle."""
import ipaddress
import json
import logging
import pkgutil
import socket
import time

import bottle

from healthcheck import __version__, errors, feed_format as feeds, pages, render, text
from healthcheck.bounded import BoundedCache
from healthcheck.matching import validate_app_code
from healthcheck.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from healthcheck.models import error_envelope, ok_envelope

log = logging.getLogger(__name__)

_HEALTH_BODY = render.encode(ok_envelope("i'm healthy"))
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def load_openapi(prefix):
    """The packaged OpenAPI document, with `servers` set to this prefix."""
    document = json.loads(pkgutil.get_data("healthcheck", "openapi.json").decode("utf-8"))
    document["servers"] = [{"url": prefix or "/"}]
    document["info"]["version"] = __version__
    return document


def make_app(checker, metrics, prefix="/container-healthcheck", renderer=None, host=None, feed=None):
    """The Bottle app: routes under prefix, each mapped to the checker and the render layer;
    feed: the entry balancers' Feed (None: its route answers 404 code 14)."""
    app = bottle.Bottle(catchall=True, autojson=False)
    renderer = renderer or render.Renderer()
    openapi_body = render.encode(load_openapi(prefix))
    host = host or socket.gethostname()

    def send(answer):
        bottle.response.status = answer.status
        bottle.response.content_type = answer.content_type
        bottle.response.set_header("Cache-Control", "no-store")
        if answer.content_type == pages.HTML_TYPE:
            bottle.response.set_header("Content-Security-Policy", pages.CSP)
            bottle.response.set_header("X-Content-Type-Options", "nosniff")
            bottle.response.set_header("Referrer-Policy", "no-referrer")
        return answer.body

    def host_page():
        query = bottle.request.query.get("q", "")[:100]
        try:
            view = checker.check_all(False)
        except errors.DockerError as exc:
            return render.Rendered(503, pages.HTML_TYPE, pages.render_error_page(str(exc), host))
        return render.Rendered(200, pages.HTML_TYPE,
                               pages.render_host_page(view, checker.probe_ages(), host, query))

    def route(path, flags=()):
        """GET (and HEAD) route, with or without a trailing slash (health checkers do not
        follow redirects); bad input is a 400 envelope before the handler runs, a docker
        failure a 503 envelope after."""
        def register(handler):
            def guarded(**kwargs):
                try:
                    parsed = query_flags(flags)
                    if "app_code" in kwargs:
                        validate_app_code(kwargs["app_code"])
                    return send(handler(parsed, **kwargs))
                except errors.HealthcheckError as exc:
                    return send(render.render_error(exc))
            if path == "/":
                app.get(prefix + "/", name=handler.__name__)(guarded)
                if prefix:
                    app.get(prefix)(guarded)
            else:
                app.get(prefix + path, name=handler.__name__)(guarded)
                app.get(prefix + path + "/")(guarded)
            return handler
        return register

    @route("/")
    def index(_flags):
        return host_page()

    @route("/health")
    def health(_flags):
        return render.Rendered(200, render.JSON_TYPE, _HEALTH_BODY)

    @route("/apps/health/<app_code>", flags=("all",))
    def app_health(flags, app_code):
        include_all = flags.get("all", False)
        report, stale_s = checker.check(app_code, include_all)
        return renderer.report(report, include_all, stale_s)

    @route("/apps", flags=("all",))
    def apps(flags):
        bottle.response.set_header("Vary", "Accept")
        if pages.wants_html(bottle.request.get_header("Accept")):
            return host_page()
        include_all = flags.get("all", False)
        return renderer.apps(checker.check_all(include_all), include_all)

    @route("/apps/feed")
    def apps_feed(_flags):
        if feed is None:
            bottle.abort(404)  # answered by the 404 handler: code 14
        client_index, wait_s = feed_query()
        answer = feed.answer(client_index, wait_s)
        return render.Rendered(200, feeds.CONTENT_TYPE, feeds.render_feed(
            answer.index, answer.verdicts, answer.ages, answer.held, answer.stale_s))

    @route("/metrics")
    def prometheus(_flags):
        return render.Rendered(200, METRICS_CONTENT_TYPE, metrics.render())

    @route("/openapi.json")
    def openapi(_flags):
        return render.Rendered(200, render.JSON_TYPE, openapi_body)

    def error_page(code, status):
        def handler(error):
            bottle.response.content_type = render.JSON_TYPE
            bottle.response.set_header("Cache-Control", "no-store")
            if status == 500:
                log.error("internal error on %s: %s", bottle.request.path, error.traceback or error.body)
                message = "internal error"
            elif status == 400:
                message = "bad request: %s" % text.escaped(str(error.body))[:200]
            elif status == 405:
                message = "method %s not allowed; use %s" % (
                    text.escaped(bottle.request.method), bottle.response.get_header("Allow", "GET, HEAD"))
            else:
                message = "no such route: %s" % text.escaped(bottle.request.path)[:200]
            return render.encode(error_envelope(code, message))
        return handler

    app.error(400)(error_page(errors.CODE_INVALID_INPUT, 400))
    app.error(404)(error_page(errors.CODE_NO_ROUTE, 404))
    app.error(405)(error_page(errors.CODE_NO_ROUTE, 405))
    app.error(500)(error_page(errors.CODE_INTERNAL, 500))
    return app


def query_flags(allowed):
    """The boolean flags in `allowed` from the query string. Like the Go tool, other
    parameters (cache-busters such as `?_=<ts>`) are ignored and a repeated flag takes its
    first value; an empty value is false.
    :raises InvalidInput: a flag's value is not one of true/1/yes/false/0/no/empty."""
    if not bottle.request.environ.get("QUERY_STRING"):
        return {}
    flags = {}
    for name, value in bottle.request.query.allitems():
        if name not in allowed or name in flags:
            continue
        lowered = value.lower()
        if lowered in _TRUE:
            flags[name] = True
        elif lowered in _FALSE:
            flags[name] = False
        else:
            raise errors.InvalidInput("query parameter %s must be true or false, not %s" % (
                name, text.escaped(value)[:64]))
    return flags


def feed_query():
    """(index or None, wait seconds) of a feed request.
    :raises InvalidInput: index is not a whole number, or wait not 0..5 seconds."""
    query = bottle.request.query
    index_text, wait_text = query.get("index"), query.get("wait")
    try:
        index = int(index_text) if index_text not in (None, "") else None
        if index is not None and index < 0:
            raise ValueError
    except ValueError:
        raise errors.InvalidInput("query parameter index must be a whole number >= 0, not %s"
                                  % text.escaped(index_text)[:64])
    try:
        wait_s = float(wait_text) if wait_text not in (None, "") else feeds.DEFAULT_WAIT_S
        if not 0 <= wait_s <= feeds.MAX_WAIT_S:
            raise ValueError
    except ValueError:
        raise errors.InvalidInput("query parameter wait must be 0..%g seconds, not %s" % (
            feeds.MAX_WAIT_S, text.escaped(wait_text)[:64]))
    return index, wait_s


def _utf8_path(wsgi_path):
    try:
        wsgi_path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return False
    return True


def _refuse(environ, start_response, status, code, message):
    body = render.encode(error_envelope(code, message))
    start_response(status, [("Content-Type", render.JSON_TYPE), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


class Instrumented(object):
    """WSGI middleware: client allow-list, one access-log line and one metric per request."""

    def __init__(self, app, metrics, allow=None, access_log=None):
        self._app = app
        self._metrics = metrics
        self._access_log = access_log if access_log is not None and access_log.enabled else None
        self._allow = [ipaddress.ip_network(net, strict=False) for net in allow] if allow else None
        self._allowed_addrs = BoundedCache(10000)  # client address -> allowed

    def __call__(self, environ, start_response):
        started = time.monotonic()
        seen = []

        def recording_start_response(status, headers, exc_info=None):
            seen.append(status)
            return start_response(status, headers, exc_info)

        if self._allow is not None and not self._allowed(environ.get("REMOTE_ADDR", "")):
            result = _refuse(environ, recording_start_response, "403 Forbidden", errors.CODE_FORBIDDEN,
                             "client address not allowed")
        elif not _utf8_path(environ.get("PATH_INFO", "")):
            # Bottle would drop the undecodable bytes and route what is left.
            result = _refuse(environ, recording_start_response, "400 Bad Request", errors.CODE_INVALID_INPUT,
                             "bad request: the path is not UTF-8")
        else:
            result = self._app(environ, recording_start_response)
        status = int(seen[0][:3]) if seen else 500
        route = environ.get("bottle.route")
        label = route.rule if route is not None else ("forbidden" if status == 403 else "unmatched")
        self._metrics.http_request(label, status)
        # The feed is asked once a second per entry balancer: its plain answers are counted
        # in /metrics, not written line by line.
        if self._access_log is not None and not (status == 200 and label.rstrip("/").endswith("/apps/feed")):
            path = environ.get("PATH_INFO", "")
            query = environ.get("QUERY_STRING")
            if query:
                path = path + "?" + query
            self._access_log.add(text.escaped(environ.get("REQUEST_METHOD", ""))[:16], text.escaped(path)[:300], status,
                                 (time.monotonic() - started) * 1000, environ.get("REMOTE_ADDR", "-"))
        return result

    def _allowed(self, addr):
        verdict = self._allowed_addrs.get(addr)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(addr)
                verdict = any(ip in net for net in self._allow)
            except ValueError:
                verdict = False
            self._allowed_addrs.put(addr, verdict)
        return verdict
