"""WebSocket /ws: pushes the tenant's live events (readings, status, command progress, alarms) to browsers.

Fan-out, per worker process:

* ONE subscription (``cache.feed()``: one Redis pub/sub connection in production, in-process in the demo)
  carries the channels of every tenant that has clients in this process; one feed thread reads it.
* Each event is turned into a WebSocket frame ONCE (Redis delivers the JSON text as published; it is not
  decoded) and the same bytes go to every client of the tenant.
* The feed thread writes the frame straight to each client's socket without blocking (``MSG_DONTWAIT``): no
  thread wake-up per client per event. Only when a client's socket buffer is full does the rest go to that
  client's bounded queue, which the client's own thread (the one flask-sock gives every WebSocket) sends
  with blocking writes. A full queue drops its oldest whole frames and the client is then sent
  ``{"type": "resync", "dropped": n}`` so it reloads the current state over the REST API. A slow client only
  ever stalls itself.

Frames sent to the client (JSON text): ``{"type": "hello", "tenant": id, "role": ...}``, then the cache events
as they are (``reading`` / ``status`` / ``command`` / ``alarm``), and ``resync`` hints; a ping every
PING_INTERVAL_S seconds (the feed thread sends it, so every write to a socket comes from one place at a time).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from urllib.parse import urlsplit

import orjson
from flask import Blueprint, g, jsonify, request
from flask_sock import Sock

from cloud.cache import FEED_RESYNC
from cloud.web import ctx
from cloud.web.auth import still_valid

log = logging.getLogger(__name__)
bp = Blueprint("ws", __name__)
sock = Sock()

CLIENT_QUEUE = 256
PING_INTERVAL_S = 25.0
PING_FRAME = b"\x89\x00"
JOIN_TIMEOUT_S = 5.0
# how often an open WebSocket checks that its login still holds: a removed user, a changed password or a revoked
# token ends it within this time (one primary-key or index probe per connection)
RECHECK_S = 30.0
POLICY_VIOLATION = 1008  # RFC 6455 7.4.1


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented WebSocket text frame (RFC 6455 5.2): what a server sends, the same for all."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def event_frame(event) -> bytes:
    return text_frame(orjson.dumps(event, default=str))


class Client:
    """One connected browser's socket and its bounded backlog.

    ``push`` (the feed thread) writes a frame directly while nothing is queued; otherwise it queues it,
    dropping the oldest whole frame when ``maxlen`` are waiting. ``drain`` (the client's own thread) sends what
    is queued with blocking writes. While the backlog is non-empty or being sent, only ``drain`` writes, so
    frames never interleave and keep their order."""

    def __init__(self, sock=None, first: bytes | None = None, maxlen: int = CLIENT_QUEUE):
        self.sock = sock
        self.maxlen = maxlen
        # writing without blocking needs a plain socket in blocking mode (a timeout makes Python wait for
        # room first; TLS sockets take no flags): otherwise everything goes through the client's thread
        self.direct = (sock is not None and not isinstance(sock, ssl.SSLSocket) and sock.gettimeout() is None)
        self._cond = threading.Condition()
        self._q: deque[bytes] = deque()
        self._partial = False  # _q[0] is the rest of a frame already partly on the wire: never dropped
        self._busy = False  # the client's thread owns the socket (backlog queued or being sent)
        self.dropped = 0
        self.dead = False
        if first is not None:
            self._q.append(first)
            self._busy = True

    def push(self, frame: bytes) -> None:
        with self._cond:
            if self.dead:
                return
            if self._busy or not self.direct:
                self._enqueue(frame)
                return
        try:
            sent = self.sock.send(frame, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.kill()
            return
        if sent < len(frame):
            with self._cond:
                self._q.appendleft(frame[sent:])
                self._partial = sent > 0
                self._busy = True
                self._cond.notify()

    def _enqueue(self, frame: bytes) -> None:
        if len(self._q) >= self.maxlen:
            if self._partial:
                del self._q[1]
            else:
                self._q.popleft()
            self.dropped += 1
        self._q.append(frame)
        self._busy = True
        self._cond.notify()

    def drain(self, timeout: float = 1.0) -> bool:
        """Send everything queued (waiting up to ``timeout`` for something); False once the client is gone."""
        with self._cond:
            if not self._q and not self.dead:
                self._cond.wait(timeout)
        while True:
            with self._cond:
                if self.dead:
                    return False
                if not self._q:
                    self._busy = False
                    return True
                frame, partial = self._q.popleft(), self._partial
                self._partial = False
                dropped, self.dropped = self.dropped, 0
            try:
                if partial:
                    self._sendall(frame)
                if dropped:
                    self._sendall(event_frame({"type": "resync", "dropped": dropped}))
                if not partial:
                    self._sendall(frame)
            except OSError:
                self.kill()
                return False

    def _sendall(self, data: bytes) -> None:
        if self.sock is None:
            raise OSError("no socket")
        self.sock.sendall(data)

    def kill(self) -> None:
        with self._cond:
            self.dead = True
            self._q.clear()
            self._cond.notify_all()


class Hub:
    """The process's live feed: one subscription, one thread, tenant -> clients."""

    def __init__(self, cache, queue_size: int = CLIENT_QUEUE, ping_interval: float = PING_INTERVAL_S):
        self.cache = cache
        self.queue_size = queue_size
        self.ping_interval = ping_interval
        self.lock = threading.Lock()
        self._tenants: dict[int, tuple[Client, ...]] = {}  # replaced, never mutated: read without the lock
        self._feed = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _start(self) -> None:  # under self.lock
        if self._thread is None:
            self._feed = self.cache.feed()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ws-feed", daemon=True)
            self._thread.start()

    def join(self, tenant_id: int, sock=None, first: bytes | None = None) -> Client:
        """Register a client; returns once the tenant's subscription is confirmed (so no event published after
        the client's first frame is missed), or after JOIN_TIMEOUT_S with a warning."""
        client = Client(sock, first, self.queue_size)
        with self.lock:
            self._start()
            self._tenants[tenant_id] = self._tenants.get(tenant_id, ()) + (client,)
            subscribed = self._feed.add(tenant_id)
        if not subscribed.wait(JOIN_TIMEOUT_S):
            log.warning("live feed for tenant %s: subscription not confirmed in %.0f s", tenant_id, JOIN_TIMEOUT_S)
        return client

    def leave(self, tenant_id: int, client: Client) -> None:
        client.kill()
        with self.lock:
            clients = tuple(c for c in self._tenants.get(tenant_id, ()) if c is not client)
            if clients:
                self._tenants[tenant_id] = clients
            elif tenant_id in self._tenants:
                del self._tenants[tenant_id]
                if self._feed is not None:
                    self._feed.remove(tenant_id)

    def client_count(self) -> int:
        with self.lock:
            return sum(len(c) for c in self._tenants.values())

    def broadcast(self, frame: bytes, tenant_id: int | None = None) -> None:
        if tenant_id is None:
            groups = list(self._tenants.values())
        else:
            groups = [self._tenants.get(tenant_id, ())]
        for clients in groups:
            for client in clients:
                client.push(frame)

    def _run(self) -> None:
        feed = self._feed
        next_ping = time.monotonic() + self.ping_interval
        while not self._stop.is_set():
            try:
                item = feed.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - the feed must outlive any single failure
                log.warning("live feed failed; retrying", exc_info=True)
                self._stop.wait(1.0)
                continue
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + self.ping_interval
                self.broadcast(PING_FRAME)
            if item is None:
                continue
            if item == FEED_RESYNC:
                self.broadcast(event_frame({"type": "resync", "dropped": 0, "reason": "feed reconnected"}))
                continue
            tenant_id, payload = item
            clients = self._tenants.get(tenant_id)
            if not clients:
                continue
            if isinstance(payload, (bytes, str)):
                data = payload.encode() if isinstance(payload, str) else payload
                try:
                    data.decode()  # a text frame must be UTF-8; the writer publishes JSON, so it is
                except UnicodeDecodeError:
                    log.warning("live feed: event for tenant %s is not UTF-8; dropped", tenant_id)
                    continue
                frame = text_frame(data)
            else:
                frame = event_frame(payload)
            for client in clients:
                client.push(frame)
        try:
            feed.close()
        except Exception:  # noqa: BLE001
            log.debug("closing the live feed failed", exc_info=True)

    def close(self) -> None:
        with self.lock:
            self._stop.set()
            thread, self._thread = self._thread, None
            for clients in self._tenants.values():
                for client in clients:
                    client.kill()
            self._tenants.clear()
        if thread is not None:
            thread.join(5.0)


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
    hello = event_frame({"type": "hello", "tenant": principal.tenant_id, "role": principal.role})
    client = hub.join(principal.tenant_id, ws.sock, hello)
    WS_CLIENTS.inc()
    recheck_at = time.monotonic() + RECHECK_S
    revoked = False
    try:
        while ws.connected and client.drain(timeout=2.0):
            while ws.connected and ws.receive(timeout=0) is not None:  # we expect nothing; drop chatter
                pass
            if time.monotonic() >= recheck_at:
                with ctx().session_factory() as s:
                    revoked = not still_valid(principal, s)
                if revoked:
                    break
                recheck_at = time.monotonic() + RECHECK_S
    finally:
        hub.leave(principal.tenant_id, client)  # first: the feed thread no longer writes to this socket
        WS_CLIENTS.dec()
    if revoked and ws.connected:
        ws.close(reason=POLICY_VIOLATION, message="login no longer valid")
