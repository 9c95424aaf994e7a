"""Prometheus metrics, per instance (own registry): docker calls, probes, HTTP, events, health."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_DOCKER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics(object):
    """Counters and gauges updated by the other modules; render() encodes them."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._docker_calls = Counter("healthcheck_docker_calls_total", "docker CLI invocations",
                                     ["command"], registry=r)
        self._docker_seconds = Histogram("healthcheck_docker_call_seconds", "docker CLI call duration",
                                         ["command"], buckets=_DOCKER_BUCKETS, registry=r)
        self._docker_failures = Counter("healthcheck_docker_failures_total", "docker CLI failures by kind",
                                        ["command", "kind"], registry=r)
        self._probes = Counter("healthcheck_probe_results_total", "app probes by result",
                               ["result"], registry=r)
        self._http = Counter("healthcheck_http_requests_total", "HTTP requests by route and status",
                             ["route", "status"], registry=r)
        self._events_restarts = Counter("healthcheck_events_stream_restarts_total",
                                        "docker events stream restarts", registry=r)
        self._events_up = Gauge("healthcheck_events_stream_up", "1 while the docker events stream runs",
                                registry=r)
        self._http_children = {}
        self._snapshot_age = None
        self._app_reports = None
        self._probe_ages = None
        self._feed_held = None
        r.register(_StateCollector(self))

    def docker_call(self, command, seconds, error):
        self._docker_calls.labels(command).inc()
        self._docker_seconds.labels(command).observe(seconds)
        if error is not None:
            self._docker_failures.labels(command, error.kind).inc()

    def probe_done(self, result):
        if result.status is None:
            kind = result.failure or "error"
        else:
            kind = "ok" if result.ok else "bad_status"
        self._probes.labels(kind).inc()

    def http_request(self, route, status):
        key = (route, status)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self._http.labels(route, str(status))
        child.inc()

    def events_restarted(self):
        self._events_restarts.inc()

    def events_up(self, up):
        self._events_up.set(1 if up else 0)

    def set_sources(self, snapshot_age, app_reports, probe_ages=None, feed_held=None):
        """Read at scrape time, and must have no side effects (no docker call, no probe, no
        logging): snapshot_age() -> seconds or None; app_reports() -> reports known now;
        probe_ages() -> {app: seconds since its last probe}; feed_held() -> entry feed
        requests held now."""
        self._snapshot_age = snapshot_age
        self._app_reports = app_reports
        self._probe_ages = probe_ages
        self._feed_held = feed_held

    def render(self):
        return generate_latest(self.registry)


class _StateCollector(object):
    """Values read at scrape time rather than pushed."""

    def __init__(self, metrics):
        self._metrics = metrics

    def describe(self):
        return []

    def collect(self):
        m = self._metrics
        age = GaugeMetricFamily("healthcheck_snapshot_age_seconds", "age of the container list served")
        value = m._snapshot_age() if m._snapshot_age is not None else None
        if value is not None:
            age.add_metric([], value)
        yield age
        health = GaugeMetricFamily("healthcheck_app_healthy", "1 when the app's health check passes",
                                   labels=["app"])
        draining = GaugeMetricFamily("healthcheck_app_draining", "1 while an operator drains the app on this host",
                                     labels=["app"])
        if m._app_reports is not None:
            for report in m._app_reports():
                health.add_metric([report.app], 1 if report.healthy else 0)
                if report.drain is not None:
                    draining.add_metric([report.app], 1)
        yield health
        yield draining
        ages = GaugeMetricFamily("healthcheck_app_probe_age_seconds",
                                 "seconds since the app's last probe finished", labels=["app"])
        if m._probe_ages is not None:
            for app, seconds in sorted(m._probe_ages().items()):
                ages.add_metric([app], seconds)
        yield ages
        if m._feed_held is not None:
            held = GaugeMetricFamily("healthcheck_feed_held_requests",
                                     "entry balancers' feed requests held now (at most --feed-waiters)")
            held.add_metric([], m._feed_held())
            yield held
