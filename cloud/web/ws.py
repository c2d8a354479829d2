"""WebSocket /ws: pushes the tenant's live events (readings, status, command progress, alarms) to browsers.

One feed thread per tenant with connected clients reads ``cache.subscribe(tenant_id)`` (Redis pub/sub in
production, in-process in the demo) and fans each event out to the clients' own bounded queues. Pushing never
blocks, so a slow client only ever stalls itself: when its queue is full the oldest events are dropped and the
client is sent ``{"type": "resync", "dropped": n}`` so it reloads the current state over the REST API.

Frames sent to the client (JSON text): ``{"type": "hello", "tenant": id, "role": ...}``, then the cache events
as they are (``reading`` / ``status`` / ``command`` / ``alarm``), and ``resync`` hints.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from urllib.parse import urlsplit

from flask import Blueprint, g, jsonify, request
from flask_sock import Sock

from cloud.web import ctx

log = logging.getLogger(__name__)
bp = Blueprint("ws", __name__)
sock = Sock()

CLIENT_QUEUE = 256


class Client:
    """A connected browser: a bounded queue that drops the oldest event when full."""

    def __init__(self, maxlen: int = CLIENT_QUEUE):
        self.maxlen = maxlen
        self._q: deque = deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def push(self, event) -> None:
        with self._cond:
            if len(self._q) >= self.maxlen:
                self._q.popleft()
                self.dropped += 1
            self._q.append(event)
            self._cond.notify()

    def take(self, timeout: float = 1.0) -> tuple[list, int]:
        """Everything queued (waiting up to ``timeout`` for the first), and how many were dropped since."""
        with self._cond:
            if not self._q:
                self._cond.wait(timeout)
            items, dropped = list(self._q), self.dropped
            self._q.clear()
            self.dropped = 0
            return items, dropped


class _Feed:
    def __init__(self, hub: "Hub", tenant_id: int):
        self.hub, self.tenant_id = hub, tenant_id
        self.clients: list[Client] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self._sub = None
        self.thread = threading.Thread(target=self._run, name=f"ws-feed-{tenant_id}", daemon=True)

    def start(self) -> None:
        """Subscribe before the first client is greeted, so no event published after its "hello" is missed."""
        try:
            self._sub = self.hub.cache.subscribe(self.tenant_id)
        except Exception:
            log.warning("live feed for tenant %s: subscribe failed; retrying", self.tenant_id, exc_info=True)
        self.ready.set()
        self.thread.start()

    def _run(self) -> None:
        sub, self._sub = self._sub, None
        while not self.stop.is_set():
            try:
                if sub is None:
                    sub = self.hub.cache.subscribe(self.tenant_id)
                event = sub.get(timeout=1.0)
            except Exception:
                log.warning("live feed for tenant %s failed; retrying", self.tenant_id, exc_info=True)
                if sub is not None:
                    try:
                        sub.close()
                    except Exception:
                        pass
                    sub = None
                self._broadcast({"type": "resync", "dropped": 0, "reason": "feed reconnected"})
                self.stop.wait(2.0)
                continue
            if event is not None:
                self._broadcast(event)
        if sub is not None:
            try:
                sub.close()
            except Exception:
                log.debug("closing subscription failed", exc_info=True)

    def _broadcast(self, event) -> None:
        with self.hub.lock:
            clients = list(self.clients)
        for client in clients:
            client.push(event)


class Hub:
    def __init__(self, cache, queue_size: int = CLIENT_QUEUE):
        self.cache = cache
        self.queue_size = queue_size
        self.lock = threading.Lock()
        self._feeds: dict[int, _Feed] = {}

    def join(self, tenant_id: int) -> Client:
        client = Client(self.queue_size)
        with self.lock:
            feed = self._feeds.get(tenant_id)
            new = feed is None
            if new:
                feed = self._feeds[tenant_id] = _Feed(self, tenant_id)
            feed.clients.append(client)
        if new:
            feed.start()
        else:
            feed.ready.wait(5.0)
        return client

    def leave(self, tenant_id: int, client: Client) -> None:
        with self.lock:
            feed = self._feeds.get(tenant_id)
            if feed is None:
                return
            if client in feed.clients:
                feed.clients.remove(client)
            if not feed.clients:
                feed.stop.set()
                del self._feeds[tenant_id]

    def client_count(self) -> int:
        with self.lock:
            return sum(len(f.clients) for f in self._feeds.values())

    def close(self) -> None:
        with self.lock:
            for feed in self._feeds.values():
                feed.stop.set()
            self._feeds.clear()


@bp.before_request
def _authenticate():
    p = g.get("principal")
    if p is None:
        return jsonify(error="authentication required (session cookie or access_token)"), 401
    origin = request.headers.get("Origin")
    if not g.get("bearer") and origin and urlsplit(origin).netloc != request.host:
        # a page on another site must not ride on the user's cookie (cross-site WebSocket hijacking)
        return jsonify(error="cross-origin WebSocket refused"), 403
    return None


@sock.route("/ws", bp=bp)
def live(ws) -> None:
    from cloud.web.ops import WS_CLIENTS

    principal = g.principal
    hub = ctx().hub
    client = hub.join(principal.tenant_id)
    WS_CLIENTS.inc()
    try:
        ws.send(json.dumps({"type": "hello", "tenant": principal.tenant_id, "role": principal.role}))
        while ws.connected:
            items, dropped = client.take(timeout=1.0)
            if dropped:
                ws.send(json.dumps({"type": "resync", "dropped": dropped}))
            for event in items:
                ws.send(event if isinstance(event, str) else json.dumps(event, default=str))
            while ws.connected and ws.receive(timeout=0) is not None:  # we expect nothing; drain pings/chatter
                pass
    finally:
        hub.leave(principal.tenant_id, client)
        WS_CLIENTS.dec()
