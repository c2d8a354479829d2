"""The writer on the in-process bus, against SQLite and PostgreSQL: idempotency, command/alarm state, dead letters,
poison records, roll-ups consistent with the raw rows, and a cache that goes away."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from cloud import db, schema
from cloud.bus import Record
from cloud.bus.memory import MemoryBus
from cloud.cache import MemoryCache, RedisCache
from cloud.db import maintenance, repo
from cloud.db.models import Alarm, Command, Device
from cloud.writer import Writer

from .helpers import RunningWriter, count, make_settings, provision, reading, settle_rollups, wait_for


def _dead_letters(bus, settings):
    consumer = bus.consumer("test-dl", [settings.topics.deadletter])
    out = [json.loads(r.value) for r in consumer.poll_batch(10_000, 0.2)]
    consumer.close()
    return out


@pytest.fixture
def engine(any_url, engine_at):
    return engine_at(any_url)


def test_redelivered_and_replayed_readings_stored_once(engine):
    ids = provision(engine, {"A": ["d1", "d2"]})
    settings = make_settings()
    bus, cache = MemoryBus(), MemoryCache()
    producer = bus.producer()
    now = int(time.time() * 1000)

    def send_all():
        for seq in range(300):
            # d1 has a clock; d2 never synced (ts null): its ts comes from the boot anchor
            producer.produce(settings.topics.telemetry, "d1", reading("d1", 7, seq, now - (300 - seq) * 1000))
            producer.produce(settings.topics.telemetry, "d2", reading("d2", 3, seq, None, up=seq * 2))

    send_all()
    send_all()  # redelivery inside the same run
    with RunningWriter(Writer(settings, bus, engine, cache)):
        wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") == 600, what="600 rows")
        time.sleep(0.3)
    # a replay to a brand-new writer (fresh in-process caches): still stored once, same ts for unsynced rows
    before = count(engine, "SELECT count(*) FROM telemetry WHERE device_id = 'd2' AND ts_estimated")
    send_all()
    with RunningWriter(Writer(settings, bus, engine, MemoryCache())) as running:
        wait_for(lambda: running.writer._last_batch is not None, what="a batch")
        time.sleep(0.5)
    assert count(engine, "SELECT count(*) FROM telemetry") == 600
    assert before == 300
    assert count(engine, "SELECT count(DISTINCT ts) FROM telemetry WHERE device_id = 'd2'") == 300
    # roll-ups counted each reading exactly once (PostgreSQL: the writer counted those below the watermark, the
    # job counts the rest)
    settle_rollups(engine)
    assert count(engine, "SELECT sum(n) FROM telemetry_1m") == 600
    assert count(engine, "SELECT sum(n) FROM telemetry_1h") == 600
    assert cache.get("d1")["seq"] == 299 and cache.get("d1")["tenant"] == ids["A"]
    with db.session_factory(engine)() as s:
        d1 = s.get(Device, "d1")
        assert d1.last_seen is not None and d1.firmware == "1.0.0" and d1.boot == 7


def test_rollups_match_a_rebuild_from_raw(engine):
    provision(engine, {"A": ["d1"]})
    settings = make_settings(writer_batch_size=37)  # many small batches hitting the same buckets
    bus = MemoryBus()
    producer = bus.producer()
    start = (int(time.time()) // 3600 * 3600 - 7200) * 1000
    for seq in range(500):
        producer.produce(settings.topics.telemetry, "d1", reading("d1", 1, seq, start + seq * 17_000,
                                                                  t=15 + (seq * 7 % 23)))
    if engine.dialect.name == "postgresql":  # the watermark in the middle: the first half arrives "late"
        maintenance.advance_rollups(engine, until=datetime.fromtimestamp(start / 1000 + 250 * 17, timezone.utc))
    writer = Writer(settings, bus, engine, MemoryCache())
    writer.rollup_every_s = 3600  # the job runs once, at the start, and not again until settle_rollups
    with RunningWriter(writer):
        wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") == 500)
        time.sleep(0.2)
    # and a replay after the watermark moved: nothing counts twice
    maintenance.advance_rollups(engine, until=datetime.fromtimestamp(start / 1000 + 400 * 17, timezone.utc))
    for seq in range(500):
        producer.produce(settings.topics.telemetry, "d1", reading("d1", 1, seq, start + seq * 17_000,
                                                                  t=15 + (seq * 7 % 23)))
    with RunningWriter(Writer(settings, bus, engine, MemoryCache())) as running:
        wait_for(lambda: running.writer._last_batch is not None)
        time.sleep(0.3)
    settle_rollups(engine)
    incremental = _rollups(engine)
    assert sum(row[1] for row in incremental["telemetry_1m"]) == 500
    maintenance.refresh_rollups(engine, datetime.fromtimestamp(start / 1000, timezone.utc) - timedelta(hours=1),
                                datetime.now(timezone.utc) + timedelta(hours=1))
    assert _rollups(engine) == incremental


def _rollups(engine):
    with engine.connect() as conn:
        out = {}
        for table in ("telemetry_1m", "telemetry_1h"):
            rows = conn.exec_driver_sql(
                f"SELECT device_id, n, t_n, round(CAST(t_sum AS numeric), 6), t_min, t_max FROM {table} "
                "ORDER BY bucket, device_id").all() if engine.dialect.name == "postgresql" else conn.exec_driver_sql(
                f"SELECT device_id, n, t_n, round(t_sum, 6), t_min, t_max FROM {table} ORDER BY bucket, device_id").all()
            out[table] = [tuple(float(v) if not isinstance(v, str) else v for v in r) for r in rows]
        return out


def test_commands_acks_overtaking_sent_and_alarms(engine):
    ids = provision(engine, {"A": ["d1"]})
    tenant = ids["A"]
    with db.session_factory(engine)() as s:
        c1 = repo.create_command(s, tenant, "d1", schema.new_command("ping"))
        c2 = repo.create_command(s, tenant, "d1", schema.new_command("led", {"state": "on"}))
        s.commit()
    settings = make_settings()
    bus, cache = MemoryBus(), MemoryCache()
    events = cache.subscribe(tenant)
    producer = bus.producer()
    now = int(time.time() * 1000)
    t = settings.topics
    # the ack overtakes "sent" for c1; c2 fails then a stale "sent" arrives
    producer.produce(t.acks, "d1", json.dumps({"v": 1, "cid": c1.cid, "ok": True, "result": {"pong": True}}).encode())
    producer.produce(t.acks, "d1", json.dumps({"v": 1, "cid": c2.cid, "ok": False, "err": "busy"}).encode())
    producer.produce(t.command_status, c1.cid, schema.CommandStatus(c1.cid, "d1", "sent", now).to_json())
    producer.produce(t.command_status, c2.cid, schema.CommandStatus(c2.cid, "d1", "sent", now).to_json())
    producer.produce(t.command_status, c2.cid, schema.CommandStatus(c2.cid, "d1", "expired", now).to_json())
    alarm = dict(alarm_id="al-1", device="d1", tenant=str(tenant), rule="hot", metric="t", value=31.0,
                 threshold=30.0, severity="major")
    producer.produce(t.alarms, "d1", schema.AlarmEvent(**alarm, state="cleared", ts=now + 2000).to_json())
    producer.produce(t.alarms, "d1", schema.AlarmEvent(**alarm, state="raised", ts=now).to_json())  # late
    producer.produce(t.status, "d1", json.dumps({"v": 1, "state": "online", "fw": "2.0", "boot": 9}).encode())
    with RunningWriter(Writer(settings, bus, engine, cache)) as running:
        wait_for(lambda: running.writer._last_batch is not None)
    with db.session_factory(engine)() as s:
        r1, r2 = s.get(Command, c1.cid), s.get(Command, c2.cid)
        assert (r1.status, r1.ok, r1.result) == ("delivered", True, {"pong": True}) and r1.sent_at is not None
        assert (r2.status, r2.ok, r2.error) == ("failed", False, "busy")
        a = s.get(Alarm, "al-1")
        assert a.state == "cleared" and a.raised_at < a.cleared_at and a.tenant_id == tenant
        d = s.get(Device, "d1")
        assert (d.status, d.firmware, d.boot) == ("online", "2.0", 9)
    kinds = []
    while (event := events.get(0.1)) is not None:
        kinds.append(event["type"])
    assert {"command", "alarm", "status"} <= set(kinds)
    assert cache.get("d1")["status"] == "online"


def test_unknown_device_and_invalid_records_go_to_dead_letters(engine):
    provision(engine, {"A": ["d1"]})
    settings = make_settings()
    bus = MemoryBus()
    producer = bus.producer()
    t = settings.topics
    producer.produce(t.telemetry, "ghost", reading("ghost", 1, 1))
    producer.produce(t.telemetry, "d1", b"{not json")
    producer.produce(t.telemetry, "d1", reading("d2", 1, 1))  # id in payload differs from the key
    producer.produce(t.telemetry, "d1", reading("d1", 1, 1))
    with RunningWriter(Writer(settings, bus, engine, MemoryCache())):
        wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") == 1)
        time.sleep(0.2)
    reasons = sorted(d["reason"] for d in _dead_letters(bus, settings))
    assert len(reasons) == 3
    assert reasons[-1] == "unknown device 'ghost'"
    assert any("malformed JSON" in r for r in reasons) and any("differs" in r for r in reasons)
    # a device provisioned later is recognised without restarting the writer
    with db.session_factory(engine)() as s:
        repo.create_device(s, 1, "ghost")
        s.commit()
    producer.produce(t.telemetry, "ghost", reading("ghost", 1, 2))
    with RunningWriter(Writer(settings, bus, engine, MemoryCache())):
        wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry WHERE device_id = 'ghost'") == 1)


def test_a_record_the_database_rejects_is_isolated(pg_url, engine_at):
    engine = engine_at(pg_url)
    provision(engine, {"A": ["d1"]})
    settings = make_settings()
    bus = MemoryBus()
    producer = bus.producer()
    now = int(time.time() * 1000)
    for seq in range(50):
        producer.produce(settings.topics.telemetry, "d1", reading("d1", 1, seq, now))
    # valid by the contract but too long for alarms.metric (32 characters): PostgreSQL refuses it
    producer.produce(settings.topics.alarms, "d1", schema.AlarmEvent(
        "al-x", "d1", "1", "r", "m" * 40, 1.0, 2.0, "minor", "raised", now).to_json())
    for seq in range(50, 100):
        producer.produce(settings.topics.telemetry, "d1", reading("d1", 1, seq, now))
    with RunningWriter(Writer(settings, bus, engine, MemoryCache())):
        wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") == 100)
        wait_for(lambda: len(_dead_letters(bus, settings)) == 1, what="one dead letter")
    [letter] = _dead_letters(bus, settings)
    assert letter["reason"].startswith("database rejected") and letter["source"] == settings.topics.alarms


def test_writer_carries_on_when_redis_stops(tmp_path, engine_at):
    from cloud.nativestack import Redis

    engine = engine_at(f"sqlite:///{tmp_path}/iot.db")
    provision(engine, {"A": ["d1"]})
    redis = Redis(tmp_path / "redis").start()
    try:
        cache = RedisCache(redis.url, retry_after=0.5)
        settings = make_settings()
        bus = MemoryBus()
        producer = bus.producer()
        now = int(time.time() * 1000)
        with RunningWriter(Writer(settings, bus, engine, cache)) as running:
            producer.produce(settings.topics.telemetry, "d1", reading("d1", 1, 1, now))
            wait_for(lambda: cache.get("d1").get("seq") == 1, what="cache filled")
            redis.stop()
            for seq in range(2, 200):
                producer.produce(settings.topics.telemetry, "d1", reading("d1", 1, seq, now + seq))
            wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") == 199, what="rows while Redis is down")
            assert cache.get("d1") == {}  # reads fall back to empty: the web tier then reads the database
            assert running.writer.health()[0]
            redis.start()
            time.sleep(0.6)  # retry_after
            producer.produce(settings.topics.telemetry, "d1", reading("d1", 1, 500, now + 500))
            wait_for(lambda: cache.get("d1").get("seq") == 500, what="cache refilled")
    finally:
        redis.close()


@pytest.mark.parametrize("pace, stopping", [(0.0, False), (0.01, False), (3.0, True)],
                         ids=["one-statement", "paced-slices", "paced-slices-stopping"])
def test_claim_left_by_a_dead_roll_up_job_is_finished_exactly_once(pg_url, engine_at, pace, stopping):
    """The roll-up job dies between its claim (the mark moved) and adding the claimed readings; meanwhile the
    writer stores more readings of the claimed range (late now: it rolls those up itself) and replays the old
    ones. The next run adds exactly the readings the claim's snapshot shows: the roll-ups equal a rebuild. The
    same whether the run adds them in one statement or paced, slice by slice (and when told to stop meanwhile:
    it drops the pauses, not the work)."""
    engine = engine_at(pg_url)
    provision(engine, {"A": ["d1", "d2"]})
    settings = make_settings(writer_batch_size=50)
    bus = MemoryBus()
    producer = bus.producer()
    start = (int(time.time()) // 3600 * 3600 - 3 * 3600) * 1000  # within one hour, three hours ago
    for seq in range(200):
        for device in ("d1", "d2"):
            producer.produce(settings.topics.telemetry, device, reading(device, 1, seq, start + seq * 9_000,
                                                                      t=10 + seq % 17))
    mark = datetime.fromtimestamp(start / 1000, timezone.utc)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE rollup_watermark SET done_until = %(m)s", {"m": mark})
    writer = Writer(settings, bus, engine, MemoryCache())
    writer.rollup_every_s = 3600
    writer._run_rollups = lambda stop: None  # no job in this writer: the test plays it
    with RunningWriter(writer):
        wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") == 400)
    until = mark + timedelta(hours=1)
    with engine.begin() as conn:  # the job claims the hour ... and dies
        assert maintenance.claim_rollups(conn, until) == until
    for seq in range(200, 300):  # later readings of the claimed hour (late now), and a replay of the first ones
        for device in ("d1", "d2"):
            producer.produce(settings.topics.telemetry, device, reading(device, 1, seq, start + seq * 9_000,
                                                                      t=10 + seq % 17))
    for seq in range(50):
        producer.produce(settings.topics.telemetry, "d1", reading("d1", 1, seq, start + seq * 9_000, t=10 + seq % 17))
    with RunningWriter(writer):
        wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") == 600)
        time.sleep(0.3)
    stop = threading.Event()
    if stopping:
        stop.set()
    # the claimed readings only
    assert maintenance.advance_rollups(engine, until=until, pace=pace, stop=stop) == 400
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT pending_lo FROM rollup_watermark").scalar() is None
    incremental = _rollups(engine)
    assert sum(row[1] for row in incremental["telemetry_1h"]) == 600
    maintenance.refresh_rollups(engine, mark - timedelta(hours=1), until + timedelta(hours=1))
    assert _rollups(engine) == incremental


def test_roll_up_job_names_its_connection_while_it_works(pg_url, engine_at):
    """While the job works (statements and paced pauses) its backend carries ROLLUP_APPLICATION_NAME, which is how
    monitoring tells it from the writer's inserts; the pooled connection loses the name when the job is done."""
    engine = engine_at(pg_url)
    provision(engine, {"A": ["d1"]})
    start = (int(time.time()) // 3600 * 3600 - 3 * 3600) * 1000
    mark = datetime.fromtimestamp(start / 1000, timezone.utc)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE rollup_watermark SET done_until = %(m)s", {"m": mark})
    settings = make_settings()
    writer = Writer(settings, MemoryBus(), engine, MemoryCache())
    assert writer.process([Record(settings.topics.telemetry, 0, seq, "d1", reading("d1", 1, seq, start + seq * 9_000),
                                  None, start) for seq in range(400)], commit=lambda records: None)
    job = threading.Thread(target=maintenance.advance_rollups, args=(engine,),
                           kwargs={"until": mark + timedelta(hours=1), "pace": 0.5})
    states = set()
    job.start()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
        while job.is_alive():
            states.update(watcher.exec_driver_sql(
                "SELECT state FROM pg_stat_activity WHERE application_name = %(n)s",
                {"n": maintenance.ROLLUP_APPLICATION_NAME}).scalars())
            time.sleep(0.005)
    job.join()
    assert {"active", "idle in transaction"} <= states  # a statement, and a pause between two
    with engine.connect() as conn:  # the job's connection is back in the pool (idle), under its own name again
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = %(n)s",
                                    {"n": maintenance.ROLLUP_APPLICATION_NAME}).scalar() == 0
    assert sum(row[1] for row in _rollups(engine)["telemetry_1h"]) == 400


@pytest.mark.parametrize("xmax8, xmin32, expected", [
    (5 * 2**32 + 1000, 990, 5 * 2**32 + 990),  # the same epoch, before the snapshot
    (5 * 2**32 + 1000, 1010, 5 * 2**32 + 1010),  # the same epoch, after it
    (5 * 2**32 + 10, 2**32 - 6, 5 * 2**32 - 6),  # the 32-bit counter wrapped after the row was written
    (5 * 2**32 - 10, 4, 5 * 2**32 + 4),  # ... or wrapped between the snapshot and the row
])
def test_claimed_rows_xid_is_widened_across_a_wraparound(pg_url, engine_at, xmax8, xmin32, expected):
    engine = engine_at(pg_url)
    with engine.connect() as conn:
        got = conn.exec_driver_sql(
            f"SELECT ({maintenance._XMIN8})::text::bigint FROM (SELECT %(x)s::bigint AS xmax8) claim, "
            "(SELECT %(m)s::bigint AS xmin) tel", {"x": xmax8, "m": xmin32}).scalar()
    assert got == expected
