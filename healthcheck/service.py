"""One running instance's parts, wired in one step: docker, the container list and its events,
the prober, the checker, the feed and the metrics' sources. `serve`, `check`, `apps --direct`
and the tests assemble the service the same way (the tests pass fakes for docker and the probe)."""
import logging
import os

from healthcheck import drain
from healthcheck.checker import Checker
from healthcheck.docker import DockerCLI
from healthcheck.events import EventsWatcher
from healthcheck.feed import Feed
from healthcheck.matching import NamePattern
from healthcheck.probe_loop import ProbeLoop
from healthcheck.prober import Prober, default_url_of
from healthcheck.snapshot import Snapshotter
from healthcheck.verdict_log import VerdictLog

log = logging.getLogger("healthcheck")


class Changes(object):
    """Something an answer depends on changed (a new container list, a probe result that
    changed): whoever subscribed is told. The list and the prober are made before the feed
    that listens to them, so they are given this instead of the feed."""

    def __init__(self):
        self._listeners = []

    def subscribe(self, listener):
        self._listeners.append(listener)

    def __call__(self):
        for listener in self._listeners:
            listener()


def make_prober(settings, metrics, ttl_s, workers, on_change, probe=None):
    """The background prober: probe(app) -> ProbeResult when given (tests), else probes from
    one thread over at most `workers` keep-alive connections to the APPO Nginx."""
    url_of = default_url_of
    if probe is None:
        probe = ProbeLoop(settings.ngx_host, settings.ngx_port, settings.probe_timeout, settings.probe_bad_status,
                          max_connections=workers)
        url_of = probe.url_of

    def observe(app, result, changed):
        metrics.probe_done(result)
        if changed:
            on_change()
            if not result.ok:
                log.warning("probe for %s: %s", app, result.describe())

    return Prober(probe, ttl_s, workers, observe=observe, url_of=url_of)


class Service(object):
    """Everything one running instance owns, made together, started and stopped together.

    settings: config.Settings. list_containers() -> [Container] and probe(app) -> ProbeResult
    replace docker and the APPO Nginx (tests); probing is on when probe is given or
    settings.ngx_port is set. feed_waiters None: no feed (commands answer once).
    """

    def __init__(self, settings, metrics, refresh_s, max_stale_s, probe_ttl_s=2.0, probe_workers=1,
                 events=False, safety_refresh_s=60.0, probe_wait_s=None, feed_waiters=None,
                 list_containers=None, probe=None):
        changes = Changes()
        self.metrics = metrics
        self.drains = drain.DrainWatcher(drain.state_path(settings.state_dir))
        self.docker = DockerCLI(settings.docker_bin, settings.docker_timeout, env=os.environ,
                                observe=metrics.docker_call)
        self.snapshotter = Snapshotter(list_containers or self.docker.list_containers, refresh_s, max_stale_s,
                                       wait_s=settings.docker_timeout + 0.5, safety_refresh_s=safety_refresh_s,
                                       on_change=changes)
        probing = probe is not None or bool(settings.ngx_port)
        self.prober = make_prober(settings, metrics, probe_ttl_s, probe_workers, changes, probe) if probing else None
        self.checker = Checker(self.snapshotter, NamePattern(settings.name_pattern), prober=self.prober,
                               probe_wait_s=settings.probe_timeout if probe_wait_s is None else probe_wait_s,
                               observe=VerdictLog(), drains=self.drains)
        self.events = EventsWatcher(self.docker, self.snapshotter.invalidate, metrics,
                                    on_up=self.snapshotter.set_events_up) if events else None
        self.feed = None
        if feed_waiters is not None:
            self.feed = Feed(lambda: self.checker.check_all(False), self.checker.probe_evidence, feed_waiters,
                             watch=self.drains.current,
                             settle_s=settings.probe_timeout + 0.5 if self.prober else 0.0)
            changes.subscribe(self.feed.poke)
        metrics.set_sources(self.snapshotter.age_s, self.checker.current_reports, self.checker.probe_ages,
                            (lambda: self.feed.holding) if self.feed is not None else None)

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
