"""Latest values per device and live events per tenant: Redis in production, process memory in the demo.

The cache is never the source of truth (PostgreSQL is). Every Redis call is guarded: when Redis is down the
writer carries on (the failure is logged at most every few seconds and counted in
``iot_cache_errors_total``), reads return empty results (the web tier then reads the database), and the hashes
fill again with the next readings. After a failure Redis is not tried again for ``retry_after`` seconds, so an
outage does not add a timeout to every batch.

Redis layout: hash ``iot:latest:<device id>`` with field values JSON-encoded: ``reading`` (the newest reading
as one JSON object: ``t``, ``h``, ``p``, ``rssi``, ``ts``, ``seq``, ``boot``, ``up``), ``last_seen``, ``tenant``
and whatever else was set field by field (``status``, ``fw``). Readers get one flat dict of the other fields and
the reading's; a reading's field wins over a top-level one of the same name. The reading is one field because
it is written for every reading stored: an HSET of ten fields cost Redis 2.5 us per reading, and a script had to
split them. Pub/sub channel ``iot:events:<tenant id>`` carries JSON events such as
``{"type":"reading","device":..,"t":..}``, ``{"type":"status",...}``, ``{"type":"command",...}``,
``{"type":"alarm",...}``; reading events (most of them) are built and published only while the channel itself
has a subscriber (SUBSCRIBE, as the web tier does; a pattern subscription does not count). The writer sends the
readings of watched tenants with every batch, and those of tenants nobody watches newest per device at most every
``IOT_CACHE_FLUSH_MS`` (cloud.writer.Writer._cache_stage); ``watched_tenants`` tells it which are which.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any, Protocol

import orjson
from prometheus_client import Counter

log = logging.getLogger(__name__)

LATEST_PREFIX = "iot:latest:"
# the hash field of the newest reading; the scripts below spell it out, and update_many must not set it
READING_FIELD = "reading"
EVENTS_PREFIX = "iot:events:"

CACHE_ERRORS = Counter("iot_cache_errors_total", "Cache (Redis) operations that failed", ["op"])


class Subscription(Protocol):
    def get(self, timeout: float = 1.0) -> dict | None: ...

    def close(self) -> None: ...


FEED_RESYNC = "resync"  # Feed.get(): events may have been lost (reconnect, overflow); clients should reload


class Feed(Protocol):
    """Many tenants' live events on ONE subscription (the web tier keeps one per process).

    ``add(tenant)`` asks for a tenant's events and returns an event set once the subscription is confirmed;
    ``get(timeout)`` (one consumer thread) returns ``(tenant_id, payload)`` where payload is the event as JSON
    bytes (Redis: exactly as published, so it is forwarded without decoding) or a dict (memory), ``FEED_RESYNC``
    after a gap, or None on timeout."""

    def add(self, tenant_id: int) -> threading.Event: ...

    def remove(self, tenant_id: int) -> None: ...

    def get(self, timeout: float = 1.0) -> tuple[int, Any] | str | None: ...

    def close(self) -> None: ...


class LatestCache(Protocol):
    def update(self, tenant_id: int, device_id: str, fields: dict) -> None: ...

    def update_many(self, items: list[tuple[int, str, dict]]) -> None: ...

    def publish_readings(self, items: list[tuple[int, str, dict]], seen_ms: int) -> None:
        """Each device's newest reading (a dict of numbers and nulls) replaces the one before, with
        ``last_seen = seen_ms``, and goes to its tenant's channel as a live event
        ``{"type": "reading", "device": id, "last_seen": seen_ms, **reading}``."""

    def get(self, device_id: str) -> dict: ...

    def get_many(self, device_ids: list[str], fields: tuple[str, ...] | None = None) -> dict[str, dict]:
        """Latest values of these devices (all fields, or only ``fields`` when given); devices without any are
        left out."""

    def publish(self, tenant_id: int, event: dict) -> None: ...

    def publish_many(self, events: list[tuple[int, dict]]) -> None: ...

    def watched_tenants(self) -> set[int] | None:
        """The tenants whose event channel has a subscriber now, or None when that is not known (then the writer
        treats every tenant as watched)."""

    def subscribe(self, tenant_id: int) -> Subscription: ...

    def feed(self) -> Feed: ...


# --- memory ----------------------------------------------------------------------------------------------

class _MemorySubscription:
    def __init__(self, cache: "MemoryCache", tenant_id: int, maxsize: int = 10_000):
        self._cache = cache
        self.tenant_id = tenant_id
        self.queue: queue.Queue[dict] = queue.Queue(maxsize)
        self.dropped = 0

    def _offer(self, event: dict) -> None:
        try:
            self.queue.put_nowait(event)
        except queue.Full:  # a stalled subscriber loses live events, never blocks the writer
            self.dropped += 1

    def get(self, timeout: float = 1.0) -> dict | None:
        try:
            return self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        self._cache._unsubscribe(self)


class _MemoryFeed:
    def __init__(self, cache: "MemoryCache", maxsize: int = 10_000):
        self._cache = cache
        self.tenants: set[int] = set()
        self.queue: queue.Queue = queue.Queue(maxsize)
        self._lost = False

    def add(self, tenant_id: int) -> threading.Event:
        with self._cache._lock:
            self.tenants.add(tenant_id)
        done = threading.Event()
        done.set()
        return done

    def remove(self, tenant_id: int) -> None:
        with self._cache._lock:
            self.tenants.discard(tenant_id)

    def _offer(self, tenant_id: int, event: dict) -> None:
        try:
            self.queue.put_nowait((tenant_id, event))
        except queue.Full:  # a stalled consumer loses live events, never blocks the writer
            self._lost = True

    def get(self, timeout: float = 1.0):
        if self._lost:
            self._lost = False
            return FEED_RESYNC
        try:
            return self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        with self._cache._lock:
            if self in self._cache._feeds:
                self._cache._feeds.remove(self)


class MemoryCache:
    """The embedded profile's cache: dicts under a lock, in-process subscriber queues."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, dict] = {}
        self._subs: dict[int, list[_MemorySubscription]] = {}
        self._feeds: list[_MemoryFeed] = []

    def update(self, tenant_id: int, device_id: str, fields: dict) -> None:
        with self._lock:
            current = self._latest.setdefault(device_id, {})
            current.update(fields)
            current["tenant"] = tenant_id

    def update_many(self, items: list[tuple[int, str, dict]]) -> None:
        for tenant_id, device_id, fields in items:
            self.update(tenant_id, device_id, fields)

    def publish_readings(self, items: list[tuple[int, str, dict]], seen_ms: int) -> None:
        for tenant_id, device_id, reading in items:
            self.update(tenant_id, device_id, {**reading, "last_seen": seen_ms})
            self.publish(tenant_id, {"type": "reading", "device": device_id, "last_seen": seen_ms, **reading})

    def get(self, device_id: str) -> dict:
        with self._lock:
            return dict(self._latest.get(device_id, {}))

    def get_many(self, device_ids: list[str], fields: tuple[str, ...] | None = None) -> dict[str, dict]:
        with self._lock:
            if not fields:
                return {d: dict(self._latest[d]) for d in device_ids if d in self._latest}
            out = {}
            for d in device_ids:
                latest = self._latest.get(d)
                if latest:
                    picked = {f: latest[f] for f in fields if f in latest}
                    if picked:
                        out[d] = picked
            return out

    def publish(self, tenant_id: int, event: dict) -> None:
        with self._lock:
            subs = list(self._subs.get(tenant_id, ()))
            feeds = [f for f in self._feeds if tenant_id in f.tenants]
        for sub in subs:
            sub._offer(event)
        for feed in feeds:
            feed._offer(tenant_id, event)

    def publish_many(self, events: list[tuple[int, dict]]) -> None:
        for tenant_id, event in events:
            self.publish(tenant_id, event)

    def watched_tenants(self) -> None:
        return None  # a dict update costs nothing worth saving: the writer gives this cache every reading at once

    def subscribe(self, tenant_id: int) -> _MemorySubscription:
        sub = _MemorySubscription(self, tenant_id)
        with self._lock:
            self._subs.setdefault(tenant_id, []).append(sub)
        return sub

    def feed(self) -> _MemoryFeed:
        feed = _MemoryFeed(self)
        with self._lock:
            self._feeds.append(feed)
        return feed

    def _unsubscribe(self, sub: _MemorySubscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.tenant_id, [])
            if sub in subs:
                subs.remove(sub)

    def clear(self) -> None:
        with self._lock:
            self._latest.clear()


