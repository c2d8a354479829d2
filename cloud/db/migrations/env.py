"""Alembic environment. Run through :func:`cloud.db.upgrade` (which passes an open connection), or with the
alembic CLI: ``alembic -c cloud/db/alembic.ini -x url=postgresql+psycopg://... upgrade head``."""

from __future__ import annotations

from alembic import context
from cloud.db import make_engine
from cloud.db.migrations_support import include_name, include_object_for
from cloud.db.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTERs via table copies
                      compare_type=True, include_name=include_name,
                      include_object=include_object_for(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        import os

        url = os.environ.get("IOT_DATABASE_URL", "sqlite:///var/iot.db")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _configure(connection)
            connection.commit()
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
