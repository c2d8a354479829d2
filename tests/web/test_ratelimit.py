"""Login rate limit: shared through Redis by every worker (production), in memory in the demo profile.

"Workers" are separate app instances (each its own limiter object, as in separate gunicorn processes) on ONE
Redis. Each test signs in from an address of its own, so the per-address window of one test does not meet the
others' (the Redis is shared by the whole session).
"""

from __future__ import annotations

import logging
import re
import socket
import time
import uuid

import pytest

from cloud.bus.memory import MemoryBus
from cloud.cache import RedisCache
from cloud.web.ratelimit import MemoryLoginLimiter, RedisLoginLimiter
from tests.web.conftest import PASSWORD, postgres_only


def _address() -> str:
    return "10.%d.%d.%d" % tuple(uuid.uuid4().bytes[:3])


class Browser:
    """A test client from one address that knows the login form's CSRF token."""

    def __init__(self, app, address: str):
        self.client = app.test_client()
        self.client.environ_base["REMOTE_ADDR"] = address
        page = self.client.get("/login").get_data(as_text=True)
        self.csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)

    def login(self, email: str, password: str, **kw):
        return self.client.post("/login", data={"email": email, "password": password, "csrf_token": self.csrf}, **kw)


@pytest.fixture
def redis_world(world):
    """The world of the postgres backend, whose cache is the shared Redis (tests using it are postgres_only)."""
    assert world.backend.name == "postgres", "mark the test postgres_only"
    return world


@pytest.fixture
def workers(redis_world):
    """Two more app instances on the same database and the same Redis: two gunicorn workers / web hosts."""
    from cloud.web import create_app

    apps = []
    for _ in range(2):
        app = create_app(redis_world.settings, engine=redis_world.backend.engine, bus=MemoryBus(partitions=1),
                         cache=RedisCache(redis_world.cache.url))
        app.config["TESTING"] = True
        apps.append(app)
    yield apps
    for app in apps:
        app.extensions["iot"].hub.close()
        app.extensions["iot"].limiter.close()


def _short_window(apps, url: str, **caps) -> None:
    """Give every worker a limiter with a 1.5 s window on a key prefix of this test's own."""
    prefix = f"iot:test-login:{uuid.uuid4().hex[:8]}:"
    for app in apps:
        app.extensions["iot"].limiter = RedisLoginLimiter(url, window_s=1.5, prefix=prefix, **caps)


def test_profiles_pick_their_limiter(world):
    limiter = world.app.extensions["iot"].limiter
    if world.backend.name == "postgres":
        assert isinstance(limiter, RedisLoginLimiter)
    else:  # the embedded demo's profile: no Redis, the in-process limiter
        assert isinstance(limiter, MemoryLoginLimiter)


@postgres_only
def test_two_workers_share_the_limit(workers, redis_world):
    email = f"nobody-{uuid.uuid4().hex[:8]}@acme.example"
    address = _address()
    one, two = Browser(workers[0], address), Browser(workers[1], address)
    for i in range(5):  # 5 attempts per (address, account), spread over both workers
        r = (one if i % 2 else two).login(email, "wrong-password")
        assert r.status_code == 401, i
    for browser in (one, two):  # both workers refuse the sixth: the count is shared
        r = browser.login(email, "wrong-password")
        assert r.status_code == 429 and "Too many failed attempts" in r.get_data(as_text=True)
        assert 1 <= int(r.headers["Retry-After"]) <= 300
    r = two.login(email, "wrong-password", headers={"Accept": "application/json"})
    assert r.status_code == 429 and r.json["retry_after"] >= 1 and "Too many" in r.json["error"]
    assert int(r.headers["Retry-After"]) == r.json["retry_after"]
    # another address is not blocked for the pair (its own window), a real user still signs in there
    r = Browser(workers[1], _address()).login(redis_world.a.users["viewer"], PASSWORD)
    assert r.status_code == 302


@postgres_only
def test_per_address_limit_across_accounts_and_workers(workers, redis_world):
    _short_window(workers, redis_world.cache.url, per_key=100, per_ip=4)
    address = _address()
    one, two = Browser(workers[0], address), Browser(workers[1], address)
    for i in range(4):
        assert (one, two)[i % 2].login(f"guess-{i}@acme.example", "x").status_code == 401
    assert one.login("guess-9@acme.example", "x").status_code == 429
    assert two.login(redis_world.a.users["viewer"], PASSWORD).status_code == 429  # refused before the check


@postgres_only
def test_the_limit_expires(workers, redis_world):
    _short_window(workers, redis_world.cache.url)
    email = f"nobody-{uuid.uuid4().hex[:8]}@acme.example"
    address = _address()
    one, two = Browser(workers[0], address), Browser(workers[1], address)
    for i in range(5):
        assert (one, two)[i % 2].login(email, "nope").status_code == 401
    r = two.login(email, "nope")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) in (1, 2)
    time.sleep(1.7)
    assert one.login(email, "nope").status_code == 401  # allowed again (and wrong)
    keys = list(workers[0].extensions["iot"].limiter._client.scan_iter(
        match=workers[0].extensions["iot"].limiter.prefix + "*"))
    time.sleep(1.7)  # Redis forgets the windows by itself (PEXPIRE): nothing is left behind
    client = workers[0].extensions["iot"].limiter._client
    assert keys and not any(client.exists(k) for k in keys)


