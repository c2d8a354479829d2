"""Roll-up job without stalling the writer: the watermark moves first, the readings are added after.

``rollup_watermark`` gains the range the job has claimed but not yet added (``pending_lo``, ``pending_hi``) and
the snapshot taken when it claimed it (``pending_snapshot``, a ``pg_snapshot`` as text). The job used to hold its
exclusive lock -- and so stall every writer transaction -- for the whole aggregate statement; now it holds it
only to move the mark and take the snapshot, and adds the readings of the range that are visible in that
snapshot afterwards (see cloud.db.maintenance.advance_rollups). A range claimed by a job that died is finished
by the next run.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollup_watermark") as batch:
        batch.add_column(sa.Column("pending_lo", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("pending_hi", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("pending_snapshot", sa.Text, nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        from cloud.db.maintenance import finish_claimed_rollups

        finish_claimed_rollups(op.get_bind())  # a claimed range must not be lost with the columns
    with op.batch_alter_table("rollup_watermark") as batch:
        batch.drop_column("pending_snapshot")
        batch.drop_column("pending_hi")
        batch.drop_column("pending_lo")
