"""The Redis latest-values cache on a real Redis: what one script call writes and publishes is what readers get."""

from __future__ import annotations

import time

import redis as redis_lib

from cloud.cache import LATEST_PREFIX, RedisCache


def test_update_many_writes_every_device_and_its_ttl(redis):
    cache = RedisCache(redis.url, ttl_s=120)
    raw = redis_lib.Redis.from_url(redis.url, decode_responses=True)
    devices = [f"cache-dev-{i}" for i in range(300)]
    cache.update_many([(7, d, {"t": 21.5 + i, "seq": i, "fw": "1.2.3", "name": "Küche ✓", "none": None})
                       for i, d in enumerate(devices)])
    got = cache.get_many(devices)
    assert len(got) == 300
    assert got["cache-dev-5"] == {"t": 26.5, "seq": 5, "fw": "1.2.3", "name": "Küche ✓", "none": None, "tenant": 7}
    assert 0 < raw.ttl(LATEST_PREFIX + "cache-dev-299") <= 120
    cache.update_many([(7, "cache-dev-5", {"t": 30.0})])  # an update changes its fields only
    assert cache.get("cache-dev-5")["t"] == 30.0 and cache.get("cache-dev-5")["seq"] == 5


def test_publish_many_keeps_order_per_tenant(redis):
    cache = RedisCache(redis.url)
    subscription = cache.subscribe(41)
    try:
        time.sleep(0.2)  # the subscription is confirmed by then on loopback
        cache.publish_many([(41, {"type": "reading", "seq": i}) for i in range(50)] + [(42, {"type": "x"})])
        seen = []
        deadline = time.monotonic() + 5
        while len(seen) < 50 and time.monotonic() < deadline:
            event = subscription.get(timeout=0.5)
            if event is not None:
                seen.append(event["seq"])
        assert seen == list(range(50))
    finally:
        subscription.close()


def test_redis_down_is_skipped_not_raised():
    cache = RedisCache("redis://127.0.0.1:1/0", socket_timeout=0.2)
    cache.update_many([(1, "d", {"t": 1.0})])
    cache.publish_many([(1, {"type": "reading"})])
    assert not cache.healthy


def test_get_many_with_fields_reads_only_those(redis):
    cache = RedisCache(redis.url)
    cache.update_many([(3, "cache-f-1", {"t": 20.5, "h": 41.0, "seq": 9, "status": "online"}),
                       (3, "cache-f-2", {"seq": 4})])  # nothing of the fields asked for
    got = cache.get_many(["cache-f-1", "cache-f-2", "cache-f-none"], ("t", "status", "last_seen"))
    assert got == {"cache-f-1": {"t": 20.5, "status": "online"}}
    assert cache._get_many_slow(["cache-f-1", "cache-f-2"], ("t", "status")) == got  # the fallback agrees


def test_memory_cache_get_many_with_fields():
    from cloud.cache import MemoryCache

    cache = MemoryCache()
    cache.update_many([(3, "m-1", {"t": 20.5, "h": 41.0}), (3, "m-2", {"seq": 4})])
    assert cache.get_many(["m-1", "m-2", "m-3"], ("t", "last_seen")) == {"m-1": {"t": 20.5}}
    assert cache.get_many(["m-1"])["m-1"]["h"] == 41.0


def test_numeric_updates_go_compact_and_read_back_exactly(redis):
    """Readings (numbers, booleans and nulls only) travel as one joined argument per device, anything else field
    by field, in the same call; both store each value's JSON text exactly as a per-field encoding would."""
    import orjson

    cache = RedisCache(redis.url)
    raw = redis_lib.Redis.from_url(redis.url, decode_responses=True)
    reading = {"t": 0.1 + 0.2, "h": 41.0, "p": None, "rssi": -60, "ts": 1_796_400_000_123, "seq": 2**40, "ok": True}
    cache.update_many([(5, "compact-1", reading),
                       (5, "compact-2", {"status": "online, really", "last_seen": 12}),  # a string: field by field
                       (6, "compact-3", {"t": 1e-7, "h": -0.0, "list": [1, 2]}),  # a list: field by field
                       (5, "compact-4", {"t": 22.25, "h": 40.0}),  # another name list
                       (5, "compact-5", reading),
                       (5, "compact-6", {"a,b": 1}),  # names the script's split would not give back one for
                       (5, "compact-7", {"": 2, "z": 3})])  # one: field by field
    for device in ("compact-1", "compact-5"):
        assert raw.hgetall(LATEST_PREFIX + device) == {
            **{k: orjson.dumps(v).decode() for k, v in reading.items()}, "tenant": "5"}
    assert cache.get("compact-1") == {**reading, "tenant": 5}
    assert cache.get("compact-2") == {"status": "online, really", "last_seen": 12, "tenant": 5}
    assert cache.get("compact-3") == {"t": 1e-7, "h": -0.0, "list": [1, 2], "tenant": 6}
    assert cache.get("compact-4") == {"t": 22.25, "h": 40.0, "tenant": 5}
    assert cache.get("compact-6") == {"a,b": 1, "tenant": 5}
    assert cache.get("compact-7") == {"": 2, "z": 3, "tenant": 5}
