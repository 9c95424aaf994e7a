"""This host's apps as an aligned table for a terminal, like `docker ps` (pure)."""
import unicodedata

from healthcheck import text
from healthcheck.models import HealthReport

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
    shown = text.printable("" if value is None else str(value))
    return shown if display_width(shown) <= limit else shown[:limit - 1] + "…"


def rows(reports):
    """Table rows from HealthReports, apps not healthy first."""
    out = []
    for report in sorted(reports, key=HealthReport.order):
        serving = report.serving
        out.append((
            report.app, report.verdict_word, report.short,
            serving.name if serving else "", serving.status if serving else "", serving.health if serving else "",
            report.probe.words if report.probe is not None else "-", str(len(report.containers))))
    return out


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
