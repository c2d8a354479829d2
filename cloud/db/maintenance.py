"""Telemetry housekeeping: daily partitions, roll-up rebuilds, retention.

Partitions (PostgreSQL only)
    ``telemetry`` is range-partitioned by event time ``ts``, one partition per UTC day named
    ``telemetry_pYYYYMMDD``. :func:`ensure_partitions` creates today's and the next ``days_ahead`` days'
    partitions; the writer calls it at start-up and hourly, and additionally creates the partition of any day a
    batch needs (late or back-filled readings) before inserting, so an insert never fails for want of one.
    There is no DEFAULT partition on purpose: rows in it would block creating the matching day later.

Roll-ups
    ``telemetry_1m`` / ``telemetry_1h`` hold per-device count/sum/min/max of t, h, p per minute / hour.
    PostgreSQL: behind a watermark (``rollup_watermark.done_until``). Every reading with ts below the mark is
    counted (or claimed, below), every reading at or after it is not yet. :func:`advance_rollups` (run by the
    writer on a thread of its own, a whole minute at a time, ``ROLLUP_GRACE`` behind the clock) moves the mark
    under an exclusive advisory lock, recording the claimed range and a snapshot, and then aggregates the
    readings of ``[old mark, new mark)`` visible in that snapshot in one set-based statement and adds them to
    both tables; every writer transaction holds the same lock shared and adds the readings it inserts *below*
    the mark (late ones) to the roll-ups itself, from the rows its insert actually added (``RETURNING``). So each
    reading is counted exactly once: by the writer if it arrived after its minute was claimed, by the job
    otherwise; duplicates never.
    (Row-by-row upserts of two roll-up rows per reading were the writer's largest cost.) SQLite: the writer
    maintains them row by row in its transaction (the mark is unused).
    :func:`refresh_rollups` recomputes a time range from the raw rows (after a bulk load, or to repair).

Retention
    Each tenant has ``retention_days``. Whole partitions can only be dropped for everybody, so
    :func:`apply_retention` (1) drops every partition that ends before ``now - max(retention_days)`` (the
    longest retention of any tenant: nothing anyone may still see), then (2) for each tenant whose retention is
    shorter, deletes its older rows with a ``DELETE ... WHERE tenant_id = :t AND ts < :cutoff`` (uses the
    (tenant_id, ts) index; partitions entirely past the cutoff are pruned from the scan). Roll-ups are
    deleted per tenant: one-minute roll-ups after ``retention_days``, one-hour roll-ups after
    ``max(retention_days, ROLLUP_1H_MIN_DAYS)`` (the long-term trend outlives the raw data). On SQLite (a plain
    table) only step 2 applies, for every tenant. Run it daily (``python -m cloud db maintain`` or the writer,
    which calls it hourly).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Mapping

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

PARTITION_PREFIX = "telemetry_p"
PARTITION_NAME = re.compile(r"^telemetry_p(\d{8})$")
ROLLUP_1H_MIN_DAYS = 400
DEFAULT_RETENTION_DAYS = 30


def _utc_day(value: datetime | date) -> date:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        return value.date()
    return value


def partition_name(day: date) -> str:
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


def collation_advice(engine: Engine) -> str | None:
    """A warning when the database compares text by a linguistic collation (e.g. the postgres image's default
    en_US.utf8, or an ICU locale), else None (and on SQLite).

    The telemetry key starts with the device id, so every stored reading compares device ids a couple of dozen
    times on its way down the key index. Under the C collation that is a memcmp; under a libc or ICU locale a
    strcoll. Measured on PostgreSQL 15 (one backend, COPY of 1,000,000 readings of 10,000 devices into a table
    with the telemetry key, rounds up to 3 M rows): C 4.6-6.2 us of backend CPU per reading, ICU en 5.4-9.0,
    libc en_US.utf8 6.8-11.1. The tests, the benchmarks and deploy/compose.yaml's database use C."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:  # every column: datlocprovider and the ICU locale's name came in version 15
        row = conn.exec_driver_sql("SELECT * FROM pg_database WHERE datname = current_database()").mappings().one()
    return collation_verdict(row)


