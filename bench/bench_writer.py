"""Writer and query benchmark on real Kafka + PostgreSQL (started with cloud.nativestack unless given).

    python bench/bench_writer.py                 # full size: 1,000 tenants, 10,000 devices, 10 M rows
    python bench/bench_writer.py --quick         # a smaller run to check the bench itself

Measures
  1. ingest: rows/s from Kafka into PostgreSQL (a backlog drained by one writer), then p50/p99 latency
     "Kafka record timestamp -> database commit" at a steady produce rate;
  2. queries with >= 10 M telemetry rows (loaded with COPY, bypassing the writer) and their one-minute roll-ups:
     "latest 500 readings of one device" and "24 h of one-minute roll-ups of one device" (cloud.db.repo).

Prints a table and, as the LAST line, one JSON object with the figures and os.cpu_count().
Use IOT_DATABASE_URL / IOT_KAFKA_BOOTSTRAP to run against existing services instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud import db, schema  # noqa: E402
from cloud import settings as settings_mod  # noqa: E402
from cloud.bus.kafka import KafkaBus  # noqa: E402
from cloud.cache import MemoryCache  # noqa: E402
from cloud.db import maintenance, repo  # noqa: E402
from cloud.passwords import hash_device_password  # noqa: E402
from cloud.writer import Writer  # noqa: E402

log = logging.getLogger("bench")


class TimedWriter(Writer):
    """Records the exact per-record lag (bus timestamp -> after the database commit) of every batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lags: list[float] = []
        self.stored = 0
        self.first_batch: float | None = None  # the consumer group join is not part of the throughput

    profile_path: str | None = None

    def run(self, stop):
        if not self.profile_path:
            return super().run(stop)
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            return super().run(stop)
        finally:
            profiler.disable()
            profiler.dump_stats(self.profile_path)
            log.info("writer profile written to %s", self.profile_path)

    def process(self, records, stop=None, **kwargs):
        if self.first_batch is None:
            self.first_batch = time.monotonic()
        ok = super().process(records, stop, **kwargs)
        if ok:
            now = time.time()
            self.lags.extend(now - r.timestamp_ms / 1000 for r in records if r.timestamp_ms)
            self.stored += len(records)
        return ok


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def provision_bulk(engine, tenants: int, devices_per_tenant: int) -> list[tuple[int, str]]:
    """Tenants and devices inserted in bulk (one shared credential hash: hashing 10,000 passwords is not what
    this bench measures)."""
    hashed = hash_device_password("bench")
    now = datetime.now(timezone.utc)
    out = []
    with engine.begin() as conn:
        raw = conn.connection.dbapi_connection
        with raw.cursor() as cur:
            with cur.copy("COPY tenants (id, name, retention_days, created_at) FROM STDIN") as copy:
                for t in range(1, tenants + 1):
                    copy.write_row((t, f"tenant-{t:04d}", 30, now))
            cur.execute("SELECT setval('tenants_id_seq', %s)", (tenants,))
            with cur.copy("COPY devices (id, tenant_id, name, mqtt_username, password_hash, status, created_at) "
                          "FROM STDIN") as copy:
                for t in range(1, tenants + 1):
                    for d in range(devices_per_tenant):
                        device = f"t{t:04d}-d{d:02d}"
                        copy.write_row((device, t, device, device, hashed, "online", now))
                        out.append((t, device))
    return out


