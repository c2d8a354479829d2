"""Per-partition stream processing with a changelog-backed state store.

One :class:`AlarmEngine` owns the device states of the input partitions assigned to it. For every record:

* telemetry -> :func:`rules.apply_reading`; status -> :func:`rules.apply_status`; an alarm event that someone
  else published (the web tier's "acknowledged" or manual "cleared") -> :func:`rules.apply_external`;
* each :class:`rules.Change` becomes a JSON :class:`cloud.schema.AlarmEvent` on the alarms topic, keyed by device
  id (produced at once, so the delay from reading to alarm is a few milliseconds), plus the rule's optional
  command to the device on the control topic;
* the device is marked dirty.

A checkpoint writes one state snapshot per dirty device to the changelog topic (compacted, key = device id,
partition = the input partition), and commits the input offsets only once the backbone has every record produced
before and with those snapshots. ``maybe_checkpoint()`` (the service loop, every ``commit_interval`` seconds) does
it without ever blocking processing: snapshots are produced a chunk per loop iteration, and the commit waits for
the delivery reports of that "epoch" of records (see its docstring); ``checkpoint()`` (on revoke, on stop, in the
tests) does it at once with a flush. So committed input is always covered by a durable state, and after a crash
the uncommitted input is replayed against a state that is at least as new as the commit: readings already
applied are recognised by (boot, seq) and skipped, an alarm that is already active is not raised again.

The per-reading path is written for throughput (one process, ~10 us of CPU a reading with 3 rules): orjson,
plain tuples from the stream I/O, rules compiled per device (:func:`rules._compile`), counters and Prometheus
updated once per batch, no object per reading that outlives it. The window in which a crash can repeat an event is the part of one
interval whose events were delivered but whose snapshot was not; such a repeat carries the same deterministic
``alarm_id`` (consumers store alarms by id), so it is harmless.

On assignment, the engine reads the changelog partitions of the new input partitions to their end before it
processes any record from them (Kafka: inside the rebalance callback, which runs in the consumer's poll).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Callable

import orjson
from prometheus_client import Counter, Gauge

from cloud.alarms import rules as R
from cloud.alarms.catalog import Catalog
from cloud.alarms.io import StreamIO
from cloud.schema import VERSION, AlarmEvent, Command, validate_command_args

log = logging.getLogger(__name__)

SOURCE_HEADER = "src"
SOURCE = "alarms"  # header on every event the engine produces; events without it come from elsewhere (web)
_SOURCE_HEADERS = {SOURCE_HEADER: SOURCE}
_NO_DEVICES: dict = {}
MAX_FUTURE_MS = 5 * 60 * 1000  # a device clock further ahead of the cloud than this is not trusted
COMMAND_TTL_S = 300
SNAPSHOT_CHUNK = 200  # snapshots produced per loop iteration while a checkpoint is under way (~1 ms)
_loads = orjson.loads
_dumps = orjson.dumps
_BAD_INPUT = (orjson.JSONDecodeError, AttributeError, TypeError)  # not JSON, not an object
_CMD_NS = uuid.UUID("1b0c6a57-22a4-4f3e-8a8f-3c2f1f4b9d10")

READINGS = Counter("iot_alarms_readings_total", "Readings evaluated by the alarm service", ["result"])
EVENTS = Counter("iot_alarms_events_total", "Alarm events produced", ["state"])
INVALID = Counter("iot_alarms_invalid_total", "Input records the alarm service could not read", ["topic"])
ACTIVE = Gauge("iot_alarms_active", "Active alarms held by this alarm service instance")
RESTORED = Counter("iot_alarms_restored_states_total", "Device states restored from the changelog")
_EVENTS = {state: EVENTS.labels(state) for state in ("raised", "cleared")}
_READINGS_APPLIED, _READINGS_LATE, _READINGS_DUPLICATE = (READINGS.labels(r) for r in ("applied", "late",
                                                                                        "duplicate"))


class _Epoch:
    """The records produced between two checkpoints (events, commands, then the checkpoint's snapshots): how many
    still wait for their delivery report, and how many failed. Its ``done`` is the delivery callback."""
    __slots__ = ("outstanding", "errors")

    def __init__(self) -> None:
        self.outstanding = 0
        self.errors = 0

    def done(self, err, _msg) -> None:
        self.outstanding -= 1
        if err is not None:
            self.errors += 1
            log.error("alarm service: a record was not delivered: %s", err)


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
        # device -> its input partition, for the devices changed since the last checkpoint (an int value: no new
        # object per reading for the garbage collector to track)
        self.dirty: dict[str, int] = {}
        self.offsets: dict[tuple[str, int], int] = {}  # next offset to commit, per (topic, partition)
        self.caught_up: dict[int, bool] = {}
        self.last_commit = time.monotonic()
        self.counts = {"readings": 0, "duplicates": 0, "late": 0, "events": 0, "commands": 0, "invalid": 0,
                       "restored": 0, "checkpoints": 0}
        io.on_assign = self.assign
        io.on_revoke = self.revoke
        io.on_lost = self.lost
        io.raw_topics = {topics.alarms}  # only _external reads headers
        self._suspended: dict[int, dict[str, R.DeviceState]] = {}
        self._epoch = _Epoch()
        # a checkpoint whose snapshots were produced but not yet confirmed: (its epoch, offsets to commit, started)
        self._inflight: tuple[_Epoch, dict[tuple[str, int], int], float] | None = None
        # a checkpoint still producing its snapshots: (devices to snapshot, how many done, offsets set aside)
        self._snapping: tuple[list[tuple[str, int]], int, dict[tuple[str, int], int]] | None = None
        self.delivery_errors = 0  # sticky: after a lost record nothing is committed (the input is replayed)
        self._tick_clean: Catalog | None = None  # the catalog the last complete tick ran with

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
                restored[p][key] = R.DeviceState.from_dict(_loads(value))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("changelog record for %s unreadable, state reset: %s", key, exc)
        for p in new:
            self.caught_up[p] = False
        self._tick_clean = None  # restored states may hold alarms of rules removed meanwhile
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
        self.dirty = {d: p for d, p in self.dirty.items() if p not in partitions}
        if self._inflight is not None:
            epoch, offsets, started = self._inflight
            self._inflight = (epoch, {tp: o for tp, o in offsets.items() if tp[1] not in partitions}, started)
        if self._snapping is not None:
            items, pos, offsets = self._snapping
            self._snapping = (items, pos, {tp: o for tp, o in offsets.items() if tp[1] not in partitions})
        self._update_active()

    def _forget_offsets(self, p: int) -> None:
        for pair in [pair for pair in self.offsets if pair[1] == p]:
            del self.offsets[pair]
        self.caught_up.pop(p, None)

    # --- records ------------------------------------------------------------------------------------------
    def process(self, records: list[tuple]) -> None:
        """Records as :meth:`StreamIO.poll` returns them: ``(topic, partition, offset, key, value, timestamp_ms,
        raw)``. Telemetry (nearly every record) is handled inline: this loop is the service's hot path."""
        if not records:
            for p in self.parts:
                self.caught_up[p] = True
            return
        topics = self.topics
        telemetry, status, alarms = topics.telemetry, topics.status, topics.alarms
        catalog = self.catalog()
        rules_for = catalog.rules_for
        cached_rules = catalog.rules_cache.get  # rules_for without the call, once the device is cached
        parts = self.parts
        dirty = self.dirty
        offsets = self.offsets
        apply_reading = R.apply_reading
        loads = _loads
        now_ms = int(self.clock() * 1000)
        future_ms = MAX_FUTURE_MS
        newest: dict[int, int] = {}
        applied = late = duplicates = invalid = 0
        for topic, p, offset, device, value, seen, raw in records:
            part = parts.get(p)
            if part is None:
                # fetched before a rebalance that ran inside this poll took the partition away: its new owner (or
                # this instance, if it got it back) reads it again from the committed offset
                continue
            offsets[(topic, p)] = offset + 1
            newest[p] = seen
            if topic != telemetry:
                if topic == status:
                    self._status(p, device, value, seen, raw, catalog)
                elif topic == alarms:
                    self._external(p, device, value, raw)
                continue
            if not device:
                continue
            dev = part.get(device)
            rules = cached_rules(device) or rules_for(device)
            if dev is None:
                if not rules:
                    if self.on_unknown_device is not None and catalog.tenant(device) is None:
                        self.on_unknown_device()  # maybe provisioned a moment ago: reload the device map soon
                    continue  # unknown device or no rules, and nothing to clear
                dev = part[device] = R.DeviceState()
            try:
                data = loads(value)  # the bridge validated it with cloud.schema: only what the rules need
                boot, seq, ts = data.get("boot"), data.get("seq"), data.get("ts")
            except _BAD_INPUT:
                invalid += 1
                continue
            if not seen:
                seen = now_ms
            if type(ts) is not int or ts > seen + future_ms:
                ts = seen  # unsynced device clock (or one far ahead): the time the reading entered the backbone
            if type(boot) is not int or type(seq) is not int:
                boot = seq = None
            result, changes = apply_reading(device, dev, rules, boot, seq, ts, data, seen)
            if result == "duplicate":
                duplicates += 1
                continue
            if result == "late":
                late += 1
            else:
                applied += 1
            dirty[device] = p
            if changes:
                self._emit(device, catalog, changes)
        counts = self.counts
        counts["readings"] += applied + late
        counts["late"] += late
        counts["duplicates"] += duplicates
        if applied:  # Prometheus once per batch, not per record
            _READINGS_APPLIED.inc(applied)
        if late:
            _READINGS_LATE.inc(late)
        if duplicates:
            _READINGS_DUPLICATE.inc(duplicates)
        if invalid:
            counts["invalid"] += invalid
            INVALID.labels(telemetry).inc(invalid)
        for p, ts in newest.items():  # a partition whose newest record is recent has caught up (nodata may run)
            self.caught_up[p] = now_ms - ts < 10_000

    def _state(self, p: int, device: str, create: bool) -> R.DeviceState | None:
        part = self.parts.get(p)
        if part is None:
            return None  # not (or no longer) this instance's partition
        dev = part.get(device)
        if dev is None and create:
            dev = part[device] = R.DeviceState()
        return dev

    def _status(self, p: int, device: str | None, value: bytes, seen: int, raw, catalog: Catalog) -> None:
        if not device:
            return
        rules = catalog.rules_for(device)
        dev = self._state(p, device, create=bool(rules))
        if dev is None:
            return
        try:
            data = _loads(value)
            state = data.get("state")
        except _BAD_INPUT:
            state = None
        if state not in ("online", "offline"):
            self.counts["invalid"] += 1
            INVALID.labels(self.topics.status).inc()
            return
        changes = R.apply_status(device, dev, rules, state == "online", seen or int(self.clock() * 1000))
        self.dirty[device] = p
        if changes:
            self._emit(device, catalog, changes)

    def _external(self, p: int, device: str | None, value: bytes, raw) -> None:
        if not device or self.io.headers(raw).get(SOURCE_HEADER) == SOURCE:
            return  # our own events
        try:
            data = _loads(value)
            state, rule, alarm = data.get("state"), data.get("rule"), data.get("alarm_id")
        except _BAD_INPUT:
            return
        if state not in ("acknowledged", "cleared"):
            return
        dev = self._state(p, device, create=False)
        if dev is not None and R.apply_external(dev, rule, alarm, state):
            self.dirty[device] = p

    def tick(self) -> None:
        """Timer (about once a second): nodata, offline-for-duration, alarms of removed rules. Partitions still
        replaying a backlog are skipped, so a restart after downtime does not raise nodata for every device."""
        catalog = self.catalog()
        if catalog is self._tick_clean and not catalog.timed:
            return  # no timed rule, and every state was reconciled with these rules by an earlier tick
        now_ms = int(self.clock() * 1000)
        complete = True
        for p, part in self.parts.items():
            if not self.caught_up.get(p, False):
                complete = False
                continue
            for device, dev in part.items():
                rules = catalog.rules_for(device)
                if rules is dev.ruleset and not dev.timed:
                    continue  # same rules as last time and none on a timer: apply_tick would change nothing
                if not rules and not dev.rules:
                    continue
                changes = R.apply_tick(device, dev, rules, now_ms)
                if changes:
                    self.dirty[device] = p
                    self._emit(device, catalog, changes)
        self._tick_clean = catalog if complete else None

    # --- output ---------------------------------------------------------------------------------------------
    def _emit(self, device: str, catalog: Catalog, changes: list[R.Change]) -> None:
        tenant = catalog.tenant(device)
        tenant = str(tenant) if tenant is not None else ""
        alarms_topic = self.topics.alarms
        for c in changes:
            # the fields of cloud.schema.AlarmEvent (tests/alarms check that parse_alarm_event reads it back equal)
            event = {"v": VERSION, "alarm_id": c.alarm_id, "device": device, "tenant": tenant, "rule": c.rule,
                     "metric": c.metric, "value": float(c.value) if c.value is not None else None,
                     "threshold": c.threshold, "severity": c.severity, "state": c.state, "ts": c.ts}
            self._produce(alarms_topic, device, _dumps(event), _SOURCE_HEADERS)
            self.counts["events"] += 1
            _EVENTS[c.state].inc()
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
                self._produce(self.topics.control, device, cmd.to_json(), _SOURCE_HEADERS)
                self.counts["commands"] += 1

    def _produce(self, topic: str, key: str, value: bytes, headers: dict[str, str] | None = None,
                 partition: int | None = None) -> None:
        epoch = self._epoch
        epoch.outstanding += 1
        self.io.produce(topic, key, value, headers, partition, epoch.done)

    def _snapshot(self, items: list[tuple[str, int]], start: int, end: int) -> None:
        parts = self.parts
        changelog = self.changelog
        produce = self._produce
        for i in range(start, end):
            device, p = items[i]
            dev = parts.get(p, _NO_DEVICES).get(device)
            if dev is None:  # partition revoked or lost meanwhile
                continue
            produce(changelog, device, _dumps(dev.to_dict()), None, p)

    def _check_deliveries(self, epoch: _Epoch) -> None:
        self.delivery_errors += epoch.errors
        epoch.errors = 0
        if self.delivery_errors or getattr(self.io, "producer_errors", 0):
            raise RuntimeError("a produce failed; offsets not committed (input will be replayed)")

    def _committed(self) -> None:
        self.last_commit = time.monotonic()
        self.counts["checkpoints"] += 1
        self._update_active()  # O(states): once per checkpoint, not per event

    def checkpoint(self) -> None:
        """Synchronous: snapshots of the dirty devices -> changelog, flush everything, then commit the input
        offsets (also those of a checkpoint still in flight). On revoke, on stop, and in the tests."""
        offsets: dict[tuple[str, int], int] = {}
        if self._inflight is not None:
            offsets.update(self._inflight[1])
        if self._snapping is not None:
            items, pos, snap_offsets = self._snapping
            self._snapshot(items, pos, len(items))
            offsets.update(snap_offsets)
        items = list(self.dirty.items())
        self._snapshot(items, 0, len(items))
        self.dirty = {}
        offsets.update(self.offsets)  # newest last
        remaining = self.io.flush(30.0)
        if remaining:  # nothing is dropped: a later checkpoint still commits these offsets
            self._snapping = (items, len(items), offsets)
            self.offsets = {}
            raise RuntimeError(f"{remaining} records not delivered within 30 s; offsets not committed")
        epoch, self._epoch = self._epoch, _Epoch()
        inflight, self._inflight, self._snapping = self._inflight, None, None
        if inflight is not None:
            self._check_deliveries(inflight[0])
        self._check_deliveries(epoch)
        self.io.commit({(t, p): o for (t, p), o in offsets.items() if p in self.parts})
        self.offsets = {}
        self._committed()

    def maybe_checkpoint(self) -> None:
        """The service loop's checkpoint, in steps, so that processing never waits for Kafka nor for thousands of
        snapshots at once:

        1. every ``commit_interval`` seconds: set the input offsets reached so far aside with the list of dirty
           devices; then, SNAPSHOT_CHUNK devices per call, produce their snapshots (each one is the device's
           state when produced, at least as new as those offsets: replayed readings are recognised by (boot, seq));
        2. when all are produced, close the epoch: every record produced since the previous checkpoint (events,
           commands, these snapshots);
        3. on a later call, once every record of that epoch has its delivery report (served by ``io.serve()``)
           and none failed, commit the offsets.

        So committed input is always covered by durable events and states, as with :meth:`checkpoint`: a
        snapshot never shows an alarm whose event could still be lost, because that event was produced before
        the snapshot, in the same or an earlier epoch."""
        inflight = self._inflight
        if inflight is not None:
            epoch, offsets, started = inflight
            if epoch.outstanding > 0:
                if time.monotonic() - started > 30.0:
                    raise RuntimeError(f"{epoch.outstanding} records not delivered within 30 s; "
                                       f"offsets not committed")
                return
            self._check_deliveries(epoch)
            self._inflight = None
            self.io.commit({(t, p): o for (t, p), o in offsets.items() if p in self.parts}, asynchronous=True)
            self._committed()
        if self._snapping is None:
            if time.monotonic() - self.last_commit < self.commit_interval or not (self.dirty or self.offsets):
                return
            self._snapping = (list(self.dirty.items()), 0, self.offsets)
            self.dirty = {}
            self.offsets = {}
            self.last_commit = time.monotonic()
        items, pos, offsets = self._snapping
        end = min(pos + SNAPSHOT_CHUNK, len(items))
        self._snapshot(items, pos, end)
        if end < len(items):
            self._snapping = (items, end, offsets)
            return
        epoch, self._epoch = self._epoch, _Epoch()
        self._inflight = (epoch, offsets, time.monotonic())
        self._snapping = None

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