def collation_verdict(row: Mapping[str, Any]) -> str | None:
    """collation_advice's answer for a ``pg_database`` row: None for libc C/POSIX and for the builtin provider
    (PostgreSQL 17+: its C, C.UTF-8 and PG_UNICODE_FAST all order by code point, a memcmp on UTF-8), else the
    warning naming the locale."""
    provider, collate = str(row.get("datlocprovider", "c")), row["datcollate"]
    if (provider == "c" and collate in ("C", "POSIX")) or provider == "b":
        return None
    locale = row.get("daticulocale") or row.get("datlocale")
    name = collate if provider == "c" else f"{locale or collate} (locale provider {provider!r})"
    return (f"database collation is {name}, not C: each stored reading can cost PostgreSQL up to ~1.8x the CPU "
            "(device ids compared by locale in the telemetry key index). Create the database with --locale=C "
            "(initdb) or LOCALE 'C' TEMPLATE template0 (CREATE DATABASE), as deploy/compose.yaml does.")


def existing_partitions(engine: Engine) -> dict[date, str]:
    """Day -> partition table name of every telemetry partition (empty on SQLite)."""
    if engine.dialect.name != "postgresql":
        return {}
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'telemetry'")).scalars().all()
    result = {}
    for name in rows:
        match = PARTITION_NAME.match(name)
        if match:
            result[datetime.strptime(match.group(1), "%Y%m%d").date()] = name
    return result


