"""The stack's ceiling for scripts/bench: Bottle + cheroot returning a constant JSON body."""
import sys

import bottle
from cheroot import wsgi

BODY = b'{"code":0,"status":"ok","message":"i\'m healthy"}'


def main():
    port, threads = int(sys.argv[1]), int(sys.argv[2])
    app = bottle.Bottle()

    @app.get("/container-healthcheck/apps/health/<app_code>")
    def constant(app_code):
        bottle.response.content_type = "application/json"
        return BODY

    server = wsgi.Server(("127.0.0.1", port), app, numthreads=threads, request_queue_size=1024)
    try:
        server.start()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
