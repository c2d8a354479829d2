"""Pure alarm rule logic: rule validation, per-device state and the state machines. No I/O, no clocks.

Everything here is a function of (state, rules, input) -> (new state, changes), so the engine can run it on
Kafka or on the in-process bus, tests can drive it directly, and a state restored from the changelog continues
exactly where the previous owner stopped.

Rule kinds (columns of :class:`cloud.db.models.Rule`):

* ``threshold`` -- ``min`` and/or ``max`` on a metric. Raised when the value is outside [min, max] for at least
  ``duration_s`` (event time, measured from the first violating reading; any reading back inside resets it).
  Cleared only when the value is back inside [min + hysteresis, max - hysteresis], so a value wobbling around
  the threshold raises one alarm, not one per wobble.
* ``rate`` -- |change per minute| of a metric above ``rate_per_min``, measured over a window of ``duration_s``
  (default 60 s) of event time. Cleared when the rate is back to ``rate_per_min - hysteresis`` or less.
* ``nodata`` -- no reading for ``nodata_s`` seconds (evaluated on a timer against the time the reading entered
  the backbone, i.e. the cloud's clock, so a device with a wrong clock cannot fake it). Cleared by a reading.
* ``offline`` -- the device's status is "offline" (normally its MQTT last will) for at least ``duration_s``.
  Cleared by "online" or by any reading.

Readings are identified by (boot, seq): a reading with the same boot and a seq not above the last applied one is
a redelivery or a replay and changes nothing. A reading whose event time is older than the newest one already
applied is *late*: it proves the device is alive (nodata/offline) but cannot move threshold/rate state back in
time, so out-of-order delivery never raises or clears an alarm on stale information.
"""

from __future__ import annotations

import math
import uuid
from hashlib import sha1 as _sha1
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from cloud.schema import SEVERITIES, validate_command_args

KINDS = ("threshold", "rate", "nodata", "offline")
# the numeric fields of a reading that rules can watch, and the names people also use for them
METRICS = ("t", "h", "p", "rssi", "up")
METRIC_ALIASES = {"temperature": "t", "temp": "t", "humidity": "h", "pressure": "p", "signal": "rssi",
                  "uptime": "up"}
METRIC_OF_KIND = {"nodata": "nodata", "offline": "status"}  # what an event of these kinds reports as metric
DEFAULT_RATE_WINDOW_S = 60
MAX_SAMPLES = 32  # rate window resolution: at most this many samples kept per rule and device
_ALARM_NS = uuid.UUID("6f1c1d2e-8a40-4c39-9a0e-4a1a1a7a2b6e")
_ALARM_NS_BYTES = _ALARM_NS.bytes

_RULE_FIELDS = ("name", "kind", "metric", "min", "max", "hysteresis", "duration_s", "rate_per_min", "nodata_s",
                "severity", "enabled", "on_raise", "on_clear")
_PASSTHROUGH = ("id", "tenant_id", "device_id", "updated_at")


# --- validation -------------------------------------------------------------------------------------------

