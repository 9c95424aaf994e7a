"""Logging set-up: stderr (journald) or files under --logpath, appended, reopened on SIGHUP."""
import logging
import os
import sys

LOG_FILE_NAME = "container-healthcheck.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR}


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
    formatter = logging.Formatter(_FORMAT)
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
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        root.addHandler(stream)
    return file_handler
