"""This host's apps as an aligned table for a terminal, like `docker ps` (pure)."""
import unicodedata

from healthcheck import errors, text

COLUMNS = ("APP", "VERDICT", "WHY", "CONTAINER", "STATUS", "HEALTH", "PROBE", "CONTAINERS")


def display_width(text):
    """Columns a string takes in a terminal: East Asian wide and full-width characters take 2,
    combining marks none."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _pad(text, width):
    return text + " " * (width - display_width(text))


def _clean(value, limit=60):
    shown = text.without_surrogates("" if value is None else str(value))
    shown = "".join(ch if ch.isprintable() else " " for ch in shown)
    return shown if display_width(shown) <= limit else shown[:limit - 1] + "…"


def rows_from_apps_answer(answer):
    """Table rows from a /apps answer (the JSON the service serves), unhealthy apps first."""
    message = answer["message"]
    reasons = message.get("unhealthy", {})
    rows = []
    for app, entry in message["apps"].items():
        healthy = entry.get("code") == 0
        containers = entry.get("containers") or []
        serving = entry["message"] if healthy else (containers[0] if containers else None)
        probe = entry.get("probe")
        if probe is None:
            probe_text = "-"
        elif probe.get("status") is not None:
            probe_text = str(probe["status"])
        else:
            probe_text = probe.get("error") or "failed"
        verdict = "healthy" if healthy else ("draining" if entry.get("code") == errors.CODE_DRAINING else "UNHEALTHY")
        rows.append((not healthy, app, (
            app, verdict, "" if healthy else reasons.get(app, ""), serving.get("names") if serving else "",
            serving.get("status") if serving else "", serving.get("health") if serving else "",
            probe_text, str(len(containers)))))
    rows.sort(key=lambda row: (not row[0], row[1]))
    return [cells for _, _, cells in rows]


def render_table(rows, encoding="utf-8", columns=COLUMNS):
    """Columns aligned by display width, two spaces apart. What `encoding` (the terminal's)
    cannot show, e.g. CJK under the C locale's ASCII, is shown as \\uXXXX escapes, and
    aligned as printed."""
    def cell(value):
        return text.for_encoding(_clean(value), encoding or "utf-8")
    cells = [tuple(cell(c) for c in columns)] + [tuple(cell(c) for c in row) for row in rows]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for row in cells:
        lines.append("  ".join(_pad(cell, widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines) + "\n"
