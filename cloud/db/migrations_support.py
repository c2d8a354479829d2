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


def include_object_for(dialect_name: str):
    """An ``include_object`` hook: indexes the models mark ``info={"sqlite_only": True}`` are compared on SQLite
    only (on PostgreSQL the telemetry primary key does their work, see migration 0003)."""

    def include_object(obj, name, type_, reflected, compare_to) -> bool:
        if type_ == "index" and dialect_name != "sqlite":
            model_index = compare_to if reflected else obj
            if model_index is not None and getattr(model_index, "info", {}).get("sqlite_only"):
                return False
        return True

    return include_object
