"""/healthz (database reachable, cache reachable) and /metrics (Prometheus: requests, latency, WebSocket clients)."""

from __future__ import annotations

import time

from flask import Blueprint, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import text

from cloud.web import ctx

bp = Blueprint("ops", __name__)

# module level: one set per process, however many apps the tests build
REQUESTS = Counter("iot_web_requests_total", "HTTP requests served by the web app",
                   ["method", "endpoint", "status"])
LATENCY = Histogram("iot_web_request_seconds", "HTTP request latency of the web app", ["method", "endpoint"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
WS_CLIENTS = Gauge("iot_web_ws_clients", "Connected WebSocket clients")
COMMANDS = Counter("iot_web_commands_total", "Commands queued through the web app", ["op"])


def init_app(app) -> None:
    @app.before_request
    def _start():
        g._t0 = time.perf_counter()

    @app.after_request
    def _observe(response):
        endpoint = request.endpoint or "unknown"
        if endpoint == "ws.live":
            return response
        t0 = g.get("_t0")
        if t0 is not None:
            LATENCY.labels(request.method, endpoint).observe(time.perf_counter() - t0)
        REQUESTS.labels(request.method, endpoint, str(response.status_code)).inc()
        return response


@bp.get("/healthz")
def healthz():
    c = ctx()
    checks: dict[str, dict] = {}
    try:
        with c.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": str(exc).splitlines()[0][:200]}
    ping = getattr(c.cache, "ping", None)
    if ping is not None:
        try:
            ok = ping() is not False
            checks["cache"] = {"ok": ok}
        except Exception as exc:
            checks["cache"] = {"ok": False, "error": str(exc).splitlines()[0][:200]}
    ok = checks["database"]["ok"]  # the cache is an accelerator: degraded, not down
    return jsonify(ok=ok, checks=checks, ws_clients=c.hub.client_count()), 200 if ok else 503


@bp.get("/metrics")
def metrics():
    return Response(generate_latest(REGISTRY), mimetype=CONTENT_TYPE_LATEST)