def create_partitions(engine: Engine, days: Iterable[date]) -> list[str]:
    """Create the daily partitions for ``days`` that do not exist yet; returns the names created.

    Safe to run concurrently from several writers (IF NOT EXISTS, and a lost race is ignored)."""
    if engine.dialect.name != "postgresql":
        return []
    created = []
    for day in sorted(set(days)):
        name = partition_name(day)
        start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        end = start + timedelta(days=1)
        try:
            with engine.begin() as conn:
                exists = conn.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar()
                if exists:
                    continue
                conn.execute(text(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF telemetry "
                    f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"))
                # device_id determines tenant_id: without this the planner multiplies both selectivities,
                # expects ~1 row per device and picks bitmap scans plus a sort for "latest readings"
                conn.execute(text(f"CREATE STATISTICS IF NOT EXISTS {name}_device_tenant (dependencies) "
                                  f"ON device_id, tenant_id FROM {name}"))
            created.append(name)
            log.info("created telemetry partition %s", name)
        except Exception as exc:  # a concurrent writer created it first
            if "already exists" in str(exc):
                continue
            raise
    return created


def ensure_partitions(engine: Engine, days_ahead: int = 2, days_back: int = 1,
                      now: datetime | None = None) -> list[str]:
    """Create the partitions from ``days_back`` days ago through ``days_ahead`` days ahead (UTC)."""
    today = _utc_day(now or datetime.now(timezone.utc))
    return create_partitions(engine, (today + timedelta(days=d) for d in range(-days_back, days_ahead + 1)))


def drop_partitions_before(engine: Engine, cutoff: datetime) -> list[str]:
    """Drop every daily partition whose whole day ends at or before ``cutoff``."""
    dropped = []
    cutoff_day = _utc_day(cutoff)
    for day, name in sorted(existing_partitions(engine).items()):
        if day + timedelta(days=1) <= cutoff_day:
            with engine.begin() as conn:
                conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
            dropped.append(name)
            log.info("dropped telemetry partition %s (retention)", name)
    return dropped


def apply_retention(engine: Engine, now: datetime | None = None) -> dict:
    """Enforce every tenant's ``retention_days`` (see the module docstring). Returns what was done."""
    now = now or datetime.now(timezone.utc)
    with engine.connect() as conn:
        tenants = conn.execute(text("SELECT id, retention_days FROM tenants")).all()
    report: dict = {"dropped_partitions": [], "deleted_rows": 0, "deleted_rollups": 0}
    if not tenants:
        return report
    postgres = engine.dialect.name == "postgresql"
    longest = max(days or DEFAULT_RETENTION_DAYS for _, days in tenants)
    if postgres:
        # whole days older than the longest retention: nobody may see them any more
        cutoff = datetime.combine(_utc_day(now - timedelta(days=longest)), datetime.min.time(), timezone.utc)
        report["dropped_partitions"] = drop_partitions_before(engine, cutoff)
    from cloud.db.models import Telemetry, Telemetry1h, Telemetry1m  # noqa: F401 (type processing for SQLite)
    from sqlalchemy import delete

    for tenant_id, days in tenants:
        days = days or DEFAULT_RETENTION_DAYS
        cutoff = now - timedelta(days=days)
        with engine.begin() as conn:
            if not postgres or days < longest:
                result = conn.execute(delete(Telemetry).where(Telemetry.tenant_id == tenant_id,
                                                              Telemetry.ts < cutoff))
                report["deleted_rows"] += result.rowcount or 0
            result = conn.execute(delete(Telemetry1m).where(Telemetry1m.tenant_id == tenant_id,
                                                            Telemetry1m.bucket < cutoff))
            report["deleted_rollups"] += result.rowcount or 0
            hour_cutoff = now - timedelta(days=max(days, ROLLUP_1H_MIN_DAYS))
            result = conn.execute(delete(Telemetry1h).where(Telemetry1h.tenant_id == tenant_id,
                                                            Telemetry1h.bucket < hour_cutoff))
            report["deleted_rollups"] += result.rowcount or 0
    return report


# --- roll-ups ---------------------------------------------------------------------------------------------

_PG_BUCKET = {"1m": "date_trunc('minute', ts)", "1h": "date_trunc('hour', ts)"}
# SQLite stores UTC timestamps as 'YYYY-MM-DD HH:MM:SS[.ffffff]' text
_SQLITE_BUCKET = {"1m": "substr(ts, 1, 16) || '\\:00.000000'", "1h": "substr(ts, 1, 13) || '\\:00\\:00.000000'"}


def refresh_rollups(engine: Engine, start: datetime, end: datetime, device_ids: list[str] | None = None) -> int:
    """Recompute the one-minute and one-hour roll-ups of the hours overlapping [start, end) from the raw rows
    (replacing what was there). Returns the number of roll-up rows written.

    PostgreSQL: first moves the watermark to the end of that range at least (:func:`advance_rollups`; readings
    that arrive later for the range are then added by the writer as late ones), then recomputes under the
    roll-up lock, so neither the job nor a writer counts a recomputed reading again. A refresh reaching into
    the future therefore sends the writer down its slower late path until that time has passed: it is a repair
    and bulk-load tool, not something to run routinely."""
    postgres = engine.dialect.name == "postgresql"
    bucket_sql = _PG_BUCKET if postgres else _SQLITE_BUCKET
    hour = timedelta(hours=1)
    lo = _floor(start, hour)
    hi = _floor(end, hour) + (hour if _floor(end, hour) < end else timedelta(0))
    if postgres:
        advance_rollups(engine, until=hi)
    written = 0
    params = {"lo": _param(lo, postgres), "hi": _param(hi, postgres)}
    device_filter = ""
    if device_ids:
        names = []
        for i, device in enumerate(device_ids):
            params[f"d{i}"] = device
            names.append(f":d{i}")
        device_filter = f" AND device_id IN ({', '.join(names)})"
    aggregates = ", ".join(f"count({m}), sum({m}), min({m}), max({m})" for m in "thp")
    with engine.begin() as conn:
        if postgres:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ROLLUP_LOCK})
        for resolution, table in (("1m", "telemetry_1m"), ("1h", "telemetry_1h")):
            conn.execute(text(f"DELETE FROM {table} WHERE bucket >= :lo AND bucket < :hi{device_filter}"), params)
            result = conn.execute(text(
                f"INSERT INTO {table} (device_id, bucket, tenant_id, n, t_n, t_sum, t_min, t_max, "
                f"h_n, h_sum, h_min, h_max, p_n, p_sum, p_min, p_max) "
                f"SELECT device_id, {bucket_sql[resolution]} AS b, min(tenant_id), count(*), {aggregates} "
                f"FROM telemetry WHERE ts >= :lo AND ts < :hi{device_filter} GROUP BY device_id, b"), params)
            written += result.rowcount or 0
    return written


# PostgreSQL roll-up job -----------------------------------------------------------------------------------------

