"""The Redis latest-values cache on a real Redis: what one script call writes and publishes is what readers get."""

from __future__ import annotations

import time

import orjson
import redis as redis_lib

from cloud.cache import LATEST_PREFIX, MemoryCache, RedisCache


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


def test_a_reading_is_one_field_and_reads_back_flat(redis):
    """publish_readings stores a reading as one JSON field beside last_seen and tenant; readers get one flat dict
    with the status fields set field by field, a newer reading replaces the older one whole, and a reading's field
    wins over a stale top-level field of the same name (a hash written before the reading was one field)."""
    cache = RedisCache(redis.url, ttl_s=60)
    raw = redis_lib.Redis.from_url(redis.url, decode_responses=True)
    reading = {"t": 0.1 + 0.2, "h": 41.0, "p": None, "rssi": -60, "ts": 1_796_400_000_123, "seq": 2**40, "boot": 3,
               "up": 9}
    raw.hset(LATEST_PREFIX + "one-2", mapping={"t": "99.0", "seq": "1"})  # the old layout's stale fields
    cache.publish_readings([(5, "one-1", reading), (6, "one-2", {"t": 1e-7, "seq": 2})], 1_796_400_000_500)
    cache.update_many([(5, "one-1", {"status": "online, really", "fw": "1.2.3"})])
    assert raw.hgetall(LATEST_PREFIX + "one-1") == {
        "reading": orjson.dumps(reading).decode(), "last_seen": "1796400000500", "tenant": "5",
        "status": '"online, really"', "fw": '"1.2.3"'}
    assert 0 < raw.ttl(LATEST_PREFIX + "one-1") <= 60
    whole = {**reading, "last_seen": 1_796_400_000_500, "tenant": 5, "status": "online, really", "fw": "1.2.3"}
    assert cache.get("one-1") == whole
    assert cache.get("one-2") == {"t": 1e-7, "seq": 2, "last_seen": 1_796_400_000_500, "tenant": 6}
    assert cache.get_many(["one-1", "one-2"], ("t", "status")) == {"one-1": {"t": reading["t"],
                                                                          "status": "online, really"},
                                                                 "one-2": {"t": 1e-7}}
    assert cache._get_many_slow(["one-1", "one-2"]) == cache.get_many(["one-1", "one-2"])  # the fallback agrees
    assert cache._get_many_slow(["one-1"], ("t", "status")) == cache.get_many(["one-1"], ("t", "status"))
    cache.publish_readings([(5, "one-1", {"t": 22.25, "seq": 7})], 1_796_400_001_000)
    assert cache.get("one-1") == {"t": 22.25, "seq": 7, "last_seen": 1_796_400_001_000, "tenant": 5,
                                  "status": "online, really", "fw": "1.2.3"}
    memory = MemoryCache()  # the demo's cache answers the same
    memory.publish_readings([(5, "one-1", reading)], 1_796_400_000_500)
    memory.update_many([(5, "one-1", {"status": "online, really", "fw": "1.2.3"})])
    assert memory.get("one-1") == whole


def test_each_stored_reading_is_published_as_its_live_event(redis):
    """publish_readings puts every reading on its tenant's channel as a "reading" event: the reading's fields,
    the device and last_seen, valid JSON whatever the device id holds and when the reading is empty; a tenant
    nobody subscribed to gets no PUBLISH (its readings are stored all the same); the demo's cache publishes the
    same events."""
    cache = RedisCache(redis.url)
    raw = redis_lib.Redis.from_url(redis.url)
    readings = [(41, "ev-1", {"t": 21.25, "h": None, "ts": 1_796_400_000_123, "seq": 2**40}),
                (42, "ev-2", {"t": -3.5}),
                (43, "ev-3", {"t": 19.0}),  # nobody listens to tenant 43
                (41, 'ev-"odd"\\', {}),  # not a valid device id, but the event must stay valid JSON
                (41, "ev-1", {"t": 21.5, "seq": 2**40 + 1})]
    expected_41 = [{"type": "reading", "device": d, "last_seen": 1_796_400_000_500, **r}
                   for t, d, r in readings if t == 41]
    subscriptions = {41: cache.subscribe(41), 42: cache.subscribe(42)}
    memory = MemoryCache()
    memory_subscription = memory.subscribe(41)
    try:
        time.sleep(0.2)  # the subscriptions are confirmed by then on loopback
        publishes = raw.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)
        cache.publish_readings(readings, 1_796_400_000_500)
        assert raw.info("commandstats")["cmdstat_publish"]["calls"] - publishes == 4  # not for tenant 43
        assert cache.get("ev-3") == {"t": 19.0, "last_seen": 1_796_400_000_500, "tenant": 43}
        memory.publish_readings(readings, 1_796_400_000_500)
        got: dict[int, list] = {41: [], 42: []}
        deadline = time.monotonic() + 5
        while (len(got[41]) < 3 or len(got[42]) < 1) and time.monotonic() < deadline:
            for tenant, subscription in subscriptions.items():
                event = subscription.get(timeout=0.1)
                if event is not None:
                    got[tenant].append(event)
        assert got[41] == expected_41
        assert got[42] == [{"type": "reading", "device": "ev-2", "last_seen": 1_796_400_000_500, "t": -3.5}]
        assert [memory_subscription.get(timeout=1) for _ in range(3)] == expected_41
        assert cache.get("ev-1")["seq"] == 2**40 + 1
    finally:
        for subscription in (*subscriptions.values(), memory_subscription):
            subscription.close()


def test_watched_tenants_are_the_channels_with_a_subscriber(redis):
    """watched_tenants names exactly the tenants whose event channel has a subscriber now (as the web tier
    subscribes), and None while Redis is failing; the demo's cache answers None (it takes every reading at once)."""
    cache = RedisCache(redis.url)
    raw = redis_lib.Redis.from_url(redis.url)
    other = raw.pubsub()
    other.subscribe("iot:events:not-a-tenant", "another:channel")
    assert cache.watched_tenants() == set()
    subscriptions = [cache.subscribe(61), cache.subscribe(62)]
    try:
        assert cache.watched_tenants() == {61, 62}
        subscriptions.pop().close()
        deadline = time.monotonic() + 5
        while cache.watched_tenants() != {61} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cache.watched_tenants() == {61}
    finally:
        for subscription in subscriptions:
            subscription.close()
        other.close()
    assert RedisCache("redis://127.0.0.1:1/0", socket_timeout=0.2).watched_tenants() is None
    assert MemoryCache().watched_tenants() is None
