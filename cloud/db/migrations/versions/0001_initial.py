"""Initial schema: tenants, users, api tokens, devices, device boots, telemetry (partitioned by day on
PostgreSQL), one-minute and one-hour roll-ups, rules, alarms, commands.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _rollup(name: str) -> None:
    op.create_table(
        name,
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("bucket", TS, nullable=False),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False, server_default="0"),
        *[col for m in "thp" for col in (
            sa.Column(f"{m}_n", sa.BigInteger, nullable=False, server_default="0"),
            sa.Column(f"{m}_sum", sa.Float, nullable=True),
            sa.Column(f"{m}_min", sa.Float, nullable=True),
            sa.Column(f"{m}_max", sa.Float, nullable=True),
        )],
        sa.PrimaryKeyConstraint("device_id", "bucket", name=f"pk_{name}"),
    )
    op.create_index(f"ix_{name}_tenant_bucket", name, ["tenant_id", "bucket"])


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"

    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(120), nullable=False, unique=True),
        sa.Column("retention_days", sa.Integer, nullable=False, server_default="30"),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("email", sa.String(254), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False, server_default="viewer"),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_users_tenant_id", "users", ["tenant_id"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(120), nullable=False),
        sa.Column("token_hash", sa.String(128), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False, server_default="viewer"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
    )
    op.create_index("ix_api_tokens_tenant_id", "api_tokens", ["tenant_id"])
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(120), nullable=False),
        sa.Column("mqtt_username", sa.String(64), nullable=True, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("firmware", sa.String(32), nullable=True),
        sa.Column("boot", sa.BigInteger, nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="unknown"),
        sa.Column("last_seen", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
    )
    op.create_index("ix_devices_tenant_id", "devices", ["tenant_id"])
    op.create_table(
        "device_boots",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("boot", sa.BigInteger, nullable=False),
        sa.Column("booted_at", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("device_id", "boot", name="pk_device_boots"),
    )

    # PostgreSQL: range-partitioned by event time; partitions (one per UTC day) are created ahead by
    # cloud.db.maintenance.ensure_partitions. A partitioned table's primary key must include the partition
    # key (see cloud.db.models.Telemetry for why (device_id, boot, seq, ts) still identifies a reading).
    # SQLite: a plain table keyed by (device_id, boot, seq).
    key = ["device_id", "boot", "seq", "ts"] if postgres else ["device_id", "boot", "seq"]
    op.create_table(
        "telemetry",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("boot", sa.BigInteger, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("t", sa.Float, nullable=True),
        sa.Column("h", sa.Float, nullable=True),
        sa.Column("p", sa.Float, nullable=True),
        sa.Column("rssi", sa.Integer, nullable=True),
        sa.Column("up", sa.BigInteger, nullable=True),
        sa.Column("ts_estimated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint(*key, name="pk_telemetry"),
        postgresql_partition_by="RANGE (ts)",
    )
    op.create_index("ix_telemetry_device_ts", "telemetry", ["device_id", "ts"])
    op.create_index("ix_telemetry_tenant_ts", "telemetry", ["tenant_id", "ts"])

    _rollup("telemetry_1m")
    _rollup("telemetry_1h")

    op.create_table(
        "rules",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False, server_default="threshold"),
        sa.Column("metric", sa.String(32), nullable=False, server_default="t"),
        sa.Column("min", sa.Float, nullable=True),
        sa.Column("max", sa.Float, nullable=True),
        sa.Column("hysteresis", sa.Float, nullable=False, server_default="0"),
        sa.Column("duration_s", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rate_per_min", sa.Float, nullable=True),
        sa.Column("nodata_s", sa.Integer, nullable=True),
        sa.Column("severity", sa.String(16), nullable=False, server_default="major"),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("on_raise", sa.JSON, nullable=True),
        sa.Column("on_clear", sa.JSON, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("tenant_id", "device_id", "name", name="uq_rules_scope_name"),
    )
    op.create_index("ix_rules_tenant_id", "rules", ["tenant_id"])
    # NULLs are distinct in a unique constraint: tenant-wide rules (device_id NULL) need their own index
    op.create_index("uq_rules_tenant_default_name", "rules", ["tenant_id", "name"], unique=True,
                    postgresql_where=sa.text("device_id IS NULL"), sqlite_where=sa.text("device_id IS NULL"))

    op.create_table(
        "alarms",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.Column("raised_at", TS, nullable=False),
        sa.Column("acknowledged_at", TS, nullable=True),
        sa.Column("acknowledged_by", sa.String(254), nullable=True),
        sa.Column("cleared_at", TS, nullable=True),
    )
    op.create_index("ix_alarms_tenant_id", "alarms", ["tenant_id"])
    op.create_index("ix_alarms_device_id", "alarms", ["device_id"])
    op.create_index("ix_alarms_tenant_raised", "alarms", ["tenant_id", "raised_at"])

    op.create_table(
        "commands",
        sa.Column("cid", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("op", sa.String(32), nullable=False),
        sa.Column("args", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("ok", sa.Boolean, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_by", sa.String(254), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("sent_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_index("ix_commands_tenant_id", "commands", ["tenant_id"])
    op.create_index("ix_commands_device_id", "commands", ["device_id"])
    op.create_index("ix_commands_device_created", "commands", ["device_id", "created_at"])


def downgrade() -> None:
    for table in ("commands", "alarms", "rules", "telemetry_1h", "telemetry_1m"):
        op.drop_table(table)
    # dropping the partitioned parent drops every partition with it
    op.execute("DROP TABLE telemetry")
    for table in ("device_boots", "devices", "api_tokens", "users", "tenants"):
        op.drop_table(table)