ROLLUP_LOCK = 0x10_7_0001  # advisory lock: writer transactions hold it shared, the roll-up job exclusively
ROLLUP_GRACE = timedelta(seconds=15)  # the job stays this far behind the clock (readings still in flight)
ROLLUP_GRANULE = timedelta(minutes=1)  # whole minutes: a one-minute roll-up row is written once, by one run
# (an update per run would cost a row version each and keep its page from becoming all-visible), and a run costs
# one upsert per device and minute however many readings the minute holds. Writers no longer wait for a run.
ROLLUP_STEP = timedelta(hours=1)  # at most this much time per job transaction (catching up after a stop)
ROLLUP_SLICE = timedelta(seconds=5)  # a paced finish aggregates this much ts per statement (finish_claimed_rollups)
ROLLUP_MERGE_PARTS = 4  # ... and adds that to the roll-ups in this many statements, each for a part of the devices
# the job's connection is named this (pg_stat_activity.application_name) while it works, so monitoring can tell its
# statements and paced pauses ("idle in transaction") from the writer's inserts (bench_e2e's PostgresWatch does)
ROLLUP_APPLICATION_NAME = "iot-rollups"

_COLUMNS = ("device_id, bucket, tenant_id, n, t_n, t_sum, t_min, t_max, h_n, h_sum, h_min, h_max, "
            "p_n, p_sum, p_min, p_max")


def rollup_add_clause() -> str:
    """``ON CONFLICT`` action adding an aggregate row to a stored one (NULL sums/extremes stay NULL only while
    the metric has no value at all; least/greatest ignore NULLs)."""
    updates = ["n = r.n + excluded.n"] + [part for m in "thp" for part in (
        f"{m}_n = r.{m}_n + excluded.{m}_n",
        f"{m}_sum = coalesce(r.{m}_sum + excluded.{m}_sum, r.{m}_sum, excluded.{m}_sum)",
        f"{m}_min = least(r.{m}_min, excluded.{m}_min)",
        f"{m}_max = greatest(r.{m}_max, excluded.{m}_max)")]
    return "ON CONFLICT (device_id, bucket) DO UPDATE SET " + ", ".join(updates)


def _hour_from_minutes(source: str) -> str:
    return (f"SELECT device_id, date_trunc('hour', bucket), min(tenant_id), sum(n), "
            + ", ".join(f"sum({m}_n), sum({m}_sum), min({m}_min), max({m}_max)" for m in "thp")
            + f" FROM {source} GROUP BY 1, 2 ORDER BY 1, 2")


# the readings with ts in [lo, hi) as one-minute aggregate rows (the roll-up tables' columns)
_MINUTE_AGGREGATES = (
    "SELECT device_id, date_trunc('minute', ts) AS bucket, min(tenant_id) AS tenant_id, count(*) AS n, "
    + ", ".join(f"count({m}) AS {m}_n, sum({m}) AS {m}_sum, min({m}) AS {m}_min, max({m}) AS {m}_max" for m in "thp")
    + " FROM telemetry WHERE ts >= %(lo)s AND ts < %(hi)s GROUP BY 1, 2")


def _add_minutes(minutes: str) -> str:
    """The statement adding the one-minute aggregate rows ``minutes`` yields to both roll-ups; returns their
    readings."""
    return (f"WITH a AS MATERIALIZED ({minutes}), "
            f"m AS (INSERT INTO telemetry_1m AS r ({_COLUMNS}) SELECT {_COLUMNS} FROM a ORDER BY 1, 2 "
            f"{rollup_add_clause()}), "
            f"h AS (INSERT INTO telemetry_1h AS r ({_COLUMNS}) {_hour_from_minutes('a')} {rollup_add_clause()}) "
            "SELECT coalesce(sum(n), 0) FROM a")


_ADVANCE_SQL = _add_minutes(_MINUTE_AGGREGATES)


# xmin is a 32-bit xid; pg_visible_in_snapshot takes a 64-bit xid8. The readings of a claimed range were written
# within seconds (at most days) of the snapshot, so their xid is the 64-bit value nearest the snapshot's xmax:
# xmax8 + the signed 32-bit distance between them (correct across a wraparound of the 32-bit counter).
_XMIN8 = ("(claim.xmax8 + mod(tel.xmin::text::bigint - (claim.xmax8 & 4294967295) + 6442450944, 4294967296)"
          " - 2147483648)::text::xid8")
