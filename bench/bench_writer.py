"""Writer and query benchmark on real Kafka, PostgreSQL and Redis (started with cloud.nativestack unless given).

    python bench/bench_writer.py                 # full size: 1,000 tenants, 10,000 devices, 10 M rows
    python bench/bench_writer.py --quick         # a smaller run to check the bench itself
    python bench/bench_writer.py --keep DIR      # keep PostgreSQL (and its 10 M-row dataset) in DIR and reuse it
    python bench/bench_writer.py --writers 2     # two writer processes in one consumer group (make bench-writer)

Measures
  1. ingest: rows/s from Kafka into PostgreSQL (a backlog drained by the writers, which keep the latest values in
     Redis as deployed, after a warm-up of one reading per device; the roll-up of the backlog is included), then
     p50/p99 latency "Kafka record timestamp -> database commit" at a steady produce rate;
  2. queries with >= 10 M telemetry rows (generated inside PostgreSQL, bypassing the writer, interleaved in time
     order across devices as the writer would store them) and their roll-ups: "latest 500 readings of one
     device" and "24 h of one-minute roll-ups of one device", through the functions the web tier calls
     (cloud.db.repo.latest_readings / history), one session per query as in a web request.

The dataset is built once per data directory: with --keep DIR a later run with the same sizes and the same schema
revision reuses it (the queries run first, on the dataset as built; the ingest then adds its readings with a boot
number of its own, so it never collides with the dataset's keys).

Prints a table and, as the LAST line, one JSON object with the figures and os.cpu_count().
Use IOT_DATABASE_URL / IOT_KAFKA_BOOTSTRAP / IOT_REDIS_URL to run against existing services instead
(IOT_REDIS_URL= empty: the in-process cache, as the measurements before the Redis one were taken).
"""

from __future__ import annotations

import argparse
import contextlib
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

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud import db, nativestack, schema  # noqa: E402
from cloud import settings as settings_mod  # noqa: E402
from cloud.bus.kafka import KafkaBus  # noqa: E402
from cloud.cache import cache_from_settings  # noqa: E402
from cloud.db import maintenance, repo  # noqa: E402
from cloud.passwords import hash_device_password  # noqa: E402
from cloud.service import freeze_startup_heap  # noqa: E402
from cloud.writer import DUPLICATES, ENGINE_OPTIONS, LATE_ROLLUPS, Writer  # noqa: E402

log = logging.getLogger("bench")


class TimedWriter(Writer):
    """Records the exact per-record lag (bus timestamp -> after the database commit) of every batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lags: list[float] = []
        self.stored = 0
        self.first_batch: float | None = None  # the consumer group join is not part of the throughput
        self.thread_idents: list[int] = []  # the writer's threads: run() (collects and parses), store, cache

    profile_path: str | None = None

    def run(self, stop):
        self.thread_idents.append(threading.get_ident())
        with self._profiled(""):
            return super().run(stop)

    def _store_stage(self, *args, **kwargs):  # the writer's second thread: stores batches
        self.thread_idents.append(threading.get_ident())
        with self._profiled(".store"):
            return super()._store_stage(*args, **kwargs)

    def _cache_stage(self, *args, **kwargs):  # the third: latest values and live events into the cache
        self.thread_idents.append(threading.get_ident())
        with self._profiled(".cache"):
            return super()._cache_stage(*args, **kwargs)

    @contextlib.contextmanager
    def _profiled(self, suffix: str):
        if not self.profile_path:
            yield
            return
        import cProfile

        profiler = cProfile.Profile(time.thread_time)  # CPU time of the thread: waits (locks, sockets) do not count
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            profiler.dump_stats(self.profile_path + suffix)
            log.info("writer profile written to %s", self.profile_path + suffix)

    cpu_first: float | None = None  # the writer's CPU time (all of its threads) before its first batch
    cpu_last: float = 0.0  # ... and after its latest one

    def _cpu(self) -> float:
        """CPU seconds of the writer's threads (all of them: process() runs in the store thread)."""
        total = 0.0
        for ident in self.thread_idents:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(ident))
            except (OSError, ValueError):  # a thread that has ended
                pass
        return total

    def process(self, records, stop=None, **kwargs):
        if self.first_batch is None:
            self.first_batch = time.monotonic()
            self.cpu_first = self._cpu()
        ok = super().process(records, stop, **kwargs)
        self.cpu_last = self._cpu()
        if ok:
            now = time.time()
            self.lags.extend(now - r.timestamp_ms / 1000 for r in records if r.timestamp_ms)
            self.stored += len(records)
        return ok


