"""Partitions, roll-ups and retention on real PostgreSQL (and retention on SQLite)."""

from __future__ import annotations

import threading
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import func, select

from cloud import db
from cloud.db import maintenance
from cloud.db.models import Telemetry, Telemetry1h, Telemetry1m

from .helpers import count, provision

NOW = datetime(2030, 6, 15, 12, 0, tzinfo=timezone.utc)


def _insert(engine, tenant_id, device, days_ago: list[int]):
    maintenance.create_partitions(engine, {(NOW - timedelta(days=d)).date() for d in days_ago})
    with db.session_factory(engine)() as s:
        for i, d in enumerate(days_ago):
            ts = NOW - timedelta(days=d)
            s.add(Telemetry(device_id=device, boot=1, seq=i, tenant_id=tenant_id, ts=ts, received_at=ts, t=20.0))
        s.commit()
    maintenance.refresh_rollups(engine, NOW - timedelta(days=max(days_ago) + 1), NOW + timedelta(days=1))


def test_partitions_created_ahead_and_idempotent(pg_url, engine_at):
    engine = engine_at(pg_url)
    created = maintenance.ensure_partitions(engine, days_ahead=3, now=NOW)
    assert created == [f"telemetry_p{(NOW + timedelta(days=d)):%Y%m%d}" for d in range(-1, 4)]
    assert maintenance.ensure_partitions(engine, days_ahead=3, now=NOW) == []
    parts = maintenance.existing_partitions(engine)
    assert date(2030, 6, 18) in parts and date(2030, 6, 14) in parts
    with engine.connect() as conn:
        bound = conn.exec_driver_sql(
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE relname = 'telemetry_p20300615'").scalar()
    assert "2030-06-15 00:00:00+00" in bound and "2030-06-16 00:00:00+00" in bound


def test_retention_drops_partitions_and_deletes_per_tenant(pg_url, engine_at):
    engine = engine_at(pg_url)
    ids = provision(engine, {"long": ["l1"], "short": ["s1"]}, retention={"long": 30, "short": 7})
    _insert(engine, ids["long"], "l1", [1, 10, 29, 40, 50])
    _insert(engine, ids["short"], "s1", [1, 5, 10, 20, 40])
    report = maintenance.apply_retention(engine, now=NOW)
    # partitions wholly older than the longest retention (30 days) are gone
    assert f"telemetry_p{(NOW - timedelta(days=40)):%Y%m%d}" in report["dropped_partitions"]
    assert f"telemetry_p{(NOW - timedelta(days=50)):%Y%m%d}" in report["dropped_partitions"]
    assert all(day >= (NOW - timedelta(days=31)).date() for day in maintenance.existing_partitions(engine))
    # the short-retention tenant lost its rows older than 7 days; the long one keeps 30 days
    assert count(engine, "SELECT count(*) FROM telemetry WHERE device_id = 'l1'") == 3
    assert count(engine, "SELECT count(*) FROM telemetry WHERE device_id = 's1'") == 2
    assert report["deleted_rows"] == 2  # s1 at 10 and 20 days (40 went with its partition)
    # one-minute roll-ups follow the tenant retention, hourly ones live longer
    assert count(engine, "SELECT count(*) FROM telemetry_1m WHERE device_id = 's1'") == 2
    assert count(engine, "SELECT count(*) FROM telemetry_1h WHERE device_id = 's1'") == 5


def test_retention_on_sqlite(sqlite_url, engine_at):
    engine = engine_at(sqlite_url)
    ids = provision(engine, {"long": ["l1"], "short": ["s1"]}, retention={"long": 30, "short": 7})
    _insert(engine, ids["long"], "l1", [1, 10, 40])
    _insert(engine, ids["short"], "s1", [1, 10, 40])
    maintenance.apply_retention(engine, now=NOW)
    assert count(engine, "SELECT count(*) FROM telemetry WHERE device_id = 'l1'") == 2
    assert count(engine, "SELECT count(*) FROM telemetry WHERE device_id = 's1'") == 1


def test_refresh_rollups_aggregates(pg_url, engine_at):
    engine = engine_at(pg_url)
    ids = provision(engine, {"A": ["d1"]})
    maintenance.create_partitions(engine, {NOW.date()})
    with db.session_factory(engine)() as s:
        for i, t in enumerate([10.0, 20.0, 30.0, None]):
            s.add(Telemetry(device_id="d1", boot=1, seq=i, tenant_id=ids["A"], ts=NOW + timedelta(seconds=10 * i),
                            received_at=NOW, t=t, h=50.0))
        s.commit()
    maintenance.refresh_rollups(engine, NOW, NOW + timedelta(minutes=1))
    with db.session_factory(engine)() as s:
        minute = s.scalar(select(Telemetry1m))
        assert (minute.n, minute.t_n, minute.t_min, minute.t_max, minute.avg("t")) == (4, 3, 10.0, 30.0, 20.0)
        assert minute.h_n == 4 and minute.bucket == NOW
        assert s.scalar(select(func.sum(Telemetry1h.n))) == 4


def test_sessions_run_in_utc_whatever_the_server_default(pg_url, engine_at):
    """Roll-up buckets are date_trunc on timestamptz, which truncates in the session's time zone."""
    engine = engine_at(pg_url)
    with engine.connect() as conn:
        conn.exec_driver_sql("ALTER DATABASE " + conn.exec_driver_sql("SELECT current_database()").scalar()
                             + " SET TimeZone = 'Asia/Kolkata'")  # a half-hour offset: hour buckets would move
    engine.dispose()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
        bucket = conn.exec_driver_sql("SELECT date_trunc('hour', timestamptz '2030-06-15 12:40:00+00')").scalar()
    assert bucket == datetime(2030, 6, 15, 12, 0, tzinfo=timezone.utc)


def test_collation_advice_names_a_linguistic_database_collation(postgres, pg_url, engine_at, sqlite_url, caplog):
    """C (what the tests' server and deploy/compose.yaml use): no advice. A database whose default collation is a
    locale's (ICU here: it needs no OS locale installed) gets a warning naming it, which the writer logs at start."""
    import psycopg

    from cloud.settings import Settings
    from cloud.writer import Writer

    assert maintenance.collation_advice(engine_at(pg_url)) is None
    assert maintenance.collation_advice(engine_at(sqlite_url)) is None
    name = "icu_" + pg_url.rsplit("_", 1)[-1]
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE 'C' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
    try:
        engine = engine_at(pg_url.rsplit("/", 1)[0] + "/" + name)
        advice = maintenance.collation_advice(engine)
        assert advice is not None and "en-US" in advice and "locale provider 'i'" in advice
        with caplog.at_level("WARNING", logger="cloud.writer"):
            Writer(Settings(), None, engine, None)._check_collation()
        assert advice in caplog.text
        engine.dispose()
    finally:
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_collation_verdict_of_each_locale_provider():
    """Code-point orders (libc C/POSIX, PostgreSQL 17's builtin provider) get no advice; a libc or ICU locale is
    named; a row from before PostgreSQL 15 (no provider column) is read as libc."""
    assert maintenance.collation_verdict({"datlocprovider": "c", "datcollate": "C"}) is None
    assert maintenance.collation_verdict({"datlocprovider": "c", "datcollate": "POSIX"}) is None
    assert maintenance.collation_verdict({"datcollate": "C"}) is None
    for builtin in ("C", "C.UTF-8", "PG_UNICODE_FAST"):
        assert maintenance.collation_verdict({"datlocprovider": "b", "datcollate": "C", "datlocale": builtin}) is None
    libc = maintenance.collation_verdict({"datlocprovider": "c", "datcollate": "en_US.utf8"})
    assert libc is not None and libc.startswith("database collation is en_US.utf8, not C")
    old = maintenance.collation_verdict({"datcollate": "de_DE.UTF-8"})
    assert old is not None and "de_DE.UTF-8" in old
    icu = maintenance.collation_verdict({"datlocprovider": "i", "datcollate": "C", "datlocale": "und-x-icu"})
    assert icu is not None and "und-x-icu (locale provider 'i')" in icu


def test_writer_checks_the_collation_once_when_the_database_answers(pg_url, engine_at, caplog, monkeypatch):
    """The writer's first maintenance round asks for the collation advice; a database not up yet (the call fails)
    is asked again with the next round instead of being skipped for good, and once answered it is not asked
    again."""
    from cloud.settings import Settings
    from cloud.writer import Writer

    calls: list[int] = []

    def advice(_engine):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the database is starting up")
        return "database collation is xx_XX, not C"

    monkeypatch.setattr(maintenance, "collation_advice", advice)
    writer = Writer(Settings(), None, engine_at(pg_url), None, retention=False)
    stop = threading.Event()
    with caplog.at_level("WARNING", logger="cloud.writer"):
        writer._maybe_maintain(stop)
        assert "xx_XX" not in caplog.text
        writer._next_maintenance = 0.0  # the retry round (30 s later in the service)
        writer._maybe_maintain(stop)
        assert "database collation is xx_XX, not C" in caplog.text
        writer._next_maintenance = 0.0
        writer._maybe_maintain(stop)
    assert len(calls) == 2
