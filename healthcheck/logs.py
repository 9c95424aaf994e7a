"""Logging set-up: logfmt lines like logrus' text format, to stderr (journald) or a file
under --logpath, appended, reopened on SIGHUP."""
import collections
import io
import json
import logging
import os
import re
import sys
import threading
import time

from healthcheck.text import loggable

LOG_FILE_NAME = "container-healthcheck.log"
# Every level the Go tool (logrus) accepted, so an operator's OPTS keep working.
LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL,
          "panic": logging.CRITICAL}
# logrus' names for what Python calls the levels.
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
                logging.ERROR: "error", logging.CRITICAL: "fatal"}
_BARE_VALUE = re.compile(r"[A-Za-z0-9_.:/@^+-]+\Z")


def logfmt_value(value):
    """A value as logrus writes it: bare when safe, else double-quoted with escapes."""
    text = loggable(str(value))
    if _BARE_VALUE.match(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def logfmt_time(seconds):
    """RFC 3339 local time with the offset, as logrus prints `time=`."""
    local = time.localtime(seconds)
    offset = time.strftime("%z", local)
    return time.strftime("%Y-%m-%dT%H:%M:%S", local) + offset[:3] + ":" + offset[3:]


class LogfmtFormatter(logging.Formatter):
    """`time="..." level=info msg="..." logger=...`: one event per line, whatever the message
    holds (newlines in messages and tracebacks are escaped, never split)."""

    def format(self, record):
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string or argument must not lose the event
            message = "%r %% %r (unformattable: %s)" % (record.msg, record.args, exc)
        if record.exc_info:
            message = message + "\n" + self.formatException(record.exc_info)
        message = loggable(message)
        return 'time="%s" level=%s msg=%s logger=%s' % (
            logfmt_time(record.created), _LEVEL_NAMES.get(record.levelno, "info"),
            json.dumps(message, ensure_ascii=False), logfmt_value(record.name))


def utf8_stderr():
    """stderr writing UTF-8 whatever the locale (journald and logrus take UTF-8; 3.6 in the
    C locale would write \\uXXXX escapes); never raises on what it is given."""
    global _utf8_stderr
    stream = sys.stderr
    buffer = getattr(stream, "buffer", None)
    if buffer is None or (stream.encoding or "").lower().replace("-", "") == "utf8":
        return stream
    if _utf8_stderr is None or _utf8_stderr.buffer is not buffer:
        # Kept for the life of the process: a collected wrapper would close stderr's buffer.
        _utf8_stderr = io.TextIOWrapper(buffer, encoding="utf-8", errors="backslashreplace", line_buffering=True)
    return _utf8_stderr


_utf8_stderr = None


class ReopenableFileHandler(logging.FileHandler):
    """Appends to a file; reopen() after logrotate moved it. A failing disk never raises."""

    def __init__(self, path):
        logging.FileHandler.__init__(self, path, mode="a", encoding="utf-8", delay=True)

    def reopen(self):
        self.acquire()
        try:
            if self.stream is not None:
                try:
                    self.stream.close()
                except OSError:
                    pass
                self.stream = None
        finally:
            self.release()

    def handleError(self, record):
        # A full or read-only log disk must not stop answers or spam tracebacks.
        self.reopen()


def configure(level="info", logpath=None):
    """Install handlers on the root logger; return the file handler (or None)."""
    # Never let a logging failure raise into a request.
    logging.raiseExceptions = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(LEVELS.get(str(level).lower(), logging.INFO))
    formatter = LogfmtFormatter()
    file_handler = None
    if logpath:
        try:
            os.makedirs(logpath, exist_ok=True)
            path = os.path.join(logpath, LOG_FILE_NAME)
            with open(path, "a"):
                pass
            file_handler = ReopenableFileHandler(path)
            file_handler.setFormatter(formatter)
            root.addHandler(file_handler)
        except OSError as exc:
            file_handler = None
            sys.stderr.write("container-healthcheck: cannot write logs under %s (%s); logging to stderr\n"
                             % (logpath, exc))
    if file_handler is None:
        stream = logging.StreamHandler(utf8_stderr())
        stream.setFormatter(formatter)
        root.addHandler(stream)
    return file_handler


class AccessLog(object):
    """One line per request, written in batches.

    Going through `logging` per request (a LogRecord, a formatter, a flush and a write
    syscall each) cost about 17% of throughput at 50 clients; here a request only formats
    its line and appends it, and a writer thread hands the batch to the root handlers'
    streams every interval_s. At most max_lines wait; beyond that lines are counted and
    dropped rather than growing memory.
    """

    def __init__(self, name="healthcheck.access", interval_s=0.2, max_lines=20000, clock=time.time):
        self.name = name
        self.enabled = logging.getLogger(name).isEnabledFor(logging.INFO)
        self._interval_s = interval_s
        self._max_lines = max_lines
        self._clock = clock
        self._lines = collections.deque()
        self._dropped = 0
        self._second = None
        self._stamp = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)

    def start(self):
        if self.enabled:
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        self.flush()

    def add(self, method, path, status, duration_ms, client):
        """One request, as a logfmt line (`msg="GET /path"` plus fields)."""
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._stamp = logfmt_time(second)
            self._second = second
        if len(self._lines) >= self._max_lines:
            self._dropped += 1
            return
        request = json.dumps("%s %s" % (method, path), ensure_ascii=False)
        self._lines.append('time="%s" level=info msg=%s status=%d duration_ms=%.1f client=%s logger=%s\n' % (
            self._stamp, request, status, duration_ms, logfmt_value(client), self.name))

    def flush(self):
        lines = []
        while True:
            try:
                lines.append(self._lines.popleft())
            except IndexError:
                break
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            lines.append('time="%s" level=warning msg="%d access log lines dropped (writer behind)" logger=%s\n'
                         % (logfmt_time(self._clock()), dropped, self.name))
        if lines:
            write_to_handlers("".join(lines))

    def _run(self):
        while not self._stop.wait(self._interval_s):
            self.flush()


def write_to_handlers(text):
    """Write preformatted lines to the root logger's streams; a failing disk is ignored."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.StreamHandler):
            continue
        handler.acquire()
        try:
            if handler.stream is None and isinstance(handler, logging.FileHandler):
                handler.stream = handler._open()
            handler.stream.write(text)
            handler.stream.flush()
        except (OSError, ValueError):
            if isinstance(handler, ReopenableFileHandler):
                handler.reopen()
        finally:
            handler.release()
