"""Plain values passed between modules: containers, probe results, health reports."""
import collections

from healthcheck import errors


class Port(collections.namedtuple("Port", "ip private_port public_port proto")):
    """One container port; ip and public_port are None when it is not published."""

    __slots__ = ()

    def to_dict(self):
        """Shaped like the Go tool's port object (Docker API field names)."""
        out = collections.OrderedDict()
        if self.ip is not None:
            out["IP"] = self.ip
        out["PrivatePort"] = self.private_port
        if self.public_port is not None:
            out["PublicPort"] = self.public_port
        out["Type"] = self.proto
        return out


_CONTAINER_FIELDS = "id name names image command created state status health ports"


class Container(collections.namedtuple("Container", _CONTAINER_FIELDS)):
    """One line of `docker ps`, parsed.

    id: full hex id; name: the primary name (no slash); names: every name as Docker
    printed it; created: Unix seconds; state: Docker's State word; health: healthy,
    unhealthy, starting or none; ports: tuple of Port.
    """

    __slots__ = ()

    @property
    def serves(self):
        """True when this container can take traffic: running, not paused, not restarting,
        and its HEALTHCHECK (if any) has passed."""
        return self.state == "running" and self.health not in ("unhealthy", "starting")

    def to_dict(self):
        """The Go tool's container object, plus `health`."""
        return collections.OrderedDict([
            ("command", self.command),
            ("container_id", self.id[:10]),
            ("created", self.created),
            ("image", self.image),
            ("names", self.name),
            ("port", [port.to_dict() for port in self.ports]),
            ("state", self.state),
            ("status", self.status),
            ("health", self.health),
        ])


PROBE_PENDING = "first probe has not finished yet"


# Why a probe got no status, for metrics and tables (the words are in `error`).
PROBE_TIMEOUT, PROBE_REFUSED, PROBE_RESET, PROBE_BAD_ANSWER, PROBE_ERROR, PROBE_CRASHED = (
    "timeout", "refused", "reset", "bad_answer", "error", "crashed")


class ProbeResult(collections.namedtuple("ProbeResult", "ok url status error failure")):
    """What GET /o/<app>/ on the APPO Nginx said: an HTTP status, or an error in words and
    its kind (failure: one of the PROBE_* names, None when a status came back)."""

    __slots__ = ()

    @classmethod
    def pending(cls, url):
        """Stands in while an app's first probe runs: not ok, since a balancer must not send
        users to an app whose uwsgi may be dead."""
        return cls(False, url, None, PROBE_PENDING)

    @property
    def is_pending(self):
        return self.status is None and self.error == PROBE_PENDING

    def describe(self):
        if self.is_pending:
            return "GET %s: %s" % (self.url, self.error)
        if self.error:
            return "GET %s failed: %s" % (self.url, self.error)
        return "GET %s answered %d" % (self.url, self.status)

    def to_dict(self):
        """The wire object: ok, url, then status or error (failure is not on the wire)."""
        out = collections.OrderedDict([("ok", self.ok), ("url", self.url)])
        if self.status is not None:
            out["status"] = self.status
        if self.error:
            out["error"] = self.error
        return out


_REPORT_FIELDS = "app healthy reason chosen containers probe drain short"


class HealthReport(collections.namedtuple("HealthReport", _REPORT_FIELDS)):
    """The verdict for one app. A result, not an exception: unhealthy is an answer.

    chosen: the Container whose object is the answer's message when healthy;
    containers: the matches listed in the answer; probe: ProbeResult or None; drain: the
    operator's Drain when this app is drained on this host, else None; short: the reason in
    a few words for tables and balancers ("exited", "probe 502", "draining: ..."), "" if healthy.
    """

    __slots__ = ()

    def to_envelope(self):
        """The wire answer: {code, status, message, containers[, probe]}."""
        if self.healthy:
            envelope = ok_envelope(self.chosen.to_dict())
        elif self.drain is not None:
            envelope = error_envelope(errors.CODE_DRAINING, self.reason)
        else:
            envelope = error_envelope(errors.CODE_UNHEALTHY, self.reason)
        envelope["containers"] = [c.to_dict() for c in self.containers]
        if self.probe is not None:
            envelope["probe"] = self.probe.to_dict()
        return envelope


HealthReport.__new__.__defaults__ = (None, "")  # drain, short
ProbeResult.__new__.__defaults__ = (None,)  # failure


def ok_envelope(message):
    return collections.OrderedDict([("code", errors.CODE_OK), ("status", "ok"), ("message", message)])


def error_envelope(code, message):
    return collections.OrderedDict([("code", code), ("status", "error"), ("message", message)])
