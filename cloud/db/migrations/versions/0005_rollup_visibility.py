"""Roll-up tables: autovacuum after a fixed number of new rows, so that the newest roll-ups become all-visible.

"24 h of one-minute roll-ups" is an index-only scan of the key (device_id, bucket), which INCLUDEs every column
(migration 0003) -- but only for heap pages that the visibility map marks all-visible; for every other row the
scan fetches the heap page too. The one-minute table is now written once per row (the roll-up job adds whole
minutes, migration 0004), so it has almost no dead rows and autovacuum visits it only for inserts: by default
after 1,000 + 20 % of the table's rows, i.e. with 30 days kept, once the table has grown by six days. Until then
the newest rows -- exactly the ones a "last 24 h" chart reads -- are not all-visible. Measured on the
bench_writer dataset (10 M roll-up rows, 10,000 devices): with the visibility map cleared the query made one heap
fetch per bucket (960 of 960) and took p50/p99 149/391 ms; after VACUUM, 0 heap fetches and 8/13 ms.

So both roll-up tables are vacuumed after a fixed number of inserted rows, whatever their size
(``autovacuum_vacuum_insert_scale_factor = 0``): 20,000 for the one-minute table (two minutes of 10,000
devices), 10,000 for the hourly one. Such a vacuum reads only the pages not yet all-visible (the new ones) and
skips the index pass when there is nothing dead, so it is cheap. The dead-row threshold of migration 0002 stays.
PostgreSQL only (SQLite has no such setting).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SETTINGS = {
    "telemetry_1m": "autovacuum_vacuum_insert_threshold = 20000, autovacuum_vacuum_insert_scale_factor = 0",
    "telemetry_1h": "autovacuum_vacuum_insert_threshold = 10000, autovacuum_vacuum_insert_scale_factor = 0",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, settings in SETTINGS.items():
        op.execute(f"ALTER TABLE {table} SET ({settings})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in SETTINGS:
        op.execute(f"ALTER TABLE {table} RESET (autovacuum_vacuum_insert_threshold, "
                   "autovacuum_vacuum_insert_scale_factor)")
