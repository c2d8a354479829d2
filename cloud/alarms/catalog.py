"""Rules and the device -> tenant map, read from the database (read-only) and reloaded every few seconds.

A :class:`Catalog` is immutable: the reloader builds a new one in a background thread and swaps the reference,
so the processing loop never waits for the database and never sees a half-loaded rule set. When nothing changed
the old catalog (and its per-device cache of effective rules) is kept.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cloud.alarms.rules import RuleSpec, effective_rules
from cloud.db.models import Device, Rule

log = logging.getLogger(__name__)

_COLUMNS = ("name", "kind", "metric", "min", "max", "hysteresis", "duration_s", "rate_per_min", "nodata_s",
            "severity", "enabled", "on_raise", "on_clear")


class Catalog:
    """Device -> tenant, tenant default rules, device overrides; ``rules_for(device)`` is cached."""

    def __init__(self, devices: dict[str, int], tenant_rules: dict[int, dict[str, RuleSpec | None]],
                 device_rules: dict[str, dict[str, RuleSpec | None]], invalid: int = 0):
        self.devices = devices
        self.tenant_rules = tenant_rules
        self.device_rules = device_rules
        self.invalid = invalid
        # rules are few: compare them by value; the device map is compared with dict equality (C speed)
        self.fingerprint = (tuple(sorted((t, tuple(sorted(r.items(), key=lambda kv: kv[0])))
                                         for t, r in tenant_rules.items())),
                            tuple(sorted((d, tuple(sorted(r.items(), key=lambda kv: kv[0])))
                                         for d, r in device_rules.items())))
        self.rules_cache: dict[str, tuple[RuleSpec, ...]] = {}  # device -> rules_for(device), filled on demand
        self.loaded_at = time.time()
        # whether any rule needs the timer (nodata, offline): without one, a tick has nothing to do until the
        # rules or the partitions change
        self.timed = any(spec is not None and spec.kind in ("nodata", "offline")
                         for rules in (*tenant_rules.values(), *device_rules.values()) for spec in rules.values())

    @classmethod
    def empty(cls) -> "Catalog":
        return cls({}, {}, {})

    def tenant(self, device: str) -> int | None:
        return self.devices.get(device)

    def rules_for(self, device: str) -> tuple[RuleSpec, ...]:
        rules = self.rules_cache.get(device)
        if rules is None:
            tenant = self.devices.get(device)
            if tenant is None:
                rules = ()
            else:
                rules = effective_rules(self.tenant_rules.get(tenant, {}), self.device_rules.get(device, {}))
            self.rules_cache[device] = rules
        return rules

    def rule_count(self) -> int:
        return sum(len(r) for r in self.tenant_rules.values()) + sum(len(r) for r in self.device_rules.values())


def build_catalog(devices: dict[str, int], rows: list[dict[str, Any]]) -> Catalog:
    """From plain rule dicts (Rule columns + tenant_id, device_id). Invalid rules are skipped with a warning:
    one bad row must not stop every other rule."""
    tenant_rules: dict[int, dict[str, RuleSpec | None]] = {}
    device_rules: dict[str, dict[str, RuleSpec | None]] = {}
    invalid = 0
    for row in rows:
        spec: RuleSpec | None
        if not row.get("enabled", True):
            spec = None  # a disabled override hides the tenant default of the same name for that device
        else:
            try:
                spec = RuleSpec.from_dict({k: row.get(k) for k in _COLUMNS if row.get(k) is not None})
            except ValueError as exc:
                invalid += 1
                log.warning("alarm rule %r (tenant %s, device %s) ignored: %s", row.get("name"), row.get("tenant_id"),
                            row.get("device_id"), exc)
                continue
        if row.get("device_id"):
            device_rules.setdefault(row["device_id"], {})[row["name"]] = spec
        else:
            tenant_rules.setdefault(row["tenant_id"], {})[row["name"]] = spec
    return Catalog(devices, tenant_rules, device_rules, invalid)


def load_devices(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return {d: t for d, t in session.execute(
            select(Device.id, Device.tenant_id).where(Device.revoked_at.is_(None)))}


def load_catalog(engine: Engine, devices: dict[str, int] | None = None) -> Catalog:
    """Rules and devices from the database; pass ``devices`` to reuse a device map loaded earlier."""
    if devices is None:
        devices = load_devices(engine)
    with Session(engine) as session:
        rows = [{"tenant_id": r.tenant_id, "device_id": r.device_id, **{c: getattr(r, c) for c in _COLUMNS}}
                for r in session.scalars(select(Rule))]
    return build_catalog(devices, rows)


class DbLoader:
    """Loads rules every call and the device map only every ``devices_interval`` seconds or when asked
    (:meth:`want_devices`, called by the engine when it meets a device it does not know): with 10,000 devices a
    full reload every 2 s would cost the processing thread more CPU (GIL) than the rules are worth."""

    def __init__(self, engine: Engine, devices_interval: float = 30.0, min_interval: float = 2.0):
        self.engine = engine
        self.devices_interval = devices_interval
        self.min_interval = min_interval
        self._devices: dict[str, int] | None = None
        self._loaded = 0.0
        self._wanted = False

    def want_devices(self) -> None:
        self._wanted = True

    def __call__(self) -> Catalog:
        now = time.monotonic()
        age = now - self._loaded
        if self._devices is None or age >= self.devices_interval or (self._wanted and age >= self.min_interval):
            self._wanted = False
            self._devices = load_devices(self.engine)
            self._loaded = now
        return load_catalog(self.engine, self._devices)


class CatalogReloader:
    """Keeps ``.current`` fresh: reloads every ``interval`` seconds in a daemon thread."""

    def __init__(self, loader: Callable[[], Catalog], interval: float = 2.0):
        self.loader = loader
        self.interval = interval
        self.current = Catalog.empty()
        self.error: str | None = None
        self.last_ok: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self) -> Catalog:
        try:
            fresh = self.loader()
        except Exception as exc:  # the database may be down for a while: keep the last good rules
            if self.error is None:
                log.warning("alarm rules could not be loaded (keeping the last ones): %s", exc)
            self.error = str(exc)
            return self.current
        self.error = None
        self.last_ok = time.time()
        if fresh.fingerprint != self.current.fingerprint or fresh.devices != self.current.devices:
            log.info("alarm rules loaded: %d rules, %d devices", fresh.rule_count(), len(fresh.devices))
            self.current = fresh
        return self.current

    def want_devices(self) -> None:
        """A device not in the map was seen: reload the device map soon (if the loader supports it)."""
        hook = getattr(self.loader, "want_devices", None)
        if hook is not None:
            hook()

    def start(self) -> "CatalogReloader":
        self._thread = threading.Thread(target=self._loop, name="alarm-rules", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.reload()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
