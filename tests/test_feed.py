"""The entry's feed: its format, the index, blocking waits, bounded waiters, no work unread."""
import threading
import time

import pytest

from healthcheck import errors
from healthcheck.checker import AppsView
from healthcheck.feed import Feed
from healthcheck.feed_format import UNKNOWN_AGE, Verdict, render_feed
from healthcheck.models import HealthReport, ProbeResult
from support import FakeClock, until


def test_format_version_1():
    body = render_feed(42, (Verdict("bk_iam", True, ""), Verdict("demo", False, "probe 502"),
                            Verdict("off", False, "draining: 内核升级"), Verdict("new", True, "")),
                       {"bk_iam": 0.44, "demo": 1.0, "new": UNKNOWN_AGE}, True, 3.25)
    # ages are rounded up (an entry never reads evidence as newer than it is); "?" is unknown
    assert body.decode("utf-8") == (
        "container-healthcheck-feed 1\nindex 42\nheld 1\nstale 3.2\napps 4\n"
        "bk_iam 1 0.5\ndemo 0 1.0 probe 502\noff 0 - draining: 内核升级\nnew 1 ?\nend\n")


class Views(object):
    """What the checker would say: set .apps to {app: (healthy, short)}, or .error; .probes
    to {app: ProbeResult} for the probe a report rests on."""

    def __init__(self):
        self.apps = {"a": (True, "")}
        self.probes = {}
        self.error = None
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.error is not None:
            raise self.error
        reports = [HealthReport(app, healthy, "", None, [], self.probes.get(app), None, short)
                   for app, (healthy, short) in sorted(self.apps.items())]
        return AppsView(reports, 0.0, None)


@pytest.fixture
def feed():
    views = Views()
    instance = Feed(views, dict, max_waiters=2, tick_s=0.05).start()
    instance.views = views
    yield instance
    instance.stop()


def test_a_change_answers_a_waiting_client_at_once(feed):
    first = feed.answer(None, 1.0)
    index = first.index
    assert first.verdicts == (Verdict("a", True, ""),) and first.stale_s is None and not first.held
    answers = []
    waiter = threading.Thread(target=lambda: answers.append((time.monotonic(), feed.answer(index, 5.0))))
    waiter.start()
    assert until(lambda: feed.holding == 1)
    assert not answers  # nothing changed: still waiting
    changed_at = time.monotonic()
    feed.views.apps["a"] = (False, "exited")
    feed.poke()
    waiter.join(5)
    answered_at, answer = answers[0]
    assert answer.index == index + 1 and answer.verdicts == (Verdict("a", False, "exited"),) and answer.held
    assert answered_at - changed_at < 1.0  # at once, not at the end of the 5 s wait


def test_no_change_is_a_heartbeat_after_wait_with_the_same_index(feed):
    index = feed.answer(None, 0)[0]
    started = time.monotonic()
    assert feed.answer(index, 0.3)[0] == index
    assert 0.25 <= time.monotonic() - started < 2.0
    assert feed.answer(index + 7, 5.0)[0] == index  # a client with another index: at once


def test_waiters_beyond_the_limit_are_answered_at_once(feed):
    index = feed.answer(None, 0)[0]
    waiters = [threading.Thread(target=feed.answer, args=(index, 1.5)) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    assert until(lambda: feed.holding == 2)
    started = time.monotonic()
    assert feed.answer(index, 1.5).held is False  # not held: no free slot
    assert time.monotonic() - started < 0.5
    for waiter in waiters:
        waiter.join(5)
    assert feed.answer(index, 0.1).held is True  # slots are given back


def test_nobody_reading_means_no_work():
    views, clock = Views(), FakeClock()
    feed = Feed(views, dict, tick_s=0.01, idle_s=30, full_s=5, clock=clock).start()

    def some_rounds():
        rounds = feed.rounds
        return until(lambda: feed.rounds >= rounds + 3)  # the builder woke, and looked
    try:
        for _ in range(5):
            feed.poke()
        assert some_rounds()
        assert views.calls == 0  # pokes without a reader build nothing (and probe nothing)
        feed.answer(None, 0)
        assert until(lambda: views.calls >= 1)  # read: built
        clock.now += 5
        assert until(lambda: views.calls >= 2)  # and again every full_s while read
        clock.now += 31  # nobody has read for longer than idle_s
        assert some_rounds()
        calls = views.calls
        clock.now += 5
        assert some_rounds()
        assert views.calls == calls  # the reader went away: building stops
    finally:
        feed.stop()


def test_docker_failure_is_raised_then_recovery_moves_the_index(feed):
    index = feed.answer(None, 0)[0]
    feed.views.error = errors.DockerUnreachable("docker daemon unreachable: down")
    feed.poke()
    assert until(lambda: _raises(feed))
    feed.views.error = None
    feed.poke()
    assert until(lambda: not _raises(feed))
    assert feed.answer(None, 0)[0] >= index + 2


def _raises(feed):
    try:
        feed.answer(None, 0)
    except errors.DockerError:
        return True
    return False


def test_between_pokes_only_a_change_of_the_watched_state_rebuilds():
    views, watched = Views(), [object()]
    feed = Feed(views, dict, tick_s=0.01, full_s=3600, watch=lambda: watched[0]).start()
    try:
        index = feed.answer(None, 0)[0]
        calls, rounds = views.calls, feed.rounds
        assert until(lambda: feed.rounds >= rounds + 5)
        assert views.calls == calls  # ticks alone rebuild nothing
        views.apps["a"] = (False, "draining: kernel update")
        watched[0] = object()  # the drain file was read anew
        assert until(lambda: feed.answer(None, 0)[0] == index + 1)
    finally:
        feed.stop()


def test_release_answers_held_requests_at_once_and_holds_no_more(feed):
    """On SIGTERM the service releases the entries' held requests: they learn now, and the
    stop does not wait out their `wait`."""
    index = feed.answer(None, 0)[0]
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(feed.answer(index, 30.0)))
    waiter.start()
    assert until(lambda: feed.holding == 1)
    released_at = time.monotonic()
    feed.release()
    waiter.join(5)
    assert answers and answers[0][0] == index and time.monotonic() - released_at < 1.0
    started = time.monotonic()
    feed.answer(index, 30.0)  # a late one is not held either
    assert time.monotonic() - started < 1.0


