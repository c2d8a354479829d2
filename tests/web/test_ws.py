"""WebSocket /ws: events reach the tenant's clients only; authentication; a slow client only loses its own events."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
import simple_websocket

from cloud.web.ws import Client, Hub, event_frame
from tests import wsclient
from tests.web.conftest import login


def open_ws(url, headers=None):
    return wsclient.connect(url, headers=headers)


def ws_url(live, token: str | None = None) -> str:
    url = live.url.replace("http://", "ws://") + "/ws"
    return url + (f"?access_token={token}" if token else "")


def receive_until(ws, predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = ws.receive(timeout=max(0.05, deadline - time.monotonic()))
        if raw is None:
            continue
        event = json.loads(raw)
        if predicate(event):
            return event
    return None


def connect(live, token=None, headers=None):
    ws = open_ws(ws_url(live, token), headers=headers)
    hello = receive_until(ws, lambda e: e["type"] == "hello")
    assert hello is not None
    return ws, hello


def test_event_reaches_own_tenant_only(world, live):
    a, hello_a = connect(live, world.a.tokens["viewer"])
    b, hello_b = connect(live, world.b.tokens["viewer"])
    try:
        assert hello_a["tenant"] == world.a.id and hello_b["tenant"] == world.b.id
        dev = world.a.devices[0]
        world.cache.publish(world.a.id, {"type": "reading", "device": dev, "t": 23.25, "h": 45.0, "p": 1000.0,
                                         "ts": 1})
        got = receive_until(a, lambda e: e.get("type") == "reading")
        assert got is not None and got["device"] == dev and got["t"] == 23.25
        assert receive_until(b, lambda e: e.get("type") == "reading", timeout=1.0) is None
        world.cache.publish(world.b.id, {"type": "command", "cid": "c-1", "status": "sent", "device": "x"})
        assert receive_until(b, lambda e: e.get("type") == "command")["cid"] == "c-1"
        assert receive_until(a, lambda e: e.get("type") == "command", timeout=1.0) is None
    finally:
        a.close()
        b.close()


def test_ws_with_session_cookie(world, live):
    client = world.client()
    login(client, world.a.users["viewer"])
    cookie = client.get_cookie("iot_session")
    ws, hello = connect(live, headers={"Cookie": f"iot_session={cookie.value}"})
    try:
        assert hello["tenant"] == world.a.id and hello["role"] == "viewer"
    finally:
        ws.close()


def test_ws_requires_auth(world, live):
    with pytest.raises(simple_websocket.ConnectionError):
        open_ws(ws_url(live))
    with pytest.raises(simple_websocket.ConnectionError):
        open_ws(ws_url(live, "iot_not-a-token"))


def test_ws_refuses_cross_site_origin(world, live):
    client = world.client()
    login(client, world.a.users["viewer"])
    cookie = client.get_cookie("iot_session")
    with pytest.raises(simple_websocket.ConnectionError):
        open_ws(ws_url(live), headers={"Cookie": f"iot_session={cookie.value}", "Origin": "http://evil.example"})


class FrameReader:
    """Reads the unmasked frames a server writes (the test's side of a socket pair)."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self):
        b0, b1 = self._need(2)
        assert b1 & 0x80 == 0, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._need(2), "big")
        elif n == 127:
            n = int.from_bytes(self._need(8), "big")
        return b0 & 0x0F, self._need(n)


def small_pair():
    server, peer = socket.socketpair()
    for s in (server, peer):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return server, peer


