"""The app probe: GET /o/<app>/ on the APPO Nginx, no redirects, a hard deadline, a bounded read."""
import socket
import time

from healthcheck import __version__, models
from healthcheck.models import ProbeResult

# What the APPO Nginx answers when the app behind it is down.
DEFAULT_BAD_STATUSES = (502, 503, 504)

_MAX_STATUS_LINE = 8192


def probe_url(app, port, host="127.0.0.1"):
    return "http://%s:%d/o/%s/" % (host, port, app)


def probe_app(app, port, timeout_s=2.0, bad_statuses=DEFAULT_BAD_STATUSES, host="127.0.0.1"):
    """Ask the APPO Nginx whether the app answers.

    Only the status line is read (at most 8 KiB, whatever the body), so a slow or huge
    answer costs at most timeout_s. Refused, reset, timed out or a bad status is not ok.
    :rtype: ProbeResult
    """
    url = probe_url(app, port, host)
    deadline = time.monotonic() + timeout_s
    try:
        status = _read_status(host, port, app, deadline)
    except socket.timeout:
        return ProbeResult(False, url, None, "timed out after %gs" % timeout_s, models.PROBE_TIMEOUT)
    except ConnectionRefusedError:
        return ProbeResult(False, url, None, "connection refused", models.PROBE_REFUSED)
    except ConnectionResetError:
        return ProbeResult(False, url, None, "connection reset", models.PROBE_RESET)
    except _BadAnswer as exc:
        return ProbeResult(False, url, None, str(exc), models.PROBE_BAD_ANSWER)
    except OSError as exc:
        return ProbeResult(False, url, None, exc.strerror or str(exc), models.PROBE_ERROR)
    return ProbeResult(status not in bad_statuses, url, status, None)


class _BadAnswer(Exception):
    pass


def _remaining(deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout()
    return left


def _read_status(host, port, app, deadline):
    sock = socket.create_connection((host, port), timeout=_remaining(deadline))
    try:
        request = ("GET /o/%s/ HTTP/1.1\r\nHost: localhost:%d\r\nUser-Agent: container-healthcheck/%s\r\n"
                   "Accept: */*\r\nConnection: close\r\n\r\n" % (app, port, __version__))
        sock.settimeout(_remaining(deadline))
        sock.sendall(request.encode("ascii"))
        received = b""
        while b"\n" not in received:
            if len(received) >= _MAX_STATUS_LINE:
                raise _BadAnswer("no HTTP status line in the first %d bytes" % _MAX_STATUS_LINE)
            sock.settimeout(_remaining(deadline))
            chunk = sock.recv(_MAX_STATUS_LINE - len(received))
            if not chunk:
                raise _BadAnswer("connection closed before an HTTP status line")
            received += chunk
    finally:
        sock.close()
    return _parse_status_line(received.split(b"\n", 1)[0])


def _parse_status_line(line):
    parts = line.decode("latin-1").strip().split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise _BadAnswer("not an HTTP answer: %.60r" % line)
    return int(parts[1])