# --- redis -----------------------------------------------------------------------------------------------

class _RedisSubscription:
    def __init__(self, client, channel: str):
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(channel)
        self._channel = channel
        self._broken_until = 0.0

    def get(self, timeout: float = 1.0) -> dict | None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                if time.monotonic() < self._broken_until:
                    time.sleep(min(remaining, 0.2))
                    message = None
                else:
                    message = self._pubsub.get_message(timeout=remaining)
            except (redis.RedisError, OSError) as exc:
                CACHE_ERRORS.labels("subscribe").inc()
                log.debug("redis subscription %s: %s", self._channel, exc)
                self._broken_until = time.monotonic() + 1.0
                self._resubscribe()
                message = None
            if message and message.get("type") == "message":
                try:
                    return json.loads(message["data"])
                except (ValueError, TypeError):
                    continue
            if time.monotonic() >= deadline:
                return None

    def _resubscribe(self) -> None:
        try:
            self._pubsub.reset()
            self._pubsub.subscribe(self._channel)
        except Exception:  # noqa: BLE001 - still down; retried on the next get
            pass

    def close(self) -> None:
        try:
            self._pubsub.close()
        except Exception:  # noqa: BLE001
            pass


class _RedisFeed:
    """One Redis pub/sub connection carrying the channels of every tenant asked for with ``add``.

    Only the consumer thread touches the connection: ``add``/``remove`` queue a request that ``get`` sends
    between waits (it waits at most ``poll_s`` at a time), and ``add``'s event is set when Redis confirms the
    subscription. After a connection failure ``get`` reconnects, re-subscribes every tenant and returns
    FEED_RESYNC once, since events published meanwhile are lost (pub/sub keeps nothing)."""

    def __init__(self, url: str, poll_s: float = 0.05):
        import redis

        self._client = redis.Redis.from_url(url, socket_connect_timeout=2.0, decode_responses=False)
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._wanted: dict[int, threading.Event] = {}
        self._ops: list[tuple[str, int]] = []
        self._pubsub = None
        self._broken = False

    @staticmethod
    def _channel(tenant_id: int) -> str:
        return f"{EVENTS_PREFIX}{tenant_id}"

    def add(self, tenant_id: int) -> threading.Event:
        with self._lock:
            done = self._wanted.get(tenant_id)
            if done is None:
                done = self._wanted[tenant_id] = threading.Event()
                self._ops.append(("add", tenant_id))
            return done

    def remove(self, tenant_id: int) -> None:
        with self._lock:
            if self._wanted.pop(tenant_id, None) is not None:
                self._ops.append(("remove", tenant_id))

    def _connect(self) -> None:
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        with self._lock:
            tenants = list(self._wanted)
            self._ops.clear()
        if tenants:
            self._pubsub.subscribe(*(self._channel(t) for t in tenants))

    def _apply_ops(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
            wanted = set(self._wanted)
        for op, tenant_id in ops:
            if op == "add" and tenant_id in wanted:
                self._pubsub.subscribe(self._channel(tenant_id))
            elif op == "remove" and tenant_id not in wanted:
                self._pubsub.unsubscribe(self._channel(tenant_id))

    def get(self, timeout: float = 1.0):
        import redis

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if self._pubsub is None:
                    self._connect()
                    if self._broken:
                        self._broken = False
                        return FEED_RESYNC
                if self._ops:
                    self._apply_ops()
                message = self._pubsub.get_message(timeout=max(0.0, min(remaining, self.poll_s)))
            except (redis.RedisError, OSError) as exc:
                CACHE_ERRORS.labels("subscribe").inc()
                log.debug("redis feed: %s", exc)
                self._drop_connection()
                self._broken = True
                time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
                message = None
            if message is not None:
                kind = message.get("type")
                channel = message.get("channel") or b""
                try:
                    tenant_id = int(channel.rsplit(b":", 1)[1])
                except (IndexError, ValueError):
                    tenant_id = None
                if kind == b"message" or kind == "message":
                    if tenant_id is not None:
                        return tenant_id, message["data"]
                elif kind in (b"subscribe", "subscribe") and tenant_id is not None:
                    with self._lock:
                        done = self._wanted.get(tenant_id)
                    if done is not None:
                        done.set()
            if time.monotonic() >= deadline:
                return None

    def _drop_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        with self._lock:
            for done in self._wanted.values():
                done.clear()
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        self._drop_connection()
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass


# get_many in one round trip: every KEYS[i] hash as a JSON object (its values are JSON text already), the whole
# answer one JSON array with null for an empty hash. ARGV empty: every field (HGETALL; each name JSON-encoded
# here); else n field names, then the same n names as JSON strings (HMGET, the names encoded once by the caller:
# encoding every name of every hash was most of Redis's time for 200 devices). The reading (one JSON object,
# read in either case) is spliced in after the other fields, so its fields win over stale top-level ones.
_GET_MANY_LUA = """
local n = #ARGV / 2
local out = {}
for i, key in ipairs(KEYS) do
  local parts = {}
  local reading = false
  if n == 0 then
    local flat = redis.call('HGETALL', key)
    for j = 1, #flat, 2 do
      if flat[j] == 'reading' then
        reading = flat[j + 1]
      else
        parts[#parts + 1] = cjson.encode(flat[j]) .. ':' .. flat[j + 1]
      end
    end
  else
    local values = redis.call('HMGET', key, 'reading', unpack(ARGV, 1, n))
    reading = values[1]
    for j = 1, n do
      if values[j + 1] then
        parts[#parts + 1] = ARGV[n + j] .. ':' .. values[j + 1]
      end
    end
  end
  if reading and #reading > 2 then
    parts[#parts + 1] = string.sub(reading, 2, -2)
  end
  if #parts == 0 then
    out[i] = 'null'
  else
    out[i] = '{' .. table.concat(parts, ',') .. '}'
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""

# KEYS: one latest-values hash per device. ARGV: the TTL (0: none), then per key the number of fields n and n
# field/value pairs.
_SET_MANY_LUA = """
local ttl = tonumber(ARGV[1])
local i = 2
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[i])
  redis.call('HSET', key, unpack(ARGV, i + 1, i + 2 * n))
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  i = i + 1 + 2 * n
end
return #KEYS
"""

# KEYS: one latest-values hash per device. ARGV: the TTL (0: none), last_seen, the length of LATEST_PREFIX, the
# events channel prefix, then per key its tenant and its reading as one JSON object. The live event is that same
# JSON with type, device and last_seen put in front, so the writer encodes and sends each reading once (a second
# JSON document per reading for the event, and its packing by redis-py, were about a tenth of the writer's CPU).
# It is built and published only for tenants whose channel has a subscriber (asked once per tenant and call): most
# tenants have no dashboard open, and a client that subscribes a moment later loads the current state anyway.
_PUBLISH_READINGS_LUA = """
local ttl = tonumber(ARGV[1])
local seen = ARGV[2]
local id_from = tonumber(ARGV[3]) + 1
local prefix = ARGV[4]
local head = '{"type":"reading","device":'
local watched = {}
for i, key in ipairs(KEYS) do
  local tenant, reading = ARGV[2 * i + 3], ARGV[2 * i + 4]
  redis.call('HSET', key, 'reading', reading, 'last_seen', seen, 'tenant', tenant)
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  local channel = prefix .. tenant
  local listeners = watched[tenant]
  if listeners == nil then
    listeners = redis.call('PUBSUB', 'NUMSUB', channel)[2]
    watched[tenant] = listeners
  end
  if listeners > 0 then
    local rest = '}'
    if #reading > 2 then rest = ',' .. string.sub(reading, 2) end
    redis.call('PUBLISH', channel, head .. cjson.encode(string.sub(key, id_from)) .. ',"last_seen":' .. seen .. rest)
  end
