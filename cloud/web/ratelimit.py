"""Login rate limiting: failed sign-ins per (client address, account), per client address and per account.

Every attempt first takes a slot (``begin``) in three sliding windows of ``window_s`` seconds:

* ``(ip, email)``: ``per_key`` attempts (one person mistyping, or one host guessing one account's password);
* ``ip``: ``per_ip`` attempts (one host trying many accounts);
* ``email``: ``per_account`` attempts from every address together (a botnet guessing one account). This one
  lets a determined attacker keep an account's sign-in blocked while the attack lasts; its cap is high enough
  that nobody hits it by mistyping, and the account's owner can still sign in once the window has passed.

A slot is taken BEFORE the password is checked, in one atomic step for all three windows, so parallel requests
cannot slip past a cap between "check" and "count". A successful sign-in gives its slot back in all three
windows ("success does not count") and forgets the ``(ip, email)`` history; a failed one keeps it. A refused
attempt takes no slot (hammering does not extend the block) and is answered with the seconds until the oldest
counted attempt leaves its window (Retry-After).

Two implementations with one interface:

* :class:`MemoryLoginLimiter`: one process (the embedded demo, which is one process).
* :class:`RedisLoginLimiter`: production, shared by every gunicorn worker and web host on one Redis. Each window
  is a sorted set ``iot:login:<kind>:<value>`` of attempt ids scored by Redis's own clock (``TIME``, so hosts
  with skewed clocks agree), trimmed and expired by a Lua script, which Redis runs atomically.

Redis unreachable: the limiter neither lets every attempt through (an attacker could then guess freely as soon
as Redis is down, or after knocking it over) nor refuses every sign-in (an outage of the cache would lock every
operator out of the dashboard). It falls back to its process-local memory limiter, which it feeds on every
attempt anyway, so counts collected before the outage still hold: the caps then apply per process (so at most
workers x cap attempts across the fleet, still bounded), a warning is logged (at most every 10 s) and
``iot_web_login_limiter_errors_total`` counts the failures. Redis is retried after ``retry_after`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque

from prometheus_client import Counter

log = logging.getLogger(__name__)

LIMITER_ERRORS = Counter("iot_web_login_limiter_errors_total",
                         "Login rate limiter calls to Redis that failed (the process-local limiter answered)")

PER_KEY, PER_IP, PER_ACCOUNT, WINDOW_S = 5, 30, 50, 300.0
KEY_PREFIX = "iot:login:"


def _keys(ip: str, email: str) -> list[tuple[str, str]]:
    # (kind, value); an empty email (a form without one) is counted per address only
    out = [("pair", f"{ip}|{email}"), ("ip", ip)]
    if email:
        out.append(("acct", email))
    return out


class MemoryLoginLimiter:
    """The three windows in this process's memory."""

    def __init__(self, per_key: int = PER_KEY, per_ip: int = PER_IP, per_account: int = PER_ACCOUNT,
                 window_s: float = WINDOW_S, clock=time.monotonic):
        self.caps = {"pair": per_key, "ip": per_ip, "acct": per_account}
        self.window = window_s
        self.clock = clock
        self._slots: dict[tuple[str, str], deque[tuple[float, str]]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[tuple[float, str]]:
        q = self._slots.get(key)
        if q is None:
            q = self._slots[key] = deque()
        while q and q[0][0] <= now - self.window:
            q.popleft()
        return q

    def begin(self, ip: str, email: str) -> tuple[str | None, float]:
        """(ticket, 0.0) when the attempt may go on, (None, seconds to wait) when it is refused."""
        now = self.clock()
        with self._lock:
            if len(self._slots) > 100_000:  # bound memory under a spray of addresses
                self._slots.clear()
            queues = [(self._recent(key, now), self.caps[key[0]]) for key in _keys(ip, email)]
            wait = 0.0
            for q, cap in queues:
                if len(q) >= cap:  # the (len - cap + 1)-th oldest must leave the window first
                    wait = max(wait, q[len(q) - cap][0] + self.window - now)
            if wait > 0:
                return None, max(1.0, wait)
            ticket = uuid.uuid4().hex
            for q, _cap in queues:
                q.append((now, ticket))
            return ticket, 0.0

    def cancel(self, ip: str, email: str, ticket: str | None) -> None:
        """Give the attempt's slot back in every window (it did not count)."""
        with self._lock:
            for key in _keys(ip, email):
                q = self._slots.get(key)
                if q is not None:
                    for item in q:
                        if item[1] == ticket:
                            q.remove(item)
                            break

    def succeeded(self, ip: str, email: str, ticket: str | None) -> None:
        """The sign-in worked: its slot is given back and the (ip, email) history forgotten."""
        self.cancel(ip, email, ticket)
        with self._lock:
            self._slots.pop(("pair", f"{ip}|{email}"), None)

    def reset(self) -> None:
        with self._lock:
            self._slots.clear()


# KEYS: the windows; ARGV[1] window in ms, ARGV[2] ticket, ARGV[3..] each key's cap.
# Returns {0, 0} when the slot was taken in every window, else {1, ms to wait} (nothing recorded).
_BEGIN_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local wait = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local cap = tonumber(ARGV[i + 2])
  local n = redis.call('ZCARD', key)
  if n >= cap then
    local oldest = redis.call('ZRANGE', key, n - cap, n - cap, 'WITHSCORES')
    local w = tonumber(oldest[2]) + window - now
    if w > wait then wait = w end
  end
end
if wait > 0 then return {1, wait} end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, window)
end
return {0, 0}
"""

# KEYS[1] the (ip, email) window (deleted), KEYS[2..] the others (the ticket removed); ARGV[1] ticket
_SUCCEED_LUA = """
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""


