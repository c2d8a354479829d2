"""The data model (SQLAlchemy 2, typed). The same models run on PostgreSQL (production) and SQLite (demo).

Every row that belongs to a customer carries ``tenant_id``, and every query the web tier makes goes through
functions that take the tenant explicitly (``cloud.db.repo``), so one customer can never see another's rows.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp that is always timezone-aware UTC in Python, on every database.

    PostgreSQL stores ``timestamptz``. SQLite has no time zones: values are converted to UTC and stored naive (so
    string comparison orders them correctly) and come back as aware UTC datetimes, so code never mixes naive and
    aware values. A naive value passed in is taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        else:
            value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    retention_days: Mapped[int] = mapped_column(Integer, default=30)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="viewer")  # admin | operator | viewer
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(120))
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)  # sha256 of the token; the token is shown once
    role: Mapped[str] = mapped_column(String(16), default="viewer")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Webhook(Base):
    """Where a tenant's alarm events are POSTed (cloud.notifier), signed with ``secret`` (HMAC-SHA256; the secret
    is shown once at creation and kept here because signing needs it)."""
    __tablename__ = "webhooks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(120))
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(64))
    min_severity: Mapped[str] = mapped_column(String(16), default="warning")  # this severity and above
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Device(Base):
    __tablename__ = "devices"
    # The device id is the MQTT identity (devices/<id>/...), unique across all tenants.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(120))
    mqtt_username: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    firmware: Mapped[str | None] = mapped_column(String(32), default=None)
    boot: Mapped[int | None] = mapped_column(BigInteger, default=None)
    status: Mapped[str] = mapped_column(String(16), default="unknown")  # online | offline | unknown
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Telemetry(Base):
    """One reading. (device_id, boot, seq) identifies it, so redeliveries and replays are stored once.

    PostgreSQL: the table is range-partitioned by ``ts`` (one partition per UTC day, see
    :mod:`cloud.db.maintenance`). A partitioned table's primary key must contain the partition key, so the
    physical key there is (device_id, boot, seq, ts). That is still a key for the *reading* because ``ts`` is a
    deterministic function of the message: the device clock when the device is synced, and otherwise an estimate
    derived from the (device, boot) anchor in :class:`DeviceBoot` plus the reading's uptime -- the same value on
    every redelivery and replay (see :mod:`cloud.writer`). SQLite: an ordinary table whose primary key is
    (device_id, boot, seq). The ORM maps the logical key (device_id, boot, seq) on both.
    """
    __tablename__ = "telemetry"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    boot: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    ts: Mapped[datetime] = mapped_column()  # event time: the device clock, or the receive time if unsynced
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    t: Mapped[float | None] = mapped_column(Float, default=None)
    h: Mapped[float | None] = mapped_column(Float, default=None)
    p: Mapped[float | None] = mapped_column(Float, default=None)
    rssi: Mapped[int | None] = mapped_column(Integer, default=None)
    up: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # True when ts is the cloud's estimate (device clock unsynced or implausible), not the device clock
    ts_estimated: Mapped[bool] = mapped_column(Boolean, default=False)

    # PostgreSQL: the primary key (device_id, ts, boot, seq) answers "this device, newest first" and device time
    # ranges, and a BRIN index on ts the time-range scans (roll-up job, retention); the two B-trees below exist on
    # SQLite only, whose key is (device_id, boot, seq) (see migration 0003 and migrations_support).
    __table_args__ = (
        Index("ix_telemetry_device_ts", "device_id", "ts", info={"sqlite_only": True}),
        Index("ix_telemetry_tenant_ts", "tenant_id", "ts", info={"sqlite_only": True}),
        Index("ix_telemetry_ts", "ts", postgresql_using="brin"),
    )


class Rule(Base):
    """An alarm rule: tenant default when device_id is NULL, a device override otherwise."""
    __tablename__ = "rules"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), default=None)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="threshold")  # threshold | rate | nodata | offline
    metric: Mapped[str] = mapped_column(String(32), default="t")
    min: Mapped[float | None] = mapped_column(Float, default=None)
    max: Mapped[float | None] = mapped_column(Float, default=None)
    hysteresis: Mapped[float] = mapped_column(Float, default=0.0)
    duration_s: Mapped[int] = mapped_column(Integer, default=0)
    rate_per_min: Mapped[float | None] = mapped_column(Float, default=None)
    nodata_s: Mapped[int | None] = mapped_column(Integer, default=None)
    severity: Mapped[str] = mapped_column(String(16), default="major")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    on_raise: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # command sent to the device
    on_clear: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        UniqueConstraint("tenant_id", "device_id", "name", name="uq_rules_scope_name"),
        # NULLs are distinct in a unique constraint: tenant-wide rules (device_id NULL) need their own index
        Index("uq_rules_tenant_default_name", "tenant_id", "name", unique=True,
              postgresql_where=text("device_id IS NULL"), sqlite_where=text("device_id IS NULL")),
    )


class Alarm(Base):
    __tablename__ = "alarms"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer, index=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))  # raised | acknowledged | cleared
    value: Mapped[float | None] = mapped_column(Float, default=None)
    threshold: Mapped[float | None] = mapped_column(Float, default=None)
    raised_at: Mapped[datetime] = mapped_column()
    acknowledged_at: Mapped[datetime | None] = mapped_column(default=None)
    acknowledged_by: Mapped[str | None] = mapped_column(String(254), default=None)
    cleared_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_alarms_tenant_raised", "tenant_id", "raised_at"),)


class Command(Base):
    __tablename__ = "commands"
    cid: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer, index=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    op: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    ok: Mapped[bool | None] = mapped_column(Boolean, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_by: Mapped[str | None] = mapped_column(String(254), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_commands_device_created", "device_id", "created_at"),)


class DeviceBoot(Base):
    """The time anchor of one boot of one device: the estimated wall-clock time the device booted.

    Written once (insert-if-absent) when the first reading of a boot arrives without a usable device clock:
    ``booted_at = receive time - uptime``. Every later reading of that boot without a clock gets
    ``ts = booted_at + up`` -- deterministic, so redelivered and replayed readings get the same ``ts`` and
    therefore the same (partitioned) primary key.
    """
    __tablename__ = "device_boots"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    boot: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    booted_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class _RollupColumns:
    """Per-bucket aggregates of one device. Sums and counts (not averages) are stored so the writer can add
    new readings incrementally; ``avg = sum / n`` per metric (each metric has its own count because a reading
    may carry only some of t, h, p)."""
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[datetime] = mapped_column(primary_key=True)  # start of the minute / hour (UTC)
    tenant_id: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(BigInteger, default=0)  # readings in the bucket
    t_n: Mapped[int] = mapped_column(BigInteger, default=0)
    t_sum: Mapped[float | None] = mapped_column(Float, default=None)
    t_min: Mapped[float | None] = mapped_column(Float, default=None)
    t_max: Mapped[float | None] = mapped_column(Float, default=None)
    h_n: Mapped[int] = mapped_column(BigInteger, default=0)
    h_sum: Mapped[float | None] = mapped_column(Float, default=None)
    h_min: Mapped[float | None] = mapped_column(Float, default=None)
    h_max: Mapped[float | None] = mapped_column(Float, default=None)
    p_n: Mapped[int] = mapped_column(BigInteger, default=0)
    p_sum: Mapped[float | None] = mapped_column(Float, default=None)
    p_min: Mapped[float | None] = mapped_column(Float, default=None)
    p_max: Mapped[float | None] = mapped_column(Float, default=None)

    def avg(self, metric: str) -> float | None:
        count = getattr(self, f"{metric}_n")
        total = getattr(self, f"{metric}_sum")
        return total / count if count and total is not None else None


class Telemetry1m(_RollupColumns, Base):
    """One-minute roll-up, maintained incrementally by the writer in the same transaction as the raw rows."""
    __tablename__ = "telemetry_1m"
    __table_args__ = (Index("ix_telemetry_1m_tenant_bucket", "tenant_id", "bucket"),)


class Telemetry1h(_RollupColumns, Base):
    """One-hour roll-up, maintained incrementally by the writer in the same transaction as the raw rows."""
    __tablename__ = "telemetry_1h"
    __table_args__ = (Index("ix_telemetry_1h_tenant_bucket", "tenant_id", "bucket"),)


ROLLUPS = {"1m": Telemetry1m, "1h": Telemetry1h}


class RollupWatermark(Base):
    """One row (id 1). PostgreSQL: readings with ``ts < done_until`` are counted in the roll-ups, or are in the
    claimed range ``[pending_lo, pending_hi)`` and visible in ``pending_snapshot`` (the roll-up job adds those
    next: :func:`cloud.db.maintenance.advance_rollups`); the writer adds a reading that arrives below the mark
    (late) itself, in its insert transaction. SQLite: the writer maintains the roll-ups row by row and ignores
    the mark."""
    __tablename__ = "rollup_watermark"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    done_until: Mapped[datetime] = mapped_column()
    pending_lo: Mapped[datetime | None] = mapped_column()
    pending_hi: Mapped[datetime | None] = mapped_column()
    pending_snapshot: Mapped[str | None] = mapped_column(Text)