_CLAIMED_MINUTE_AGGREGATES = _MINUTE_AGGREGATES.replace(
    " FROM telemetry WHERE ts >= %(lo)s AND ts < %(hi)s GROUP BY 1, 2",
    " FROM telemetry tel, (SELECT %(snap)s::pg_snapshot AS snap, "
    "pg_snapshot_xmax(%(snap)s::pg_snapshot)::text::bigint AS xmax8) claim "
    f"WHERE ts >= %(lo)s AND ts < %(hi)s AND pg_visible_in_snapshot({_XMIN8}, claim.snap) GROUP BY 1, 2")
assert _CLAIMED_MINUTE_AGGREGATES != _MINUTE_AGGREGATES
_ADVANCE_CLAIMED_SQL = _add_minutes(_CLAIMED_MINUTE_AGGREGATES)

# A paced finish (see finish_claimed_rollups) aggregates the claimed range slice by slice into this table, then
# adds its rows, merged per device and minute, to the roll-ups, a part of the devices (by PostgreSQL's own text
# hash) per statement. Temporary: no WAL, gone at commit.
_PARTS = "rollup_parts"
_PARTS_DDL = (f"CREATE TEMP TABLE {_PARTS} (device_id varchar(64), bucket timestamptz, tenant_id int4, n int8, "
              + ", ".join(f"{m}_n int8, {m}_sum float8, {m}_min float8, {m}_max float8" for m in "thp")
              + ") ON COMMIT DROP")
_ADD_PART_SQL = f"INSERT INTO {_PARTS} ({_COLUMNS}) {_CLAIMED_MINUTE_AGGREGATES}"
_ADD_PARTS_SQL = _add_minutes(
    "SELECT device_id, bucket, min(tenant_id) AS tenant_id, sum(n) AS n, "
    + ", ".join(f"sum({m}_n) AS {m}_n, sum({m}_sum) AS {m}_sum, min({m}_min) AS {m}_min, max({m}_max) AS {m}_max"
                for m in "thp")
    + f" FROM {_PARTS} WHERE abs(hashtext(device_id) %% %(parts)s) = %(part)s GROUP BY 1, 2")


def advance_statement() -> str:
    """The roll-up job's statement (parameters ``lo``, ``hi``): adds the readings with ts in [lo, hi)."""
    return _ADVANCE_SQL


def rollup_watermark(engine: Engine) -> datetime | None:
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT done_until FROM rollup_watermark WHERE id = 1").scalar()


def advance_rollups(engine: Engine, until: datetime | None = None, now: datetime | None = None,
                    step: timedelta = ROLLUP_STEP, pace: float = 0.0, stop: threading.Event | None = None) -> int:
    """PostgreSQL: add the readings with ts in [watermark, until) to both roll-ups and move the watermark to
    ``until`` (default: ``ROLLUP_GRACE`` before now, on a ``ROLLUP_GRANULE`` boundary). Never moves it back. Returns the
    number of readings added. A no-op on SQLite (the writer keeps the roll-ups there itself).

    Each step is two transactions, so that writers wait only for the first, which is short:

    1. *claim* (under the exclusive roll-up lock): move the mark from ``lo`` to ``hi`` and record the range and
       ``pg_current_snapshot()``. Taking the lock waited for every writer transaction that read the old mark, so
       the snapshot shows every reading those will ever add to the range; every later writer transaction reads
       the new mark and rolls up its own readings below it (late ones).
    2. *finish*: add the readings of the range that are visible in the recorded snapshot -- exactly the ones no
       writer counted -- and clear the claim, in one transaction. A claim left by a job that died is finished
       by the next run: the same rows are visible in the same snapshot.

    ``pace`` and ``stop``: see finish_claimed_rollups."""
    if engine.dialect.name != "postgresql":
        return 0
    if until is None:
        until = _floor((now or datetime.now(timezone.utc)) - ROLLUP_GRACE, ROLLUP_GRANULE)
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SET application_name = '{ROLLUP_APPLICATION_NAME}'")
        conn.commit()
        try:
            summarize_claimed_range(conn)
            total = finish_claimed_rollups(conn, pace, stop)
            conn.commit()
            while True:
                with conn.begin():
                    hi = claim_rollups(conn, until, step)
                if hi is None:
                    return total
                summarize_claimed_range(conn)
                total += finish_claimed_rollups(conn, pace, stop)
                conn.commit()
                if hi >= until:
                    return total
        finally:
            try:  # the pooled connection goes back to the writer's batches under its own name
                conn.rollback()  # a step an error interrupted: the next run redoes it
                conn.exec_driver_sql("RESET application_name")
                conn.commit()
            except Exception:  # noqa: BLE001 - a broken connection: the pool discards it, name and all
                pass


