"""Plain values passed between modules: containers, probe results, drains, health reports.

HealthReport is the one model of an answer: the envelope, /apps, the host page, the terminal
table and `apps --direct` all render from it, and `apps` reads a service's answer back into it.
"""
import collections
import time

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

    @classmethod
    def from_dict(cls, obj):
        """The wire object read back (a service's answer)."""
        return cls(obj.get("IP"), obj.get("PrivatePort"), obj.get("PublicPort"), obj.get("Type") or "")


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

    @classmethod
    def from_dict(cls, obj):
        """The wire object read back (a service's answer): id is the 10-hex prefix it carries.
        :raises ValueError: obj is not a container object."""
        if not isinstance(obj, dict):
            raise ValueError("a container is not an object")
        name = obj.get("names") or ""
        return cls(obj.get("container_id") or "", name, (name,), obj.get("image") or "", obj.get("command") or "",
                   obj.get("created") or 0, obj.get("state") or "", obj.get("status") or "",
                   obj.get("health") or "none",
                   tuple(Port.from_dict(p) for p in obj.get("port") or () if isinstance(p, dict)))


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

    @property
    def words(self):
        """The result in a table cell: "pending", the status, or the error."""
        if self.is_pending:
            return "pending"
        if self.status is not None:
            return str(self.status)
        return self.error or "failed"

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

    @classmethod
    def from_dict(cls, obj):
        """The wire object read back; the failure kind is not on the wire (None)."""
        if not isinstance(obj, dict):
            raise ValueError("a probe is not an object")
        return cls(obj.get("ok") is True, obj.get("url") or "", obj.get("status"), obj.get("error"))


class Drain(collections.namedtuple("Drain", "reason since")):
    """One drain: why (operator's words) and since when (Unix seconds; None when read back
    from an answer, which does not carry it)."""

    __slots__ = ()

    _SHORT_PREFIX = "draining: "

    def short(self):
        """The few words tables and balancers show: "draining" and the reason."""
        return "draining" + (": " + self.reason if self.reason else "")

    @classmethod
    def from_short(cls, short):
        """The drain a /apps answer's few words describe (its time is not on the wire)."""
        return cls(short[len(cls._SHORT_PREFIX):] if short.startswith(cls._SHORT_PREFIX) else "", None)

    def describe(self):
        if self.since is None:
            return "draining%s" % (": " + self.reason if self.reason else "")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.since))
        return "draining since %s%s" % (stamp, ": " + self.reason if self.reason else "")


_REPORT_FIELDS = "app healthy reason chosen containers probe drain short"


class HealthReport(collections.namedtuple("HealthReport", _REPORT_FIELDS)):
    """The verdict for one app. A result, not an exception: unhealthy is an answer.

    chosen: the Container whose object is the answer's message when healthy;
    containers: the matches listed in the answer; probe: ProbeResult or None; drain: the
    operator's Drain when this app is drained on this host, else None; short: the reason in
    a few words for tables and balancers ("exited", "probe 502", "draining: ..."), "" if healthy.
    """

    __slots__ = ()

    @property
    def code(self):
        """The envelope code: CODE_OK, CODE_DRAINING or CODE_UNHEALTHY."""
        if self.healthy:
            return errors.CODE_OK
        return errors.CODE_DRAINING if self.drain is not None else errors.CODE_UNHEALTHY

    @property
    def verdict_word(self):
        """The verdict in one word for tables and pages: healthy, draining or UNHEALTHY."""
        if self.healthy:
            return "healthy"
        return "draining" if self.drain is not None else "UNHEALTHY"

    @staticmethod
    def order(report):
        """Sort key of every list of reports people read: the not healthy first, then by app."""
        return (report.healthy, report.app)

    @property
    def serving(self):
        """The container a table shows: the one answering, else the newest listed, else None."""
        return self.chosen or (self.containers[0] if self.containers else None)

    def to_envelope(self):
        """The wire answer: {code, status, message, containers[, probe]}."""
        if self.healthy:
            envelope = ok_envelope(self.chosen.to_dict())
        else:
            envelope = error_envelope(self.code, self.reason)
        envelope["containers"] = [c.to_dict() for c in self.containers]
        if self.probe is not None:
            envelope["probe"] = self.probe.to_dict()
        return envelope

    @classmethod
    def from_envelope(cls, app, envelope, short=""):
        """One app's answer read back (its per-app envelope, as /apps carries it); short is
        the few words /apps gives for an app that is not healthy.
        :raises ValueError: envelope is not a health answer."""
        if not isinstance(envelope, dict) or not isinstance(envelope.get("code"), int):
            raise ValueError("the answer for %s is not an envelope" % app)
        code, message = envelope["code"], envelope.get("message")
        containers = tuple(Container.from_dict(c) for c in envelope.get("containers") or ())
        probe = ProbeResult.from_dict(envelope["probe"]) if envelope.get("probe") is not None else None
        if code == errors.CODE_OK:
            return cls(app, True, "", Container.from_dict(message), containers, probe, None, "")
        drain = Drain.from_short(short) if code == errors.CODE_DRAINING else None
        return cls(app, False, str(message), None, containers, probe, drain, short)


HealthReport.__new__.__defaults__ = (None, "")  # drain, short
ProbeResult.__new__.__defaults__ = (None,)  # failure


def ok_envelope(message):
    return collections.OrderedDict([("code", errors.CODE_OK), ("status", "ok"), ("message", message)])


def error_envelope(code, message):
    return collections.OrderedDict([("code", code), ("status", "error"), ("message", message)])