class LocalWriter:
    """The writer on a thread of this process (what --profile needs, and what each of ProcessWriters runs)."""

    def __init__(self, settings, bus, engine, cache, profile: str | None = None):
        self.writer = TimedWriter(settings, bus, engine, cache, retention=False)
        self.writer.profile_path = profile
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.writer.run, args=(self._stop,), daemon=True)
        self._late_before = LATE_ROLLUPS._value.get()  # process-wide: an earlier writer in this process counted too

    def start(self) -> None:
        freeze_startup_heap()  # as cloud.service.serve does before a service runs
        self._thread.start()

    def status(self) -> list[tuple[int, float | None, float, float]]:
        """Per writer: (records stored, monotonic time of its first batch, CPU seconds since its first batch,
        late readings it rolled up itself)."""
        w = self.writer
        return [(w.stored, w.first_batch, w.cpu_last - (w.cpu_first or 0.0),
                 LATE_ROLLUPS._value.get() - self._late_before)]

    def clear_lags(self) -> None:
        self.writer.lags.clear()

    def stop(self) -> list[float]:
        lags = list(self.writer.lags)
        self._stop.set()
        self._thread.join(30)
        return lags


def _writer_process(env: dict, url: str, conn) -> None:
    """A writer process of ProcessWriters: a LocalWriter that answers the parent's requests on ``conn``."""
    logging.basicConfig(level=logging.WARNING)
    settings = settings_mod.load(env)
    local = LocalWriter(settings, KafkaBus(settings.kafka_bootstrap), db.make_engine(url, **ENGINE_OPTIONS),
                        cache_from_settings(settings))
    local.start()
    while True:
        request = conn.recv()
        if request == "status":
            conn.send(local.status()[0])
        elif request == "clear":
            local.clear_lags()
            conn.send(True)
        else:  # "stop"
            lags = local.stop()
            print(f"writer process {os.getpid()}: stored {local.writer.stored}, duplicates skipped "
                  f"{DUPLICATES._value.get():.0f}", file=sys.stderr)
            conn.send(lags)
            return


class ProcessWriters:
    """N writer processes in one consumer group, as N ``python -m cloud writer`` would run (the partitions are
    split between them; each has its own interpreter, so the second core runs Python too)."""

    def __init__(self, n: int, env: dict, url: str):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of this process's Kafka and database clients
        self._conns = []
        self._procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            self._conns.append(parent)
            self._procs.append(ctx.Process(target=_writer_process, args=(env, url, child), daemon=True))

    def start(self) -> None:
        for proc in self._procs:
            proc.start()

    def _ask(self, request: str) -> list:
        for conn in self._conns:
            conn.send(request)
        return [conn.recv() for conn in self._conns]

    def status(self) -> list[tuple[int, float | None, float, float]]:
        return self._ask("status")

    def clear_lags(self) -> None:
        self._ask("clear")

    def stop(self) -> list[float]:
        lags = [lag for part in self._ask("stop") for lag in part]
        for proc in self._procs:
            proc.join(10)
        return lags


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


