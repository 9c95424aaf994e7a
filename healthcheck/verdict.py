"""The health verdict for one app, from its containers and probe result (pure)."""
from healthcheck import text
from healthcheck.matching import name_timestamp
from healthcheck.models import HealthReport

# What `docker ps` without -a lists: the containers that exist as processes.
LISTED_STATES = ("running", "paused", "restarting")
_MAX_DESCRIBED = 5


def newest_first(containers):
    """Newest = latest `created`, ties broken by the timestamp in the name."""
    return sorted(containers, key=lambda c: (c.created, name_timestamp(c.name), c.name), reverse=True)


def pick_serving(matches):
    """The newest container that can take traffic, or None."""
    for container in newest_first(matches):
        if container.serves:
            return container
    return None


def decide(app, matches, include_all=False, probe=None, drain=None):
    """Build the HealthReport.

    matches: every container of the app; probe: the ProbeResult for the serving
    container, or None when probing is off or nothing serves; drain: the operator's Drain
    for this app on this host, which makes it not healthy whatever its containers say.
    """
    ordered = newest_first(matches)
    listed = ordered if include_all else [c for c in ordered if c.state in LISTED_STATES]
    chosen = pick_serving(ordered)
    if drain is not None:
        return HealthReport(app, False, "%s (app %s on this host)" % (drain.describe(), app), chosen, listed,
                            probe, drain, _short(drain.short()))
    if chosen is None:
        short = _condition(ordered[0]) if ordered else "no container"
        return HealthReport(app, False, _why_nothing_serves(app, ordered), None, listed, None, None, _short(short))
    if probe is not None and probe.is_pending:
        reason = "container %s is running; %s" % (chosen.name, probe.describe())
        return HealthReport(app, False, reason, chosen, listed, probe, None, "probe pending")
    if probe is not None and not probe.ok:
        reason = "container %s is running but the app does not answer: %s" % (chosen.name, probe.describe())
        short = "probe %d" % probe.status if probe.status is not None else "probe: %s" % probe.error
        return HealthReport(app, False, reason, chosen, listed, probe, None, _short(short))
    return HealthReport(app, True, "", chosen, listed, probe)


def _why_nothing_serves(app, ordered):
    if not ordered:
        return "no container of app %s on this host" % app
    described = ["%s is %s (%s)" % (c.name, _condition(c), c.status or c.state) for c in ordered[:_MAX_DESCRIBED]]
    if len(ordered) > _MAX_DESCRIBED:
        described.append("and %d more" % (len(ordered) - _MAX_DESCRIBED))
    return "no healthy container of app %s: %s" % (app, "; ".join(described))


def _condition(container):
    if container.state == "running" and container.health == "unhealthy":
        return "unhealthy"
    if container.state == "running" and container.health == "starting":
        return "starting (its HEALTHCHECK has not passed yet)"
    return container.state


_SHORT_MAX = 60


def _short(words):
    """A reason in a few plain characters (text.plain_words), at most 60."""
    return text.plain_words(words, _SHORT_MAX)
