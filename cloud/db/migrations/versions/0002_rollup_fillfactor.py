"""Roll-up tables: room on every page for in-place (HOT) updates.

The writer updates a roll-up row for every batch that carries a reading of that device in that minute / hour
(``INSERT ... ON CONFLICT DO UPDATE``). With full pages (fillfactor 100) nearly every such update had to put the new
row version on another page and add entries to both indexes; with free space on the page the update stays on the
page (a heap-only tuple: no index writes, the old version pruned in place). The hourly table is updated most
often (every batch, for every active device), so it keeps half of each page free; the one-minute table a
third. Autovacuum is asked to visit them sooner than the default 20 % of dead rows. PostgreSQL only (SQLite has
no such setting); only pages written after the change are affected (``VACUUM FULL`` rewrites existing ones).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SETTINGS = {
    "telemetry_1m": "fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02",
    "telemetry_1h": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0.02",
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
        op.execute(f"ALTER TABLE {table} RESET (fillfactor, autovacuum_vacuum_scale_factor)")