def run_in_thread(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def test_frames_are_plain_websocket_text():
    from cloud.web.ws import text_frame

    for size in (0, 125, 126, 65535, 65536):
        server, peer = socket.socketpair()
        payload = b"x" * size
        run_in_thread(server.sendall, text_frame(payload))
        assert FrameReader(peer).frame() == (0x1, payload)
        server.close()
        peer.close()


def test_slow_client_drops_oldest_whole_frames_and_gets_resync():
    server, peer = small_pair()
    client = Client(server, maxlen=3)
    pad = "y" * 900
    pusher = run_in_thread(lambda: [client.push(event_frame({"n": i, "pad": pad})) for i in range(300)])
    pusher.join(30)
    assert not pusher.is_alive(), "push blocked on a client that does not read"
    assert client.dropped > 0 and len(client._q) <= 3 + 1
    sender = run_in_thread(lambda: [client.drain(timeout=0.1) for _ in range(50)])
    reader = FrameReader(peer)
    got, resyncs = [], []
    while not got or got[-1] != 299:
        opcode, data = reader.frame()
        event = json.loads(data)
        if event.get("type") == "resync":
            resyncs.append(event["dropped"])
        else:
            got.append(event["n"])
    assert got == sorted(got) and len(set(got)) == len(got)  # in order, each frame whole and once
    assert len(resyncs) == 1 and resyncs[0] + len(got) == 300
    assert got[-3:] == [297, 298, 299]
    client.kill()
    sender.join(10)
    server.close()
    peer.close()


def test_slow_client_does_not_stall_others():
    from cloud.cache import MemoryCache

    cache = MemoryCache()
    hub = Hub(cache, queue_size=5)
    slow_server, slow_peer = small_pair()  # the peer never reads
    fast_server, fast_peer = small_pair()
    try:
        slow = hub.join(1, slow_server)
        fast = hub.join(1, fast_server)
        senders = [run_in_thread(lambda c=c: [None for _ in iter(lambda: c.drain(0.2), False)])
                   for c in (slow, fast)]
        received, resyncs = [], []
        progress = threading.Condition()

        def read_fast():
            reader = FrameReader(fast_peer)
            try:
                while len(received) < 2000:
                    event = json.loads(reader.frame()[1])
                    with progress:
                        (resyncs if event.get("type") == "resync" else received).append(event)
                        progress.notify_all()
            except (EOFError, OSError):
                pass

        run_in_thread(read_fast)
        for i in range(2000):
            cache.publish(1, {"type": "reading", "n": i, "pad": "z" * 300})
            if i % 4 == 3:  # the fast client keeps up with a steady stream; the slow one never reads
                with progress:
                    progress.wait_for(lambda: len(received) + len(resyncs) >= i + 1, timeout=30)
        assert [e["n"] for e in received] == list(range(2000)) and resyncs == []
        assert slow.dropped > 0 and len(slow._q) <= 5 + 1
        assert hub.client_count() == 2
        hub.leave(1, slow)
        hub.leave(1, fast)
        assert hub.client_count() == 0
        for t in senders:
            t.join(10)
    finally:
        hub.close()
        for s in (slow_server, slow_peer, fast_server, fast_peer):
            s.close()


def test_redis_feed_is_one_subscription_and_recovers_from_a_dropped_connection(redis):
    """One pub/sub connection carries every tenant's channel; when Redis drops it, the feed reconnects,
    re-subscribes every tenant and says FEED_RESYNC once (events in between are lost: pub/sub keeps none)."""
    import redis as redis_lib

    from cloud.cache import FEED_RESYNC, RedisCache

    cache = RedisCache(redis.url)
    feed = cache.feed()
    admin = redis_lib.Redis.from_url(redis.url)
    tenants = (9001, 9002, 9003)
    try:
        events = [feed.add(t) for t in tenants]

        def next_item(timeout=10.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                item = feed.get(timeout=0.2)
                if item is not None:
                    return item
            return None

        deadline = time.monotonic() + 10
        while not all(e.is_set() for e in events) and time.monotonic() < deadline:
            feed.get(timeout=0.1)  # the consumer thread's loop is what subscribes
        assert all(e.is_set() for e in events)
        assert admin.pubsub_numsub(*(f"iot:events:{t}" for t in tenants)) == [
            (f"iot:events:{t}".encode(), 1) for t in tenants]
        clients = [c for c in admin.client_list() if int(c.get("psub", 0)) + int(c.get("sub", 0)) > 0]
        assert len(clients) == 1 and int(clients[0]["sub"]) == 3  # one connection for all three tenants
        cache.publish(9002, {"type": "reading", "n": 1})
        tenant, payload = next_item()
        assert tenant == 9002 and json.loads(payload) == {"type": "reading", "n": 1}

        admin.client_kill_filter(_id=clients[0]["id"])
        assert next_item() == FEED_RESYNC
        deadline = time.monotonic() + 10
        while admin.pubsub_numsub("iot:events:9003")[0][1] != 1 and time.monotonic() < deadline:
            feed.get(timeout=0.1)
        cache.publish(9003, {"type": "status", "n": 2})
        tenant, payload = next_item()
        assert tenant == 9003 and json.loads(payload)["n"] == 2

        feed.remove(9003)
        deadline = time.monotonic() + 10
        while admin.pubsub_numsub("iot:events:9003")[0][1] != 0 and time.monotonic() < deadline:
            feed.get(timeout=0.1)
        assert admin.pubsub_numsub("iot:events:9003")[0][1] == 0
    finally:
        feed.close()
        cache.close()
        admin.close()


def test_frame_sent_with_the_handshake_is_received():
    """The server's first frame in the same TCP segment as its 101 reaches the test client (the race that once
    made ``hello`` look lost on a busy CI machine)."""
    import base64
    import hashlib

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = re.search(rb"Sec-WebSocket-Key: *(\S+)", request, re.I).group(1)
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + event_frame({"type": "hello"}))
            conn.recv(4096)  # hold the connection until the client closes it

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    ws = wsclient.connect(f"ws://127.0.0.1:{port}/ws")
    try:
        assert json.loads(ws.receive(timeout=5.0)) == {"type": "hello"}
    finally:
        ws.close()
        listener.close()
