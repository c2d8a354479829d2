"""A webhook endpoint for the tests: a real HTTP(S) server on 127.0.0.1 that records every POST.

``Receiver(tls=context)`` serves HTTPS with that server context. Each request is recorded as a dict with
``path``, ``headers``, ``body`` (bytes) and the ``status`` it was answered with: the next of ``statuses`` (a list
the test may change at any time), else ``status_for(path)``, else 200."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    def __init__(self, tls=None, status_for=None):
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver.statuses.pop(0) if receiver.statuses else \
                    (status_for(self.path) if status_for else 200)
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                          "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_port
        self.url = f"{'https' if tls is not None else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list[dict]:
        """The JSON bodies POSTed to ``path``, in arrival order."""
        return [json.loads(r["body"]) for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
