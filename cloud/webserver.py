"""Serving the Flask app: a threaded Werkzeug server inside the demo and tests, gunicorn in production.

flask-sock needs a server that gives each WebSocket its own thread: Werkzeug's threaded server does, and so does
gunicorn's ``gthread`` worker (one thread per open socket, so size IOT_WEB_THREADS for the expected number
of live dashboards).
"""

from __future__ import annotations

import logging
import threading

from werkzeug.serving import make_server

from cloud.settings import Settings

log = logging.getLogger(__name__)


class WebServer:
    """The dashboard in a background thread (demo, tests)."""

    name = "web"

    def __init__(self, settings: Settings, *, engine=None, bus=None, cache=None, port: int | None = None):
        from cloud.web import create_app

        self.app = create_app(settings, engine=engine, bus=bus, cache=cache)
        self.httpd = make_server(settings.web_host, settings.web_port if port is None else port, self.app,
                                 threaded=True)
        self.port = self.httpd.server_port
        self.url = f"http://{settings.web_host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="web", daemon=True)

    def start(self) -> "WebServer":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _freeze_heap(_worker) -> None:
    from cloud.service import freeze_startup_heap

    freeze_startup_heap()


def run_web(settings: Settings) -> int:
    """``python -m cloud web``: gunicorn with threaded workers; SIGTERM is a graceful shutdown."""
    from gunicorn.app.base import BaseApplication

    class Gunicorn(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.web_host}:{settings.web_port}")
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("workers", settings.web_workers)
            self.cfg.set("threads", settings.web_threads)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("accesslog", "-" if settings.log_level == "DEBUG" else None)
            # what the worker built at start-up out of the collector's view, as cloud/web/wsgi.py does: a full
            # collection then scans what requests allocate, not ~100,000 start-up objects (~80 ms)
            self.cfg.set("post_worker_init", _freeze_heap)

        def load(self):
            from cloud.web import create_app

            return create_app(settings)

    Gunicorn().run()
    return 0
