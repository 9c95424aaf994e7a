"""Text from outside (argv, files, docker, sockets) made safe to store and print (pure).

CentOS 7 runs Python 3.6 in the C locale (cron, `env -i`, ssh): argv arrives decoded as
ASCII with surrogate escapes, and stdout is ASCII. Nothing here raises on any input.
"""
import os
import re

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
REPLACEMENT = "\ufffd"


def from_argv(arg):
    """An argv string as the operator typed it: the bytes the shell passed, read as UTF-8
    (3.6 in the C locale decodes them as ASCII with surrogate escapes). Bytes that are not
    UTF-8 become U+FFFD."""
    try:
        raw = os.fsencode(arg)
    except UnicodeError:
        return without_surrogates(arg)
    return raw.decode("utf-8", "replace")


def without_surrogates(text):
    """text with every lone surrogate (undecodable input that slipped through) as U+FFFD:
    such a string cannot be encoded as UTF-8, so it must never reach an encoder."""
    return _SURROGATE.sub(REPLACEMENT, text)


def printable(text):
    """text with no lone surrogates and every character a terminal would not print
    (controls, format characters) as a space: for tables, where width is measured."""
    return "".join(ch if ch.isprintable() else " " for ch in without_surrogates(text))


def plain_words(text, limit):
    """A reason in a few plain characters, for balancers' simple parsers and tables: no
    quotes, backslashes, braces or unprintable characters, at most limit characters."""
    return "".join(" " if (ch in '"\\{}' or not ch.isprintable()) else ch for ch in text)[:limit]


def escaped(text):
    """text for an error message about input: as it is when printable, else with escapes."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def quoted(value, limit=80):
    """A value in an error message: its repr, at most limit characters."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def loggable(text):
    """text that any log stream can take: a lone surrogate (undecodable input) is written
    as its \\udcXX escape instead of making the handler drop the line."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(text, limit=None):
    """Operator or Docker text for one line of output: no lone surrogates, control
    characters (newlines included) as spaces, at most limit characters."""
    cleaned = _CONTROL.sub(" ", without_surrogates(text))
    return cleaned if limit is None else cleaned[:limit]


def utf8(text):
    """UTF-8 bytes of text; a lone surrogate becomes U+FFFD instead of raising."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return without_surrogates(text).encode("utf-8")


def for_encoding(text, encoding):
    """text as a stream in `encoding` can write it: what it cannot encode shown as \\uXXXX
    escapes (the C locale's ASCII terminal), so width can be measured on what is printed."""
    text = without_surrogates(text)
    try:
        text.encode(encoding)
        return text
    except (UnicodeEncodeError, LookupError):
        pass
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        return text.encode("ascii", "backslashreplace").decode("ascii")