def _num(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number")
    return float(value)


def _seconds(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number of seconds, got {value!r}")
    if value < 0:
        raise ValueError(f"{key} must not be negative, got {value}")
    if value != int(value):
        raise ValueError(f"{key} must be a whole number of seconds, got {value}")
    if value > 30 * 86_400:
        raise ValueError(f"{key} must be at most 30 days, got {value}")
    return int(value)


def _command(data: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("op"), str):
        raise ValueError(f"{key} must be a command object like {{\"op\": \"led\", \"args\": {{\"state\": \"on\"}}}}")
    extra = set(value) - {"op", "args"}
    if extra:
        raise ValueError(f"{key} has unknown field(s) {', '.join(sorted(extra))}; expected op and args")
    try:
        args = validate_command_args(value["op"], value.get("args"))
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return {"op": value["op"], "args": args}


def validate_rule(data: Mapping[str, Any]) -> dict[str, Any]:
    """Check an alarm rule as the API receives it and return it normalized (the Rule columns).

    Raises ValueError with one clear sentence (min above max, unknown metric, negative duration, ...).
    ``id``, ``tenant_id``, ``device_id`` and ``updated_at`` pass through untouched; any other unknown field is
    refused so a typo ("treshold") does not silently create a rule that never fires.
    """
    if not isinstance(data, Mapping):
        raise ValueError("a rule must be a JSON object")
    unknown = set(data) - set(_RULE_FIELDS) - set(_PASSTHROUGH)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(_RULE_FIELDS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name is required (a short text such as 'high-temperature')")
    name = name.strip()
    if len(name) > 64:
        raise ValueError("name must be at most 64 characters")
    kind = data.get("kind", "threshold")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    severity = data.get("severity", "major")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError("enabled must be true or false")
    lo, hi = _num(data, "min"), _num(data, "max")
    hysteresis = _num(data, "hysteresis") or 0.0
    rate = _num(data, "rate_per_min")
    duration = _seconds(data, "duration_s") or 0
    nodata = _seconds(data, "nodata_s")
    if hysteresis < 0:
        raise ValueError(f"hysteresis must not be negative, got {hysteresis}")
    metric = data.get("metric")
    if kind in ("threshold", "rate"):
        if metric is None:
            metric = "t"
        if not isinstance(metric, str) or METRIC_ALIASES.get(metric, metric) not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)} "
                             f"(or {', '.join(METRIC_ALIASES)})")
        metric = METRIC_ALIASES.get(metric, metric)
    else:
        metric = METRIC_OF_KIND[kind]
    if kind == "threshold":
        if lo is None and hi is None:
            raise ValueError("a threshold rule needs min, max or both")
        if lo is not None and hi is not None:
            if lo >= hi:
                raise ValueError(f"min {lo:g} must be below max {hi:g}")
            if 2 * hysteresis >= hi - lo:
                raise ValueError(f"hysteresis {hysteresis:g} is too wide for min {lo:g} and max {hi:g}: the "
                                 f"clearing band [min + hysteresis, max - hysteresis] would be empty")
        rate = nodata = None
    elif kind == "rate":
        if rate is None or rate <= 0:
            raise ValueError("a rate rule needs rate_per_min above 0 (change of the metric per minute)")
        if hysteresis >= rate:
            raise ValueError(f"hysteresis {hysteresis:g} must be below rate_per_min {rate:g}")
        if duration and duration < 2:
            raise ValueError("duration_s (the rate window) must be at least 2 seconds")
        lo = hi = nodata = None
    elif kind == "nodata":
        if not nodata:
            raise ValueError("a nodata rule needs nodata_s above 0 (seconds without a reading)")
        lo = hi = rate = None
    else:  # offline
        lo = hi = rate = nodata = None
    out: dict[str, Any] = {
        "name": name, "kind": kind, "metric": metric, "min": lo, "max": hi, "hysteresis": hysteresis,
        "duration_s": duration, "rate_per_min": rate, "nodata_s": nodata, "severity": severity,
        "enabled": enabled, "on_raise": _command(data, "on_raise"), "on_clear": _command(data, "on_clear"),
    }
    for key in _PASSTHROUGH:
        if key in data:
            out[key] = data[key]
    return out


# --- compiled rules ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One validated rule as the engine runs it (times in milliseconds)."""
    name: str
    kind: str
    metric: str
    min: float | None = None
    max: float | None = None
    hysteresis: float = 0.0
    duration_ms: int = 0
    rate_per_min: float | None = None
    nodata_ms: int | None = None
    severity: str = "major"
    on_raise: Any = None  # {"op":..., "args":...} or None (dicts are not hashable: stored as a JSON-ish tuple)
    on_clear: Any = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RuleSpec":
        """From a Rule row or API dict; raises ValueError for an invalid rule."""
        r = validate_rule(data)
        return cls(name=r["name"], kind=r["kind"], metric=r["metric"], min=r["min"], max=r["max"],
                   hysteresis=r["hysteresis"], duration_ms=r["duration_s"] * 1000, rate_per_min=r["rate_per_min"],
                   nodata_ms=(r["nodata_s"] * 1000 if r["nodata_s"] else None), severity=r["severity"],
                   on_raise=_freeze(r["on_raise"]), on_clear=_freeze(r["on_clear"]))

    def threshold(self) -> float | None:
        if self.kind == "rate":
            return self.rate_per_min
        if self.kind == "nodata":
            return (self.nodata_ms or 0) / 1000
        if self.kind == "offline":
            return self.duration_ms / 1000
        return self.max if self.max is not None else self.min


