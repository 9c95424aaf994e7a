"""The terminal table: aligned by display width, long app codes and CJK text included."""
import json

import pytest

from healthcheck import drain, verdict
from healthcheck.checker import AppsView
from healthcheck.models import Container, ProbeResult
from healthcheck.apps_answer import reports_from_apps_answer
from healthcheck.render import Renderer
from healthcheck.terminal import COLUMNS, display_width, render_table, rows


def _column_starts(line, cells):
    """Display offsets where each cell begins on a rendered line."""
    starts, at, rest = [], 0, line
    for cell in cells:
        index = rest.index(cell)
        at += display_width(rest[:index])
        starts.append(at)
        at += display_width(cell)
        rest = rest[index + len(cell):]
    return starts


@pytest.mark.parametrize("text,width", [("abc", 3), ("内核升级", 8), ("ｆｕｌｌ", 8), ("e\u0301", 1), ("", 0)])
def test_display_width(text, width):
    assert display_width(text) == width


def test_columns_line_up_with_long_app_codes_and_cjk_text():
    long_app = "bk_" + "x" * 60
    rows = [
        (long_app, "healthy", "", long_app + "-1709878117", "Up 5 days", "none", "200", "1"),
        ("bk_iam", "draining", "draining: 内核升级 维护", "bk_iam-1709878117", "Up 2 hours", "healthy", "200", "2"),
        ("a", "UNHEALTHY", "exited", "a-1709878117", "Exited (1) 3 minutes ago", "none", "-", "1"),
    ]
    text = render_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    header = _column_starts(lines[0], COLUMNS)
    for line, row in zip(lines[1:], rows):
        cells = [c if display_width(c) <= 60 else c[:59] + "…" for c in row]
        present = [(i, c) for i, c in enumerate(cells) if c]
        starts = _column_starts(line, [c for _, c in present])
        assert starts == [header[i] for i, _ in present], line


def test_rows_from_an_apps_answer_put_unhealthy_first():
    container = {"names": "ok-1709878117", "status": "Up 1 hour", "health": "none"}
    answer = {"code": 0, "status": "ok", "message": {
        "snapshot_age_s": 0.1, "healthy": ["ok"], "unhealthy": {"bad": "probe 502", "off": "draining: 维护"},
        "apps": {
            "ok": {"code": 0, "message": container, "containers": [container], "probe": {"ok": True, "status": 200}},
            "bad": {"code": 12, "message": "...", "containers": [dict(container, names="bad-1")],
                    "probe": {"ok": False, "status": 502}},
            "off": {"code": 17, "message": "...", "containers": []},
        }}}
    table = rows(reports_from_apps_answer(answer))
    assert [r[:3] for r in table] == [("bad", "UNHEALTHY", "probe 502"), ("off", "draining", "draining: 维护"),
                                      ("ok", "healthy", "")]
    assert table[0][6] == "502" and table[1][3] == "" and table[2][3] == "ok-1709878117"


def _container(name, state="running", status="Up 1 hour", health="none"):
    return Container("f" * 64, name, (name,), "img", "uwsgi", 1709878117, state, status, health, ())


def test_the_table_is_the_same_from_reports_and_from_their_apps_answer():
    """`apps --direct` renders the reports; `apps` renders the service's /apps answer read
    back: one model, so both print the same table."""
    reports = [
        verdict.decide("ok", [_container("ok-1709878117")],
                       probe=ProbeResult(True, "http://127.0.0.1/o/ok/", 200, None)),
        verdict.decide("bad", [_container("bad-1709878117")],
                       probe=ProbeResult(False, "http://127.0.0.1/o/bad/", None, "timed out", "timeout")),
        verdict.decide("gone", [_container("gone-1709878117", "exited", "Exited (1) 3 minutes ago")], True),
        verdict.decide("none", []),
        verdict.decide("off", [_container("off-1709878117")], drain=drain.Drain("内核升级", 1709878117)),
        verdict.decide("pending", [_container("pending-1709878117", health="starting")],
                       probe=ProbeResult.pending("http://127.0.0.1/o/pending/")),
    ]
    answer = json.loads(Renderer().apps(AppsView(reports, 0.5, None), True).body.decode("utf-8"))
    read_back = reports_from_apps_answer(answer)
    assert rows(read_back) == rows(reports)
    assert [r.code for r in read_back] == [r.code for r in reports]
    assert [r.to_envelope() for r in read_back] == [json.loads(json.dumps(r.to_envelope())) for r in reports]
    # a drain read back holds the operator's reason, not the table's words
    assert read_back[4].drain == drain.Drain("内核升级", None) and read_back[4].drain.describe() == "draining: 内核升级"


@pytest.mark.parametrize("answer", [None, [], {"code": 0}, {"code": 10, "message": "docker down"},
                                    {"code": 0, "message": {"apps": {"a": "x"}}},
                                    {"code": 0, "message": {"apps": {"a": {"code": 0, "message": 3}}}}])
def test_what_is_not_an_apps_answer_is_refused_in_words(answer):
    with pytest.raises(ValueError):
        reports_from_apps_answer(answer)


def test_an_ascii_terminal_gets_escapes_aligned_as_printed():
    """The C locale's ASCII stdout cannot show CJK: the table shows \\uXXXX escapes (never a
    crash) and aligns the columns on what it prints."""
    rows = [
        ("bk_iam", "draining", "draining: 内核升级", "bk_iam-1709878117", "Up 2 hours", "healthy", "200", "1"),
        ("a", "healthy", "", "a-1709878117", "Up 1 second", "none", "200", "1"),
    ]
    text = render_table(rows, "ascii")
    text.encode("ascii")  # every character printable on that terminal
    lines = text.splitlines()
    assert "draining: \\u5185\\u6838\\u5347\\u7ea7" in lines[1]
    header = _column_starts(lines[0], COLUMNS)
    printed = [c.replace("内核升级", "\\u5185\\u6838\\u5347\\u7ea7") for c in rows[0]]
    assert _column_starts(lines[1], printed) == header
    assert _column_starts(lines[2], [c for c in rows[1] if c])[2:] == header[3:]
