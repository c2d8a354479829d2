"""The writer: the bus -> the database (and the latest-values cache), exactly once in effect.

Consumer group ``writer`` on the telemetry, status, acks, command-status and alarm topics. Records are collected
into batches (``settings.writer_batch_size`` records or ``settings.writer_batch_ms``, whichever comes first),
stored in **one database transaction per batch**, and the bus offsets are committed only after that transaction
committed (and after any dead letters were delivered). A crash anywhere therefore means redelivery, never loss,
and redelivery is harmless because every write is idempotent:

* telemetry: ``INSERT ... ON CONFLICT DO NOTHING`` on the reading's key. On PostgreSQL the table is partitioned
  by day on ``ts``, and a partitioned table's primary key must contain the partition key, so the key is
  (device_id, boot, seq, ts). For that to identify a *reading*, ``ts`` must be the same on every delivery and
  every replay of it, which rules out the receive time. So ``ts`` is:

  - the device clock (``ts`` in the message) when the device is synced and the value is plausible (no more
    than 365 days older or 1 day newer than the bus record's timestamp); otherwise
  - an estimate from the boot anchor: the first reading of a (device, boot) without a usable clock stores
    ``booted_at = record time - up`` in ``device_boots`` (insert-if-absent, never changed afterwards), and every
    such reading of that boot gets ``ts = booted_at + up`` (``ts_estimated`` = true). Deterministic, so
    replays and redeliveries land on the same key, and close to the real time.

  (A device whose clock is off by more than the window is treated as unsynced; a reading replayed so late that
  the same clock value flips between plausible and implausible could be stored twice -- a deliberate trade-off
  against a second, unpartitioned dedup index that would double the write cost.) SQLite keys on
  (device_id, boot, seq) directly.
* roll-ups (``telemetry_1m`` / ``telemetry_1h``): on PostgreSQL behind a watermark (cloud.db.maintenance): the
  writer runs the roll-up job on a thread of its own every ``ROLLUP_EVERY_S`` (it moves the mark under an
  exclusive advisory lock for a moment, then adds the readings of the claimed range in one set-based statement)
  and, in each batch transaction (holding that lock shared), adds to the roll-ups only the readings its insert
  actually added (``RETURNING``) *below* the mark -- late ones. On
  SQLite every added reading is rolled up in the batch transaction. Either way duplicates never count twice.
* status -> devices.status / last_seen / firmware / boot; acks and command-status -> commands, moving the state
  only forward (``schema.COMMAND_STATE_RANK``: an ack may overtake the bridge's "sent"); alarm events -> alarms
  (timestamps set once, state derived from them).

Failures:

* a record that does not parse, or comes from an unknown (unprovisioned) device -> dead-letter topic with the
  reason; nothing is lost and the batch goes on.
* the database unreachable (refused, restarting, connection dropped) -> the batch is retried with exponential
  backoff (0.2 s .. 10 s) until it commits; offsets are not committed meanwhile; ``health()`` reports it.
* the database reachable but rejecting the batch (a value it cannot store) -> the batch is split in halves
  until the offending record is isolated; it goes to the dead-letter topic, the rest is stored.
* the cache (Redis) down -> counted and logged, the writer carries on.

Run it with ``python -m cloud writer`` (or ``python -m cloud.writer``, configured by IOT_* variables).
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from psycopg import errors as psycopg_errors
from sqlalchemy import Engine, bindparam, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from cloud import schema
from cloud.bus import Bus, BusError, Record, produce_until_confirmed
from cloud.db import maintenance, repo
from cloud.db.models import Command, Device, DeviceBoot, Telemetry, Telemetry1h, Telemetry1m
from cloud.service import raise_gc_threshold

log = logging.getLogger(__name__)

GROUP = "writer"
PLAUSIBLE_PAST_MS = 365 * 86_400_000
PLAUSIBLE_FUTURE_MS = 86_400_000
MAINTENANCE_EVERY_S = 3600
ROLLUP_EVERY_S = 10.0
# the roll-up job pauses three times as long as each slice of its work took, so it never takes more than a quarter
# of a core at once (cloud.db.maintenance.finish_claimed_rollups); catching up, it claims at most 5 minutes at a
# time, so the slices of one claim stay a small temporary table
ROLLUP_PACE = 3.0
ROLLUP_JOB_STEP = timedelta(minutes=5)
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 10.0
# devices.last_seen from readings at most this often per device: with 10,000 devices at 1,500 msg/s, 5 s meant an
# UPDATE of the devices table per reading. The cache holds the exact last_seen, and the web tier shows the newer.
DEVICE_UPDATE_EVERY_MS = 30_000
# how often the cache thread asks which tenants are watched live (cloud.writer.Writer._cache_stage): a dashboard
# opened meanwhile gets its readings' live events this much later at most (it loads the current state itself)
WATCHED_REFRESH_S = 0.5
OPERATIONAL_RETRIES = 3  # an operational error while the database answers pings: retry, then isolate
# The writer's engine: no ping before each checkout. A ping is a round trip per batch (~10 % of the store thread's
# time in bench_writer); during an outage the writer drops every pooled connection itself (Writer._drop_connections),
# so none is stale after a database restart.
ENGINE_OPTIONS = {"pre_ping": False}

ROWS = Counter("iot_writer_rows_inserted_total", "Telemetry rows inserted")
DUPLICATES = Counter("iot_writer_duplicates_skipped_total", "Telemetry rows skipped as already stored")
BATCHES = Counter("iot_writer_batches_total", "Batches committed")
RECORDS = Counter("iot_writer_records_total", "Bus records processed", ["topic"])
BATCH_SECONDS = Histogram("iot_writer_batch_seconds", "Time to store and commit one batch",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
DEAD_LETTERS = Counter("iot_writer_dead_letters_total", "Records sent to the dead-letter topic", ["reason"])
DB_ERRORS = Counter("iot_writer_db_errors_total", "Failed database transactions", ["kind"])
LATE_ROLLUPS = Counter("iot_writer_late_rollup_rows_total",
                       "Readings stored below the roll-up watermark and rolled up by the writer itself")
ROLLUP_JOB_SECONDS = Histogram("iot_writer_rollup_job_seconds", "Time of one roll-up job run",
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
LAG_SECONDS = Histogram("iot_writer_lag_seconds", "Bus record timestamp -> database commit",
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
UNMATCHED = Counter("iot_writer_unmatched_total", "Acks / command states for commands not in the database")
PAUSED = Gauge("iot_writer_paused", "1 while the writer waits for the database to come back")


def _reason_label(reason: str) -> str:
    """A low-cardinality label for the dead-letter metric."""
    if reason.startswith("unknown device"):
        return "unknown_device"
    if reason.startswith("database rejected"):
        return "db_rejected"
    return "invalid"


class Item:
    """One bus record, parsed: ``kind`` is telemetry | status | ack | command_status | alarm."""

    __slots__ = ("record", "kind", "message", "device_id", "tenant_id")

    def __init__(self, record: Record, kind: str, message: Any, device_id: str, tenant_id: int = 0):
        self.record = record
        self.kind = kind
        self.message = message
        self.device_id = device_id
        self.tenant_id = tenant_id


@dataclass
class Outcome:
    # newest inserted row per device (at least): (device_id, tenant_id, ts as unix ms, t, h, p, rssi, seq,
    # boot, up)
    inserted: list[tuple] = field(default_factory=list)
    inserted_count: int = 0
    duplicates: int = 0
    statuses: list[tuple[Item, schema.Status]] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    alarms: list[tuple[int, schema.AlarmEvent]] = field(default_factory=list)
    rejected: list[tuple[Record, str]] = field(default_factory=list)


class DatabaseDown(Exception):
    pass


def _is_outage(exc: BaseException) -> bool:
    # the raw driver's own classes too: COPY and the batch statements run on the psycopg cursor, whose errors
    # SQLAlchemy does not wrap (a connection lost mid-COPY is psycopg.OperationalError)
    if isinstance(exc, (OperationalError, InterfaceError, psycopg_errors.OperationalError,
                        psycopg_errors.InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _utc_date(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).date()


def _rollup_cte(table: str, unit: str, where: str = "") -> str:
    aggregates = ", ".join(f"count({m}), coalesce(sum({m}), 0), min({m}), max({m})" for m in "thp")
    updates = ", ".join(
        [f"n = r.n + excluded.n"]
        + [part for m in "thp" for part in (
            f"{m}_n = r.{m}_n + excluded.{m}_n",
            f"{m}_sum = coalesce(r.{m}_sum, 0) + excluded.{m}_sum",
            f"{m}_min = least(r.{m}_min, excluded.{m}_min)",  # least/greatest ignore NULLs
            f"{m}_max = greatest(r.{m}_max, excluded.{m}_max)")])
    return (f"INSERT INTO {table} AS r (device_id, bucket, tenant_id, n, t_n, t_sum, t_min, t_max, "
            f"h_n, h_sum, h_min, h_max, p_n, p_sum, p_min, p_max) "
            f"SELECT device_id, date_trunc('{unit}', ts), min(tenant_id), count(*), {aggregates} "
            f"FROM ins {where} GROUP BY device_id, date_trunc('{unit}', ts) ORDER BY 1, 2 "
            f"ON CONFLICT (device_id, bucket) DO UPDATE SET {updates}")


# PostgreSQL, the usual batch (no reading of it stored before, none below the roll-up watermark): ONE binary
# COPY straight into the partitioned table, from a buffer built here (_copy_buffer: timestamps already in
# PostgreSQL's binary form, so no conversion in the server). COPY inserts in bulk (a heap page per WAL record,
# no executor per row): measured on a 1M-row table with 10,000 devices, 5.6-6.5 us of backend CPU per row
# against 12-14 us for staging + INSERT ... ON CONFLICT DO NOTHING RETURNING + DISTINCT ON. COPY has no
# ON CONFLICT, so a batch holding an already stored reading (a redelivery or replay) fails with a unique
# violation: that transaction is rolled back and the batch is stored again the old way (_PG_INSERT below), as
# are the next DUPLICATE_PATH_BATCHES batches (a replay usually comes as a run of batches).
# Each reading's timestamps are identical in both ways (the same buffer), so they collide on the same key.
_PG_COLUMNS = ("device_id", "boot", "seq", "tenant_id", "ts", "received_at", "t", "h", "p", "rssi", "up",
               "ts_estimated")
_PG_COPY = f"COPY telemetry ({', '.join(_PG_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
DUPLICATE_PATH_BATCHES = 10

# The other way: the batch is COPied (the same buffer) into a per-connection temporary staging table, then one
# statement inserts it into the partitioned table (ON CONFLICT DO NOTHING), increments both roll-ups from
# exactly the rows that insert added when some are below the watermark (RETURNING, data-modifying CTEs) and
# returns the newest added row per device with the count. The staging table empties itself at every commit
# (ON COMMIT DELETE ROWS) and a rolled-back batch takes its rows with it, so it never carries anything from one
# transaction into the next.
_STAGE = "writer_batch"
_STAGE_DDL = (f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (device_id varchar(64), boot int8, seq int8, tenant_id int4, "
              "ts timestamptz, received_at timestamptz, t float8, h float8, p float8, rssi int4, up int8, "
              "ts_estimated bool) ON COMMIT DELETE ROWS")
_STAGE_COPY = f"COPY {_STAGE} ({', '.join(_PG_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_PG_INSERT_ROWS = (
    f"INSERT INTO telemetry ({', '.join(_PG_COLUMNS)}) SELECT {', '.join(_PG_COLUMNS)} FROM {_STAGE} "
    "ON CONFLICT DO NOTHING "
    "RETURNING device_id, tenant_id, ts, t, h, p, rssi, seq, boot, up")
_PG_NEWEST = ("SELECT DISTINCT ON (device_id) device_id, tenant_id, ts, t, h, p, rssi, seq, boot, up, count(*) OVER () "
              "FROM ins ORDER BY device_id, ts DESC, seq DESC")
# every reading of the batch at or after the roll-up watermark: the roll-up job counts it later
_PG_INSERT = f"WITH ins AS ({_PG_INSERT_ROWS}) {_PG_NEWEST}"
# some below it (late): those are added to the roll-ups here, from exactly the rows this insert added
_PG_INSERT_LATE = (
    f"WITH ins AS ({_PG_INSERT_ROWS}), "
    f"m AS ({_rollup_cte('telemetry_1m', 'minute', 'WHERE ts < %(mark)s')}), "
    f"hr AS ({_rollup_cte('telemetry_1h', 'hour', 'WHERE ts < %(mark)s')}) "
    f"{_PG_NEWEST}")
# the COPY way with late readings: the COPY added every row of the batch (or failed), so the late ones, COPied
# into the staging table as well, are exactly the added readings to roll up here
_PG_ROLLUP_STAGED = (
    f"WITH ins AS (SELECT device_id, tenant_id, ts, t, h, p FROM {_STAGE}), "
    f"m AS ({_rollup_cte('telemetry_1m', 'minute', 'WHERE ts < %(mark)s')}), "
    f"hr AS ({_rollup_cte('telemetry_1h', 'hour', 'WHERE ts < %(mark)s')}) "
    "SELECT count(*) FROM ins")

# binary COPY (the format of PostgreSQL's COPY documentation): a signature, flags and header extension length,
# then per row the field count and per field its length (-1: NULL) and bytes; int8/int4/float8 big-endian,
# bool one byte, timestamptz int8 microseconds since 2000-01-01 UTC; a trailer of field count -1.
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in unix microseconds
# everything after the device id, for a row without NULLs: boot, seq, tenant, ts, received_at, t, h, p, rssi, up, est
_COPY_TAIL = "iqiqiiiqiqidididiiiqi?"
_copy_structs: dict[int, Any] = {}


def _copy_row_struct(id_len: int):
    st = _copy_structs.get(id_len)
    if st is None:
        st = _copy_structs[id_len] = struct.Struct(f"!hi{id_len}s{_COPY_TAIL}")
    return st


_FIELD = {"q": struct.Struct("!iq"), "i": struct.Struct("!ii"), "d": struct.Struct("!id")}
_NULL = struct.pack("!i", -1)


def _copy_row_slow(row: tuple) -> bytes:
    """One row with NULLs (a reading without t, h, p, rssi or up)."""
    device_id, boot, seq, tenant_id, ts, rec, t, h, p, rssi, up, est = row
    encoded = device_id.encode()
    parts = [struct.pack(f"!hi{len(encoded)}s", 12, len(encoded), encoded),
             _FIELD["q"].pack(8, boot), _FIELD["q"].pack(8, seq), _FIELD["i"].pack(4, tenant_id),
             _FIELD["q"].pack(8, ts * 1000 - _PG_EPOCH_US), _FIELD["q"].pack(8, rec * 1000 - _PG_EPOCH_US)]
    for value, kind, size in ((t, "d", 8), (h, "d", 8), (p, "d", 8), (rssi, "i", 4), (up, "q", 8)):
        parts.append(_NULL if value is None else _FIELD[kind].pack(size, value))
    parts.append(b"\x00\x00\x00\x01\x01" if est else b"\x00\x00\x00\x01\x00")
    return b"".join(parts)


def _copy_buffer(rows: list[tuple]) -> bytes:
    """The binary COPY data of ``rows`` (tuples in _telemetry_rows' PostgreSQL layout, times as unix ms) for the
    columns _PG_COLUMNS, signature and trailer included. One struct.pack per row."""
    out = [_COPY_SIGNATURE]
    append = out.append
    epoch = _PG_EPOCH_US
    structs = _copy_structs
    for row in rows:
        device_id, boot, seq, tenant_id, ts, rec, t, h, p, rssi, up, est = row
        if t is None or h is None or p is None or rssi is None or up is None:
            append(_copy_row_slow(row))
            continue
        encoded = device_id.encode()
        n = len(encoded)
        st = structs.get(n) or _copy_row_struct(n)
        append(st.pack(12, n, encoded, 8, boot, 8, seq, 4, tenant_id, 8, ts * 1000 - epoch, 8, rec * 1000 - epoch,
                       8, t, 8, h, 8, p, 4, rssi, 8, up, 1, est))
    append(_COPY_TRAILER)
    return b"".join(out)


def _ms(ts: datetime) -> int:
    """Unix ms of a stored timestamp (SQLite hands back naive UTC datetimes)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return int(ts.timestamp() * 1000)


def _newest_per_device(rows: list[tuple]) -> list[tuple]:
    """The newest of ``rows`` (PostgreSQL row layout) per device, by (ts, seq) as _PG_NEWEST orders them, in
    Outcome.inserted's layout: (device_id, tenant_id, ts ms, t, h, p, rssi, seq, boot, up)."""
    newest: dict[str, tuple] = {}
    get = newest.get
    for row in rows:
        prev = get(row[0])
        if prev is None or row[4] > prev[4] or (row[4] == prev[4] and row[2] > prev[2]):
            newest[row[0]] = row
    return [(d, tenant, ts, t, h, p, rssi, seq, boot, up)
            for d, boot, seq, tenant, ts, _rec, t, h, p, rssi, up, _est in newest.values()]


class _Duplicate(Exception):
    """The COPY way met a reading stored before: store the batch again with ON CONFLICT DO NOTHING."""


_devices = Device.__table__
# firmware and boot only when the status names them (an "offline" last will carries neither)
_DEVICE_STATUS_UPDATE = (
    update(_devices).where(_devices.c.id == bindparam("b_id"))
    .values(status=bindparam("b_status"), last_seen=bindparam("b_seen", type_=_devices.c.last_seen.type),
            firmware=func.coalesce(bindparam("b_fw", type_=_devices.c.firmware.type), _devices.c.firmware),
            boot=func.coalesce(bindparam("b_boot", type_=_devices.c.boot.type), _devices.c.boot)))


class Writer:
    name = "writer"

    def __init__(self, settings, bus: Bus, engine: Engine, cache, *, group: str = GROUP,
                 maintenance_every_s: float = MAINTENANCE_EVERY_S, retention: bool = True):
        self.settings = settings
        self.bus = bus
        self.engine = engine
        self.cache = cache
        self.group = group
        self.topics = settings.topics
        self.maintenance_every_s = maintenance_every_s
        self.retention = retention
        self.postgres = engine.dialect.name == "postgresql"
        self._insert = pg_insert if self.postgres else sqlite_insert
        self._devices: dict[str, int] = {}
        self._anchors: dict[tuple[str, int], int] = {}
        self._partitions: set[date] = set()
        self._cached_ts: dict[str, int] = {}  # newest reading ts pushed to the cache per device
        self._device_written: dict[str, tuple] = {}  # device -> (last_seen ms, fw, boot) in the db
        self._pending_devices: dict[str, tuple] = {}
        self._duplicate_path = 0  # PostgreSQL: batches still to store with ON CONFLICT instead of COPY
        self._last_batch: float | None = None
        self._last_error: str | None = None
        self._paused_since: float | None = None
        self._next_maintenance = 0.0
        self._collation_checked = not self.postgres
        self.rollup_every_s = ROLLUP_EVERY_S
        self._lock = threading.Lock()
        self._to_cache: queue.SimpleQueue | None = None  # run(): stored batches' outcomes for the cache thread
        self.producer = None
        self.consumer = None

    # --- service protocol ---------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        # a batch of 2,000 records is ~10,000 tracked objects (records, parsed readings, rows): with the default
        # threshold a young collection ran several times per batch (~85 a second at 10,000 msg/s, 0.7 ms each)
        # and pushed live batches into the old generations, which then filled and were walked in full
        raise_gc_threshold()
        t = self.topics
        self.consumer = self.bus.consumer(self.group, [t.telemetry, t.status, t.acks, t.command_status, t.alarms],
                                          name="writer")
        self.producer = self.bus.producer("writer")
        log.info("writer: consuming %s as group %r", ", ".join([t.telemetry, t.status, t.acks, t.command_status,
                                                                 t.alarms]), self.group)
        rollups = None
        if self.postgres:
            rollups = threading.Thread(target=self._run_rollups, args=(stop,), name="writer-rollups", daemon=True)
            rollups.start()
        # two stages: this thread collects and parses batch N+1 while the store thread has batch N in the
        # database, so Python's work and PostgreSQL's overlap (one after the other, the batch cycle was their
        # sum). One batch waits between them at most; the store thread handles batches in order.
        # The consumer is only ever called from this thread: the Kafka client serialises calls on one handle,
        # and a commit from the store thread starved behind this thread's back-to-back polls. So the store
        # thread hands stored batches back (``stored``) and this thread commits their offsets, in order.
        # ``store_idle`` is set by the store thread while it waits for a batch and cleared here when one is handed
        # over, so a batch is closed when it can be stored at once (_collect) and the handoff never queues.
        handoff: queue.Queue = queue.Queue(maxsize=1)
        stored: queue.SimpleQueue = queue.SimpleQueue()
        store_idle = threading.Event()
        store_idle.set()
        failure: list[BaseException] = []
        storer = threading.Thread(target=self._store_stage, args=(handoff, stored, stop, failure, store_idle),
                                  name="writer-store", daemon=True)
        # a third thread keeps the cache: latest values and live events of stored batches go to Redis beside the
        # next batch's insert, not between two (the cache call was ~45 % of the store thread's busy time at
        # 6,500 msg/s, and the store thread's cycle is the writer's latency); batches that queued meanwhile go in
        # the same calls
        self._to_cache = queue.SimpleQueue()
        cacher = threading.Thread(target=self._cache_stage, args=(self._to_cache,), name="writer-cache", daemon=True)
        storer.start()
        cacher.start()
        try:
            while not stop.is_set() and storer.is_alive():
                self._commit_stored(stored)
                batch = self._collect(stop, store_idle)
                if batch is None:
                    continue
                store_idle.clear()
                while not stop.is_set() and storer.is_alive():
                    try:
                        handoff.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        self._commit_stored(stored)
        finally:
            while storer.is_alive():  # it finishes (or, stopped, abandons) its batch and sees the end marker
                try:
                    handoff.put(None, timeout=0.2)
                    break
                except queue.Full:
                    continue
            storer.join()
            self._to_cache.put(None)  # what was stored is cached before the end
            cacher.join(10)
            self._to_cache = None
            self._commit_stored(stored, wait=True)
            if rollups is not None:
                rollups.join(30)
            for closer in (self.consumer.close, self.producer.close):
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001
                    log.warning("writer: close failed: %s", exc)
        if failure:
            raise failure[0]

    def _check_collation(self) -> None:
        """Warn once if the database compares text by a locale (cloud.db.maintenance.collation_advice). Run with
        the first maintenance round that reaches the database, so a database still starting does not skip it."""
        advice = maintenance.collation_advice(self.engine)
        if advice:
            log.warning("writer: %s", advice)
        self._collation_checked = True

    def _store_stage(self, handoff: queue.Queue, stored: queue.SimpleQueue, stop: threading.Event,
                     failure: list[BaseException], idle: threading.Event | None = None) -> None:
        """The store thread: parsed batches, in order, into the database; each stored batch goes to ``stored``
        for its offsets to be committed. A batch abandoned because of ``stop`` ends the thread: no later batch
        may have its offsets committed past it."""
        try:
            while True:
                # partition DDL and retention here, between batches as before, never beside a batch's insert
                self._maybe_maintain(stop)
                if idle is not None:
                    idle.set()
                try:
                    item = handoff.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None:
                    return
                records, parsed = item
                if not self.process(records, stop, parsed=parsed, commit=stored.put):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to run(), which raises it
            failure.append(exc)
            log.exception("writer: store stage failed")

    def health(self) -> tuple[bool, dict]:
        details: dict[str, Any] = {
            "last_batch_age_s": None if self._last_batch is None else round(time.time() - self._last_batch, 3),
            "paused_s": None if self._paused_since is None else round(time.monotonic() - self._paused_since, 1),
            "last_error": self._last_error,
        }
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            details["db"] = "ok"
        except Exception as exc:  # noqa: BLE001
            details["db"] = f"unreachable: {type(exc).__name__}"
            return False, details
        return self._paused_since is None, details

    # --- batching -------------------------------------------------------------------------------------------
    def _collect(self, stop: threading.Event, store_idle: threading.Event | None = None
                 ) -> tuple[list[Record], tuple[list[Item], list[tuple[Record, str]]]] | None:
        """One batch and what ``_parse`` made of it, or None when nothing came for a while.

        Group commit: the batch closes as soon as the store stage is free (``store_idle``) and nothing more is
        waiting in the consumer, but not before ``writer_batch_ms`` after its first record, and at
        ``writer_batch_size`` records. A reading at a low rate waits for no timer (a fixed window held every
        batch for it: with the consumer's 50 ms fetch wait, the batch cycle was ~100 ms at any rate); under load,
        what arrives while the store stage is busy joins the open batch, so batches grow with the load and none
        queues behind another. Each chunk is parsed as it arrives, while the store stage has the previous batch
        in the database.

        librdkafka's consume() waits for the whole count or the whole timeout, so a single large poll held every
        batch for the full poll timeout at low rates; short polls let a batch close on time."""
        size = self.settings.writer_batch_size
        linger = self.settings.writer_batch_ms / 1000
        poll = self.consumer.poll_batch
        idle_until = time.monotonic() + 0.5  # return now and then, so run() can see `stop` and do maintenance
        records: list[Record] = []
        while not records:
            if stop.is_set() or time.monotonic() >= idle_until:
                return None
            records = poll(max_records=size, timeout=0.05)
        items, rejected = self._parse(records)
        earliest = time.monotonic() + linger
        while len(records) < size and not stop.is_set():
            wait = earliest - time.monotonic()
            if wait > 0:  # lingering for more (writer_batch_ms)
                more = poll(max_records=size - len(records), timeout=min(wait, 0.05))
            elif store_idle is None or store_idle.is_set():
                more = poll(max_records=size - len(records), timeout=0)
                if not more:
                    break  # the store stage is free and nothing is waiting: close now
            else:  # the store stage is busy: wake the moment it is free, take what came meanwhile
                store_idle.wait(0.01)
                more = poll(max_records=size - len(records), timeout=0)
            if more:
                records.extend(more)
                more_items, more_rejected = self._parse(more)
                items.extend(more_items)
                rejected.extend(more_rejected)
        return records, (items, rejected)

    def _commit_stored(self, stored: queue.SimpleQueue, wait: bool = False) -> None:
        while True:
            try:
                records = stored.get_nowait()
            except queue.Empty:
                return
            self._commit(records, wait)

    def _commit(self, records: list[Record], wait: bool = False) -> None:
        try:
            # not waiting for the broker's answer (a round trip per batch): storing is idempotent, so a commit
            # lost in a crash only means these records come again and are skipped as duplicates
            self.consumer.commit(records, wait=wait)
        except BusError as exc:  # partitions moved to another member: it will redeliver, which is harmless
            log.warning("writer: offset commit failed (%s); the records will be redelivered", exc)

    def process(self, records: list[Record], stop: threading.Event | None = None,
                parsed: tuple[list[Item], list[tuple[Record, str]]] | None = None, commit=None) -> bool:
        """Store one batch (``parsed``: what ``_parse`` made of it, if done already) and then commit its offsets
        (or hand the records to ``commit``, which does). Returns False if stopped before it was stored (the
        offsets are then not committed and the records will be delivered again)."""
        stop = stop or threading.Event()
        started = time.monotonic()
        items, rejected = parsed if parsed is not None else self._parse(records)
        outcome = self._store_with_retry(items, stop)
        if outcome is None:
            return False
        rejected.extend(outcome.rejected)
        if not self._send_dead_letters(rejected, stop):
            return False
        (commit or self._commit)(records)
        now = time.time()
        _observe_many(LAG_SECONDS, [max(0.0, now - r.timestamp_ms / 1000) for r in records if r.timestamp_ms])
        per_topic: dict[str, int] = defaultdict(int)
        for record in records:
            per_topic[record.topic] += 1
        for topic, n in per_topic.items():
            RECORDS.labels(topic).inc(n)
        BATCHES.inc()
        BATCH_SECONDS.observe(time.monotonic() - started)
        self._last_batch = now
        if self._to_cache is not None:
            self._to_cache.put(outcome)
        else:  # called directly (tests, tools): cached before returning
            self._publish([outcome])
        return True

    # --- parsing --------------------------------------------------------------------------------------------
    def _parse(self, records: list[Record]) -> tuple[list[Item], list[tuple[Record, str]]]:
        t = self.topics
        max_bytes = self.settings.max_payload_bytes
        items: list[Item] = []
        rejected: list[tuple[Record, str]] = []
        unknown = False  # some device not in the in-process tenant map (yet)
        devices = self._devices
        append, fast, telemetry_topic = items.append, schema.plain_telemetry, t.telemetry
        for record in records:
            try:
                if record.topic == telemetry_topic:
                    device = record.key or ""
                    msg: Any = (fast(device, record.value, max_bytes)
                                or schema.parse_telemetry(device, record.value, max_bytes))
                    kind = "telemetry"
                elif record.topic == t.status:
                    device = record.key or ""
                    msg = schema.parse_status(device, record.value, max_bytes)
                    kind = "status"
                elif record.topic == t.acks:
                    device = record.key or ""
                    msg = schema.parse_ack(device, record.value, max_bytes)
                    kind = "ack"
                elif record.topic == t.command_status:
                    msg = schema.parse_command_status(record.value)
                    kind, device = "command_status", msg.device
                elif record.topic == t.alarms:
                    msg = schema.parse_alarm_event(record.value)
                    kind, device = "alarm", msg.device
                else:
                    rejected.append((record, f"unexpected topic {record.topic!r}"))
                    continue
            except schema.Rejected as exc:
                rejected.append((record, exc.reason))
                continue
            tenant = devices.get(device)
            if tenant is None:
                unknown = True
                tenant = 0
            append(Item(record, kind, msg, device, tenant))
        if not unknown:
            return items, rejected
        # tenants: from the in-process map, refreshed for ids it does not know yet
        self._lookup_devices({i.device_id for i in items if i.device_id not in devices})
        known = []
        for item in items:
            tenant = devices.get(item.device_id)
            if tenant is None:
                rejected.append((item.record, f"unknown device {item.device_id!r}"))
            else:
                item.tenant_id = tenant
                known.append(item)
        return known, rejected

    def _lookup_devices(self, device_ids: set[str]) -> None:
        delay = BACKOFF_MIN_S
        while True:
            try:
                with self.engine.connect() as conn:
                    if self.postgres:  # one array parameter: a fleet's first batch names ~10,000 devices, and
                        # compiling that many bound parameters was ~2 us per row of the first 200,000
                        cursor = conn.connection.driver_connection.cursor()
                        cursor.execute("SELECT id, tenant_id FROM devices WHERE id = ANY(%s)", (sorted(device_ids),))
                        rows = cursor.fetchall()
                        conn.rollback()
                    else:
                        rows = conn.execute(select(Device.id, Device.tenant_id)
                                            .where(Device.id.in_(sorted(device_ids)))).all()
                break
            except Exception as exc:  # noqa: BLE001 - database down: wait for it (the batch is not committed)
                if not _is_outage(exc):
                    raise
                self._outage(exc, delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        for device_id, tenant_id in rows:
            self._devices[device_id] = tenant_id

    # --- storing --------------------------------------------------------------------------------------------
    def _drop_connections(self) -> None:
        """During an outage every pooled connection goes (``_outage``): they were opened to the same server, and
        the writer's engine is not pre-pinged (see ENGINE_OPTIONS). SQLAlchemy already invalidates its pool when
        it sees a disconnect, but the batch statements run on the raw psycopg cursor, whose errors it does not
        see; this does not depend on which path noticed."""
        if not self.postgres:  # SQLite: nothing goes stale (and an in-memory database would be lost)
            return
        try:
            self.engine.dispose()
        except Exception as exc:  # noqa: BLE001
            log.debug("writer: dispose failed: %s", exc)

    def _outage(self, exc: BaseException, delay: float) -> None:
        self._drop_connections()
        DB_ERRORS.labels("outage").inc()
        if self._paused_since is None:
            self._paused_since = time.monotonic()
            PAUSED.set(1)
            log.warning("writer: database unavailable (%s); pausing, nothing is committed until it is back",
                        str(exc).splitlines()[0][:200])
        self._last_error = str(exc).splitlines()[0][:300]
        time.sleep(delay)

    def _db_reachable(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001
            return False

    def _store_with_retry(self, items: list[Item], stop: threading.Event) -> Outcome | None:
        delay = BACKOFF_MIN_S
        operational_failures = 0
        while True:
            try:
                outcome = self._store(items)
                if self._paused_since is not None:
                    log.info("writer: database back after %.1f s", time.monotonic() - self._paused_since)
                    self._paused_since = None
                    PAUSED.set(0)
                return outcome
            except Exception as exc:  # noqa: BLE001 - classified below
                if _is_outage(exc) and not self._db_reachable():
                    if stop.is_set():
                        return None
                    self._outage(exc, delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                if _is_outage(exc) and operational_failures < OPERATIONAL_RETRIES:
                    operational_failures += 1  # e.g. a deadlock or a connection dropped mid-batch: try again
                    DB_ERRORS.labels("transient").inc()
                    log.info("writer: transient database error, retrying: %s", str(exc).splitlines()[0][:200])
                    time.sleep(delay)
                    continue
                DB_ERRORS.labels("rejected").inc()
                self._last_error = str(exc).splitlines()[0][:300]
                return self._isolate(items, exc, stop)

    def _isolate(self, items: list[Item], exc: BaseException, stop: threading.Event) -> Outcome | None:
        """The database rejects this batch: store the halves separately until the culprit is alone."""
        if len(items) == 1:
            reason = f"database rejected: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log.warning("writer: dead-lettering %s record at offset %s/%d: %s", items[0].record.topic,
                        items[0].record.partition, items[0].record.offset, reason)
            outcome = Outcome()
            outcome.rejected.append((items[0].record, reason))
            return outcome
        middle = len(items) // 2
        combined = Outcome()
        for half in (items[:middle], items[middle:]):
            part = self._store_with_retry(half, stop)
            if part is None:
                return None
            combined.inserted += part.inserted
            combined.inserted_count += part.inserted_count
            combined.duplicates += part.duplicates
            combined.statuses += part.statuses
            combined.commands += part.commands
            combined.alarms += part.alarms
            combined.rejected += part.rejected
        return combined

    def _store(self, items: list[Item]) -> Outcome:
        try:
            return self._store_once(items)
        except _Duplicate:  # rolled back: this batch (and the next few) with ON CONFLICT DO NOTHING
            self._duplicate_path = DUPLICATE_PATH_BATCHES + 1
            return self._store_once(items)

    def _store_once(self, items: list[Item]) -> Outcome:
        outcome = Outcome()
        readings = [i for i in items if i.kind == "telemetry"]
        rows: list = []
        latest: dict[str, tuple[int, Item]] = {}
        if readings:
            rows, latest = self._telemetry_rows(readings, outcome)
            if self.postgres:
                self._create_partitions({_utc_date(ms) for ms in {r[4] // 86_400_000 * 86_400_000
                                                                  for r in rows}})
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            if readings:
                self._store_telemetry(session, latest, rows, outcome)
            self._store_devices(session, items, outcome)
            self._store_commands(session, items, outcome)
            alarms = [(item.tenant_id, item.message) for item in items if item.kind == "alarm"]
            if alarms:
                repo.apply_alarm_events(session, alarms)
                outcome.alarms.extend(alarms)
        ROWS.inc(outcome.inserted_count)
        self._remember_devices()
        DUPLICATES.inc(outcome.duplicates)
        return outcome

    # telemetry ---------------------------------------------------------------------------------------------
    def _create_partitions(self, days: set[date]) -> None:
        missing = days - self._partitions
        if not missing:
            return
        if not self._partitions:
            self._partitions.update(maintenance.existing_partitions(self.engine))
            missing = days - self._partitions
        if missing:
            maintenance.create_partitions(self.engine, missing)
            self._partitions.update(missing)

    def _anchor_for(self, readings: list[tuple[Item, int]]) -> None:
        """Load or create the boot anchors of the readings that need an estimated time (in a transaction of
        their own: an anchor is written once and never changes, so committing it early is harmless)."""
        pairs = {(i.device_id, i.message.boot) for i, _ in readings} - set(self._anchors)
        if not pairs:
            return
        first: dict[tuple[str, int], int] = {}
        for item, rec in readings:
            key = (item.device_id, item.message.boot)
            if key in pairs and key not in first:
                first[key] = rec - (item.message.up or 0) * 1000
        pair_list = sorted(pairs)
        rows = [{"device_id": d, "boot": b,
                 "booted_at": datetime.fromtimestamp(first[(d, b)] / 1000, timezone.utc),
                 "created_at": datetime.now(timezone.utc)} for d, b in pair_list]
        with Session(self.engine) as session, session.begin():
            session.execute(self._insert(DeviceBoot).on_conflict_do_nothing(), rows)
            for chunk_start in range(0, len(pair_list), 500):
                chunk = pair_list[chunk_start:chunk_start + 500]
                found = session.execute(select(DeviceBoot.device_id, DeviceBoot.boot, DeviceBoot.booted_at)
                                        .where(tuple_(DeviceBoot.device_id, DeviceBoot.boot).in_(chunk)))
                for device_id, boot, booted_at in found:
                    self._anchors[(device_id, boot)] = int(booted_at.timestamp() * 1000)
        if len(self._anchors) > 200_000:
            self._anchors.clear()  # a cache: reloaded from device_boots on demand

    def _event_ms(self, item: Item) -> tuple[int | None, int]:
        rec = item.record.timestamp_ms or int(time.time() * 1000)
        ts = item.message.ts
        if ts is not None and rec - PLAUSIBLE_PAST_MS <= ts <= rec + PLAUSIBLE_FUTURE_MS:
            return ts, rec
        return None, rec

    def _telemetry_rows(self, readings: list[Item], outcome: Outcome) -> tuple[list, dict[str, tuple[int, Item]]]:
        """One row per distinct reading of the batch: on PostgreSQL a tuple in _PG_COLUMNS' order (times as unix
        ms), on SQLite a dict of Telemetry columns; and the newest reading per device by record time (for the
        devices table: (record ms, item))."""
        now_ms = int(time.time() * 1000)
        past, future = PLAUSIBLE_PAST_MS, PLAUSIBLE_FUTURE_MS
        timed: list[tuple[Item, int | None, int]] = []
        unsynced: list[tuple[Item, int]] = []
        latest: dict[str, tuple[int, Item]] = {}
        latest_get = latest.get
        for item in readings:  # see _event_ms
            rec = item.record.timestamp_ms or now_ms
            ts = item.message.ts
            if ts is None or not rec - past <= ts <= rec + future:
                ts = None
                unsynced.append((item, rec))
            timed.append((item, ts, rec))
            prev = latest_get(item.device_id)
            if prev is None or rec >= prev[0]:
                latest[item.device_id] = (rec, item)
        if unsynced:
            self._anchor_for(unsynced)
        anchors = self._anchors
        postgres = self.postgres
        rows: list = []
        append = rows.append
        seen: set[tuple[str, int, int]] = set()
        add = seen.add
        for item, ts, rec in timed:
            m: schema.Telemetry | schema.PlainTelemetry = item.message  # the slow parse's or the fast one's
            device_id = item.device_id
            key = (device_id, m.boot, m.seq)
            if key in seen:  # the same reading twice in one batch
                outcome.duplicates += 1
                continue
            add(key)
            estimated = ts is None
            if estimated:
                ts = anchors[(device_id, m.boot)] + (m.up or 0) * 1000
            if postgres:
                append((device_id, m.boot, m.seq, item.tenant_id, ts, rec, m.t, m.h, m.p, m.rssi, m.up, estimated))
            else:
                append({"device_id": device_id, "boot": m.boot, "seq": m.seq, "tenant_id": item.tenant_id,
                        "ts": datetime.fromtimestamp(ts / 1000, timezone.utc),
                        "received_at": datetime.fromtimestamp(rec / 1000, timezone.utc),
                        "t": m.t, "h": m.h, "p": m.p, "rssi": m.rssi, "up": m.up, "ts_estimated": estimated})
        return rows, latest

    def _store_telemetry(self, session: Session, latest: dict[str, tuple[int, Item]], rows: list,
                         outcome: Outcome) -> None:
        if self.postgres:
            self._store_telemetry_pg(session, rows, outcome)
        else:
            table = Telemetry.__table__
            stmt = self._insert(table).on_conflict_do_nothing().returning(
                table.c.device_id, table.c.tenant_id, table.c.ts, table.c.t, table.c.h, table.c.p, table.c.rssi,
                table.c.seq, table.c.boot, table.c.up)
            inserted = session.execute(stmt, rows).all() if rows else []
            outcome.inserted_count = len(inserted)
            outcome.duplicates += len(rows) - len(inserted)
            if inserted:
                self._rollup(session, inserted)
            outcome.inserted = [(r[0], r[1], _ms(r[2]), *r[3:]) for r in inserted]
        # devices: last_seen (record time), firmware and boot from the newest reading. To spare the devices
        # table an update per reading, a device is updated when something changed or its last write is
        # DEVICE_UPDATE_EVERY_MS old.
        # (this runs for every device of every batch: no tuple is built for a device unless it is due)
        self._pending_devices = pending = {}
        written_get = self._device_written.get
        every = DEVICE_UPDATE_EVERY_MS
        for device, (rec, item) in latest.items():
            m = item.message
            prev = written_get(device)
            if prev is None or rec - prev[0] >= every or prev[2] != m.boot or prev[1] != m.fw:
                pending[device] = (rec, m.fw, m.boot)
        if not pending:
            return
        ordered = sorted(pending.items())
        if self.postgres:
            cursor = session.connection().connection.driver_connection.cursor()
            cursor.execute(
                "UPDATE devices d SET last_seen = greatest(d.last_seen, to_timestamp(v.ls / 1000.0)), "
                "firmware = coalesce(v.fw, d.firmware), boot = v.boot "
                "FROM unnest(%s::varchar[], %s::bigint[], %s::varchar[], %s::bigint[]) AS v(id, ls, fw, boot) "
                "WHERE d.id = v.id",
                ([d for d, _ in ordered], [st[0] for _, st in ordered], [st[1] for _, st in ordered],
                 [st[2] for _, st in ordered]))
            return
        params = [{"d": device, "ls": datetime.fromtimestamp(rec / 1000, timezone.utc), "fw": fw, "boot": boot}
                  for device, (rec, fw, boot) in ordered]
        session.execute(text(
            "UPDATE devices SET last_seen = CASE WHEN last_seen IS NULL OR last_seen < :ls THEN :ls "
            "ELSE last_seen END, firmware = COALESCE(:fw, firmware), boot = :boot WHERE id = :d")
            .bindparams(bindparam("ls", type_=Device.__table__.c.last_seen.type)), params)

    def _remember_devices(self) -> None:
        """After a commit: what the devices table now holds (see _store_telemetry)."""
        self._device_written.update(self._pending_devices)
        self._pending_devices = {}
        if len(self._device_written) > 1_000_000:
            self._device_written.clear()

    def _store_telemetry_pg(self, session: Session, rows: list[tuple], outcome: Outcome) -> None:
        """PostgreSQL: the batch in one binary COPY straight into telemetry when none of it is stored yet (the
        usual case; see _PG_COPY), else staged and inserted with ON CONFLICT DO NOTHING (_PG_INSERT). Readings
        below the roll-up watermark (late) are added to the roll-ups here, from exactly the rows added."""
        if not rows:
            return
        cursor = session.connection().connection.driver_connection.cursor()
        # the roll-up lock, shared: the job cannot move the watermark until this transaction ends, so each added
        # reading is counted either here (below the mark) or by a later job run (the statement after the lock
        # sees the mark as the last job committed it)
        cursor.execute("SELECT pg_advisory_xact_lock_shared(%s)", (maintenance.ROLLUP_LOCK,), prepare=True)
        cursor.execute("SELECT done_until FROM rollup_watermark WHERE id = 1", prepare=True)
        found = cursor.fetchone()
        mark = found[0] if found else None
        if mark is None:  # no watermark row (never expected after the migration): roll every row up here
            mark = datetime.max.replace(tzinfo=timezone.utc)
            late = rows
        else:
            mark_ms = mark.timestamp() * 1000
            late = [row for row in rows if row[4] < mark_ms] if min(row[4] for row in rows) < mark_ms else []
        data = _copy_buffer(rows)
        if self._duplicate_path > 0:
            self._duplicate_path -= 1
        else:
            try:
                with cursor.copy(_PG_COPY) as copy:
                    copy.write(data)
            except psycopg_errors.UniqueViolation as exc:
                raise _Duplicate() from exc
            if late:
                cursor.execute(_STAGE_DDL)
                with cursor.copy(_STAGE_COPY) as copy:
                    copy.write(data if late is rows else _copy_buffer(late))
                cursor.execute(_PG_ROLLUP_STAGED, {"mark": mark}, prepare=True)
                cursor.fetchall()
                LATE_ROLLUPS.inc(len(late))
            outcome.inserted = _newest_per_device(rows)
            outcome.inserted_count = len(rows)
            return
        cursor.execute(_STAGE_DDL)
        with cursor.copy(_STAGE_COPY) as copy:
            copy.write(data)
        if late:
            cursor.execute(_PG_INSERT_LATE, {"mark": mark}, prepare=True)
            LATE_ROLLUPS.inc(len(late))  # at most: duplicates are not added
        else:
            cursor.execute(_PG_INSERT, prepare=True)
        result = cursor.fetchall()
        outcome.inserted_count = result[0][-1] if result else 0
        outcome.inserted = [(r[0], r[1], _ms(r[2]), *r[3:-1]) for r in result]
        outcome.duplicates += len(rows) - outcome.inserted_count

    def _rollup(self, session: Session, inserted: list[tuple]) -> None:
        for model, unit in ((Telemetry1m, 60), (Telemetry1h, 3600)):
            buckets: dict[tuple[str, int], dict[str, Any]] = {}
            for device_id, tenant_id, ts, t, h, p, *_ in inserted:
                epoch = int(ts.timestamp()) // unit * unit
                agg = buckets.get((device_id, epoch))
                if agg is None:
                    agg = buckets[(device_id, epoch)] = {
                        "device_id": device_id, "bucket": datetime.fromtimestamp(epoch, timezone.utc),
                        "tenant_id": tenant_id, "n": 0,
                        **{f"{m}_{k}": (0 if k in ("n", "sum") else None) for m in "thp"
                           for k in ("n", "sum", "min", "max")}}
                agg["n"] += 1
                for m, value in (("t", t), ("h", h), ("p", p)):
                    if value is None:
                        continue
                    agg[f"{m}_n"] += 1
                    agg[f"{m}_sum"] += value
                    agg[f"{m}_min"] = value if agg[f"{m}_min"] is None else min(agg[f"{m}_min"], value)
                    agg[f"{m}_max"] = value if agg[f"{m}_max"] is None else max(agg[f"{m}_max"], value)
            table = model.__table__
            stmt = self._insert(table)
            ex = stmt.excluded
            least = "least" if self.postgres else "min"
            greatest = "greatest" if self.postgres else "max"
            from sqlalchemy import func

            values = {"n": table.c.n + ex.n}
            for m in "thp":
                values[f"{m}_n"] = table.c[f"{m}_n"] + ex[f"{m}_n"]
                values[f"{m}_sum"] = func.coalesce(table.c[f"{m}_sum"], 0) + func.coalesce(ex[f"{m}_sum"], 0)
                cur, new = table.c[f"{m}_min"], ex[f"{m}_min"]
                values[f"{m}_min"] = getattr(func, least)(func.coalesce(cur, new), func.coalesce(new, cur))
                cur, new = table.c[f"{m}_max"], ex[f"{m}_max"]
                values[f"{m}_max"] = getattr(func, greatest)(func.coalesce(cur, new), func.coalesce(new, cur))
            stmt = stmt.on_conflict_do_update(index_elements=[table.c.device_id, table.c.bucket], set_=values)
            session.execute(stmt, [buckets[k] for k in sorted(buckets)])

    # devices, commands -------------------------------------------------------------------------------------
    def _store_devices(self, session: Session, items: list[Item], outcome: Outcome) -> None:
        """The newest status per device onto its row, all devices in one executemany (pipelined by psycopg).

        A fleet reconnecting (or the bridge resubscribing: the broker sends every retained status again) is a
        burst of thousands of statuses; an ORM UPDATE per device took ~10 ms each and stalled the writer for tens
        of seconds behind such a burst."""
        last: dict[str, Item] = {}
        for item in items:
            if item.kind == "status":
                last[item.device_id] = item  # per-device order is kept by the bus key: the last one wins
        if not last:
            return
        rows = []
        for device_id in sorted(last):  # a fixed order: concurrent writers lock rows the same way round
            item = last[device_id]
            status: schema.Status = item.message
            rows.append({"b_id": device_id, "b_status": status.state, "b_fw": status.fw or None, "b_boot": status.boot,
                         "b_seen": datetime.fromtimestamp((item.record.timestamp_ms or time.time() * 1000) / 1000,
                                                          timezone.utc)})
            outcome.statuses.append((item, status))
        session.connection().execute(_DEVICE_STATUS_UPDATE, rows)

    def _store_commands(self, session: Session, items: list[Item], outcome: Outcome) -> None:
        events = [i for i in items if i.kind in ("ack", "command_status")]
        if not events:
            return
        cids = sorted({i.message.cid for i in events})
        rows = {c.cid: c for c in session.scalars(select(Command).where(Command.cid.in_(cids))
                                                   .with_for_update() if self.postgres else
                                                   select(Command).where(Command.cid.in_(cids)))}
        changed: dict[str, Command] = {}
        for item in events:
            row = rows.get(item.message.cid)
            if row is None or row.device_id != item.device_id or row.tenant_id != item.tenant_id:
                UNMATCHED.inc()  # e.g. a command sent by a rule action, which has no row
                continue
            at = datetime.fromtimestamp((item.record.timestamp_ms or time.time() * 1000) / 1000, timezone.utc)
            if item.kind == "ack":
                ack: schema.Ack = item.message
                state = "delivered" if ack.ok else "failed"
                if repo.advance_command(row, state, at, ok=ack.ok, result=ack.result, error=ack.err):
                    changed[row.cid] = row
            else:
                cs: schema.CommandStatus = item.message
                if cs.state == "queued":
                    continue
                if repo.advance_command(row, cs.state, datetime.fromtimestamp(cs.ts / 1000, timezone.utc)):
                    changed[row.cid] = row
        outcome.commands = list(changed.values())

    # --- after the commit -------------------------------------------------------------------------------------
    def _send_dead_letters(self, rejected: list[tuple[Record, str]], stop: threading.Event) -> bool:
        for record, reason in rejected:
            DEAD_LETTERS.labels(_reason_label(reason)).inc()
            log.info("writer: dead letter from %s (key %s): %s", record.topic, record.key, reason)
        return produce_until_confirmed(self.producer, [
            (self.topics.deadletter, record.key,
             schema.dead_letter(record.topic, record.value, reason, key=record.key),
             {"source": "writer", "reason": reason[:200]}) for record, reason in rejected],
            stop, "writer", (BACKOFF_MIN_S, BACKOFF_MAX_S))

    def _cache_stage(self, outcomes: queue.SimpleQueue) -> None:
        """The cache thread: each stored batch's outcome, with any that queued behind it, into the cache, until
        None comes.

        The newest reading of a device whose tenant nobody watches live is held back and written at most every
        ``settings.cache_flush_ms`` (newest per device): with 10,000 devices at 20,000 msg/s, a write per reading
        was ~20,000 Redis writes a second (the cache thread's Python and Redis together ~10 % of a core), a
        second's worth is one per device, however often the devices report. Readings of watched tenants (a
        channel with a subscriber, asked every WATCHED_REFRESH_S) go at once, since they are also their live
        events; so do status, command and alarm events. When the cache cannot tell who watches, everything goes
        at once."""
        flush_s = self.settings.cache_flush_ms / 1000
        held: dict[str, tuple] = {}  # device -> its newest stored reading not cached yet (a tenant nobody watches)
        watched: set[int] | None = None
        watched_at = next_flush = 0.0
        end = False
        while not end:
            batch: list[Outcome] = []
            try:  # with readings held back, wake for their flush even if no batch comes
                first = outcomes.get(timeout=max(0.0, next_flush - time.monotonic()) if held else None)
                if first is None:
                    end = True
                else:
                    batch.append(first)
            except queue.Empty:
                pass
            while not end:
                try:
                    more = outcomes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    end = True
                else:
                    batch.append(more)
            now = time.monotonic()
            if flush_s > 0 and now >= watched_at:
                watched = self.cache.watched_tenants()
                watched_at = now + WATCHED_REFRESH_S
            deferring = flush_s > 0 and watched is not None and not end
            flush = not deferring or now >= next_flush
            self._publish(batch, held, watched if deferring else None, flush)
            if flush:
                next_flush = now + flush_s

    def _publish(self, outcomes: list[Outcome], held: dict[str, tuple] | None = None,
                 watched: set[int] | None = None, flush: bool = True) -> None:
        """Latest values into the cache and live events per tenant, for stored batches in the order stored. Best
        effort: the cache swallows errors.

        ``held`` (see _cache_stage): readings held back from earlier calls; with ``watched`` given, this call's
        readings of other tenants join them instead of going now; with ``flush``, all of them go now."""
        try:
            readings: list[tuple[int, str, dict]] = []
            updates: list[tuple[int, str, dict]] = []
            events: list[tuple[int, dict]] = []
            newest: dict[str, tuple] = {}
            get = newest.get
            for outcome in outcomes:
                for row in outcome.inserted:  # usually one per device already
                    into = newest if watched is None or row[1] in watched else held
                    prev = into.get(row[0])
                    if prev is None or row[2] >= prev[2]:
                        into[row[0]] = row
            if flush and held:
                for device_id, row in held.items():
                    prev = get(device_id)
                    if prev is None or row[2] >= prev[2]:
                        newest[device_id] = row
                held.clear()
            cached = self._cached_ts
            cached_get = cached.get
            now_ms = int(time.time() * 1000)
            for device_id, tenant_id, ts_ms, t, h, p, rssi, seq, boot, up in newest.values():
                if ts_ms < cached_get(device_id, 0):
                    continue  # an old reading (backlog replay) must not replace a newer one
                cached[device_id] = ts_ms
                readings.append((tenant_id, device_id, {"t": t, "h": h, "p": p, "rssi": rssi, "ts": ts_ms,
                                                        "seq": seq, "boot": boot, "up": up}))
            for outcome in outcomes:
                for item, status in outcome.statuses:
                    seen = item.record.timestamp_ms or int(time.time() * 1000)
                    fields = {"status": status.state, "last_seen": seen}
                    if status.fw:
                        fields["fw"] = status.fw
                    updates.append((item.tenant_id, item.device_id, fields))
                    events.append((item.tenant_id, {"type": "status", "device": item.device_id,
                                                    "state": status.state, "ts": seen, "fw": status.fw,
                                                    "boot": status.boot}))
                for row in outcome.commands:
                    events.append((row.tenant_id, {"type": "command", "device": row.device_id, "cid": row.cid,
                                                   "op": row.op, "status": row.status, "ok": row.ok,
                                                   "error": row.error, "result": row.result}))
                for tenant_id, event in outcome.alarms:
                    events.append((tenant_id, {"type": "alarm", "alarm_id": event.alarm_id, "device": event.device,
                                               "rule": event.rule, "metric": event.metric, "value": event.value,
                                               "threshold": event.threshold, "severity": event.severity,
                                               "state": event.state, "ts": event.ts}))
            if len(self._cached_ts) > 1_000_000:
                self._cached_ts.clear()
            if readings:  # their live events go with them (LatestCache.publish_readings)
                self.cache.publish_readings(readings, now_ms)
            if updates:
                self.cache.update_many(updates)
            if events:
                self.cache.publish_many(events)
        except Exception as exc:  # noqa: BLE001 - the cache is never allowed to stop the writer
            log.warning("writer: cache update failed: %s", exc)

    # --- maintenance ------------------------------------------------------------------------------------------
    def _run_rollups(self, stop: threading.Event) -> None:
        """PostgreSQL: the roll-up job (cloud.db.maintenance.advance_rollups) at start and every rollup_every_s,
        on its own thread and connection. Batches wait only for its short claim transaction, never for the
        aggregate statement (which, run by the batch loop, used to hold every batch for its whole duration)."""
        while True:
            try:
                started = time.monotonic()
                maintenance.advance_rollups(self.engine, step=ROLLUP_JOB_STEP, pace=ROLLUP_PACE, stop=stop)
                ROLLUP_JOB_SECONDS.observe(time.monotonic() - started)
            except Exception as exc:  # noqa: BLE001 - nothing is lost: the next run covers the same readings
                log.warning("writer: roll-up job failed: %s", str(exc).splitlines()[0][:200])
            if stop.wait(self.rollup_every_s):
                return

    def _maybe_maintain(self, stop: threading.Event) -> None:
        now = time.monotonic()
        if now < self._next_maintenance:
            return
        self._next_maintenance = now + self.maintenance_every_s
        try:
            if not self._collation_checked:
                self._check_collation()
            if self.postgres:
                self._partitions.update(maintenance.existing_partitions(self.engine))
                created = maintenance.ensure_partitions(self.engine, days_ahead=2)
                self._partitions.update(datetime.strptime(n[len("telemetry_p"):], "%Y%m%d").date()
                                        for n in created)
            if self.retention:
                report = maintenance.apply_retention(self.engine)
                if report["dropped_partitions"] or report["deleted_rows"]:
                    log.info("writer: retention %s", report)
                    self._partitions.clear()
        except Exception as exc:  # noqa: BLE001 - retried on the next round; inserts create what they need
            log.warning("writer: maintenance failed: %s", str(exc).splitlines()[0][:200])
            self._next_maintenance = now + 30


def _observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, at the cost of one update per bucket instead of one per value
    (falls back to observe() if prometheus_client's internals ever differ)."""
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = defaultdict(int)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bound >= value, as observe() picks it
    total.inc(sum(values))
    for index, n in counts.items():
        buckets[min(index, len(buckets) - 1)].inc(n)


def main() -> int:
    """``python -m cloud.writer``: the writer alone, configured from IOT_* variables. (Not through
    cloud.__main__.build_service: run as a script this module is ``__main__``, and importing ``cloud.writer`` a
    second time would register its metrics twice.)"""
    from cloud import settings as settings_mod
    from cloud.bus import from_settings
    from cloud.cache import cache_from_settings
    from cloud.db import make_engine
    from cloud.service import serve, setup_logging

    settings = settings_mod.load()
    setup_logging(settings.log_level)
    writer = Writer(settings, from_settings(settings), make_engine(settings.database_url, **ENGINE_OPTIONS),
                    cache_from_settings(settings))
    return serve(writer, host=settings.metrics_host, ops_port=settings.metrics_port)


if __name__ == "__main__":
    raise SystemExit(main())
