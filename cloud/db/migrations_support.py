"""Helpers shared by the Alembic environment and the migration tests."""

from __future__ import annotations

from cloud.db.maintenance import PARTITION_NAME


def include_name(name, type_, parent_names) -> bool:
    """Autogenerate/compare ignore the daily telemetry partitions (created at run time, not by migrations)."""
    if type_ == "table" and name and PARTITION_NAME.match(name):
        return False
    if type_ == "index" and name and name.startswith("telemetry_p"):
        return False
    return True
