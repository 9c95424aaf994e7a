"""Outside text made safe: argv under the C locale, lone surrogates, control characters."""
import pytest

from healthcheck import text


def test_argv_bytes_are_read_as_utf8():
    # What 3.6 hands main() for `--reason 内核升级` under the C locale (ASCII + surrogateescape).
    escaped = "内核升级".encode("utf-8").decode("ascii", "surrogateescape")
    assert text.from_argv(escaped) == "内核升级"
    assert text.from_argv("plain") == "plain"
    # not UTF-8 at all (a GBK terminal): replaced, never a lone surrogate
    gbk = "内核".encode("gbk").decode("ascii", "surrogateescape")
    read = text.from_argv(gbk)
    assert "\ufffd" in read and not any("\ud800" <= ch <= "\udfff" for ch in read)


@pytest.mark.parametrize("raw, shown", [
    ("a\udce5b", "a\ufffdb"),
    ("line\nbreak\ttab\x00nul\x85", "line break tab nul "),
    ("内核 é", "内核 é"),
])
def test_one_line(raw, shown):
    assert text.one_line(raw) == shown
    assert text.one_line(raw * 100, 10) == (shown * 100)[:10]


@pytest.mark.parametrize("helper, raw, shown", [
    (text.printable, "a\udce5\u200bb\tc", "a\ufffd b c"),
    (lambda s: text.plain_words(s, 12), 'probe "502" {x}\\ \n', "probe  502   x     "[:12]),
    (text.escaped, "ok", "ok"),
    (text.escaped, "a\nb\x00", "a\\nb\\x00"),
    (text.quoted, "x" * 100, repr("x" * 100)[:77] + "..."),
    (text.loggable, "a\udce5", "a\\udce5"),
])
def test_the_other_cleaners(helper, raw, shown):
    assert helper(raw) == shown


def test_utf8_never_raises():
    assert text.utf8("é\udce5") == "é\ufffd".encode("utf-8")
    assert text.utf8("内核") == "内核".encode("utf-8")


@pytest.mark.parametrize("encoding, shown", [
    ("utf-8", "内核 é"),
    ("ascii", "\\u5185\\u6838 \\xe9"),
    ("ANSI_X3.4-1968", "\\u5185\\u6838 \\xe9"),  # what 3.6 calls the C locale's encoding
    ("latin-1", "\\u5185\\u6838 é"),
    ("no-such-codec", "\\u5185\\u6838 \\xe9"),
])
def test_for_encoding(encoding, shown):
    assert text.for_encoding("内核 é", encoding) == shown
