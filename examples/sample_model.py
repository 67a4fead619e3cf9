#!/usr/bin/env python3
"""A sample model server with the routes of the AzureML scoring server.

GET /              -> 200 "Healthy" (the readiness probe scorefront uses)
POST /score        -> 200 JSON: the version that served, the process id, and the input
GET /score?...     -> the same, scoring the query string
GET /swagger.json  -> a minimal OpenAPI document

Only the Python standard library is needed. Options:
  --port N         port to listen on (loopback only)
  --delay-ms N     time each scoring call takes
  --close          answer with Connection: close, as the AzureML server does
"""

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = os.environ.get("SCOREFRONT_VERSION", "sample")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave at once
    delay = 0.0
    close = False

    def log_message(self, *args):
        pass  # scorefront keeps the access log

    def reply(self, status, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def score(self, payload):
        time.sleep(self.delay)
        self.reply(200, json.dumps({"version": VERSION, "pid": os.getpid(), "input": payload}))

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/":
            self.reply(200, "Healthy", "text/plain")
        elif path == "/score":
            self.score(query)
        elif path == "/swagger.json":
            self.reply(200, json.dumps({"swagger": "2.0", "info": {"title": VERSION}}))
        else:
            self.reply(404, json.dumps({"message": "not found"}))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        if self.path.partition("?")[0] != "/score":
            self.reply(404, json.dumps({"message": "not found"}))
            return
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            self.reply(400, json.dumps({"message": "body is not JSON"}))
            return
        self.score(payload)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--close", action="store_true")
    args = p.parse_args()
    Handler.delay = args.delay_ms / 1000.0
    Handler.close = args.close
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
