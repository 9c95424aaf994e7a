"""The commands' output in any locale: JSON bytes as they are, and stdout/stderr that escape
what their encoding cannot show (the C locale's ASCII) instead of raising."""
import io
import sys


def write_json(body):
    """JSON bytes as they are (UTF-8, as JSON is), whatever the locale's encoding."""
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a text-only stream (tests): give it text
        sys.stdout.write(body.decode("utf-8") + "\n")
    else:
        out.write(body + b"\n")
        out.flush()


def never_raising_std_streams():
    """stdout and stderr that show what their encoding cannot (the C locale's ASCII) as
    \\uXXXX escapes instead of raising, so no output can turn an answer into a crash."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        buffer = getattr(stream, "buffer", None)
        if buffer is None or getattr(stream, "errors", None) == "backslashreplace":
            continue
        stream.flush()
        setattr(sys, name, io.TextIOWrapper(buffer, encoding=stream.encoding or "utf-8", errors="backslashreplace",
                                            line_buffering=True))
