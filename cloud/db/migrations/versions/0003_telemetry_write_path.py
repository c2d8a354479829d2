"""Telemetry: fewer indexes to maintain per row, one key that serves "this device, newest first", and roll-ups
computed behind a watermark instead of upserted row by row.

PostgreSQL
  * The primary key becomes (device_id, ts, boot, seq) (was (device_id, boot, seq, ts)): the same columns, so the
    same uniqueness and the same idempotency for ``ON CONFLICT DO NOTHING``, but in an order that also answers
    "latest readings of a device" and "a device's readings in a time range" straight from the key, newest first.
  * ``ix_telemetry_device_ts`` (now redundant with the key) and ``ix_telemetry_tenant_ts`` (only retention used it)
    are dropped: two B-tree insertions less per stored reading.
  * ``ix_telemetry_ts``: a BRIN index on ts (a few pages per partition, nearly free to maintain because rows arrive
    in time order) for the time-range scans of the roll-up job and retention.
  * Extended statistics (functional dependency device_id -> tenant_id) on every partition: without them the
    planner multiplied the selectivities of ``device_id = :d`` and ``tenant_id = :t``, expected one row for a
    device, and chose bitmap scans of every partition plus a sort over the ordered, LIMIT-stopping key scan
    (new partitions get them in cloud.db.maintenance.create_partitions).
  * Roll-ups: the key (device_id, bucket) INCLUDEs every aggregate column, so "a day of one device" is an
    index-only scan of a few leaf pages instead of one heap page per bucket (the job writes a roll-up row
    once; autovacuum marks those pages all-visible). Fillfactor back to 100: rows are no longer updated in
    place row by row (migration 0002's reason is gone). The same extended statistics.
SQLite keeps its key (device_id, boot, seq) and both B-trees and gets an ordinary index on ts.

Both: ``rollup_watermark`` (one row). Readings with ts below ``done_until`` are in the roll-ups (the writer adds a
late reading to them in its own transaction); readings at or after it are added by the roll-up job, which advances
the watermark (see cloud.db.maintenance.advance_rollups). Starting at the time of the upgrade keeps every roll-up
the old writer maintained exact.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


ROLLUP_TABLES = ("telemetry_1m", "telemetry_1h")
ROLLUP_INCLUDE = "tenant_id, n, " + ", ".join(f"{m}_n, {m}_sum, {m}_min, {m}_max" for m in "thp")
_PARTITIONS = ("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
               "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'telemetry'")


def partition_statistics_ddl(partition: str) -> str:
    # kept here as well as in cloud.db.maintenance: a migration must not change when the application does
    return (f"CREATE STATISTICS IF NOT EXISTS {partition}_device_tenant (dependencies) "
            f"ON device_id, tenant_id FROM {partition}")


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute("ALTER TABLE telemetry DROP CONSTRAINT pk_telemetry")
        op.execute("ALTER TABLE telemetry ADD CONSTRAINT pk_telemetry PRIMARY KEY (device_id, ts, boot, seq)")
        op.drop_index("ix_telemetry_device_ts", table_name="telemetry")
        op.drop_index("ix_telemetry_tenant_ts", table_name="telemetry")
        op.create_index("ix_telemetry_ts", "telemetry", ["ts"], postgresql_using="brin")
        for (name,) in op.get_bind().exec_driver_sql(_PARTITIONS).all():
            op.execute(partition_statistics_ddl(name))
        for table in ROLLUP_TABLES:
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT pk_{table}")
            op.execute(f"ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY (device_id, bucket) "
                       f"INCLUDE ({ROLLUP_INCLUDE})")
            op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
            op.execute(f"CREATE STATISTICS IF NOT EXISTS {table}_device_tenant (dependencies) "
                       f"ON device_id, tenant_id FROM {table}")
    else:
        op.create_index("ix_telemetry_ts", "telemetry", ["ts"])
    table = op.create_table(
        "rollup_watermark",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("done_until", sa.DateTime(timezone=True), nullable=False),
    )
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    op.bulk_insert(table, [{"id": 1, "done_until": now if postgres else now.replace(tzinfo=None)}])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # the readings at or after the watermark are not in the roll-ups yet; before 0003 the writer counted
        # every reading as it stored it, so count them now (the roll-up job's statement, with no upper bound)
        from datetime import datetime, timezone

        from cloud.db.maintenance import ROLLUP_LOCK, advance_statement

        bind = op.get_bind()
        bind.exec_driver_sql("SELECT pg_advisory_xact_lock(%(k)s)", {"k": ROLLUP_LOCK})
        mark = bind.exec_driver_sql("SELECT done_until FROM rollup_watermark WHERE id = 1").scalar()
        if mark is not None:
            bind.exec_driver_sql(advance_statement(), {"lo": mark, "hi": datetime(9999, 12, 31, tzinfo=timezone.utc)})
    op.drop_table("rollup_watermark")
    op.drop_index("ix_telemetry_ts", table_name="telemetry")
    if op.get_bind().dialect.name == "postgresql":
        for table in ROLLUP_TABLES:
            op.execute(f"DROP STATISTICS IF EXISTS {table}_device_tenant")
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT pk_{table}")
            op.execute(f"ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY (device_id, bucket)")
        op.execute("ALTER TABLE telemetry_1m SET (fillfactor = 70)")  # migration 0002's settings
        op.execute("ALTER TABLE telemetry_1h SET (fillfactor = 50)")
        for (name,) in op.get_bind().exec_driver_sql(_PARTITIONS).all():
            op.execute(f"DROP STATISTICS IF EXISTS {name}_device_tenant")
        op.execute("ALTER TABLE telemetry DROP CONSTRAINT pk_telemetry")
        op.execute("ALTER TABLE telemetry ADD CONSTRAINT pk_telemetry PRIMARY KEY (device_id, boot, seq, ts)")
        op.create_index("ix_telemetry_device_ts", "telemetry", ["device_id", "ts"])
        op.create_index("ix_telemetry_tenant_ts", "telemetry", ["tenant_id", "ts"])