class RedisLoginLimiter:
    """The three windows in Redis, shared by every process that uses the same Redis; see the module doc for
    what happens while Redis is unreachable."""

    def __init__(self, url: str | None = None, *, client=None, per_key: int = PER_KEY, per_ip: int = PER_IP,
                 per_account: int = PER_ACCOUNT, window_s: float = WINDOW_S, socket_timeout: float = 0.5,
                 retry_after: float = 2.0, prefix: str = KEY_PREFIX):
        if client is None:
            import redis

            client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                          health_check_interval=10)
        self._client = client
        self.caps = {"pair": per_key, "ip": per_ip, "acct": per_account}
        self.window = window_s
        self.prefix = prefix
        self.retry_after = retry_after
        self.local = MemoryLoginLimiter(per_key, per_ip, per_account, window_s)
        self._begin = client.register_script(_BEGIN_LUA)
        self._succeed = client.register_script(_SUCCEED_LUA)
        self._down_until = 0.0
        self._last_log = 0.0

    def _redis_keys(self, ip: str, email: str) -> tuple[list[str], list[int]]:
        pairs = _keys(ip, email)
        return [f"{self.prefix}{kind}:{value}" for kind, value in pairs], [self.caps[kind] for kind, _ in pairs]

    def _failed(self, op: str, exc: Exception) -> None:
        LIMITER_ERRORS.inc()
        now = time.monotonic()
        self._down_until = now + self.retry_after
        if now - self._last_log > 10:
            self._last_log = now
            log.warning("login rate limiter: redis %s failed (%s); limiting sign-ins per process until it is back",
                        op, exc)

    @property
    def redis_ok(self) -> bool:
        return time.monotonic() >= self._down_until

    def begin(self, ip: str, email: str) -> tuple[str | None, float]:
        ticket, wait = self.local.begin(ip, email)  # fed always: holds the counts through a Redis outage
        if ticket is None:
            return None, wait
        if not self.redis_ok:
            LIMITER_ERRORS.inc()
            return ticket, 0.0
        keys, caps = self._redis_keys(ip, email)
        try:
            refused, wait_ms = self._begin(keys=keys, args=[int(self.window * 1000), ticket, *caps])
        except Exception as exc:  # noqa: BLE001 - see the module doc: the local limiter answers
            self._failed("begin", exc)
            return ticket, 0.0
        if int(refused):
            self.local.cancel(ip, email, ticket)  # not an attempt after all: give the local slot back
            return None, max(1.0, int(wait_ms) / 1000.0)
        return ticket, 0.0

    def succeeded(self, ip: str, email: str, ticket: str | None) -> None:
        self.local.succeeded(ip, email, ticket)
        if not self.redis_ok:
            return
        keys, _caps = self._redis_keys(ip, email)
        try:
            self._succeed(keys=keys, args=[ticket or ""])
        except Exception as exc:  # noqa: BLE001
            self._failed("succeeded", exc)

    def reset(self) -> None:
        """Forget every count (tests)."""
        self.local.reset()
        for key in self._client.scan_iter(match=self.prefix + "*", count=1000):
            self._client.delete(key)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass


def limiter_from(settings, cache):
    """Redis when the app has one (the cache's, else ``IOT_REDIS_URL``), else the in-memory limiter."""
    from cloud.cache import RedisCache

    url = cache.url if isinstance(cache, RedisCache) else getattr(settings, "redis_url", None)
    if url:
        return RedisLoginLimiter(url)
    return MemoryLoginLimiter()