def _freeze(command: dict | None) -> Any:
    if command is None:
        return None
    return (command["op"], tuple(sorted((k, _freeze_value(v)) for k, v in command["args"].items())))


def _freeze_value(value: Any) -> Any:
    if isinstance(value, dict):
        return ("__dict__", tuple(sorted((k, _freeze_value(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("__list__", tuple(_freeze_value(v) for v in value))
    return value


def thaw_command(frozen: Any) -> tuple[str, dict[str, Any]] | None:
    """RuleSpec.on_raise/on_clear back to (op, args)."""
    if frozen is None:
        return None
    op, args = frozen
    return op, {k: _thaw_value(v) for k, v in args}


def _thaw_value(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__dict__":
        return {k: _thaw_value(v) for k, v in value[1]}
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__list__":
        return [_thaw_value(v) for v in value[1]]
    return value


def effective_rules(tenant_rules: Mapping[str, RuleSpec | None],
                    device_rules: Mapping[str, RuleSpec | None]) -> tuple[RuleSpec, ...]:
    """Tenant defaults overridden by name by the device's own rules; a disabled override (None) removes the
    default for that device."""
    merged = dict(tenant_rules)
    merged.update(device_rules)
    return tuple(r for _, r in sorted(merged.items()) if r is not None)


# --- state --------------------------------------------------------------------------------------------------

class RuleState:
    """State of one rule on one device: the active alarm (if any), a pending violation, the rate window."""
    __slots__ = ("kind", "metric", "alarm", "acked", "raised_ts", "severity", "value", "threshold", "pending",
                 "samples")

    def __init__(self, kind: str, metric: str):
        self.kind = kind
        self.metric = metric
        self.alarm: str | None = None  # alarm id while raised or acknowledged
        self.acked = False
        self.raised_ts: int | None = None
        self.severity: str | None = None
        self.value: float | None = None
        self.threshold: float | None = None
        self.pending: int | None = None  # event time of the first violating reading not yet long enough
        # rate window [(ts, value), ...]: tuples of numbers, which the garbage collector stops tracking (lists
        # of lists kept tens of thousands of new long-lived objects a second in its oldest generation)
        self.samples: list[tuple[int, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"k": self.kind, "m": self.metric}
        if self.alarm is not None:
            d.update(a=self.alarm, rt=self.raised_ts, sev=self.severity, v=self.value, th=self.threshold)
            if self.acked:
                d["ack"] = 1
        if self.pending is not None:
            d["pd"] = self.pending
        if self.samples:
            d["sm"] = self.samples
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RuleState":
        rs = cls(d["k"], d["m"])
        rs.alarm = d.get("a")
        rs.acked = bool(d.get("ack"))
        rs.raised_ts = d.get("rt")
        rs.severity = d.get("sev")
        rs.value = d.get("v")
        rs.threshold = d.get("th")
        rs.pending = d.get("pd")
        sm = d.get("sm")
        rs.samples = [(s[0], s[1]) for s in sm] if sm else None
        return rs


class DeviceState:
    """Everything the engine remembers about one device; snapshotted to the changelog after each change."""
    __slots__ = ("boot", "seq", "max_ts", "seen", "online", "offline_since", "rules", "ruleset", "plan", "timed")

    def __init__(self) -> None:
        self.boot: int | None = None
        self.seq: int | None = None  # last applied reading of this boot
        self.max_ts: int | None = None  # event-time watermark: newest reading applied
        self.seen: int | None = None  # cloud time (ms) of the newest reading received, for nodata
        self.online: bool | None = None
        self.offline_since: int | None = None
        self.rules: dict[str, RuleState] = {}
        self.ruleset: tuple | None = None  # the rules tuple last reconciled against (not persisted)
        self.plan: tuple = ()  # the rules compiled against this device's rule states (see _compile; not persisted)
        self.timed = False  # whether the plan has nodata/offline rules, i.e. whether the timer has work here

    def active(self) -> Iterable[tuple[str, RuleState]]:
        return ((n, rs) for n, rs in self.rules.items() if rs.alarm is not None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"b": self.boot, "s": self.seq, "t": self.max_ts, "w": self.seen}
        if self.online is not None:
            d["o"] = 1 if self.online else 0
        if self.offline_since is not None:
            d["os"] = self.offline_since
        # a rule state with nothing in it (no alarm, nothing pending, no samples) is the same as none
        rules = {n: rs.to_dict() for n, rs in self.rules.items()
                 if rs.alarm is not None or rs.pending is not None or rs.samples}
        if rules:
            d["r"] = rules
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DeviceState":
        ds = cls()
        ds.boot, ds.seq, ds.max_ts, ds.seen = d.get("b"), d.get("s"), d.get("t"), d.get("w")
        o = d.get("o")
        ds.online = None if o is None else bool(o)
        ds.offline_since = d.get("os")
        ds.rules = {n: RuleState.from_dict(r) for n, r in (d.get("r") or {}).items()}
        return ds


@dataclass(frozen=True, slots=True)
class Change:
    """An alarm transition the engine turns into an AlarmEvent (and maybe a command)."""
    rule: str
    metric: str
    severity: str
    state: str  # raised | cleared
    alarm_id: str
    value: float | None
    threshold: float | None
    ts: int
    command: Any = None  # frozen command of the rule (on_raise / on_clear), or None


def alarm_id(device: str, rule: str, raised_ts: int) -> str:
    """Deterministic: reprocessing the same reading after a crash yields the same id (consumers upsert).
    Exactly ``str(uuid.uuid5(_ALARM_NS, f"{device}\\x1f{rule}\\x1f{raised_ts}"))`` (tests compare them), built
    without the UUID objects."""
    digest = bytearray(_sha1(_ALARM_NS_BYTES + f"{device}\x1f{rule}\x1f{raised_ts}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- the state machines -----------------------------------------------------------------------------------

def _raise(device: str, spec: RuleSpec, rs: RuleState, value: float | None, threshold: float | None,
           ts: int) -> Change:
    rs.alarm = alarm_id(device, spec.name, ts)
    rs.acked = False
    rs.raised_ts = ts
    rs.severity = spec.severity
    rs.value = value
    rs.threshold = threshold
    rs.pending = None
    return Change(spec.name, rs.metric, spec.severity, "raised", rs.alarm, value, threshold, ts, spec.on_raise)


def _clear(name: str, rs: RuleState, value: float | None, ts: int, command: Any = None) -> Change:
    change = Change(name, rs.metric, rs.severity or "major", "cleared", rs.alarm or "", value, rs.threshold,
                    ts, command)
    rs.alarm = None
    rs.acked = False
    rs.raised_ts = None
    rs.severity = None
    rs.value = None
    rs.threshold = None
    return change


def _state_for(dev: DeviceState, spec: RuleSpec) -> RuleState:
    rs = dev.rules.get(spec.name)
    if rs is None:
        rs = dev.rules[spec.name] = RuleState(spec.kind, spec.metric)
    return rs


def reconcile(device: str, dev: DeviceState, rules: tuple[RuleSpec, ...], ts: int) -> list[Change]:
    """Rules removed, disabled or changed to another kind/metric: clear their alarms and forget their state.
    Then compile the device's plan for the new rules."""
    changes: list[Change] = []
    if rules is dev.ruleset:  # the catalog hands out the same tuple until the rules change: nothing to do
        return changes
    dev.ruleset = rules
    if dev.rules:
        by_name = {r.name: r for r in rules}
        for name in list(dev.rules):
            rs = dev.rules[name]
            spec = by_name.get(name)
            if spec is not None and spec.kind == rs.kind and spec.metric == rs.metric:
                continue
            if rs.alarm is not None:
                changes.append(_clear(name, rs, None, ts))
            del dev.rules[name]
    dev.plan = _compile(dev, rules)
    dev.timed = any(step[0] == _LIVENESS for step in dev.plan)
    return changes


_THRESHOLD, _RATE, _LIVENESS = 0, 1, 2
_INF = float("inf")


def _compile(dev: DeviceState, rules: tuple[RuleSpec, ...]) -> tuple:
    """Per device and rule set: one tuple per rule with its RuleState and the numbers the reading path needs,
    so a reading costs no kind dispatch by name, no RuleState lookup and no None checks on the bounds.
    (Every rule gets its RuleState now; an empty one is the same as none and is not snapshotted.)

    threshold: (_THRESHOLD, spec, rs, metric, max or +inf, min or -inf, max - hysteresis, min + hysteresis)
    rate:      (_RATE, spec, rs, metric, window ms, rate_per_min, rate_per_min - hysteresis, window / 2)
    nodata, offline (cleared by any reading): (_LIVENESS, spec, rs, None, ...)
    The bounds are compared exactly as before: inf never crosses, and a missing bound always allows clearing.
    """
    plan = []
    for spec in rules:
        rs = _state_for(dev, spec)
        kind = spec.kind
        if kind == "threshold":
            hi = spec.max if spec.max is not None else _INF
            lo = spec.min if spec.min is not None else -_INF
            plan.append((_THRESHOLD, spec, rs, spec.metric, hi, lo, hi - spec.hysteresis, lo + spec.hysteresis))
        elif kind == "rate":
            window = spec.duration_ms or DEFAULT_RATE_WINDOW_S * 1000
            limit = spec.rate_per_min or 0.0
            plan.append((_RATE, spec, rs, spec.metric, window, limit, limit - spec.hysteresis, window / 2))
        else:
            plan.append((_LIVENESS, spec, rs, None, None, None, None, None))
    return tuple(plan)


def _round(value: float) -> float:
    return round(value, 4)


def apply_reading(device: str, dev: DeviceState, rules: tuple[RuleSpec, ...], boot: int | None, seq: int | None,
                  ts: int, values: Mapping[str, Any], seen: int) -> tuple[str, list[Change]]:
    """One reading. Returns ("applied" | "duplicate" | "late", changes).

    The hot path of the service (every reading, every rule): it runs the device's compiled plan (see
    :func:`_compile`). A metric is evaluated only when it is a number (int or float, not bool)."""
    if boot is not None and seq is not None and boot == dev.boot and dev.seq is not None and seq <= dev.seq:
        return "duplicate", []
    changes = reconcile(device, dev, rules, ts) if rules is not dev.ruleset else []
    if dev.seen is None or seen > dev.seen:
        dev.seen = seen
    max_ts = dev.max_ts
    late = max_ts is not None and ts < max_ts
    if not late:
        if boot is not None and seq is not None:
            dev.boot, dev.seq = boot, seq
        dev.max_ts = ts
    if dev.online is False:
        dev.online = True
        dev.offline_since = None
    for code, spec, rs, metric, a, b, c, d in dev.plan:
        if code == _THRESHOLD:  # a = max, b = min, c = max - hysteresis, d = min + hysteresis
            if late:
                continue
            value = values.get(metric)
            tv = type(value)
            if tv is not float and tv is not int:
                continue  # missing, null, bool or not a number
            if rs.alarm is not None:
                if value <= c and value >= d:
                    changes.append(_clear(spec.name, rs, value, ts, spec.on_clear))
                continue
            if value > a:
                bound = a
            elif value < b:
                bound = b
            else:
                rs.pending = None
                continue
            if rs.pending is None:
                rs.pending = ts
            if ts - rs.pending >= spec.duration_ms:
                changes.append(_raise(device, spec, rs, value, bound, ts))
        elif code == _RATE:  # a = window ms, b = rate_per_min, c = rate_per_min - hysteresis, d = window / 2
            if late:
                continue
            value = values.get(metric)
            tv = type(value)
            if tv is not float and tv is not int:
                continue
            samples = rs.samples
            if samples is None:
                samples = rs.samples = []
            cutoff = ts - a
            while len(samples) > 1 and samples[1][0] <= cutoff:
                del samples[0]  # keep one sample at or before the window start so the span approaches the window
            if samples and samples[0][0] < cutoff - a:
                del samples[0]  # a gap longer than the window: that old sample says nothing about this minute
            rate = None
            if samples:
                first = samples[0]
                span = ts - first[0]
                if span >= d:
                    rate = (value - first[1]) * 60_000 / span
            if not samples or ts - samples[-1][0] >= a / MAX_SAMPLES:
                samples.append((ts, value))
                if len(samples) > MAX_SAMPLES + 1:
                    del samples[0]
            if rate is None:
                continue
            if rs.alarm is not None:
                if abs(rate) <= c:
                    changes.append(_clear(spec.name, rs, _round(rate), ts, spec.on_clear))
            elif abs(rate) > b:
                changes.append(_raise(device, spec, rs, _round(rate), b, ts))
        elif rs.alarm is not None or rs.pending is not None:  # nodata, offline: any reading proves the device
            rs.pending = None
            if rs.alarm is not None:
                changes.append(_clear(spec.name, rs, None, ts, spec.on_clear))
    return ("late" if late else "applied"), changes


def apply_status(device: str, dev: DeviceState, rules: tuple[RuleSpec, ...], online: bool,
                 ts: int) -> list[Change]:
    """A status message ("offline" is normally the last will); ``ts`` is when it entered the backbone."""
    changes = reconcile(device, dev, rules, ts)
    if online:
        dev.online = True
        dev.offline_since = None
    elif dev.online is not False:
        dev.online = False
        dev.offline_since = ts
    for spec in rules:
        if spec.kind != "offline":
            continue
        rs = _state_for(dev, spec)
        if online:
            rs.pending = None
            if rs.alarm is not None:
                changes.append(_clear(spec.name, rs, None, ts, spec.on_clear))
        elif rs.alarm is None:
            since = dev.offline_since if dev.offline_since is not None else ts
            if spec.duration_ms <= 0 or ts - since >= spec.duration_ms:
                changes.append(_raise(device, spec, rs, None, spec.threshold(), ts))
            else:
                rs.pending = since
    return changes


def apply_tick(device: str, dev: DeviceState, rules: tuple[RuleSpec, ...], now: int) -> list[Change]:
    """Timer: nodata and offline-for-duration, plus clearing alarms of rules that were removed."""
    changes = reconcile(device, dev, rules, now)
    for spec in rules:
        kind = spec.kind
        if kind == "nodata":
            if dev.seen is None or spec.nodata_ms is None:
                continue
            rs = _state_for(dev, spec)
            age = now - dev.seen
            if rs.alarm is None and age >= spec.nodata_ms:
                changes.append(_raise(device, spec, rs, round(age / 1000, 1), spec.nodata_ms / 1000, now))
        elif kind == "offline":
            if dev.online is not False or dev.offline_since is None:
                continue
            rs = _state_for(dev, spec)
            if rs.alarm is None and now - dev.offline_since >= spec.duration_ms:
                changes.append(_raise(device, spec, rs, None, spec.threshold(), now))
    return changes


def apply_external(dev: DeviceState, rule: str, alarm: str, state: str) -> bool:
    """An alarm event someone else published (the web tier): "acknowledged" marks the active alarm as
    acknowledged; "cleared" (a manual clear) forgets it, so it is raised again, as a new alarm, only if the
    condition is seen again. Events for another alarm id (an older, already cleared alarm) are ignored.
    Returns whether the state changed."""
    rs = dev.rules.get(rule)
    if rs is None or rs.alarm != alarm:
        return False
    if state == "acknowledged":
        if rs.acked:
            return False
        rs.acked = True
        return True
    if state == "cleared":
        rs.alarm = None
        rs.acked = False
        rs.raised_ts = rs.severity = rs.value = rs.threshold = None
        rs.pending = None
        return True
    return False
