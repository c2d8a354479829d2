"""Migrations: empty -> head -> base on real PostgreSQL, head on SQLite, and the models match the migrations."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from cloud import db
from cloud.db.migrations_support import include_name, include_object_for
from cloud.db.models import Base

TABLES = {"tenants", "users", "api_tokens", "devices", "device_boots", "telemetry", "telemetry_1m", "telemetry_1h",
          "rules", "alarms", "commands", "rollup_watermark", "webhooks"}


def _diff(url):
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={
                "compare_type": True, "include_name": include_name,
                "include_object": include_object_for(conn.dialect.name)})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def _tables(url):
    engine = db.make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_postgres_up_down_up(pg_url):
    assert db.current(pg_url) is None
    db.upgrade(pg_url)
    assert db.current(pg_url) == db.head()
    assert TABLES <= _tables(pg_url)
    assert _diff(pg_url) == []
    engine = db.make_engine(pg_url)
    with engine.connect() as conn:
        kind = conn.exec_driver_sql("SELECT relkind FROM pg_class WHERE relname = 'telemetry'").scalar()
        key = conn.exec_driver_sql(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'pk_telemetry'").scalar()
    engine.dispose()
    assert kind == "p"  # partitioned
    # the same columns as the reading's identity (device, boot, seq) plus the partition key, ordered so that the
    # key also serves "this device, newest first"
    assert key == "PRIMARY KEY (device_id, ts, boot, seq)"
    db.downgrade(pg_url, "base")
    assert db.current(pg_url) is None
    assert _tables(pg_url) == set()
    db.upgrade(pg_url)  # and up again
    assert db.current(pg_url) == db.head()


def test_sqlite_to_head(sqlite_url):
    db.upgrade(sqlite_url)
    assert db.current(sqlite_url) == db.head()
    assert TABLES <= _tables(sqlite_url)
    assert _diff(sqlite_url) == []
    db.upgrade(sqlite_url)  # idempotent
    db.downgrade(sqlite_url, "base")
    assert _tables(sqlite_url) == set()


def test_postgres_downgrade_from_0003_counts_readings_above_the_watermark(pg_url):
    """Before 0003 the writer rolled every reading up as it stored it; going back must leave no reading out."""
    from datetime import datetime, timedelta, timezone

    from cloud.db import maintenance

    db.upgrade(pg_url, "0003")
    engine = db.make_engine(pg_url)
    try:
        maintenance.ensure_partitions(engine)
        soon = datetime.now(timezone.utc) + timedelta(minutes=5)  # above the mark the upgrade set
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO telemetry (device_id, boot, seq, tenant_id, ts, received_at, t) "
                "VALUES ('d1', 1, 1, 1, %(ts)s, %(ts)s, 20.5)", {"ts": soon})
            assert conn.exec_driver_sql("SELECT count(*) FROM telemetry_1m").scalar() == 0
        db.downgrade(pg_url, "0002")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT n, t_sum FROM telemetry_1m").one() == (1, 20.5)
            assert conn.exec_driver_sql("SELECT n FROM telemetry_1h").scalar() == 1
    finally:
        engine.dispose()
    db.downgrade(pg_url, "base")