def bench_ingest(bootstrap: str, engine, devices: list[tuple[int, str]], backlog: int, rate: int,
                 seconds: float, profile: str | None = None) -> dict:
    suffix = uuid.uuid4().hex[:6]
    env = {f"IOT_TOPIC_{n.upper()}": f"bench-{n}-{suffix}" for n in
           ("telemetry", "status", "acks", "alarms", "control", "command_status", "deadletter")}
    settings = settings_mod.load({**env, "IOT_KAFKA_BOOTSTRAP": bootstrap})
    bus = KafkaBus(bootstrap)
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(t, num_partitions=6, replication_factor=1)
                                    for t in settings.topics.all()]).values():
        fut.result(30)
    time.sleep(1)
    producer = bus.producer("bench")
    now = int(time.time() * 1000)
    seqs = {d: 0 for _, d in devices}
    ids = [d for _, d in devices]

    def produce(n: int, paced: float | None = None) -> None:
        started = time.monotonic()
        for i in range(n):
            device = ids[i % len(ids)]
            seqs[device] += 1
            producer.produce(settings.topics.telemetry, device, schema.Telemetry(
                device, 1, seqs[device], int(time.time() * 1000) if paced else now + seqs[device],
                21.0 + (i % 50) / 10, 45.0, 1000.0, -60, up=seqs[device]).to_json())
            if paced and i % 100 == 0:
                ahead = started + i / paced - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
                producer.poll(0)
        producer.flush(60)

    log.info("producing a backlog of %d readings", backlog)
    produce(backlog)
    writer = TimedWriter(settings, bus, engine, MemoryCache(), retention=False)
    writer.profile_path = profile
    stop = threading.Event()
    thread = threading.Thread(target=writer.run, args=(stop,), daemon=True)
    started = time.monotonic()
    thread.start()
    while writer.stored < backlog:
        time.sleep(0.05)
        if time.monotonic() - started > 600:
            raise RuntimeError("backlog not drained in 10 minutes")
    drain_s = time.monotonic() - (writer.first_batch or started)
    log.info("drained %d in %.1f s", backlog, drain_s)
    writer.lags.clear()
    steady = int(rate * seconds)
    before = writer.stored
    produce(steady, paced=rate)
    deadline = time.monotonic() + 60
    while writer.stored < before + steady and time.monotonic() < deadline:
        time.sleep(0.05)
    lags = list(writer.lags)
    stop.set()
    thread.join(30)
    return {"backlog_rows": backlog, "ingest_rows_per_s": backlog / drain_s, "steady_rate": rate,
            "steady_rows": len(lags), "lag_p50_ms": percentile(lags, 50) * 1000,
            "lag_p99_ms": percentile(lags, 99) * 1000, "lag_max_ms": max(lags) * 1000 if lags else None}


def load_rows(engine, devices: list[tuple[int, str]], per_device: int, step_s: int, end: datetime) -> float:
    """per_device readings per device every step_s seconds up to ``end``, with COPY. Returns seconds taken."""
    start = end - timedelta(seconds=step_s * per_device)
    maintenance.create_partitions(engine, {(start + timedelta(days=d)).date()
                                           for d in range((end - start).days + 2)})
    started = time.monotonic()
    with engine.begin() as conn:
        raw = conn.connection.dbapi_connection
        with raw.cursor() as cur:
            with cur.copy("COPY telemetry (device_id, boot, seq, tenant_id, ts, received_at, t, h, p, rssi, up, "
                          "ts_estimated) FROM STDIN") as copy:
                rnd = random.Random(1)
                for tenant, device in devices:
                    offset = rnd.randrange(step_s)
                    for seq in range(per_device):
                        ts = start + timedelta(seconds=seq * step_s + offset)
                        copy.write_row((device, 1, seq, tenant, ts, ts, 20 + (seq % 100) / 10, 40.0 + seq % 20,
                                        1000.0, -60, seq * step_s, False))
    return time.monotonic() - started


def time_query(fn, samples: int) -> dict:
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": statistics.median(times), "p99_ms": percentile(times, 99), "mean_ms": statistics.fmean(times)}