def process_tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its children that are still running (PostgreSQL's
    backends are children of the postmaster). 0.0 if unknown."""
    return sum(cpu for _, cpu in process_tree_cpu_by_kind(pid).values())


def process_tree_cpu_by_kind(pid: int | None) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds) of ``pid`` and its children: kind from the process title ("backend" for client
    sessions, else e.g. "walwriter", "checkpointer", "autovacuum worker")."""
    if not pid:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            kind = title.removeprefix("postgres: ").strip() if title.startswith("postgres: ") else "postmaster"
            if "127.0.0.1(" in kind or "[local]" in kind:
                kind = "backend"
            out[int(entry.name)] = (kind, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_kind(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per process kind between two snapshots (processes started meanwhile count in full; those that
    ended meanwhile are lost, so short-lived autovacuum workers may be undercounted)."""
    result: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        result[kind] = result.get(kind, 0.0) + cpu - (before.get(pid, (kind, 0.0))[1])
    return result


def bench_ingest(bootstrap: str, engine, devices: list[tuple[int, str]], backlog: int, rate: int,
                 seconds: float, profile: str | None = None, boot: int = 1, pg_pid: int | None = None,
                 writers: int = 1, url: str = "", redis_url: str = "", kafka_pid: int | None = None,
                 redis_pid: int | None = None) -> dict:
    suffix = uuid.uuid4().hex[:6]
    env = {f"IOT_TOPIC_{n.upper()}": f"bench-{n}-{suffix}" for n in
           ("telemetry", "status", "acks", "alarms", "control", "command_status", "deadletter")}
    # the writer's batching comes from IOT_WRITER_BATCH_SIZE / IOT_WRITER_BATCH_MS as deployed (defaults otherwise)
    # the latest values go to Redis as deployed (IOT_REDIS_URL; empty: the in-process cache)
    env = {**env, "IOT_KAFKA_BOOTSTRAP": bootstrap, "IOT_REDIS_URL": redis_url,
           **{k: os.environ[k] for k in ("IOT_WRITER_BATCH_SIZE", "IOT_WRITER_BATCH_MS") if os.environ.get(k)}}
    settings = settings_mod.load(env)
    log.info("writer batches: %d records / %d ms", settings.writer_batch_size, settings.writer_batch_ms)
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

    def produce(n: int, paced: float | None = None, ts: int | None = None) -> None:
        started = time.monotonic()
        for i in range(n):
            device = ids[i % len(ids)]
            seqs[device] += 1
            seq = seqs[device]
            # the bytes schema.Telemetry(...).to_json() makes, built directly (asdict() made producing the
            # backlog take longer than storing it)
            producer.produce(settings.topics.telemetry, device, orjson.dumps({
                "v": schema.VERSION, "id": device, "boot": boot, "seq": seq,
                "ts": ts or (int(time.time() * 1000) if paced else now + seq), "t": 21.0 + (i % 50) / 10, "h": 45.0,
                "p": 1000.0, "rssi": -60, "up": seq}))
            if paced and i % 100 == 0:
                ahead = started + i / paced - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
                producer.poll(0)
        producer.flush(60)

    def writer_group() -> LocalWriter | ProcessWriters:
        if writers == 1:
            return LocalWriter(settings, bus, db.make_engine(url, **ENGINE_OPTIONS), cache_from_settings(settings),
                               profile)
        return ProcessWriters(writers, env, url)

    def stored_by(group) -> int:
        return sum(n for n, *_ in group.status())

    def wait_stored(group, target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while stored_by(group) < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # warm-up: one reading per device in the previous minute, stored by the writers and rolled up, as in a system
    # that has been running: the pages a sustained ingest keeps in memory (each device's newest index pages of the
    # telemetry and roll-up tables, its device rows, its Redis hash) are then in memory when the backlog is timed.
    # Without it the roll-up of the backlog read 15,000 index pages from disk: 1.4-2.0 s instead of 0.8 s.
    # A reading below the roll-up watermark is "late" (rolled up in the writer's own transaction, a slower path):
    # a previous run moved the mark up to a minute ahead of its own readings, so wait until it is behind ours.
    warm_ts = now // 60_000 * 60_000 - 30_000
    mark = maintenance.rollup_watermark(engine)
    if mark is not None and mark.timestamp() * 1000 > now + 120_000:
        raise RuntimeError(f"the roll-up watermark is at {mark}, more than 2 minutes ahead of the clock (a "
                           "refresh_rollups into the future?): readings stamped now would all be late ones")
    while mark is not None and mark.timestamp() * 1000 > warm_ts:
        log.info("waiting for the roll-up watermark of an earlier run (%s) to be behind the warm-up", mark)
        time.sleep(5)
        now = int(time.time() * 1000)
        warm_ts = now // 60_000 * 60_000 - 30_000
    log.info("warm-up: one reading per device, stored and rolled up")
    group = writer_group()
    group.start()
    produce(len(ids), ts=warm_ts)
    if not wait_stored(group, len(ids), 120):
        raise RuntimeError("warm-up not stored in 2 minutes")
    group.stop()
    maintenance.advance_rollups(engine, until=datetime.fromtimestamp(now // 60_000 * 60, timezone.utc))
    # the backlog's readings are stamped from now on; the writers' own roll-up job claims a minute 15 s after its
    # end, so start early in a minute: it then cannot claim the backlog's minute during the drain (its readings
    # not stored yet would become late ones, the writer's slower path)
    now = int(time.time() * 1000)
    if now % 60_000 > 20_000:
        time.sleep((60_000 - now % 60_000) / 1000 + 0.5)
        now = int(time.time() * 1000)
    log.info("producing a backlog of %d readings", backlog)
    produce(backlog)
    group = writer_group()
    started = time.monotonic()
    pg_kinds_before = process_tree_cpu_by_kind(pg_pid)
    broker_cpu_before = {name: process_tree_cpu(pid) for name, pid in (("kafka", kafka_pid), ("redis", redis_pid))}
    group.start()

    def late() -> float:
        return sum(status[3] for status in group.status())

    if not wait_stored(group, backlog, 600):
        raise RuntimeError("backlog not drained in 10 minutes")
    status = group.status()
    first = min((f for _, f, _, _ in status if f is not None), default=started)
    drain_s = time.monotonic() - first
    writer_cpu_s = sum(cpu for _, _, cpu, _ in status)
    # the roll-ups of the backlog are part of the work: what the writer's own roll-up job has not counted yet
    # is counted now, and the throughput figure includes that time
    t0 = time.monotonic()
    # up to just past the backlog's newest reading (now + its largest seq): a mark further ahead (it was now + 60 s)
    # made every reading of the steady phase below it, i.e. late, and timed the late path instead
    rolled = maintenance.advance_rollups(engine, until=datetime.fromtimestamp((now + max(seqs.values()) + 1) / 1000,
                                                                              timezone.utc))
    rollup_s = time.monotonic() - t0
    pg_kinds = cpu_by_kind(pg_kinds_before, process_tree_cpu_by_kind(pg_pid))
    pg_cpu_s = sum(pg_kinds.values())  # includes the group join before the first batch
    # the rest of the machine's work per row: the Kafka broker serving the writers' fetches, Redis running the
    # cache scripts (both None when they run elsewhere)
    broker_cpu_s = {name: process_tree_cpu(pid) - broker_cpu_before[name] if pid else None
                    for name, pid in (("kafka", kafka_pid), ("redis", redis_pid))}
    late_rows = late()
    drain_load = os.getloadavg()[0]
    log.info("drained %d in %.1f s; roll-up job for the remaining %d readings %.1f s", backlog, drain_s, rolled,
             rollup_s)
    group.clear_lags()
    steady = int(rate * seconds)
    before = stored_by(group)
    produce(steady, paced=rate)
    wait_stored(group, before + steady, 60)  # what is not stored by then is missing from the latency figures
    steady_late = late() - late_rows
    lags = group.stop()
    return {"writers": writers, "backlog_rows": backlog, "ingest_rows_per_s": backlog / (drain_s + rollup_s),
            "ingest_rows_only_per_s": backlog / drain_s, "rollup_catchup_s": rollup_s,
            # CPU per stored row, independent of what else the shared machine is running: the writer thread
            # (parse, batching, driver) and PostgreSQL (all its processes, the roll-up job included)
            "writer_cpu_us_per_row": writer_cpu_s / backlog * 1e6,
            "pg_cpu_us_per_row": pg_cpu_s / backlog * 1e6 if pg_pid else None,
            "pg_cpu_us_per_row_by_process": {k: round(v / backlog * 1e6, 2) for k, v in sorted(pg_kinds.items())
                                             if v > 0},
            **{f"{name}_cpu_us_per_row": cpu_s / backlog * 1e6 if cpu_s is not None else None
               for name, cpu_s in broker_cpu_s.items()},
            "late_rows": int(late_rows), "steady_late_rows": int(steady_late), "drain_load_average_1m": round(drain_load, 2),
            "steady_rate": rate,
            "steady_rows": len(lags), "lag_p50_ms": percentile(lags, 50) * 1000,
            "lag_p99_ms": percentile(lags, 99) * 1000, "lag_max_ms": max(lags) * 1000 if lags else None}


def load_rows(engine, per_device: int, step_s: int, end: datetime) -> float:
    """per_device readings of every provisioned device, one every step_s seconds (a per-device phase) up to
    ``end``, generated by PostgreSQL itself (10 M rows through Python's COPY took minutes). Rows are inserted in
    time order, interleaved across devices, as the writer stores them. Returns seconds taken."""
    start = end - timedelta(seconds=step_s * per_device)
    maintenance.create_partitions(engine, {(start + timedelta(days=d)).date()
                                           for d in range((end - start).days + 2)})
    started = time.monotonic()
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")  # bulk load only; the writer never does this
        conn.exec_driver_sql(
            "INSERT INTO telemetry (device_id, boot, seq, tenant_id, ts, received_at, t, h, p, rssi, up, "
            "ts_estimated) "
            "SELECT d.id, 1, s.seq, d.tenant_id, %(start)s + make_interval(secs => s.seq * %(step)s + d.phase), "
            "%(start)s + make_interval(secs => s.seq * %(step)s + d.phase), 20 + (s.seq %% 100) / 10.0, "
            "40.0 + s.seq %% 20, 1000.0, -60, s.seq * %(step)s, false "
            "FROM generate_series(0, %(n)s - 1) AS s(seq) "
            "CROSS JOIN LATERAL (SELECT id, tenant_id, (hashtext(id) & 2147483647) %% %(step)s AS phase "
            "FROM devices ORDER BY id) AS d",
            {"start": start, "step": step_s, "n": per_device})
    return time.monotonic() - started


def time_query(fn, samples: int) -> dict:
    """Wall time per call, and the calling thread's CPU time per call (this process's share only: the shared
    machine's other load stretches the wall time, not the CPU time)."""
    times, cpu = [], []
    for _ in range(samples):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.thread_time() - c0) * 1000)
    return {"p50_ms": statistics.median(times), "p99_ms": percentile(times, 99), "mean_ms": statistics.fmean(times),
            "client_cpu_p50_ms": statistics.median(cpu), "client_cpu_p99_ms": percentile(cpu, 99)}


def bench_queries(engine, devices: list[tuple[int, str]], end: datetime, samples: int, per_device: int) -> dict:
    """Each sample a new session (a pooled connection), as one web request: the repo functions the web tier
    calls, rows turned into Python objects included."""
    factory = db.session_factory(engine)
    rnd = random.Random(7)
    with factory() as s:  # warm-up (connection pool, statement cache)
        tenant, device = devices[0]
        repo.latest_readings(s, tenant, device, 500)
        repo.history(s, tenant, device, end - timedelta(hours=24), end, "1m")

    def latest():
        t, d = rnd.choice(devices)
        with factory() as s:
            rows = repo.latest_readings(s, t, d, 500)
        assert len(rows) == min(500, per_device), len(rows)

    def minutes():
        t, d = rnd.choice(devices)
        with factory() as s:
            result = repo.history(s, t, d, end - timedelta(hours=24), end, "1m")
        assert result["points"], "no roll-ups"

    load_before = os.getloadavg()[0]
    result = {"latest_500": time_query(latest, samples), "rollup_1m_24h": time_query(minutes, samples)}
    result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def explain_queries(engine, devices: list[tuple[int, str]], end: datetime, count: int) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of the statements behind latest_readings and history("1m") for ``count``
    random devices not timed before (as cold as the timed ones), printed to stderr: where the time goes
    (planning, shared-buffer hits and reads, heap fetches of the index-only scan)."""
    rnd = random.Random(99)
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    first = datetime.fromtimestamp(int((end - timedelta(hours=24)).timestamp()) // 60 * 60, timezone.utc)
    with engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()
        for _ in range(count):
            tenant, device = rnd.choice(devices)
            for name, sql, params in (
                    ("latest 500", repo._PG_LATEST_SINCE, (tenant, device, today - timedelta(days=1), 500)),
                    ("24 h of 1-minute roll-ups", repo._PG_ROLLUP["1m"], (tenant, device, first, end,
                                                                          repo.HISTORY_MAX_POINTS))):
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                print(f"--- {name}, device {device}", file=sys.stderr)
                print("\n".join(row[0] for row in cursor.fetchall()), file=sys.stderr)
        conn.rollback()


def print_statements(engine, rows: int) -> None:
    """pg_stat_statements since the reset before the ingest, by total execution time, per stored row."""
    with engine.connect() as conn:
        found = conn.exec_driver_sql(
            "SELECT calls, total_exec_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 150) "
            "FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15").all()
    print(f"--- pg_stat_statements, ingest of {rows:,} rows (backlog + steady): exec us per stored row, calls, rows",
          file=sys.stderr)
    for calls, total_ms, n, query in found:
        print(f"{total_ms * 1000 / rows:8.2f} us {calls:7d} {n:9d}  {query}", file=sys.stderr)


DATASET_TABLE = "bench_writer_dataset"


def dataset_meta(engine) -> dict | None:
    with engine.connect() as conn:
        if conn.exec_driver_sql(f"SELECT to_regclass('{DATASET_TABLE}')").scalar() is None:
            return None
        row = conn.exec_driver_sql(f"SELECT meta FROM {DATASET_TABLE}").first()
    return json.loads(row[0]) if row else None


def vacuum_analyze(engine) -> None:
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("telemetry", "telemetry_1m", "telemetry_1h", "devices"):
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")


def build_dataset(url: str, engine, args, want: dict) -> dict:
    """Schema from empty, tenants and devices, the telemetry rows and their roll-ups; VACUUM ANALYZE as
    autovacuum would after a while. Records what was built in DATASET_TABLE."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {DATASET_TABLE}")
    db.downgrade(url, "base")
    db.upgrade(url)
    devices = provision_bulk(engine, args.tenants, args.devices_per_tenant)
    log.info("provisioned %d tenants, %d devices", args.tenants, len(devices))
    end = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    step_s = max(60, int(25 * 3600 / args.rows_per_device))  # ~25 h of data: a full day of roll-ups
    start = end - timedelta(seconds=step_s * args.rows_per_device)
    with engine.begin() as conn:  # no readings yet, so any mark is consistent: the job then rolls the load up
        conn.exec_driver_sql("UPDATE rollup_watermark SET done_until = %s", (start,))
    log.info("generating %d rows", len(devices) * args.rows_per_device)
    load_s = load_rows(engine, args.rows_per_device, step_s, end)
    log.info("loaded in %.1f s; building roll-ups with the roll-up job", load_s)
    t0 = time.monotonic()
    maintenance.advance_rollups(engine, until=end, step=timedelta(hours=6))
    rollup_s = time.monotonic() - t0
    log.info("roll-ups in %.1f s; VACUUM ANALYZE", rollup_s)
    vacuum_analyze(engine)
    meta = {**want, "end": end.isoformat(), "load_s": round(load_s, 1), "rollup_build_s": round(rollup_s, 1)}
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {DATASET_TABLE} (meta text)")
        conn.exec_driver_sql(f"INSERT INTO {DATASET_TABLE} VALUES (%s)", (json.dumps(meta),))
    return meta


