"""Helpers of the storage tests (imported by the test modules and conftest)."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

from cloud import db, schema
from cloud import settings as settings_mod
from cloud.db import repo


def fresh_pg_database(pg) -> tuple[str, Callable[[], None]]:
    """A new empty database on the server ``pg``; returns (url, drop)."""
    import psycopg

    name = "store_" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg.dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg.url.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        try:
            with psycopg.connect(pg.dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception:  # noqa: BLE001 - server may be gone at the end of the session
            pass

    return url, drop


def provision(engine, tenants: dict[str, list[str]], retention: dict[str, int] | None = None) -> dict[str, int]:
    """Create tenants and their devices; returns tenant name -> id."""
    ids = {}
    with db.session_factory(engine)() as s:
        for name, devices in tenants.items():
            tenant = repo.create_tenant(s, name, (retention or {}).get(name, 30))
            for device in devices:
                repo.create_device(s, tenant.id, device)
            ids[name] = tenant.id
        s.commit()
    return ids


def reading(device: str, boot: int, seq: int, ts: int | None = None, t: float = 21.5, up: int | None = None) -> bytes:
    return schema.Telemetry(device, boot, seq, ts, t, 45.0, 1001.0, -60, up=up if up is not None else seq * 10,
                            fw="1.0.0").to_json()


def make_settings(**overrides):
    values = {"writer_batch_ms": 20, "writer_batch_size": 500}
    values.update(overrides)
    return settings_mod.load({}, **values)


class RunningWriter:
    def __init__(self, writer):
        self.writer = writer
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.writer.run(self.stop)
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(exc)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "writer did not stop"
        assert not self.errors, self.errors


def wait_for(condition: Callable[[], bool], timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def settle_rollups(engine) -> None:
    """PostgreSQL: run the roll-up job up to two days ahead, so every stored reading is counted in the roll-ups
    (the writer's own job stays ROLLUP_GRACE behind the clock); a no-op on SQLite."""
    from datetime import datetime, timedelta, timezone

    from cloud.db import maintenance

    maintenance.advance_rollups(engine, until=datetime.now(timezone.utc) + timedelta(days=2))


def count(engine, sql: str, **params) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar() or 0)