def bench_queries(engine, devices: list[tuple[int, str]], end: datetime, samples: int, per_device: int) -> dict:
    factory = db.session_factory(engine)
    rnd = random.Random(7)
    with factory() as s:
        # warm-up
        tenant, device = devices[0]
        repo.latest_readings(s, tenant, device, 500)

        def latest():
            t, d = rnd.choice(devices)
            rows = repo.latest_readings(s, t, d, 500)
            assert len(rows) == min(500, per_device), len(rows)

        def minutes():
            t, d = rnd.choice(devices)
            result = repo.history(s, t, d, end - timedelta(hours=24), end, "1m")
            assert result["points"], "no roll-ups"

        return {"latest_500": time_query(latest, samples), "rollup_1m_24h": time_query(minutes, samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (checks the bench, not the system)")
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--devices-per-tenant", type=int, default=10)
    parser.add_argument("--rows-per-device", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=5000, help="steady produce rate for the latency figure")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--profile", metavar="FILE", help="cProfile the writer thread into FILE (pstats format)")
    args = parser.parse_args()
    if args.quick:  # explicitly given sizes win over the quick defaults
        given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
        for name, value in (("tenants", 50), ("rows_per_device", 100), ("backlog", 20_000), ("seconds", 3),
                            ("samples", 20)):
            if "--" + name.replace("_", "-") not in given:
                setattr(args, name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("cloud").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    services = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    url = os.environ.get("IOT_DATABASE_URL")
    bootstrap = os.environ.get("IOT_KAFKA_BOOTSTRAP")
    try:
        from cloud import nativestack

        if not url or url.startswith("sqlite"):
            log.info("starting PostgreSQL (fsync on)")
            pg = nativestack.Postgres(workdir / "pg", fsync=True,
                                      settings={"shared_buffers": "256MB", "max_wal_size": "4GB"}).start()
            services.append(pg)
            url = pg.url
        if not bootstrap:
            log.info("starting Kafka")
            kafka = nativestack.Kafka(workdir / "kafka").start()
            services.append(kafka)
            bootstrap = kafka.bootstrap
        db.downgrade(url, "base")
        db.upgrade(url)
        engine = db.make_engine(url)
        devices = provision_bulk(engine, args.tenants, args.devices_per_tenant)
        log.info("provisioned %d tenants, %d devices", args.tenants, len(devices))

        ingest = bench_ingest(bootstrap, engine, devices, args.backlog, args.rate, args.seconds,
                              profile=args.profile)

        # queries: reset the readings, then bulk-load the big table and its roll-ups
        with engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE telemetry, telemetry_1m, telemetry_1h")
        end = datetime.now(timezone.utc).replace(second=0, microsecond=0)
        step_s = max(60, int(25 * 3600 / args.rows_per_device))  # ~25 h of data: a full day of roll-ups
        log.info("COPY %d rows", len(devices) * args.rows_per_device)
        copy_s = load_rows(engine, devices, args.rows_per_device, step_s, end)
        total_rows = len(devices) * args.rows_per_device
        log.info("loaded in %.1f s; building roll-ups", copy_s)
        t0 = time.monotonic()
        maintenance.refresh_rollups(engine, end - timedelta(seconds=step_s * args.rows_per_device + 3600),
                                    end + timedelta(hours=1))
        rollup_s = time.monotonic() - t0
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE telemetry")
            conn.exec_driver_sql("ANALYZE telemetry_1m")
            rollup_rows = conn.exec_driver_sql("SELECT count(*) FROM telemetry_1m").scalar()
        queries = bench_queries(engine, devices, end, args.samples, args.rows_per_device)
        engine.dispose()
    finally:
        for service in reversed(services):
            service.close()

    result = {
        "cpus": os.cpu_count(),
        "tenants": args.tenants, "devices": len(devices),
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in ingest.items()},
        "query_rows": total_rows, "rollup_1m_rows": rollup_rows,
        "copy_rows_per_s": round(total_rows / copy_s), "rollup_build_s": round(rollup_s, 1),
        "latest_500_p50_ms": round(queries["latest_500"]["p50_ms"], 2),
        "latest_500_p99_ms": round(queries["latest_500"]["p99_ms"], 2),
        "rollup_1m_24h_p50_ms": round(queries["rollup_1m_24h"]["p50_ms"], 2),
        "rollup_1m_24h_p99_ms": round(queries["rollup_1m_24h"]["p99_ms"], 2),
        "query_samples": args.samples,
    }
    print()
    print(f"writer benchmark ({os.cpu_count()} CPUs; Kafka, PostgreSQL and the writer on the same machine)")
    print("-" * 78)
    rows = [
        ("ingest, Kafka backlog -> PostgreSQL", f"{result['ingest_rows_per_s']:,.0f} rows/s",
         f"{args.backlog:,} rows, one writer"),
        ("latency Kafka -> committed, p50", f"{result['lag_p50_ms']:.0f} ms", f"at {args.rate:,} msg/s steady"),
        ("latency Kafka -> committed, p99", f"{result['lag_p99_ms']:.0f} ms", f"{result['steady_rows']:,} rows"),
        ("COPY bulk load", f"{result['copy_rows_per_s']:,} rows/s", f"{total_rows:,} rows"),
        ("latest 500 readings of one device, p50", f"{result['latest_500_p50_ms']:.2f} ms",
         f"{len(devices):,} devices, {args.tenants:,} tenants"),
        ("latest 500 readings of one device, p99", f"{result['latest_500_p99_ms']:.2f} ms",
         f"{args.samples} random devices"),
        ("24 h of 1-minute roll-ups, p50", f"{result['rollup_1m_24h_p50_ms']:.2f} ms",
         f"{rollup_rows:,} roll-up rows"),
        ("24 h of 1-minute roll-ups, p99", f"{result['rollup_1m_24h_p99_ms']:.2f} ms", ""),
    ]
    for name, value, note in rows:
        print(f"{name:<42} {value:>16}   {note}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
