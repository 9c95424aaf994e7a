"""The entry balancers' feed on the wire: its text format, version 1 (pure).

One field per line, read without a JSON parser (README "The entry's feed"; the entry Lua's
feed.lua reads it, tests/test_lua_units.py holds both sides to it). What the verdicts are and
when they change is feed.py's job; this module only says them.
"""
import collections
import math

FORMAT_NAME = "container-healthcheck-feed"
FORMAT_VERSION = 1
CONTENT_TYPE = "text/plain; charset=utf-8"
DEFAULT_WAIT_S = 1.0
MAX_WAIT_S = 5.0

# One app's line: healthy or not, and the short reason (empty when healthy). The index moves
# when these change; the probe ages beside them do not move it.
Verdict = collections.namedtuple("Verdict", "app healthy short")

# The probe a verdict rests on, kept from the build that made the verdict: the result object
# and when the latest probe giving that object finished (the feed's clock), None if unknown.
Evidence = collections.namedtuple("Evidence", "probe finished_at")

# One answer: what Feed.answer() gives the route to render.
FeedAnswer = collections.namedtuple("FeedAnswer", "index verdicts ages stale_s held")

# The age of a verdict whose probe's finish time is not known: rendered "?", read by the
# entry as evidence older than anything (it never clears an ejection).
UNKNOWN_AGE = float("inf")


def verdicts_of(view):
    """The verdict lines of an AppsView, in app order (what the index tracks)."""
    return tuple(Verdict(r.app, r.healthy, r.short) for r in view.reports)


def evidence_of(view, known, now):
    """{app: Evidence} for the reports of one build. known: the prober's {app: (result,
    age_s)} read after the reports; a report's probe that is not the prober's result any more
    (it changed in between) has no known finish time."""
    evidence = {}
    for report in view.reports:
        if report.probe is None:
            continue
        seen = known.get(report.app)
        finished_at = now - seen[1] if seen is not None and seen[0] is report.probe else None
        evidence[report.app] = Evidence(report.probe, finished_at)
    return evidence


def ages_of(evidence, known, now):
    """{app: seconds} since the probe each verdict rests on finished. The prober's latest
    result counts only when it is the very object the verdict rests on (the prober keeps the
    object while probes give the same answer): a newer, different result never lends its age
    to an older verdict, which would let an entry trust a stale "healthy"."""
    ages = {}
    for app, (probe, finished_at) in evidence.items():
        seen = known.get(app)
        if seen is not None and seen[0] is probe:
            ages[app] = seen[1]
        elif finished_at is not None:
            ages[app] = now - finished_at
        else:
            ages[app] = UNKNOWN_AGE
    return ages


def _age_text(age):
    if age is None:
        return "-"
    if age == UNKNOWN_AGE:
        return "?"
    # rounded up: an entry must never read the evidence as newer than it is
    return "%.1f" % (math.ceil(max(age, 0.0) * 10 - 1e-9) / 10.0)


def render_feed(index, verdicts, ages, held, stale_s=None):
    """The feed answer (pure). Format, version 1 (README "The entry's feed"):

        container-healthcheck-feed 1
        index <n>
        held <0|1>
        [stale <seconds>]
        apps <count>
        <app> <1|0> <age> [<short reason>]
        ...
        end

    age: seconds (rounded up to a tenth) since the probe result the verdict rests on finished,
    `-` when no probe applies, `?` when its finish time is unknown (older than anything); an
    ejecting client trusts a healthy line only when its evidence is newer than the ejection.
    Unknown lines are to be ignored by readers; `end` proves the answer whole.
    """
    lines = ["%s %d" % (FORMAT_NAME, FORMAT_VERSION), "index %d" % index, "held %d" % (1 if held else 0)]
    if stale_s is not None:
        lines.append("stale %.1f" % stale_s)
    lines.append("apps %d" % len(verdicts))
    for verdict in verdicts:
        line = "%s %d %s" % (verdict.app, 1 if verdict.healthy else 0, _age_text(ages.get(verdict.app)))
        if verdict.short:
            line += " " + verdict.short
        lines.append(line)
    lines.append("end")
    return ("\n".join(lines) + "\n").encode("utf-8")
