"""Telemetry housekeeping: daily partitions, roll-up rebuilds, retention.

Partitions (PostgreSQL only)
    ``telemetry`` is range-partitioned by event time ``ts``, one partition per UTC day named
    ``telemetry_pYYYYMMDD``. :func:`ensure_partitions` creates today's and the next ``days_ahead`` days'
    partitions; the writer calls it at start-up and hourly, and additionally creates the partition of any day a
    batch needs (late or back-filled readings) before inserting, so an insert never fails for want of one.
    There is no DEFAULT partition on purpose: rows in it would block creating the matching day later.

Roll-ups
    ``telemetry_1m`` / ``telemetry_1h`` hold per-device count/sum/min/max of t, h, p per minute / hour. They
    are maintained **incrementally by the writer**, in the same transaction as the raw rows, from the rows the
    insert actually added (``RETURNING``), so duplicates never count twice and a crash never leaves them out of
    step. :func:`refresh_rollups` recomputes a time range from the raw rows (after a bulk load, or to repair).

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
from datetime import date, datetime, timedelta, timezone
from typing import Iterable

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
    """Recompute the one-minute and one-hour roll-ups of the buckets overlapping [start, end) from the raw
    rows (replacing what was there). Returns the number of roll-up rows written."""
    postgres = engine.dialect.name == "postgresql"
    bucket_sql = _PG_BUCKET if postgres else _SQLITE_BUCKET
    written = 0
    for resolution, table in (("1m", "telemetry_1m"), ("1h", "telemetry_1h")):
        unit = timedelta(minutes=1) if resolution == "1m" else timedelta(hours=1)
        lo = _floor(start, unit)
        hi = _floor(end, unit) + (unit if _floor(end, unit) < end else timedelta(0))
        params = {"lo": _param(lo, postgres), "hi": _param(hi, postgres)}
        device_filter = ""
        if device_ids:
            names = []
            for i, device in enumerate(device_ids):
                params[f"d{i}"] = device
                names.append(f":d{i}")
            device_filter = f" AND device_id IN ({', '.join(names)})"
        aggregates = ", ".join(
            f"count({m}), sum({m}), min({m}), max({m})" for m in "thp")
        with engine.begin() as conn:
            conn.execute(text(f"DELETE FROM {table} WHERE bucket >= :lo AND bucket < :hi{device_filter}"), params)
            result = conn.execute(text(
                f"INSERT INTO {table} (device_id, bucket, tenant_id, n, t_n, t_sum, t_min, t_max, "
                f"h_n, h_sum, h_min, h_max, p_n, p_sum, p_min, p_max) "
                f"SELECT device_id, {bucket_sql[resolution]} AS b, min(tenant_id), count(*), {aggregates} "
                f"FROM telemetry WHERE ts >= :lo AND ts < :hi{device_filter} GROUP BY device_id, b"), params)
            written += result.rowcount or 0
    return written


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
