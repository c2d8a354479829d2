"""What every long-running service shares: logs, a stop signal, and an HTTP port with /healthz and /metrics.

A service is a class with ``run(stop: threading.Event)`` that returns when ``stop`` is set, and a ``health()``
that returns ``(ok, details)``. :func:`serve` runs one in the foreground with SIGTERM/SIGINT handling (used by
``python -m cloud <service>``); the demo runs several in threads of one process with a shared stop event.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Histogram, generate_latest

log = logging.getLogger(__name__)

GC_PAUSE_SECONDS = Histogram("iot_gc_pause_seconds", "Python garbage-collection pauses (every thread waits)",
                             ["generation"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))


def observe_gc_pauses() -> None:
    """Time every garbage collection into GC_PAUSE_SECONDS (once per process): a full collection stops every
    thread, and with tens of thousands of live objects it is a candidate for any tail latency."""
    import gc
    import time

    if any(getattr(cb, "__name__", "") == "_gc_timer" for cb in gc.callbacks):
        return
    started = [0.0]

    def _gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            GC_PAUSE_SECONDS.labels(str(info.get("generation"))).observe(time.perf_counter() - started[0])

    gc.callbacks.append(_gc_timer)


# young-generation threshold of the services that handle records in batches (alarms, writer): see raise_gc_threshold
GC_GEN0_THRESHOLD = 20_000


def raise_gc_threshold(gen0: int = GC_GEN0_THRESHOLD) -> None:
    """Fewer young-generation collections, so a batch of records is usually gone before one runs.

    With the default threshold (700 allocations) a collection runs in the middle of nearly every batch of 1,000
    records, the records alive at that moment move up a generation, and the oldest generation's growth then
    triggers a full collection every few seconds. A full collection walks every long-lived object (the alarm
    service's 10,000 device states = ~200,000 objects): 50-100 ms on an idle core, several hundred ms on a loaded
    one, and every record that arrives meanwhile waits. Process-wide, so only ever raised (the demo runs every
    service in one process: they only see rarer, slightly larger young collections)."""
    import gc

    current, gen1, gen2 = gc.get_threshold()
    if current < gen0:
        gc.set_threshold(gen0, gen1, gen2)


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (modules, SQLAlchemy's metadata and compiled statements, clients)
    out of the collector's view: it never becomes garbage, and a full collection then walks only what the
    service allocated since. Called by serve() and by the web workers (cloud/webserver.py, cloud/web/wsgi.py)."""
    import gc

    gc.collect()
    gc.freeze()


class Service(Protocol):
    name: str

    def run(self, stop: threading.Event) -> None: ...

    def health(self) -> tuple[bool, dict]: ...


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class OpsServer:
    """/healthz (200 or 503 with JSON details) and /metrics (Prometheus text) for the given services."""

    def __init__(self, services: list[Service], host: str = "127.0.0.1", port: int = 0):
        services_ref = services

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/metrics":
                    body, ctype, code = generate_latest(REGISTRY), CONTENT_TYPE_LATEST, 200
                elif self.path in ("/healthz", "/health"):
                    results = {s.name: s.health() for s in services_ref}
                    ok = all(r[0] for r in results.values())
                    body = json.dumps({"ok": ok, "services": {n: {"ok": r[0], **r[1]} for n, r in results.items()}},
                                      default=str).encode()
                    ctype, code = "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b'{"error":"not found"}', "application/json", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds would drown the service's own log
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ops-http", daemon=True)

    def start(self) -> "OpsServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``, from a thread of their own (call from the main thread).

    A Python signal handler runs in the main thread between two bytecodes. One that called ``stop.set()`` while
    that thread was inside ``stop.wait()``, holding the event's lock, deadlocked: ``nativestack up`` was seen
    hanging in exactly that way and from then on ignored every SIGTERM. So the handler does nothing itself: the
    interpreter's C-level handler writes the signal's number to a pipe (``signal.set_wakeup_fd``), and a watcher
    thread reads it and sets the event outside any signal context."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def handler(_signum, _frame):  # a Python-level handler must exist for the wakeup write to happen
        pass

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)

    def watch() -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum in STOP_SIGNALS:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    stop.set()

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()


def serve(service: Service, host: str = "127.0.0.1", ops_port: int = 0, stop: threading.Event | None = None) -> int:
    """Run one service in the foreground until SIGTERM/SIGINT; returns the process exit status.

    Pass ``stop`` when signals must be handled already during start-up work done before calling this."""
    if stop is None:
        stop = threading.Event()
        install_stop_signals(stop)
    observe_gc_pauses()
    freeze_startup_heap()
    ops = OpsServer([service], host, ops_port).start()
    log.info("%s: health and metrics on http://%s:%d/healthz and /metrics", service.name, host, ops.port)
    try:
        service.run(stop)
    finally:
        ops.stop()
    log.info("%s stopped", service.name)
    return 0
