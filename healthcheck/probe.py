"""The app probe, defined: GET /o/<app>/ on the APPO Nginx, and what its outcomes mean (pure).

healthcheck.probe_loop sends it; this module says what is sent and which result each outcome is.
"""
from healthcheck import __version__, models
from healthcheck.models import ProbeResult

# What the APPO Nginx answers when the app behind it is down.
DEFAULT_BAD_STATUSES = (502, 503, 504)


def probe_url(app, port, host="127.0.0.1"):
    return "http://%s:%d/o/%s/" % (host, port, app)


def probe_request(app, port):
    """The request bytes: HTTP/1.1, so the connection stays open for the next probe (the
    Host header is the one the Go tool sent)."""
    return ("GET /o/%s/ HTTP/1.1\r\nHost: localhost:%d\r\nUser-Agent: container-healthcheck/%s\r\n"
            "Accept: */*\r\n\r\n" % (app, port, __version__)).encode("ascii")


def answered(url, status, bad_statuses=DEFAULT_BAD_STATUSES):
    """The result of an answer: ok unless its status says the app is down."""
    return ProbeResult(status not in bad_statuses, url, status, None)


def timed_out(url, timeout_s):
    return ProbeResult(False, url, None, "timed out after %gs" % timeout_s, models.PROBE_TIMEOUT)


def bad_answer(url, words):
    return ProbeResult(False, url, None, words, models.PROBE_BAD_ANSWER)


def failed(url, exc):
    """The result of an OSError while connecting, sending or reading: refused, reset or other."""
    if isinstance(exc, ConnectionRefusedError):
        return ProbeResult(False, url, None, "connection refused", models.PROBE_REFUSED)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return ProbeResult(False, url, None, "connection reset", models.PROBE_RESET)
    return ProbeResult(False, url, None, exc.strerror or str(exc), models.PROBE_ERROR)


def crashed(url, exc):
    """A probe that raised is an unhealthy result with the reason, never a healthy one."""
    return ProbeResult(False, url, None, "probe crashed: %s: %s" % (type(exc).__name__, exc), models.PROBE_CRASHED)
