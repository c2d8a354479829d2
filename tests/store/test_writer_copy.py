"""The writer's PostgreSQL COPY way: a batch of new readings in one binary COPY straight into telemetry; a batch
holding a stored reading falls back to staging + ON CONFLICT DO NOTHING (and so do the next few), with the same
keys either way; the binary rows carry NULLs and exact times; the newest reading per device is picked as
PostgreSQL's DISTINCT ON picks it."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from cloud import schema
from cloud.bus import Record
from cloud.bus.memory import MemoryBus
from cloud.cache import MemoryCache
from cloud.writer import DUPLICATE_PATH_BATCHES, Writer, _copy_buffer, _newest_per_device

from .helpers import count, make_settings, provision, reading

_offset = 0


def _records(settings, readings: list[tuple[str, int, int, int]]) -> list[Record]:
    """(device, boot, seq, ts ms) -> telemetry records as the bus delivers them."""
    global _offset
    out = []
    for device, boot, seq, ts in readings:
        _offset += 1
        out.append(Record(settings.topics.telemetry, 0, _offset, device, reading(device, boot, seq, ts), None,
                          int(time.time() * 1000)))
    return out


@pytest.fixture
def pg_engine(pg_url, engine_at):
    return engine_at(pg_url)


def test_copy_then_redelivery_falls_back_and_stores_each_reading_once(pg_engine):
    provision(pg_engine, {"A": ["d1", "d2"]})
    settings = make_settings()
    cache = MemoryCache()
    writer = Writer(settings, MemoryBus(), pg_engine, cache, retention=False)
    writer.producer = writer.bus.producer()

    def store(records):  # one batch, as the store stage has it (offsets handed to a no-op)
        return writer.process(records, commit=lambda _records: None)

    now = int(time.time() * 1000)
    first = [(d, 1, seq, now - 60_000 + seq * 1000) for seq in range(10) for d in ("d1", "d2")]
    assert store(_records(settings, first))
    assert writer._duplicate_path == 0  # stored by the COPY
    assert count(pg_engine, "SELECT count(*) FROM telemetry") == 20
    assert cache.get("d1")["seq"] == 9 and cache.get("d2")["seq"] == 9
    # half of it again plus new readings: the COPY meets stored keys, the batch goes the ON CONFLICT way
    mixed = [(d, 1, seq, now - 60_000 + seq * 1000) for seq in range(5, 15) for d in ("d1", "d2")]
    assert store(_records(settings, mixed))
    assert writer._duplicate_path == DUPLICATE_PATH_BATCHES
    assert count(pg_engine, "SELECT count(*) FROM telemetry") == 30
    assert cache.get("d1")["seq"] == 14
    # the next batches go that way as well, then the COPY again
    for i in range(DUPLICATE_PATH_BATCHES):
        assert store(_records(settings, [("d1", 2, i, now + i)]))
    assert writer._duplicate_path == 0
    assert store(_records(settings, [("d2", 2, 0, now)]))
    assert writer._duplicate_path == 0
    assert count(pg_engine, "SELECT count(*) FROM telemetry") == 30 + DUPLICATE_PATH_BATCHES + 1
    # a replay of everything the COPY stored meets the same keys (the same timestamps, to the microsecond)
    assert store(_records(settings, first))
    assert count(pg_engine, "SELECT count(*) FROM telemetry") == 30 + DUPLICATE_PATH_BATCHES + 1
    assert count(pg_engine, "SELECT count(*) FROM telemetry WHERE boot = 1 AND seq < 10") == 20


def test_copy_buffer_carries_nulls_and_exact_times(pg_engine):
    rows = [
        ("d1", 1, 2**53, 7, 1_796_353_051_299, 1_796_353_051_300, 21.5, 45.25, 1000.125, -60, 2**62, False),
        ("d-\u00e9", 2**31 - 1, 0, 1, 946_684_800_001, 4_102_444_800_000, None, None, 870.0, None, None, True),
        ("d3", 0, 5, 2, 946_684_799_999, 946_684_800_000, -40.0, None, None, -127, 0, False),
    ]
    with pg_engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()
        cursor.execute("CREATE TEMP TABLE t_copy (LIKE telemetry)")
        with cursor.copy("COPY t_copy (device_id, boot, seq, tenant_id, ts, received_at, t, h, p, rssi, up, "
                         "ts_estimated) FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(_copy_buffer(rows))
        cursor.execute("SELECT device_id, boot, seq, tenant_id, ts, received_at, t, h, p, rssi, up, ts_estimated "
                       "FROM t_copy ORDER BY device_id")
        back = cursor.fetchall()
        conn.rollback()
    expected = [(d, b, s, tn, datetime.fromtimestamp(ts / 1000, timezone.utc),
                 datetime.fromtimestamp(rec / 1000, timezone.utc), t, h, p, rssi, up, est)
                for d, b, s, tn, ts, rec, t, h, p, rssi, up, est in sorted(rows)]
    assert back == expected


def test_newest_per_device_orders_by_time_then_seq():
    def row(device, seq, ts):
        return (device, 1, seq, 3, ts, ts, 1.0, 2.0, 3.0, -50, seq, False)

    newest = _newest_per_device([row("a", 1, 100), row("a", 3, 90), row("a", 2, 100), row("b", 9, 5),
                                 row("b", 8, 5)])
    assert sorted((r[0], r[7], r[2]) for r in newest) == [("a", 2, 100), ("b", 9, 5)]
    assert newest[0][:3] == ("a", 3, 100)  # (device, tenant, ts ms) first, as Outcome.inserted has them
    assert schema.VERSION  # the payloads above are the contract's