@postgres_only
def test_success_does_not_count(workers, redis_world):
    _short_window(workers, redis_world.cache.url, per_key=3, per_ip=3)
    email = redis_world.a.users["operator"]
    address = _address()
    for i in range(6):  # twice the per-address cap of successful sign-ins (a new session each)
        assert Browser(workers[i % 2], address).login(email, PASSWORD).status_code == 302, i
    one, two = Browser(workers[0], address), Browser(workers[1], address)  # signed out again
    for i in range(3):  # the failures still have all three slots
        assert (one, two)[i % 2].login(email, "wrong").status_code == 401, i
    assert one.login(email, PASSWORD).status_code == 429


@postgres_only
def test_success_resets_the_account_and_address_pair(workers, redis_world):
    _short_window(workers, redis_world.cache.url, per_key=3)
    email = redis_world.a.users["viewer"]
    one = Browser(workers[0], _address())
    for _ in range(2):
        assert one.login(email, "typo").status_code == 401
    assert one.login(email, PASSWORD).status_code == 302
    one = Browser(workers[1], one.client.environ_base["REMOTE_ADDR"])  # a new session (signed in: new CSRF)
    for _ in range(3):  # three mistakes again before the block, not one
        assert one.login(email, "typo").status_code == 401
    assert one.login(email, "typo").status_code == 429


@postgres_only
def test_parallel_attempts_cannot_pass_the_cap(redis_world):
    """The slot is taken before the password is checked, atomically: a burst gets exactly the cap."""
    from concurrent.futures import ThreadPoolExecutor

    limiter = RedisLoginLimiter(redis_world.cache.url, prefix=f"iot:test-login:{uuid.uuid4().hex[:8]}:")
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _i: limiter.begin("10.0.0.1", "victim@acme.example"), range(40)))
        assert sum(1 for ticket, _ in results if ticket) == 5
    finally:
        limiter.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_down_falls_back_to_the_process_limiter(caplog):
    """Redis unreachable: neither open (every guess allowed) nor closed (nobody signs in): the process-local
    windows answer, and it is logged."""
    limiter = RedisLoginLimiter(f"redis://127.0.0.1:{_closed_port()}/0", socket_timeout=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="cloud.web.ratelimit"):
            tickets = [limiter.begin("10.0.0.2", "victim@acme.example")[0] for _ in range(5)]
        assert all(tickets)  # not locked out
        ticket, wait = limiter.begin("10.0.0.2", "victim@acme.example")
        assert ticket is None and wait >= 1  # not let through either
        assert "limiting sign-ins per process" in caplog.text
        ok, _ = limiter.begin("10.0.0.3", "operator@acme.example")
        assert ok
        limiter.succeeded("10.0.0.3", "operator@acme.example", ok)  # no exception while Redis is down
    finally:
        limiter.close()


@postgres_only
def test_counts_from_before_an_outage_still_hold(redis_world):
    limiter = RedisLoginLimiter(redis_world.cache.url, prefix=f"iot:test-login:{uuid.uuid4().hex[:8]}:")
    try:
        for _ in range(4):
            assert limiter.begin("10.0.0.4", "victim@acme.example")[0]
        limiter._down_until = time.monotonic() + 60  # Redis is "down" from now on
        assert limiter.begin("10.0.0.4", "victim@acme.example")[0]
        assert limiter.begin("10.0.0.4", "victim@acme.example")[0] is None
    finally:
        limiter.close()


def test_memory_limiter_windows():
    now = [1000.0]
    limiter = MemoryLoginLimiter(per_key=2, per_ip=3, per_account=4, window_s=10, clock=lambda: now[0])
    assert limiter.begin("a", "x@y")[0] and limiter.begin("a", "x@y")[0]
    ticket, wait = limiter.begin("a", "x@y")
    assert ticket is None and wait == 10
    assert limiter.begin("a", "z@y")[0]  # another account from the same address: third per-address slot
    assert limiter.begin("a", "w@y")[0] is None  # per address full
    assert limiter.begin("b", "x@y")[0] and limiter.begin("c", "x@y")[0]  # per account: 4 from everywhere
    assert limiter.begin("d", "x@y")[0] is None
    now[0] += 10.5
    assert limiter.begin("a", "x@y")[0]  # the window moved on
    ok = limiter.begin("e", "q@y")[0]
    limiter.succeeded("e", "q@y", ok)
    assert limiter.begin("e", "q@y")[0] and limiter.begin("e", "q@y")[0]  # the success took no slot


@pytest.mark.parametrize("hops", [0, 1])
def test_client_address_behind_the_proxy(world, hops):
    """Behind Traefik (IOT_WEB_PROXY_HOPS=1) the limit counts per forwarded client address, so one client's
    failures do not lock out everyone else behind the same proxy; without a proxy configured the header is a
    client's own claim and is ignored, so rotating it does not get past the limit."""
    from dataclasses import replace

    from cloud.web import create_app

    app = create_app(replace(world.settings, web_proxy_hops=hops), engine=world.backend.engine,
                     bus=MemoryBus(partitions=1), cache=world.cache)
    app.config["TESTING"] = True
    app.extensions["iot"].limiter = MemoryLoginLimiter()
    try:
        proxy = _address()
        email = world.a.users["viewer"]
        for n in range(5):
            b = Browser(app, proxy)
            r = b.login(email, "wrong password!", headers={"X-Forwarded-For": f"198.51.100.{n + 1}"})
            assert r.status_code == 401
        other = Browser(app, proxy)
        r = other.login(email, PASSWORD, headers={"X-Forwarded-For": "203.0.113.9"})
        if hops:
            assert r.status_code == 302  # another client behind the proxy: its own window
        else:
            assert r.status_code == 429  # same TCP peer and account: the forged header changes nothing
    finally:
        app.extensions["iot"].hub.close()