_TS_INDEX_OF = ("SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indexrelid "
                "WHERE h.inhparent = to_regclass('ix_telemetry_ts') AND i.indrelid = to_regclass(%(p)s)")


def summarize_claimed_range(conn) -> int:
    """Summarize the not yet summarized block ranges of the BRIN index on ts (``brin_summarize_new_values``) of the
    partitions the pending claim covers, in a transaction of its own (committed here). Returns the ranges added.

    A BRIN index summarizes a block range only when VACUUM (or this) does; until then every scan by ts reads the
    range whatever it holds. The roll-up job reads a claimed minute by ts, so without this each run read every
    page written since the partition's last vacuum: measured on the bench_writer dataset, 1,250,099 rows read
    for 199,906 claimed (20,497 heap blocks, 521 ms); after summarizing (0.19 s, once) 3,985 blocks. Blocks
    written later into a summarized range widen its summary as they are inserted, so only new ranges need this.
    Failures (e.g. a role that does not own the table) are logged and skipped: the scan stays correct, only
    slower."""
    claim = conn.exec_driver_sql("SELECT pending_lo, pending_hi FROM rollup_watermark WHERE id = 1").first()
    conn.commit()
    if claim is None or claim[0] is None:
        return 0
    lo, hi = claim
    day, last = _utc_day(lo), _utc_day(hi)
    added = 0
    try:
        while day <= last:
            index = conn.exec_driver_sql(_TS_INDEX_OF, {"p": partition_name(day)}).scalar()
            if index:
                added += int(conn.exec_driver_sql("SELECT brin_summarize_new_values(%(i)s::regclass)",
                                                  {"i": index}).scalar() or 0)
            day += timedelta(days=1)
        conn.commit()
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        conn.rollback()
        log.warning("roll-up job: could not summarize the ts index: %s", str(exc).splitlines()[0][:200])
    return added


def claim_rollups(conn, until: datetime, step: timedelta = ROLLUP_STEP) -> datetime | None:
    """The claim transaction's work (the caller commits at once: writers wait for it): move the mark towards
    ``until`` by at most ``step`` and record the range and the snapshot. Returns the new mark, None if the mark
    is at ``until`` already."""
    # the job runs every few seconds but has a whole minute to claim only once a minute: the mark only ever
    # moves forward, so one already at ``until`` is seen without the exclusive lock, which every batch waits for
    mark = conn.exec_driver_sql("SELECT done_until FROM rollup_watermark WHERE id = 1").scalar()
    if mark is None or mark >= until:
        return None
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%(k)s)", {"k": ROLLUP_LOCK})
    lo = conn.exec_driver_sql("SELECT done_until FROM rollup_watermark WHERE id = 1 FOR UPDATE").scalar()
    if lo is None or lo >= until:
        return None
    hi = min(until, lo + step)
    # pg_current_snapshot() is this statement's snapshot, taken after the lock was granted
    conn.exec_driver_sql(
        "UPDATE rollup_watermark SET done_until = %(hi)s, pending_lo = %(lo)s, pending_hi = %(hi)s, "
        "pending_snapshot = pg_current_snapshot()::text WHERE id = 1", {"lo": lo, "hi": hi})
    return hi


