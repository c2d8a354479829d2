"""Database access: engines, sessions and schema migrations (Alembic, run programmatically).

* :func:`make_engine` -- PostgreSQL through psycopg 3 with a connection pool, or SQLite (demo profile) with WAL,
  a busy timeout and foreign keys on.
* :func:`session_factory` / :func:`session_scope` -- ORM sessions (``expire_on_commit=False``).
* :func:`upgrade` / :func:`downgrade` / :func:`current` -- the Alembic migrations under ``cloud/db/migrations``;
  ``python -m cloud db upgrade`` calls :func:`upgrade`. The same migrations build SQLite and PostgreSQL (they
  branch on the dialect where the two differ: the partitioned telemetry table exists on PostgreSQL only).

The schema is owned by the migrations, not by ``Base.metadata.create_all``: use :func:`upgrade` (also in tests).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")


def normalize_url(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg://`` (psycopg 3 is the only PostgreSQL driver installed)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url_or_engine: str | Engine) -> bool:
    if isinstance(url_or_engine, Engine):
        return url_or_engine.dialect.name == "sqlite"
    return str(url_or_engine).startswith("sqlite")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10, echo: bool = False,
                connect_timeout: int = 5, pre_ping: bool = True) -> Engine:
    """An engine for ``url``. SQLite: the file's directory is created; each connection gets WAL mode, a 10 s
    busy timeout and foreign keys. PostgreSQL: psycopg 3, a pre-pinged pool (connections broken by a database
    restart are replaced transparently; ``pre_ping=False`` for a caller that replaces them itself, see
    cloud.writer), a connect timeout so an outage fails fast instead of hanging, and every session in UTC."""
    url = normalize_url(url)
    if is_sqlite(url):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:" and not path.startswith("file:"):
            Path(os.path.dirname(path) or ".").mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, echo=echo, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=pre_ping,
                         pool_recycle=1800,
                         # sessions in UTC whatever the server's default: roll-up buckets (date_trunc on
                         # timestamptz) are UTC minutes and hours, and psycopg reads timestamps fastest in "UTC"
                         connect_args={"connect_timeout": connect_timeout, "application_name": "iot",
                                       "options": "-c TimeZone=UTC"})


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# --- migrations -------------------------------------------------------------------------------------------

def alembic_config(url: str | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        # ConfigParser interpolation: a literal % (e.g. in a password) must be doubled
        config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def _run(url_or_engine: str | Engine, action) -> None:
    engine = url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
    config = alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            action(config)
    finally:
        if not isinstance(url_or_engine, Engine):
            engine.dispose()


def upgrade(url: str | Engine, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (default: the newest)."""
    from alembic import command

    _run(url, lambda config: command.upgrade(config, revision))
    if revision == "head" and not is_sqlite(url if isinstance(url, str) else url.url.drivername):
        # PostgreSQL: telemetry partitions around today, so a fresh database takes readings at once (the writer
        # keeps creating them; code inserting telemetry itself must call maintenance.create_partitions)
        from cloud.db import maintenance

        engine = url if isinstance(url, Engine) else make_engine(url)
        try:
            maintenance.ensure_partitions(engine, days_ahead=2, days_back=7)
        finally:
            if not isinstance(url, Engine):
                engine.dispose()


def downgrade(url: str | Engine, revision: str = "base") -> None:
    """Migrate down to ``revision`` ("base" removes every table)."""
    from alembic import command

    _run(url, lambda config: command.downgrade(config, revision))


def current(url: str | Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        if not isinstance(url, Engine):
            engine.dispose()


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()  # type: ignore[return-value]
