"""The writer with real Kafka and PostgreSQL: a kill -9 mid-batch and a PostgreSQL restart mid-stream lose
nothing and store nothing twice (raw rows and roll-ups)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from cloud import db
from cloud import settings as settings_mod
from cloud.bus.kafka import KafkaBus
from cloud.cache import MemoryCache
from cloud.writer import DEAD_LETTERS, ENGINE_OPTIONS, Writer

from .helpers import RunningWriter, count, fresh_pg_database, provision, reading, settle_rollups, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEVICES = [f"k-{i:02d}" for i in range(20)]


def _topic_env(suffix: str) -> dict[str, str]:
    return {f"IOT_TOPIC_{name.upper()}": f"store-{name}-{suffix}" for name in
            ("telemetry", "status", "acks", "alarms", "control", "command_status", "deadletter")}


def _produce(bootstrap: str, topic: str, start: int, n: int, now_ms: int) -> int:
    """n readings spread over the devices; every fourth device has no clock. Returns the count."""
    producer = KafkaBus(bootstrap).producer("test")
    for i in range(start, start + n):
        device = DEVICES[i % len(DEVICES)]
        seq = i // len(DEVICES)
        synced = DEVICES.index(device) % 4 != 0
        producer.produce(topic, device, reading(device, 1, seq, now_ms - 3_600_000 + seq * 100 if synced else None,
                                                up=seq))
    assert producer.flush(30) == 0
    return n


def _start_writer(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cloud.writer"], cwd=ROOT, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_kill_9_mid_batch_then_restart_stores_every_reading_once(kafka, postgres, engine_at, tmp_path):
    url, drop = fresh_pg_database(postgres)
    try:
        engine = engine_at(url)
        provision(engine, {"A": DEVICES})
        suffix = uuid.uuid4().hex[:8]
        topics = _topic_env(suffix)
        kafka.create_topics(topics.values(), partitions=3)
        now = int(time.time() * 1000)
        total = _produce(kafka.bootstrap, topics["IOT_TOPIC_TELEMETRY"], 0, 40_000, now)
        _produce(kafka.bootstrap, topics["IOT_TOPIC_TELEMETRY"], 0, 2_000, now)  # redeliveries by the bridge
        env = {**os.environ, **topics, "IOT_KAFKA_BOOTSTRAP": kafka.bootstrap, "IOT_DATABASE_URL": url,
               "IOT_WRITER_BATCH_SIZE": "500", "IOT_WRITER_BATCH_MS": "50", "IOT_METRICS_PORT": "0",
               "PYTHONPATH": str(ROOT)}
        env.pop("IOT_REDIS_URL", None)
        log = tmp_path / "writer.log"
        proc = _start_writer(env, log)
        try:
            wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") >= 4_000, timeout=90,
                     what="the first writer to store some rows")
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream, most likely mid-batch
            proc.wait(10)
            stored_at_kill = count(engine, "SELECT count(*) FROM telemetry")
            assert stored_at_kill < total, "the writer finished before it was killed; the test proved nothing"
            proc = _start_writer(env, log)
            wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") == total, timeout=120,
                     what=f"all {total} rows after the restart")
            time.sleep(1.0)  # anything still in flight would show up as a surplus
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert count(engine, "SELECT count(*) FROM telemetry") == total
        settle_rollups(engine)
        assert count(engine, "SELECT sum(n) FROM telemetry_1m") == total
        assert count(engine, "SELECT sum(n) FROM telemetry_1h") == total
        assert count(engine, "SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM telemetry) x") == total
    finally:
        drop()


def test_postgres_restart_mid_stream_loses_nothing(kafka, tmp_path, engine_at):
    from cloud.nativestack import Postgres

    pg = Postgres(tmp_path / "pg").start()
    writer_engine = None
    try:
        engine = engine_at(pg.url)
        provision(engine, {"A": DEVICES})
        suffix = uuid.uuid4().hex[:8]
        topics = _topic_env(suffix)
        kafka.create_topics(topics.values(), partitions=3)
        settings = settings_mod.load({**topics, "IOT_KAFKA_BOOTSTRAP": kafka.bootstrap, "IOT_DATABASE_URL": pg.url},
                                     writer_batch_size=300, writer_batch_ms=50)
        now = int(time.time() * 1000)
        # the writer's engine as `python -m cloud writer` makes it (no pre-ping: after the restart its pooled
        # connections are stale until the writer drops them)
        writer_engine = db.make_engine(pg.url, **ENGINE_OPTIONS)
        dead_letters_before = _dead_letters()
        writer = Writer(settings, KafkaBus(kafka.bootstrap), writer_engine, MemoryCache(), retention=False)
        with RunningWriter(writer):
            total = _produce(kafka.bootstrap, settings.topics.telemetry, 0, 20_000, now)
            wait_for(lambda: count(engine, "SELECT count(*) FROM telemetry") >= 2_000, timeout=60)
            pg.stop()
            more = threading.Thread(target=_produce, args=(kafka.bootstrap, settings.topics.telemetry, 20_000,
                                                           3_000, now))
            more.start()
            wait_for(lambda: writer.health()[0] is False, timeout=30, what="health to report the outage")
            time.sleep(2)
            more.join()
            total += 3_000
            pg.start()
            wait_for(lambda: _safe_count(engine) == total, timeout=120, what=f"all {total} rows after the restart")
            wait_for(lambda: writer.health()[0], timeout=30, what="health to recover")
            time.sleep(0.5)
        assert count(engine, "SELECT count(*) FROM telemetry") == total
        settle_rollups(engine)
        assert count(engine, "SELECT sum(n) FROM telemetry_1m") == total
        assert count(engine, "SELECT sum(n) FROM telemetry_1h") == total
        assert _dead_letters() == dead_letters_before, "a storable reading was dead-lettered"
    finally:
        engine.dispose()
        if writer_engine is not None:
            writer_engine.dispose()
        pg.close()


def _dead_letters() -> float:
    return sum(s.value for s in DEAD_LETTERS.collect()[0].samples if s.name.endswith("_total"))


def _safe_count(engine) -> int:
    try:
        return count(engine, "SELECT count(*) FROM telemetry")
    except Exception:  # noqa: BLE001 - the database is still starting
        return -1
