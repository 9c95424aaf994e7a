"""Answers on the wire: a report, a view or an error into (status, content type, body bytes)
(pure). Reading a /apps answer back is apps_answer.py's."""
import collections
import json

from healthcheck import errors, text
from healthcheck.bounded import BoundedCache
from healthcheck.models import error_envelope

JSON_TYPE = "application/json; charset=utf-8"
HEALTHY_STATUS, UNHEALTHY_STATUS = 200, 503

Rendered = collections.namedtuple("Rendered", "status content_type body")

_MEMO_MAX = 8192


def encode(envelope):
    """Compact UTF-8 JSON, the same bytes for the same envelope; never raises on odd text."""
    return text.utf8(json.dumps(envelope, ensure_ascii=False, separators=(",", ":")))


def with_member(encoded_object, key, encoded_value):
    """A JSON object's bytes with one more member whose value is already encoded: /apps
    reuses each app's cached answer bytes instead of encoding them again."""
    if not encoded_object.endswith(b"}"):
        raise ValueError("not an encoded JSON object")
    separator = b"" if encoded_object == b"{}" else b","
    return encoded_object[:-1] + separator + encode(key) + b":" + encoded_value + b"}"


def status_of(exc):
    """HTTP status for an exception that ended a request."""
    if isinstance(exc, errors.InvalidInput):
        return 400
    if isinstance(exc, errors.DockerError):
        return 503
    return 500


def render_error(exc):
    """400 for refused input, 503 for docker failures, 500 (code 16) for anything else: a bug."""
    status = status_of(exc)
    if status == 500:
        return render_envelope(500, error_envelope(errors.CODE_INTERNAL, "internal error"))
    return render_envelope(status, error_envelope(exc.code, str(exc)))


def render_envelope(status, envelope):
    return Rendered(status, JSON_TYPE, encode(envelope))


def report_status(report):
    return HEALTHY_STATUS if report.healthy else UNHEALTHY_STATUS


class Renderer(object):
    """Encodes reports once: the checker hands back the same report object while nothing
    changed, so its bytes are reused instead of encoded per request."""

    def __init__(self):
        self._bodies = BoundedCache(_MEMO_MAX)  # (app, include_all) -> (report, body)

    def report(self, report, include_all, stale_s=None):
        """One app's answer; stale_s (seconds) is added while docker does not answer."""
        if stale_s is not None:
            envelope = report.to_envelope()
            envelope["stale_s"] = round(stale_s, 1)
            return Rendered(report_status(report), JSON_TYPE, encode(envelope))
        return Rendered(report_status(report), JSON_TYPE, self._body(report, include_all))

    def apps(self, view, include_all):
        """/apps: every app with exactly its own answer, spliced from the per-app bytes."""
        head = collections.OrderedDict([("snapshot_age_s", round(max(view.snapshot_age_s, 0.0), 1))])
        if view.stale_s is not None:
            head["stale_s"] = round(view.stale_s, 1)
        head["healthy"] = [r.app for r in view.reports if r.healthy]
        # Why each other app is not healthy, in a few words, before the bulky per-app answers:
        # the entry balancer reads only this far.
        head["unhealthy"] = collections.OrderedDict((r.app, r.short) for r in view.reports if not r.healthy)
        apps = b"{" + b",".join(encode(r.app) + b":" + self._body(r, include_all) for r in view.reports) + b"}"
        message = with_member(encode(head), "apps", apps)
        envelope = encode(collections.OrderedDict([("code", errors.CODE_OK), ("status", "ok")]))
        return Rendered(HEALTHY_STATUS, JSON_TYPE, with_member(envelope, "message", message))

    def _body(self, report, include_all):
        key = (report.app, include_all)
        cached = self._bodies.get(key)
        if cached is not None and cached[0] is report:
            return cached[1]
        body = encode(report.to_envelope())
        self._bodies.put(key, (report, body))
        return body