end
return #KEYS
"""

# ARGV: channel, message, channel, message, ...
_PUBLISH_MANY_LUA = """
for i = 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""


class RedisCache:
    def __init__(self, url: str, *, socket_timeout: float = 0.5, retry_after: float = 2.0, ttl_s: int = 0):
        import redis

        self.url = url
        self.retry_after = retry_after
        self.ttl_s = ttl_s
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                            health_check_interval=10, decode_responses=True)
        self._down_until = 0.0
        self._last_log = 0.0
        self._scripts: dict[str, Any] = {}  # Lua source -> redis-py Script

    # errors: log at most every 10 s, count every one, skip Redis for retry_after seconds
    def _failed(self, op: str, exc: Exception) -> None:
        CACHE_ERRORS.labels(op).inc()
        self._down_until = time.monotonic() + self.retry_after
        now = time.monotonic()
        if now - self._last_log > 10:
            self._last_log = now
            log.warning("redis %s failed (%s); carrying on without the cache", op, exc)

    def _available(self, op: str) -> bool:
        if time.monotonic() < self._down_until:
            CACHE_ERRORS.labels(op).inc()
            return False
        return True

    def _run(self, op: str, source: str, keys: list, args: list) -> Any:
        """The Lua script ``source`` on ``keys``/``args`` (registered once; redis-py loads it again if Redis lost
        it); None after a failure, which is counted and logged (see _failed)."""
        try:
            script = self._scripts.get(source)
            if script is None:
                script = self._scripts[source] = self._client.register_script(source)
            return script(keys=keys, args=args)
        except Exception as exc:  # noqa: BLE001 - the cache must never stop the caller
            self._failed(op, exc)
            return None

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    def update(self, tenant_id: int, device_id: str, fields: dict) -> None:
        self.update_many([(tenant_id, device_id, fields)])

    def update_many(self, items: list[tuple[int, str, dict]]) -> None:
        """Every device's fields (each stored as JSON text) in ONE script call: a pipeline of an HSET and an
        EXPIRE per device, with redis-py packing every command, was a third of the writer's time at 10,000
        devices."""
        if not items or not self._available("update"):
            return
        keys: list[str] = []
        args: list = [self.ttl_s]
        dumps = orjson.dumps
        for tenant_id, device_id, fields in items:
            keys.append(LATEST_PREFIX + device_id)
            args.append(len(fields) + 1)
            for name, value in fields.items():
                args.append(name)
                args.append(dumps(value, default=str))
            args.append("tenant")
            args.append(tenant_id)
        self._run("update", _SET_MANY_LUA, keys, args)

    def publish_readings(self, items: list[tuple[int, str, dict]], seen_ms: int) -> None:
        """Each device's reading as ONE hash field (one orjson call; see the module docstring), with last_seen and
        the tenant, and its live event, all in one script call (_PUBLISH_READINGS_LUA)."""
        if not items or not self._available("update"):
            return
        keys: list[str] = []
        args: list = [self.ttl_s, seen_ms, len(LATEST_PREFIX), EVENTS_PREFIX]
        dumps = orjson.dumps
        for tenant_id, device_id, reading in items:
            keys.append(LATEST_PREFIX + device_id)
            args.append(tenant_id)
            args.append(dumps(reading, default=str))
        self._run("update", _PUBLISH_READINGS_LUA, keys, args)

    def get(self, device_id: str) -> dict:
        return self.get_many([device_id]).get(device_id, {})

    def get_many(self, device_ids: list[str], fields: tuple[str, ...] | None = None) -> dict[str, dict]:
        """The latest values of many devices in ONE round trip: a server-side script reads every hash and
        answers with one JSON document (field values are stored as JSON already), parsed by one orjson call.
        With ``fields`` it reads only those (see _GET_MANY_LUA). A reply that is not valid JSON
        (a value some other client wrote raw) falls back to a pipeline of HGETALLs parsed field by field."""
        if not device_ids or not self._available("get"):
            return {}
        keys = [LATEST_PREFIX + d for d in device_ids]
        blob = self._run("get", _GET_MANY_LUA, keys, [*fields, *(orjson.dumps(f) for f in fields)] if fields else [])
        if blob is None:
            return {}
        try:
            values = orjson.loads(blob)
        except (orjson.JSONDecodeError, TypeError):
            return self._get_many_slow(device_ids, fields)
        if fields:  # the whole reading came along: keep what was asked for
            values = [v and {f: v[f] for f in fields if f in v} for v in values]
        return {d: v for d, v in zip(device_ids, values) if v}

    def _get_many_slow(self, device_ids: list[str], fields: tuple[str, ...] | None = None) -> dict[str, dict]:
        try:
            pipe = self._client.pipeline(transaction=False)
            for device_id in device_ids:
                pipe.hgetall(LATEST_PREFIX + device_id)
            results = pipe.execute()
        except Exception as exc:  # noqa: BLE001
            self._failed("get", exc)
            return {}
        out = {}
        for device_id, raw in zip(device_ids, results):
            if raw:
                value = {k: _loads(v) for k, v in raw.items() if k != READING_FIELD}
                reading = _loads(raw.get(READING_FIELD, "{}"))
                if isinstance(reading, dict):
                    value.update(reading)
                if fields:
                    value = {k: v for k, v in value.items() if k in fields}
                if value:
                    out[device_id] = value
        return out

    def publish(self, tenant_id: int, event: dict) -> None:
        self.publish_many([(tenant_id, event)])

    def publish_many(self, events: list[tuple[int, dict]]) -> None:
        if not events or not self._available("publish"):
            return
        args: list = []
        dumps = orjson.dumps
        for tenant_id, event in events:
            args.append(f"{EVENTS_PREFIX}{tenant_id}")
            args.append(dumps(event, default=str))
        # one script call, not a PUBLISH each: redis-py packs every command of a pipeline one by one
        self._run("publish", _PUBLISH_MANY_LUA, [], args)

    def watched_tenants(self) -> set[int] | None:
        """Tenants whose channel has a subscriber (``PUBSUB CHANNELS``: exact subscriptions, as the web tier makes
        them); None while Redis is failing."""
        if not self._available("watched"):
            return None
        try:
            channels = self._client.pubsub_channels(EVENTS_PREFIX + "*")
        except Exception as exc:  # noqa: BLE001 - the cache must never stop the caller
            self._failed("watched", exc)
            return None
        start = len(EVENTS_PREFIX)
        return {int(channel[start:]) for channel in channels if channel[start:].isdigit()}

    def subscribe(self, tenant_id: int) -> _RedisSubscription:
        return _RedisSubscription(self._client, f"{EVENTS_PREFIX}{tenant_id}")

    def feed(self) -> _RedisFeed:
        return _RedisFeed(self.url)

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass


def _loads(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


_shared_memory: MemoryCache | None = None
_shared_lock = threading.Lock()


def shared_memory_cache() -> MemoryCache:
    global _shared_memory
    with _shared_lock:
        if _shared_memory is None:
            _shared_memory = MemoryCache()
        return _shared_memory


def cache_from_settings(settings) -> LatestCache:
    """RedisCache if ``settings.redis_url`` is set, else the process-wide MemoryCache (demo: the writer and the
    web app run as threads of one process and meet on it)."""
    if settings.redis_url:
        return RedisCache(settings.redis_url)
    return shared_memory_cache()