# as deployed (make up, deploy/compose.yaml)
PG_SETTINGS = dict(nativestack.DURABLE_PG_SETTINGS)


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
    parser.add_argument("--profile", metavar="FILE", help="cProfile the writer into FILE (its batch loop), FILE.store and FILE.cache (its store and cache threads), pstats format; each thread's CPU time, read per call, slows the writer several-fold: read shares, not rates")
    parser.add_argument("--keep", metavar="DIR",
                        help="PostgreSQL's data directory lives in DIR and is kept; a later run with the same sizes "
                             "and schema revision reuses its dataset instead of building it again")
    parser.add_argument("--shared-buffers", default=PG_SETTINGS["shared_buffers"],
                        help="PostgreSQL shared_buffers for this run (default %(default)s)")
    parser.add_argument("--writers", type=int, default=1,
                        help="writer processes in the consumer group (default 1: the writer on a thread of this "
                             "process; more: that many processes, as `python -m cloud writer` scales)")
    parser.add_argument("--skip-ingest", action="store_true", help="only the queries")
    parser.add_argument("--skip-queries", action="store_true", help="only the ingest")
    parser.add_argument("--pg-statements", action="store_true",
                        help="load pg_stat_statements and print, to stderr, the statements of the ingest by total time "
                             "(the share of each part of the write path; PostgreSQL started here only)")
    parser.add_argument("--explain", type=int, default=0, metavar="N",
                        help="after the timed queries, print EXPLAIN (ANALYZE, BUFFERS) of both for N other random "
                             "devices to stderr (PostgreSQL)")
    args = parser.parse_args()
    if args.quick:  # explicitly given sizes win over the quick defaults
        given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
        for name, value in (("tenants", 50), ("rows_per_device", 100), ("backlog", 20_000), ("seconds", 3),
                            ("samples", 20)):
            if "--" + name.replace("_", "-") not in given:
                setattr(args, name, value)
    if args.profile and args.writers != 1:
        parser.error("--profile profiles the in-process writer: use it with --writers 1")
    PG_SETTINGS["shared_buffers"] = args.shared_buffers
    if args.pg_statements:
        PG_SETTINGS.update({"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "all",
                            "pg_stat_statements.track_utility": "on"})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("cloud").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    services = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    url = os.environ.get("IOT_DATABASE_URL")
    bootstrap = os.environ.get("IOT_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("IOT_REDIS_URL")
    ingest: dict = {}
    queries: dict = {}
    pg_pid = kafka_pid = redis_pid = None
    try:
        if not url or url.startswith("sqlite"):
            pg_dir = workdir / "pg"
            if args.keep:
                pg_dir = Path(args.keep).resolve() / "pg"
                pg_dir.mkdir(parents=True, exist_ok=True)
                for d in (pg_dir.parent, pg_dir):  # the postgres OS user must reach it (else a private temp dir)
                    d.chmod(0o755)
            log.info("starting PostgreSQL (fsync on) in %s", pg_dir)
            pg = nativestack.Postgres(pg_dir, fsync=True, settings=PG_SETTINGS).start()
            services.append(pg)
            url = pg.url
            pg_pid = pg.postmaster_pid
        engine = db.make_engine(url)
        want = {"tenants": args.tenants, "devices_per_tenant": args.devices_per_tenant,
                "rows_per_device": args.rows_per_device, "revision": db.head()}
        meta = dataset_meta(engine)
        sizes = [k for k in want if k != "revision"]
        if meta and all(meta.get(k) == want[k] for k in sizes) and db.current(url) != db.head():
            # the same dataset on an older schema: upgraded by the migrations, as a deployment would be
            log.info("upgrading the kept dataset from revision %s to %s", db.current(url), db.head())
            t0 = time.monotonic()
            db.upgrade(url)
            vacuum_analyze(engine)
            meta = {**meta, "revision": db.head(), "upgrade_s": round(time.monotonic() - t0, 1)}
            log.info("upgraded in %.1f s", meta["upgrade_s"])
            with engine.begin() as conn:
                conn.exec_driver_sql(f"UPDATE {DATASET_TABLE} SET meta = %s", (json.dumps(meta),))
        if meta and {k: meta.get(k) for k in want} == want and db.current(url) == db.head():
            log.info("reusing the dataset built %s", meta["end"])
        else:
            meta = build_dataset(url, engine, args, want)
        end = datetime.fromisoformat(meta["end"])
        with engine.connect() as conn:
            devices = [(t, d) for d, t in conn.exec_driver_sql("SELECT id, tenant_id FROM devices ORDER BY id")]
            total_rows = conn.exec_driver_sql("SELECT count(*) FROM telemetry").scalar()
            rollup_rows = conn.exec_driver_sql("SELECT count(*) FROM telemetry_1m").scalar()
        if not args.skip_queries:
            queries = bench_queries(engine, devices, end, args.samples, args.rows_per_device)
            if args.explain:
                explain_queries(engine, devices, end, args.explain)
        if not args.skip_ingest:
            if not bootstrap:
                log.info("starting Kafka")
                # several writers: the group's first assignment waits for all of them (else the first one to join
                # takes every partition and the others' arrival moves them mid-drain)
                kafka = nativestack.Kafka(workdir / "kafka", properties={"group.initial.rebalance.delay.ms":
                                                                          3000 if args.writers > 1 else 0}).start()
                services.append(kafka)
                bootstrap = kafka.bootstrap
                kafka_pid = kafka.pid
            if redis_url is None:
                log.info("starting Redis")
                redis = nativestack.Redis(workdir / "redis").start()
                services.append(redis)
                redis_url = redis.url
                redis_pid = redis.pid
            boot = int(time.time()) % 2**31  # a boot of its own: never collides with the dataset or earlier runs
            if args.pg_statements:
                if pg_pid is None:
                    raise SystemExit("--pg-statements needs the PostgreSQL this bench starts")
                import psycopg

                with psycopg.connect(pg.admin_dsn.replace("dbname=postgres", f"dbname={pg.database}"),
                                     autocommit=True) as admin:
                    admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                    admin.execute("SELECT pg_stat_statements_reset()")
            ingest = bench_ingest(bootstrap, engine, devices, args.backlog, args.rate, args.seconds,
                                  profile=args.profile, boot=boot, pg_pid=pg_pid, writers=args.writers, url=url,
                                  redis_url=redis_url, kafka_pid=kafka_pid, redis_pid=redis_pid)
            if args.pg_statements:
                print_statements(engine, args.backlog + int(args.rate * args.seconds))
        engine.dispose()
    finally:
        for service in reversed(services):
            service.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)

    def q(name: str, key: str):
        return round(queries[name][key], 2) if queries else None

    result = {
        "cpus": os.cpu_count(),
        "tenants": args.tenants, "devices": len(devices),
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in ingest.items()},
        "query_rows": total_rows, "rollup_1m_rows": rollup_rows,
        "dataset_load_s": meta.get("load_s"), "rollup_build_s": meta.get("rollup_build_s"),
        "latest_500_p50_ms": q("latest_500", "p50_ms"),
        "latest_500_p99_ms": q("latest_500", "p99_ms"),
        "rollup_1m_24h_p50_ms": q("rollup_1m_24h", "p50_ms"),
        "rollup_1m_24h_p99_ms": q("rollup_1m_24h", "p99_ms"),
        "latest_500_client_cpu_p50_ms": q("latest_500", "client_cpu_p50_ms"),
        "latest_500_client_cpu_p99_ms": q("latest_500", "client_cpu_p99_ms"),
        "rollup_1m_24h_client_cpu_p50_ms": q("rollup_1m_24h", "client_cpu_p50_ms"),
        "rollup_1m_24h_client_cpu_p99_ms": q("rollup_1m_24h", "client_cpu_p99_ms"),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "query_load_average_1m": queries.get("load_average_1m"),  # at the start and the end of the query phase
        "query_samples": args.samples,
        "writer_batch_size": int(os.environ.get("IOT_WRITER_BATCH_SIZE") or settings_mod.Settings.writer_batch_size),
        "writer_batch_ms": int(os.environ.get("IOT_WRITER_BATCH_MS") or settings_mod.Settings.writer_batch_ms),
        "pg_settings": PG_SETTINGS,
    }

    def fmt(value, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    print()
    print(f"writer benchmark ({os.cpu_count()} CPUs; Kafka, PostgreSQL and the writer on the same machine)")
    print("-" * 78)
    rows = [
        ("ingest, Kafka backlog -> PostgreSQL", fmt(result.get("ingest_rows_per_s"), "{:,.0f} rows/s"),
         f"{args.backlog:,} rows, {'one writer' if args.writers == 1 else f'{args.writers} writer processes'}, "
         "roll-ups included"),
        ("writer CPU per row", fmt(result.get("writer_cpu_us_per_row"), "{:.1f} us"),
         fmt(result.get("ingest_rows_per_s") and 1e6 / result["writer_cpu_us_per_row"],
             "= {:,.0f} rows/s per writer core")),
        ("PostgreSQL CPU per row", fmt(result.get("pg_cpu_us_per_row"), "{:.1f} us"), "all backends, roll-ups included"),
        ("  by process", "", ", ".join(f"{k} {v}" for k, v in (result.get("pg_cpu_us_per_row_by_process") or {}).items())),
        ("Kafka broker / Redis CPU per row", fmt(result.get("kafka_cpu_us_per_row"), "{:.1f} us"),
         fmt(result.get("redis_cpu_us_per_row"), "Redis {:.1f} us")),
        ("  late readings (rolled up by the writer)", fmt(result.get("late_rows"), "{:,}"),
         fmt(result.get("drain_load_average_1m"), "load {:.1f} after the drain")),
        ("latency Kafka -> committed, p50", fmt(result.get("lag_p50_ms"), "{:.0f} ms"),
         f"at {args.rate:,} msg/s steady"),
        ("latency Kafka -> committed, p99", fmt(result.get("lag_p99_ms"), "{:.0f} ms"),
         fmt(result.get("steady_rows"), "{:,} rows")),
        ("latest 500 readings of one device, p50", fmt(result["latest_500_p50_ms"], "{:.2f} ms"),
         f"{len(devices):,} devices, {args.tenants:,} tenants, {total_rows:,} rows"),
        ("latest 500 readings of one device, p99", fmt(result["latest_500_p99_ms"], "{:.2f} ms"),
         f"{args.samples} random devices"),
        ("24 h of 1-minute roll-ups, p50", fmt(result["rollup_1m_24h_p50_ms"], "{:.2f} ms"),
         f"{rollup_rows:,} roll-up rows"),
        ("24 h of 1-minute roll-ups, p99", fmt(result["rollup_1m_24h_p99_ms"], "{:.2f} ms"), ""),
        ("  client CPU per query p50/p99: latest", fmt(result["latest_500_client_cpu_p50_ms"], "{:.2f} ms"),
         fmt(result["latest_500_client_cpu_p99_ms"], "p99 {:.2f} ms (Python side only)")),
        ("  client CPU per query p50/p99: roll-ups", fmt(result["rollup_1m_24h_client_cpu_p50_ms"], "{:.2f} ms"),
         fmt(result["rollup_1m_24h_client_cpu_p99_ms"], "p99 {:.2f} ms")),
        ("machine load average (1 min) at the end", f"{result['load_average_1m']:.1f}", f"{os.cpu_count()} CPUs"),
        ("  ... at the start / end of the queries",
         fmt(queries and "{:.1f} / {:.1f}".format(*queries["load_average_1m"]), "{}"), ""),
    ]
    for name, value, note in rows:
        print(f"{name:<42} {value:>16}   {note}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
