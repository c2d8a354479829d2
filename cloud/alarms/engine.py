"""Per-partition stream processing with a changelog-backed state store.

One :class:`AlarmEngine` owns the device states of the input partitions assigned to it. For every record:

* telemetry -> :func:`rules.apply_reading`; status -> :func:`rules.apply_status`; an alarm event that someone
  else published (the web tier's "acknowledged" or manual "cleared") -> :func:`rules.apply_external`;
* each :class:`rules.Change` becomes a JSON :class:`cloud.schema.AlarmEvent` on the alarms topic, keyed by device
  id (produced at once, so the delay from reading to alarm is a few milliseconds), plus the rule's optional
  command to the device on the control topic;
* the device is marked dirty.

``checkpoint()`` (every ``commit_interval`` seconds, on revoke and on stop) writes one state snapshot per dirty
device to the changelog topic (compacted, key = device id, partition = the input partition), waits until the
backbone has every record of the interval (flush), and only then commits the input offsets. So committed input
is always covered by a durable state, and after a crash the uncommitted input is replayed against a state that is
at least as new as the commit: readings already applied are recognised by (boot, seq) and skipped, an alarm that
is already active is not raised again. The window in which a crash can repeat an event is the part of one
interval whose events were delivered but whose snapshot was not; such a repeat carries the same deterministic
``alarm_id`` (consumers store alarms by id), so it is harmless.

On assignment, the engine reads the changelog partitions of the new input partitions to their end before it
processes any record from them (Kafka: inside the rebalance callback, which runs in the consumer's poll).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Callable

from prometheus_client import Counter, Gauge

from cloud.alarms import rules as R
from cloud.alarms.catalog import Catalog
from cloud.alarms.io import StreamIO
from cloud.bus import Record
from cloud.schema import VERSION, AlarmEvent, Command, validate_command_args

log = logging.getLogger(__name__)

SOURCE_HEADER = "src"
SOURCE = "alarms"  # header on every event the engine produces; events without it come from elsewhere (web)
MAX_FUTURE_MS = 5 * 60 * 1000  # a device clock further ahead of the cloud than this is not trusted
COMMAND_TTL_S = 300
_decode = json.JSONDecoder().raw_decode
_CMD_NS = uuid.UUID("1b0c6a57-22a4-4f3e-8a8f-3c2f1f4b9d10")

READINGS = Counter("iot_alarms_readings_total", "Readings evaluated by the alarm service", ["result"])
EVENTS = Counter("iot_alarms_events_total", "Alarm events produced", ["state"])
INVALID = Counter("iot_alarms_invalid_total", "Input records the alarm service could not read", ["topic"])
ACTIVE = Gauge("iot_alarms_active", "Active alarms held by this alarm service instance")
RESTORED = Counter("iot_alarms_restored_states_total", "Device states restored from the changelog")


class AlarmEngine:
    def __init__(self, io: StreamIO, topics, changelog: str, catalog: Callable[[], Catalog],
                 clock: Callable[[], float] = time.time, commit_interval: float = 5.0,
                 on_unknown_device: Callable[[], None] | None = None):
        self.io = io
        self.topics = topics
        self.changelog = changelog
        self.catalog = catalog
        self.clock = clock
        self.commit_interval = commit_interval
        self.on_unknown_device = on_unknown_device
        self.parts: dict[int, dict[str, R.DeviceState]] = {}  # input partition -> device -> state
        self.dirty: dict[str, tuple[int, R.DeviceState]] = {}
        self.offsets: dict[tuple[str, int], int] = {}  # next offset to commit, per (topic, partition)
        self.caught_up: dict[int, bool] = {}
        self.last_commit = time.monotonic()
        self.counts = {"readings": 0, "duplicates": 0, "late": 0, "events": 0, "commands": 0, "invalid": 0,
                       "restored": 0, "checkpoints": 0}
        io.on_assign = self.assign
        io.on_revoke = self.revoke
        io.on_lost = self.lost
        self._suspended: dict[int, dict[str, R.DeviceState]] = {}

    # --- partitions -----------------------------------------------------------------------------------------
    def assign(self, partitions: set[int]) -> None:
        # eager rebalance: partitions we just gave back in on_revoke and got again were processed by nobody in
        # between (same rebalance), so their in-memory state is still exact
        keep = {p: self._suspended.pop(p) for p in list(self._suspended) if p in partitions}
        self._suspended.clear()
        self.parts.update(keep)
        new = {p for p in partitions if p not in self.parts}
        if not new:
            return
        started = time.monotonic()
        restored: dict[int, dict[str, R.DeviceState]] = {p: {} for p in new}
        for p, key, value in self.io.restore(self.changelog, new):
            if key is None or p not in restored:
                continue
            if value is None:
                restored[p].pop(key, None)
                continue
            try:
                restored[p][key] = R.DeviceState.from_dict(json.loads(value))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("changelog record for %s unreadable, state reset: %s", key, exc)
        for p in new:
            self.caught_up[p] = False
        self.parts.update(restored)
        n = sum(len(part) for part in restored.values())
        self.counts["restored"] += n
        RESTORED.inc(n)
        self._update_active()
        log.info("alarm state: partitions %s assigned, %d device states restored in %.2fs", sorted(new), n,
                 time.monotonic() - started)

    def revoke(self, partitions: set[int]) -> None:
        """Before a partition goes to another instance: make its state and offsets durable, then let it go."""
        try:
            self.checkpoint()
        except Exception:  # noqa: BLE001 -- the other instance replays from the last good commit
            log.exception("checkpoint on revoke failed")
        for p in partitions:
            if p in self.parts:
                self._suspended[p] = self.parts.pop(p)
            self._forget_offsets(p)
        self._update_active()

    def lost(self, partitions: set[int]) -> None:
        """Partitions taken away without a chance to commit: drop them (the new owner restores and replays)."""
        for p in partitions:
            self.parts.pop(p, None)
            self._suspended.pop(p, None)
            self._forget_offsets(p)
        self.dirty = {d: v for d, v in self.dirty.items() if v[0] not in partitions}
        self._update_active()

    def _forget_offsets(self, p: int) -> None:
        for pair in [pair for pair in self.offsets if pair[1] == p]:
            del self.offsets[pair]
        self.caught_up.pop(p, None)

    # --- records ------------------------------------------------------------------------------------------
    def process(self, records: list[Record]) -> None:
        topics = self.topics
        telemetry, status, alarms = topics.telemetry, topics.status, topics.alarms
        catalog = self.catalog()
        offsets = self.offsets
        now_ms = int(self.clock() * 1000)
        newest: dict[int, int] = {}
        for record in records:
            topic, p = record.topic, record.partition
            offsets[(topic, p)] = record.offset + 1
            newest[p] = record.timestamp_ms
            if topic == telemetry:
                self._reading(record, catalog, now_ms)
            elif topic == status:
                self._status(record, catalog)
            elif topic == alarms:
                self._external(record)
        for p, ts in newest.items():  # a partition whose newest record is recent has caught up (nodata may run)
            self.caught_up[p] = now_ms - ts < 10_000
        if not records:
            for p in self.parts:
                self.caught_up[p] = True

    def _state(self, p: int, device: str, create: bool) -> R.DeviceState | None:
        part = self.parts.get(p)
        if part is None:
            part = self.parts[p] = {}
        dev = part.get(device)
        if dev is None and create:
            dev = part[device] = R.DeviceState()
        return dev

    def _reading(self, record: Record, catalog: Catalog, now_ms: int) -> None:
        device = record.key
        rules = catalog.rules_for(device) if device else ()
        dev = self._state(record.partition, device, create=bool(rules)) if device else None
        if dev is None:
            if device and self.on_unknown_device is not None and catalog.tenant(device) is None:
                self.on_unknown_device()  # maybe provisioned a moment ago: reload the device map soon
            return  # unknown device or no rules, and nothing to clear
        try:
            data = _decode(record.value.decode("utf-8"))[0]  # the bridge validated it: skip json.loads' extras
            boot, seq, ts = data.get("boot"), data.get("seq"), data.get("ts")
        except (ValueError, AttributeError, TypeError, IndexError):
            self.counts["invalid"] += 1
            INVALID.labels(record.topic).inc()
            return
        seen = record.timestamp_ms or now_ms
        if not isinstance(ts, int) or isinstance(ts, bool) or ts > seen + MAX_FUTURE_MS:
            ts = seen  # unsynced device clock (or one far ahead): the time the reading entered the backbone
        if not isinstance(boot, int) or not isinstance(seq, int):
            boot = seq = None
        result, changes = R.apply_reading(device, dev, rules, boot, seq, ts, data, seen)
        if result == "duplicate":
            self.counts["duplicates"] += 1
            READINGS.labels("duplicate").inc()
            return
        self.counts["readings"] += 1
        if result == "late":
            self.counts["late"] += 1
            READINGS.labels("late").inc()
        self.dirty[device] = (record.partition, dev)
        if changes:
            self._emit(device, catalog, changes)

    def _status(self, record: Record, catalog: Catalog) -> None:
        device = record.key
        if not device:
            return
        rules = catalog.rules_for(device)
        dev = self._state(record.partition, device, create=bool(rules))
        if dev is None:
            return
        try:
            data = json.loads(record.value)
            state = data.get("state")
        except (ValueError, AttributeError, TypeError):
            state = None
        if state not in ("online", "offline"):
            self.counts["invalid"] += 1
            INVALID.labels(record.topic).inc()
            return
        changes = R.apply_status(device, dev, rules, state == "online", record.timestamp_ms or int(self.clock() * 1000))
        self.dirty[device] = (record.partition, dev)
        if changes:
            self._emit(device, catalog, changes)

    def _external(self, record: Record) -> None:
        if record.headers.get(SOURCE_HEADER) == SOURCE or not record.key:
            return  # our own events
        try:
            data = json.loads(record.value)
            state, rule, alarm = data.get("state"), data.get("rule"), data.get("alarm_id")
        except (ValueError, AttributeError, TypeError):
            return
        if state not in ("acknowledged", "cleared"):
            return
        dev = self._state(record.partition, record.key, create=False)
        if dev is not None and R.apply_external(dev, rule, alarm, state):
            self.dirty[record.key] = (record.partition, dev)

    def tick(self) -> None:
        """Timer (about once a second): nodata, offline-for-duration, alarms of removed rules. Partitions still
        replaying a backlog are skipped, so a restart after downtime does not raise nodata for every device."""
        catalog = self.catalog()
        now_ms = int(self.clock() * 1000)
        for p, part in self.parts.items():
            if not self.caught_up.get(p, False):
                continue
            for device, dev in part.items():
                rules = catalog.rules_for(device)
                if not rules and not dev.rules:
                    continue
                changes = R.apply_tick(device, dev, rules, now_ms)
                if changes:
                    self.dirty[device] = (p, dev)
                    self._emit(device, catalog, changes)

    # --- output ---------------------------------------------------------------------------------------------
    def _emit(self, device: str, catalog: Catalog, changes: list[R.Change]) -> None:
        tenant = catalog.tenant(device)
        io = self.io
        alarms_topic = self.topics.alarms
        for c in changes:
            event = AlarmEvent(alarm_id=c.alarm_id, device=device, tenant=str(tenant) if tenant is not None else "",
                               rule=c.rule, metric=c.metric,
                               value=float(c.value) if c.value is not None else None, threshold=c.threshold,
                               severity=c.severity, state=c.state, ts=c.ts)
            io.produce(alarms_topic, device, event.to_json(), {SOURCE_HEADER: SOURCE})
            self.counts["events"] += 1
            EVENTS.labels(c.state).inc()
            command = R.thaw_command(c.command)
            if command is not None:
                op, args = command
                try:
                    args = validate_command_args(op, args)
                except ValueError as exc:
                    log.warning("rule %s: command not sent: %s", c.rule, exc)
                    continue
                cid = str(uuid.uuid5(_CMD_NS, f"{c.alarm_id}:{c.state}"))  # same command on a replay
                cmd = Command(cid=cid, op=op, args=args, exp=int(self.clock() * 1000) + COMMAND_TTL_S * 1000)
                io.produce(self.topics.control, device, cmd.to_json(), {SOURCE_HEADER: SOURCE})
                self.counts["commands"] += 1

    def checkpoint(self) -> None:
        """Snapshots of the dirty devices -> changelog, flush everything, then commit the input offsets."""
        io = self.io
        for device, (p, dev) in self.dirty.items():
            if p not in self.parts:
                continue
            io.produce(self.changelog, device,
                       json.dumps(dev.to_dict(), separators=(",", ":")).encode(), None, partition=p)
        self.dirty = {}
        remaining = io.flush(30.0)
        if remaining:
            raise RuntimeError(f"{remaining} records not delivered within 30 s; offsets not committed")
        if getattr(io, "producer_errors", 0):
            raise RuntimeError("a produce failed; offsets not committed (input will be replayed)")
        assigned = {(t, p): o for (t, p), o in self.offsets.items() if p in self.parts}
        io.commit(assigned)
        self.offsets = {}
        self.last_commit = time.monotonic()
        self.counts["checkpoints"] += 1
        self._update_active()  # O(states): once per checkpoint, not per event

    def maybe_checkpoint(self) -> None:
        if time.monotonic() - self.last_commit >= self.commit_interval and (self.dirty or self.offsets):
            self.checkpoint()

    # --- introspection ------------------------------------------------------------------------------------
    def _update_active(self) -> None:
        ACTIVE.set(self.active_count())

    def active_count(self) -> int:
        return sum(1 for part in self.parts.values() for dev in part.values() for rs in dev.rules.values()
                   if rs.alarm is not None)

    def active_alarms(self) -> list[dict]:
        out = []
        for part in self.parts.values():
            for device, dev in part.items():
                for name, rs in dev.rules.items():
                    if rs.alarm is not None:
                        out.append({"device": device, "rule": name, "alarm_id": rs.alarm,
                                    "state": "acknowledged" if rs.acked else "raised", "raised_ts": rs.raised_ts,
                                    "severity": rs.severity, "value": rs.value, "threshold": rs.threshold})
        return out

    def device_state(self, device: str) -> R.DeviceState | None:
        for part in self.parts.values():
            if device in part:
                return part[device]
        return None


def ack_event(alarm_id: str, device: str, tenant: str | int, rule: str, metric: str, severity: str,
              value: float | None = None, threshold: float | None = None, ts: int | None = None) -> AlarmEvent:
    """The "acknowledged" event the web tier publishes after updating the alarm row (see cloud.alarms)."""
    return AlarmEvent(alarm_id=alarm_id, device=device, tenant=str(tenant), rule=rule, metric=metric, value=value,
                      threshold=threshold, severity=severity, state="acknowledged",
                      ts=ts if ts is not None else int(time.time() * 1000))


__all__ = ["AlarmEngine", "ack_event", "SOURCE", "SOURCE_HEADER", "VERSION"]
