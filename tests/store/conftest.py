"""Fixtures of the storage tests: a fresh PostgreSQL database per test (on the session server), SQLite files,
provisioned tenants/devices, message builders and a helper that runs a Writer until a condition holds."""

from __future__ import annotations

import pytest

from cloud import db

from .helpers import fresh_pg_database


@pytest.fixture
def pg_url(postgres):
    url, drop = fresh_pg_database(postgres)
    yield url
    drop()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/iot.db"


@pytest.fixture(params=["sqlite", "postgres"])
def any_url(request, tmp_path):
    """Both databases: the data layer must behave the same on each."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/iot.db"
        return
    url, drop = fresh_pg_database(request.getfixturevalue("postgres"))
    yield url
    drop()


@pytest.fixture
def engine_at():
    """engine_at(url): migrated database + engine, disposed at the end."""
    engines = []

    def make(url: str):
        db.upgrade(url)
        engine = db.make_engine(url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


