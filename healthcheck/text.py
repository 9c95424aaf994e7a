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


def has_surrogates(text):
    return _SURROGATE.search(text) is not None


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
