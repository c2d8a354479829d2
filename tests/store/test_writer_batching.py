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
