"""The writer's batching (group commit): a batch closes once the store stage is free and nothing more is waiting,
grows while the store stage is busy, and never exceeds writer_batch_size. On the in-process bus and SQLite: the
collecting side does not depend on the database."""

from __future__ import annotations

import threading

import pytest

from cloud.bus.memory import MemoryBus
from cloud.cache import MemoryCache
from cloud.writer import Writer

from .helpers import make_settings, provision, reading


@pytest.fixture
def collecting(sqlite_url, engine_at):
    """A writer whose consumer is subscribed (as run() does), its settings, and a producer on the same bus."""
    engine = engine_at(sqlite_url)
    provision(engine, {"A": ["d1"]})

    def make(**overrides):
        settings = make_settings(**overrides)
        bus = MemoryBus(partitions=2)
        writer = Writer(settings, bus, engine, MemoryCache())
        writer.consumer = bus.consumer("writer", [settings.topics.telemetry])
        producer = bus.producer()
        return writer, lambda seq: producer.produce(settings.topics.telemetry, "d1", reading("d1", 1, seq, None))

    return make


def _collect_in_thread(writer, idle):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(writer._collect(threading.Event(), idle)), daemon=True)
    thread.start()
    return thread, out


def test_batch_closes_when_the_store_stage_is_free_and_nothing_waits(collecting):
    writer, send = collecting(writer_batch_ms=0, writer_batch_size=500)
    for seq in range(3):
        send(seq)
    idle = threading.Event()
    idle.set()
    thread, out = _collect_in_thread(writer, idle)
    thread.join(10)
    assert not thread.is_alive(), "an idle store stage and an empty consumer must close the batch"
    records, (items, rejected) = out[0]
    assert [i.message.seq for i in items] == [0, 1, 2] and len(records) == 3 and not rejected


def test_batch_grows_while_the_store_stage_is_busy(collecting):
    writer, send = collecting(writer_batch_ms=0, writer_batch_size=500)
    send(0)
    idle = threading.Event()  # cleared: the store stage has the previous batch in the database
    thread, out = _collect_in_thread(writer, idle)
    for seq in range(1, 50):
        send(seq)
    thread.join(0.3)
    assert thread.is_alive(), "the batch must stay open while the store stage is busy"
    idle.set()  # the previous batch committed
    thread.join(10)
    assert not thread.is_alive()
    records, (items, _rejected) = out[0]
    assert sorted(i.message.seq for i in items) == list(range(50))  # parsed as they came, all in this batch
    assert len(records) == 50


def test_batch_never_exceeds_the_size_even_while_busy(collecting):
    writer, send = collecting(writer_batch_ms=0, writer_batch_size=40)
    for seq in range(100):
        send(seq)
    thread, out = _collect_in_thread(writer, threading.Event())  # store stage busy throughout
    thread.join(10)
    assert not thread.is_alive(), "a full batch closes whatever the store stage is doing"
    records, (items, _rejected) = out[0]
    assert len(records) == len(items) == 40


def test_nothing_to_collect_returns_none(collecting):
    writer, _send = collecting()
    idle = threading.Event()
    idle.set()
    assert writer._collect(threading.Event(), idle) is None


