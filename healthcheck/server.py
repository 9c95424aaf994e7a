"""Serving: a cheroot WSGI server with graceful stop on SIGTERM; the only cheroot importer."""
import logging
import signal
import threading

from cheroot import wsgi

log = logging.getLogger(__name__)


def make_server(app, bind, port, threads=16, backlog=1024, timeout_s=5, shutdown_timeout_s=4):
    """A cheroot server. backlog is the listen queue: cheroot's default of 5 overflows
    with 50 clients, whose connects then time out."""
    server = wsgi.Server((bind, port), app, numthreads=threads, request_queue_size=backlog,
                         timeout=timeout_s, shutdown_timeout=shutdown_timeout_s,
                         server_name="container-healthcheck")
    # No route takes a body and no honest client sends 16 KiB of headers: refuse floods
    # (cheroot answers 413) instead of buffering them.
    server.max_request_header_size = 16 * 1024
    server.max_request_body_size = 1024
    return server


def serve_forever(server, on_hup=None, on_stop=None):
    """Run until SIGTERM/SIGINT: stop accepting, let in-flight requests finish, return.
    on_stop: called first, to end requests that would otherwise wait (held feed requests)."""
    stopping = threading.Event()

    def stop():
        if on_stop is not None:
            on_stop()
        server.stop()
    # Off the signal handler: stop() takes locks the interrupted code may hold.
    stopper = threading.Thread(target=stop, name="stopper", daemon=True)

    def request_stop(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            log.warning("signal %d: stopping; in-flight requests finish first", signum)
            stopper.start()

    def reopen(_signum, _frame):
        if on_hup is not None:
            on_hup()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, reopen)
    server.prepare()
    log.warning("serving on %s:%d", server.bind_addr[0], server.bind_addr[1])
    try:
        server.serve()
    finally:
        if stopping.is_set():
            stopper.join()
        else:
            server.stop()
