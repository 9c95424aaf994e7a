"""Log writing never raises and never drops a line for the text it is given."""
import logging

from healthcheck import logs
from support import parse_logfmt


def test_any_text_is_written_to_the_log_file(tmp_path):
    handler = logs.configure("info", str(tmp_path))
    try:
        log = logging.getLogger("healthcheck.test")
        log.warning("reason %s from %s", "\udce5\udc86 内核", "\x00\n")
        log.warning("bad format %d", "not a number")
        handler.flush()
    finally:
        logs.configure("info", None)
    lines = (tmp_path / logs.LOG_FILE_NAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert parse_logfmt(lines[0])["msg"] == "reason \\udce5\\udc86 内核 from \x00\n"
    assert "unformattable" in parse_logfmt(lines[1])["msg"]


def test_log_lines_are_logfmt_one_event_per_line():
    record = logging.LogRecord("healthcheck.snapshot", logging.ERROR, __file__, 1,
                               'docker said "%s"', ("no\nsuch = thing",), None)
    line = logs.LogfmtFormatter().format(record)
    assert "\n" not in line
    fields = parse_logfmt(line)
    assert fields["level"] == "error" and fields["msg"] == 'docker said "no\nsuch = thing"'
    assert fields["logger"] == "healthcheck.snapshot"
    assert fields["time"][10] == "T" and fields["time"][-3] == ":"  # RFC 3339 with the offset
