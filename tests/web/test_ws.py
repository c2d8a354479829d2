"""WebSocket /ws: events reach the tenant's clients only; authentication; a slow client only loses its own events."""

from __future__ import annotations

import json
import threading
import time

import pytest
import simple_websocket

from cloud.web.ws import Client, Hub
from tests.web.conftest import login


class DaemonThread(threading.Thread):
    """simple_websocket's reader thread, as a daemon: a connection left open must not keep pytest alive."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.daemon = True


def open_ws(url, headers=None):
    return simple_websocket.Client.connect(url, headers=headers, thread_class=DaemonThread)


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


def test_slow_client_drops_oldest_and_gets_resync():
    client = Client(maxlen=3)
    for i in range(10):
        client.push({"n": i})
    items, dropped = client.take(timeout=0)
    assert [e["n"] for e in items] == [7, 8, 9] and dropped == 7
    assert client.take(timeout=0) == ([], 0)


def test_slow_client_does_not_stall_others():
    from cloud.cache import MemoryCache

    cache = MemoryCache()
    hub = Hub(cache, queue_size=5)
    try:
        slow = hub.join(1)  # never reads
        fast = hub.join(1)
        received = []
        for i in range(200):
            cache.publish(1, {"n": i})
            if i % 4 == 3:
                deadline = time.monotonic() + 2
                while len(received) < i + 1 and time.monotonic() < deadline:
                    items, dropped = fast.take(timeout=0.1)
                    assert dropped == 0
                    received.extend(e["n"] for e in items)
        assert received == list(range(200))
        deadline = time.monotonic() + 2
        while slow.dropped < 195 and time.monotonic() < deadline:
            time.sleep(0.01)
        items, dropped = slow.take(timeout=0)
        assert [e["n"] for e in items] == [195, 196, 197, 198, 199] and dropped == 195
        assert hub.client_count() == 2
        hub.leave(1, slow)
        hub.leave(1, fast)
        assert hub.client_count() == 0
    finally:
        hub.close()
