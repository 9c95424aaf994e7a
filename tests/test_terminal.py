"""The terminal table: aligned by display width, long app codes and CJK text included."""
import pytest

from healthcheck.terminal import COLUMNS, display_width, render_table, rows_from_apps_answer


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
    rows = rows_from_apps_answer(answer)
    assert [r[:3] for r in rows] == [("bad", "UNHEALTHY", "probe 502"), ("off", "draining", "draining: 维护"),
                                     ("ok", "healthy", "")]
    assert rows[0][6] == "502" and rows[1][3] == "" and rows[2][3] == "ok-1709878117"


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