def finish_claimed_rollups(conn, pace: float = 0.0, stop: threading.Event | None = None) -> int:
    """Add the claimed range's readings (those visible in the claim's snapshot) to the roll-ups and clear the
    claim; returns how many were added (0 without a claim). Runs in the caller's transaction. The row lock
    makes a second job (another writer) that finds the same claim wait and then see it cleared.

    ``pace`` > 0 spreads the work: the range is aggregated ``ROLLUP_SLICE`` of ts at a time into a temporary
    table, with a pause of ``pace`` times each slice's duration after it; the slices' rows are then merged and
    added to the roll-ups in ``ROLLUP_MERGE_PARTS`` statements, each for a part of the devices, paced the same way
    (a one-minute row is still written once). A minute of 16,000 readings/s in one statement is 0.7-1.5 s of a
    backend's CPU at once (idle machine; 1.5 s when its sort spilled to disk), and in the bench's 16,000 msg/s
    steps, on a busy machine, it ran for 2-5 s while every reading stored meanwhile waited: those were the
    window's slowest seconds. Paced (pace 3), the same minute took 3.7-5.1 s in statements of 40-120 ms (12 slices,
    4 merges), for 0.95-1.3 s of CPU against 0.7 s in one statement: the temporary table is the price of never
    holding the machine for long. ``stop`` ends the pauses (not the work)."""
    if conn.exec_driver_sql("SELECT pending_lo FROM rollup_watermark WHERE id = 1").scalar() is None:
        return 0  # the usual case: no row lock taken (and no row version written) for nothing
    claim = conn.exec_driver_sql("SELECT pending_lo, pending_hi, pending_snapshot FROM rollup_watermark "
                                 "WHERE id = 1 FOR UPDATE").first()
    if claim is None or claim[0] is None:
        return 0
    lo, hi, snapshot = claim
    # the partition's statistics lag behind its newest rows, so the planner expects one row and sorts every
    # claimed reading for the grouping: with the default 4 MB that sort spilled to disk (200,000 readings on the
    # bench_writer dataset: 521 ms; in memory 325 ms). (enable_sort = off got a hash aggregate, 256 ms, but
    # over a range of many partitions a plan that took minutes; and scanning the one partition by name with it
    # measured 0.60-0.68 s against 0.51-0.53 s for the sort, 400,000 readings of 10,000 devices, warm cache.)
    conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
    if pace <= 0 or hi - lo <= ROLLUP_SLICE:
        added = int(conn.exec_driver_sql(_ADVANCE_CLAIMED_SQL, {"lo": lo, "hi": hi, "snap": snapshot}).scalar()
                    or 0)
    else:
        conn.exec_driver_sql(_PARTS_DDL)
        # a slice is seconds of a day's partition: always the BRIN index on ts. Without statistics of the partition
        # (a new day's, before autovacuum analysed it) the planner chose a sequential scan of the whole partition
        # for every slice (measured: 170 ms a slice on a 2.9 M-row partition, against 50-80 ms)
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        stop = stop or threading.Event()

        def breathe(began: float) -> None:  # pause ``pace`` times what the statement took; none once stopping
            nonlocal pace
            if pace > 0 and stop.wait((time.monotonic() - began) * pace):
                pace = 0.0

        start = lo
        while start < hi:
            began = time.monotonic()
            conn.exec_driver_sql(_ADD_PART_SQL, {"lo": start, "hi": min(start + ROLLUP_SLICE, hi), "snap": snapshot})
            start += ROLLUP_SLICE
            breathe(began)
        conn.exec_driver_sql("SET LOCAL enable_seqscan TO DEFAULT")  # a merge reads the whole temporary table
        added = 0
        for part in range(ROLLUP_MERGE_PARTS):
            began = time.monotonic()
            added += int(conn.exec_driver_sql(_ADD_PARTS_SQL, {"parts": ROLLUP_MERGE_PARTS, "part": part}).scalar()
                         or 0)
            if part + 1 < ROLLUP_MERGE_PARTS:
                breathe(began)
    conn.exec_driver_sql("UPDATE rollup_watermark SET pending_lo = NULL, pending_hi = NULL, pending_snapshot = NULL "
                         "WHERE id = 1")
    return added


def _floor(value: datetime, unit: timedelta) -> datetime:
    value = value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    return epoch + ((value - epoch) // unit) * unit


def _param(value: datetime, postgres: bool):
    if postgres:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def maintain(engine: Engine, days_ahead: int = 2, now: datetime | None = None) -> dict:
    """Everything periodic in one call: partitions ahead, retention."""
    created = ensure_partitions(engine, days_ahead=days_ahead, now=now)
    report = apply_retention(engine, now=now)
    report["created_partitions"] = created
    return report
