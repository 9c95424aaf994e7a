"""The host view as one self-contained HTML page: every value escaped, no external loads (pure)."""
import base64
import hashlib
import html
import time

from healthcheck import text
from healthcheck.models import HealthReport

# The same look as the entry Nginx's matrix (scripts/nginx/container_healthcheck/status.lua).
STYLE = (
    "body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}"
    "header{padding:10px 16px;background:#1d2330;color:#fff;display:flex;gap:16px;align-items:center;flex-wrap:wrap}"
    "header h1{font-size:15px;margin:0}header .meta{color:#aab3c5}"
    "input#filter{padding:4px 8px;border-radius:4px;border:1px solid #556;min-width:220px}"
    "table{border-collapse:separate;border-spacing:0}"
    "th,td{padding:3px 8px;border-bottom:1px solid #e1e4ea;white-space:nowrap;text-align:left;vertical-align:top}"
    "thead th{position:sticky;top:0;background:#e9ecf1;z-index:2}"
    "tbody th{position:sticky;left:0;background:#fff;z-index:1}"
    ".ok{background:#d9f2e1;color:#125d2c}.bad{background:#fbdada;color:#8a1111}"
    ".unknown{background:#eceff3;color:#5b6478}.backup{background:#e3ecfb;color:#1d4a8f}"
    ".drain{background:#fdf0d5;color:#7a4b00}.open th{background:#fff3c4}"
    ".small{color:#6b7385;font-size:11px}.error{padding:16px;color:#8a1111}"
)
# The filter box: hides rows whose app code does not contain the text, and keeps it in the
# URL (?q=) so the auto-refresh keeps it too.
SCRIPT = (
    '(function(){var f=document.getElementById("filter");if(!f)return;'
    'function apply(){var q=f.value.trim().toLowerCase();var rows=document.querySelectorAll("tbody tr");'
    'for(var i=0;i<rows.length;i++){rows[i].hidden=q!==""&&rows[i].getAttribute("data-app").indexOf(q)<0;}'
    'var u=new URL(location.href);if(q){u.searchParams.set("q",q);}else{u.searchParams.delete("q");}'
    'history.replaceState(null,"",u.toString());}'
    'f.addEventListener("input",apply);apply();})();'
)


def _sha256(text):
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


# Only this page's own style and script may run: nothing external, no inline handlers.
CSP = ("default-src 'none'; style-src 'sha256-%s'; script-src 'sha256-%s'; img-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'" % (_sha256(STYLE), _sha256(SCRIPT)))
HTML_TYPE = "text/html; charset=utf-8"


def wants_html(accept):
    """True when the client asked for a page (browsers list text/html; balancers and curl do not)."""
    return "text/html" in (accept or "")


def _e(value):
    return html.escape("" if value is None else str(value), quote=True)


def _age(seconds):
    if seconds is None:
        return ""
    seconds = max(seconds, 0)
    if seconds < 120:
        return "%.0f s" % seconds
    if seconds < 7200:
        return "%.0f min" % (seconds / 60)
    return "%.1f h" % (seconds / 3600)


def _page(title, meta, body, refresh_s, query):
    return text.utf8("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                     "<meta http-equiv=\"refresh\" content=\"%d\"><title>%s</title><style>%s</style></head><body>"
                     "<header><h1>%s</h1><span class=\"meta\">%s</span>"
                     "<form method=\"get\"><input id=\"filter\" name=\"q\" placeholder=\"filter apps\" value=\"%s\" "
                     "autocomplete=\"off\"></form></header>%s<script>%s</script></body></html>\n" % (
                         refresh_s, _e(title), STYLE, _e(title), meta, _e(query), body, SCRIPT))


def _verdict_cell(report):
    if report.healthy:
        return '<td class="ok">%s</td>' % report.verdict_word
    if report.drain is not None:
        return '<td class="drain" title="%s">%s</td>' % (_e(report.reason), report.verdict_word)
    return '<td class="bad" title="%s">%s</td>' % (_e(report.reason), _e(report.short or "not healthy"))


def _probe_cell(report, age):
    probe = report.probe
    if probe is None:
        return "<td class=\"small\">off</td>" if report.chosen is not None else "<td></td>"
    css = "ok" if probe.ok else "bad"
    return '<td class="%s" title="%s">%s <span class="small">%s</span></td>' % (
        css, _e(probe.describe()), _e(probe.words), _e(_age(age) + " ago" if age is not None else ""))


def render_host_page(view, probe_ages, host, query="", refresh_s=2, now=None):
    """This host's apps: verdict and why, serving container, Docker's status and health, the
    probe and its age, how many containers. Apps not healthy come first.
    :rtype: bytes"""
    now = time.time() if now is None else now
    rows = []
    ordered = sorted(view.reports, key=HealthReport.order)
    for report in ordered:
        serving = report.serving
        rows.append(
            '<tr data-app="%s"><th>%s</th>%s<td>%s</td><td title="%s">%s</td><td>%s</td><td>%s</td>%s'
            '<td>%d</td></tr>' % (
                _e(report.app.lower()), _e(report.app), _verdict_cell(report),
                _e(serving.name if serving else ""),
                _e(serving.command if serving else ""), _e((serving.command or "")[:60] if serving else ""),
                _e(serving.status if serving else ""), _e(serving.health if serving else ""),
                _probe_cell(report, probe_ages.get(report.app)), len(report.containers)))
    healthy = sum(1 for r in view.reports if r.healthy)
    meta = "%d apps, %d healthy &middot; container list %s old%s &middot; %s" % (
        len(view.reports), healthy, _e(_age(view.snapshot_age_s)),
        (" &middot; <b>docker not answering: list %s old</b>" % _e(_age(view.stale_s)))
        if view.stale_s is not None else "",
        _e(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))))
    body = ("<table><thead><tr><th>app</th><th>verdict</th><th>container</th><th>command</th><th>docker status</th>"
            "<th>health</th><th>probe</th><th>containers</th></tr></thead><tbody>%s</tbody></table>" % "".join(rows))
    return _page("container-healthcheck on %s" % host, meta, body, refresh_s, query)


def render_error_page(message, host, refresh_s=2):
    """What the host page says when docker could not be asked."""
    return _page("container-healthcheck on %s" % host, "", '<p class="error">%s</p>' % _e(message), refresh_s, "")
