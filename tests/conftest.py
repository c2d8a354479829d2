"""Shared pytest fixtures: REAL Mosquitto, Kafka, PostgreSQL and Redis on loopback (cloud.nativestack).

Each fixture is session-scoped and lazy: a service starts the first time a test asks for it and is
stopped at the end of the session. Area-specific fixtures belong in tests/<area>/conftest.py.

    mosquitto  -> cloud.nativestack.Mosquitto  .port .url ("mqtt://127.0.0.1:<port>")
    kafka      -> cloud.nativestack.Kafka      .port .bootstrap ("127.0.0.1:<port>") .create_topics() .admin()
    postgres   -> cloud.nativestack.Postgres   .port .url (SQLAlchemy, postgresql+psycopg://iot:iot@...)
                                               .dsn (psycopg) .admin_dsn (superuser, unix socket)
    redis      -> cloud.nativestack.Redis      .port .url ("redis://127.0.0.1:<port>/0")

All expose .start() .stop() .restart() .kill() .running .pid .workdir .log_path .log_tail().
A test that stops or kills a shared service must start it again before it returns.
Kafka jars: $IOT_KAFKA_LIBS, else the tools/fetch-kafka.sh cache (fetched on first use).
"""

from __future__ import annotations

import pytest

from cloud import nativestack


def _serve(request, svc):
    request.addfinalizer(svc.close)
    svc.start()
    return svc


@pytest.fixture(scope="session")
def kafka_libs():
    """Directory of the Kafka jars (fetched with tools/fetch-kafka.sh when missing)."""
    return nativestack.kafka_libs_dir(fetch=True)


@pytest.fixture(scope="session")
def mosquitto(request, tmp_path_factory):
    return _serve(request, nativestack.Mosquitto(tmp_path_factory.mktemp("mosquitto")))


@pytest.fixture(scope="session")
def kafka(request, tmp_path_factory, kafka_libs):
    return _serve(request, nativestack.Kafka(tmp_path_factory.mktemp("kafka"), libs=kafka_libs))


@pytest.fixture(scope="session")
def postgres(request, tmp_path_factory):
    return _serve(request, nativestack.Postgres(tmp_path_factory.mktemp("postgres")))


@pytest.fixture(scope="session")
def redis(request, tmp_path_factory):
    return _serve(request, nativestack.Redis(tmp_path_factory.mktemp("redis")))


@pytest.fixture(scope="session")
def make_backend(tmp_path_factory):
    """A factory for a migrated database of a test's own and the matching latest-values cache:
    ``make_backend(request, "sqlite" | "postgres", prefix) -> (url, engine, cache)``. SQLite comes with the
    in-memory cache; "postgres" is a new database on the shared PostgreSQL, with the shared Redis."""
    import uuid

    def make(request, kind: str, prefix: str):
        from cloud import db
        from cloud.cache import MemoryCache, RedisCache
        from cloud.db import maintenance

        if kind == "sqlite":
            url, cache = f"sqlite:///{tmp_path_factory.mktemp(prefix + 'db')}/web.db", MemoryCache()
        else:
            import psycopg

            pg = request.getfixturevalue("postgres")
            rd = request.getfixturevalue("redis")
            name = f"{prefix}_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(pg.admin_dsn, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}" OWNER iot')
            url, cache = pg.url.rsplit("/", 1)[0] + "/" + name, RedisCache(rd.url)
        db.upgrade(url)
        engine = db.make_engine(url)
        maintenance.ensure_partitions(engine)
        return url, engine, cache

    return make