def test_a_verdict_carries_the_age_of_its_own_probe_not_of_a_newer_one():
    """A heartbeat between a probe that failed and the rebuild it pokes still says "healthy"
    (the last build's verdict): its age must be that verdict's probe's, or an entry would read
    the failed probe's fresh age as fresh evidence for "healthy" and clear an ejection."""
    healthy = ProbeResult(True, "http://127.0.0.1:8010/o/a/", 200, None)
    failed = ProbeResult(False, "http://127.0.0.1:8010/o/a/", 502, None)
    views, clock = Views(), FakeClock()
    views.probes["a"] = healthy
    prober = {"a": (healthy, 0.3)}
    feed = Feed(views, lambda: dict(prober), tick_s=0.01, full_s=3600, clock=clock).start()
    try:
        first = feed.answer(None, 0)
        assert first.ages == {"a": 0.3}
        clock.now += 4
        prober["a"] = (healthy, 0.2)  # the same answer again: the latest such probe counts
        assert feed.answer(None, 0).ages == {"a": 0.2}
        prober["a"] = (failed, 0.1)  # a newer probe failed; no rebuild yet
        later = feed.answer(None, 0)
        assert later.index == first.index and later.verdicts == first.verdicts
        assert later.ages == {"a": pytest.approx(4.3)}  # the healthy verdict's own probe, 4.3 s old
        views.apps["a"], views.probes["a"] = (False, "probe 502"), failed
        feed.poke()
        assert until(lambda: feed.answer(None, 0).index == first.index + 1)
        assert feed.answer(None, 0).ages == {"a": 0.1}
    finally:
        feed.stop()


def test_a_probe_that_changed_during_the_build_has_an_unknown_age():
    healthy = ProbeResult(True, "http://127.0.0.1:8010/o/a/", 200, None)
    views = Views()
    views.probes["a"] = healthy
    known = {}  # the prober already holds another result than the one the report used
    feed = Feed(views, lambda: known, tick_s=0.01).start()
    try:
        assert feed.answer(None, 0).ages == {"a": UNKNOWN_AGE}
    finally:
        feed.stop()


def test_a_starting_service_publishes_no_verdict_that_waits_for_its_first_probe():
    """Restarted, the service would say "unhealthy, first probe pending" for every app and take
    its APPO out for a moment; it waits (at most settle_s) for the first probes instead."""
    pending = ProbeResult.pending("http://127.0.0.1:8010/o/a/")
    healthy = ProbeResult(True, "http://127.0.0.1:8010/o/a/", 200, None)
    views, clock = Views(), FakeClock()
    views.probes["a"] = pending
    views.apps["a"] = (False, "probe pending")
    feed = Feed(views, dict, tick_s=0.01, clock=clock, settle_s=2.5).start()
    try:
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(feed.answer(None, 0)))
        waiter.start()
        calls = views.calls
        assert until(lambda: views.calls >= calls + 3)  # built, and held back, again and again
        assert not answers
        views.probes["a"], views.apps["a"] = healthy, (True, "")
        feed.poke()
        waiter.join(5)
        assert answers and answers[0].verdicts == (Verdict("a", True, ""),)
    finally:
        feed.stop()


def test_settling_ends_settle_s_after_the_first_read_whatever_the_probes():
    """Apps are probed once someone asks: settling counts from the first read, not the start."""
    views, clock = Views(), FakeClock()
    views.probes["a"] = ProbeResult.pending("http://127.0.0.1:8010/o/a/")
    views.apps["a"] = (False, "probe pending")
    feed = Feed(views, dict, tick_s=0.01, clock=clock, settle_s=2.5).start()
    try:
        clock.now += 10  # long after the start: nobody read yet
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(feed.answer(None, 0)))
        waiter.start()
        calls = views.calls
        assert until(lambda: views.calls >= calls + 3)
        assert not answers  # still settling: 2.5 s from the first read
        clock.now += 3
        feed.poke()
        waiter.join(10)
        assert answers and answers[0].verdicts == (Verdict("a", False, "probe pending"),)
    finally:
        feed.stop()


def test_a_held_request_never_gets_an_empty_list_for_nothing_yet():
    """A client holding an index while nothing is published yet waits for the first build,
    it is not answered `apps 0` (which would mean: no app here)."""
    views, clock = Views(), FakeClock()
    views.probes["a"] = ProbeResult.pending("http://127.0.0.1:8010/o/a/")
    views.apps["a"] = (False, "probe pending")
    feed = Feed(views, dict, tick_s=0.01, clock=clock, settle_s=2.5).start()
    try:
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(feed.answer(12345, 0.01)))
        waiter.start()
        calls = views.calls
        assert until(lambda: views.calls >= calls + 3)
        assert not answers
        views.probes["a"], views.apps["a"] = ProbeResult(True, "http://127.0.0.1:8010/o/a/", 200, None), (True, "")
        feed.poke()
        waiter.join(10)
        assert answers and answers[0].verdicts == (Verdict("a", True, ""),)
    finally:
        feed.stop()