class _RecordingCache(MemoryCache):
    """The demo's cache, recording each call the writer makes."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list]] = []

    def update_many(self, items):
        self.calls.append(("update_many", list(items)))
        super().update_many(items)

    def publish_readings(self, items, seen_ms):
        self.calls.append(("publish_readings", list(items)))
        super().publish_readings(items, seen_ms)

    def publish_many(self, events):
        self.calls.append(("publish_many", list(events)))
        super().publish_many(events)


def test_cache_stage_takes_queued_batches_in_one_call_newest_reading_wins(sqlite_url, engine_at):
    """Outcomes that queued behind the cache thread go in one call, which stores and publishes the readings: per
    device the newest reading of all of them, an older one (a replay stored later) never replaces it, and the
    stage ends at None after caching what came before it."""
    import queue

    from cloud.writer import Outcome

    cache = _RecordingCache()
    live = cache.subscribe(7)
    writer = Writer(make_settings(), MemoryBus(), engine_at(sqlite_url), cache)

    def stored(*rows):  # (device, ts ms, seq) -> a stored batch's outcome
        return Outcome(inserted=[(d, 7, ts, 20.0 + seq, 40.0, 1000.0, -60, seq, 1, seq) for d, ts, seq in rows])

    outcomes: queue.SimpleQueue = queue.SimpleQueue()
    outcomes.put(stored(("d1", 1_000, 1), ("d2", 1_000, 1)))
    outcomes.put(stored(("d1", 3_000, 3)))
    outcomes.put(stored(("d1", 2_000, 2), ("d3", 5_000, 9)))  # d1's seq 2 arrives after seq 3
    outcomes.put(None)
    stage = threading.Thread(target=writer._cache_stage, args=(outcomes,), daemon=True)
    stage.start()
    stage.join(10)
    assert not stage.is_alive(), "the cache stage must end at None"
    assert [name for name, _ in cache.calls] == ["publish_readings"]
    updates = {device: fields["seq"] for _, device, fields in cache.calls[0][1]}
    assert updates == {"d1": 3, "d2": 1, "d3": 9}
    assert cache.get("d1")["seq"] == 3 and cache.get("d1")["tenant"] == 7
    events = [live.get(timeout=1) for _ in range(3)]
    assert sorted((e["type"], e["device"], e["seq"]) for e in events) == [
        ("reading", "d1", 3), ("reading", "d2", 1), ("reading", "d3", 9)]
    assert live.get(timeout=0.05) is None

    outcomes.put(stored(("d1", 2_500, 2)))  # later, on its own: still older than what is cached
    outcomes.put(None)
    writer._cache_stage(outcomes)
    assert cache.get("d1")["seq"] == 3


class _WatchedCache(_RecordingCache):
    """A cache that tells which tenants are watched (as RedisCache does)."""

    def __init__(self, watched):
        super().__init__()
        self.watched = watched

    def watched_tenants(self):
        return self.watched


def test_cache_stage_holds_back_readings_of_unwatched_tenants_until_the_flush(sqlite_url, engine_at):
    """With cache_flush_ms, a reading of a tenant nobody watches waits for the next flush (newest per device,
    flushed on time even when no batch comes), while a watched tenant's reading and every status go at once; at
    the end everything held is written; a held reading never replaces a newer one already cached."""
    import queue
    import time

    from cloud import schema
    from cloud.bus import Record
    from cloud.writer import Item, Outcome

    cache = _WatchedCache({7})
    writer = Writer(make_settings(cache_flush_ms=400), MemoryBus(), engine_at(sqlite_url), cache)

    def stored(tenant, *rows):
        return Outcome(inserted=[(d, tenant, ts, 20.0, 40.0, 1000.0, -60, seq, 1, seq) for d, ts, seq in rows])

    def readings_sent():
        return [{d: f["seq"] for _t, d, f in items} for name, items in cache.calls if name == "publish_readings"]

    outcomes: queue.SimpleQueue = queue.SimpleQueue()
    stage = threading.Thread(target=writer._cache_stage, args=(outcomes,), daemon=True)
    stage.start()
    outcomes.put(stored(7, ("w1", 1_000, 1)))  # the first call flushes (nothing is held yet)
    deadline = time.monotonic() + 5
    while not readings_sent() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert readings_sent() == [{"w1": 1}]
    started = time.monotonic()
    outcomes.put(stored(8, ("u1", 1_000, 1), ("u2", 1_000, 1)))
    outcomes.put(stored(8, ("u1", 2_000, 2)))
    status = schema.Status(id="s1", state="online", fw="1.0", boot=1)
    record = Record("iot-status", 0, 0, "s1", b"", None, 1_000)
    outcomes.put(Outcome(inserted=[(d, t, ts, 20.0, 40.0, 1000.0, -60, seq, 1, seq)
                                   for d, t, ts, seq in (("w1", 7, 2_000, 2), ("u3", 8, 900, 1))],
                         statuses=[(Item(record, "status", status, "s1", 8), status)]))
    while len(readings_sent()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert readings_sent()[1] == {"w1": 2}, "a watched tenant's reading goes with its batch"
    assert cache.get("s1")["status"] == "online", "statuses are not held back"
    not_yet = cache.get("u1") == {}
    assert not_yet or time.monotonic() - started >= 0.3, "held until the flush (0.4 s after the first call)"
    while len(readings_sent()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert readings_sent()[2] == {"u1": 2, "u2": 1, "u3": 1}, "held readings: the newest per device, in one call"
    assert 0.2 < time.monotonic() - started < 2.0, "flushed on time without another batch"

    cache.watched = None  # the cache cannot tell (Redis failing): everything goes at once again
    outcomes.put(stored(8, ("u1", 1_500, 3)))  # older than the cached ts 2_000: must not replace it
    outcomes.put(stored(8, ("u4", 1_000, 1)))
    outcomes.put(None)
    stage.join(10)
    assert not stage.is_alive()
    assert readings_sent()[3:] == [{"u4": 1}] and cache.get("u1")["seq"] == 2

    # the end writes what is held
    writer = Writer(make_settings(cache_flush_ms=60_000), MemoryBus(), engine_at(sqlite_url), cache)
    cache.watched = set()
    cache.calls.clear()
    stage = threading.Thread(target=writer._cache_stage, args=(outcomes,), daemon=True)
    stage.start()
    outcomes.put(stored(8, ("u5", 1_000, 1)))  # the first call flushes
    deadline = time.monotonic() + 5
    while not readings_sent() and time.monotonic() < deadline:
        time.sleep(0.01)
    outcomes.put(stored(8, ("u6", 1_000, 1)))
    time.sleep(0.3)
    assert readings_sent() == [{"u5": 1}], "u6 is held (the next flush is a minute away)"
    outcomes.put(None)
    stage.join(10)
    assert not stage.is_alive()
    assert readings_sent() == [{"u5": 1}, {"u6": 1}]
