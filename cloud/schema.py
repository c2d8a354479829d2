"""The message contract: one module that every service uses to read and write messages.

MQTT topics (device side)::

    devices/<id>/telemetry  device -> cloud  QoS 1
    devices/<id>/status     device -> cloud  QoS 1, retained, "offline" is the last will
    devices/<id>/acks       device -> cloud  QoS 1
    devices/<id>/commands   cloud -> device  QoS 1

Every parser takes the device id from the topic and the raw payload bytes and returns a typed message, or
raises :class:`Rejected` with a human-readable reason. Rejected messages are never dropped: the caller
wraps them with :func:`dead_letter` and sends them to the dead-letter topic.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import msgspec
import orjson

VERSION = 1
MAX_PAYLOAD_BYTES = 4096

# BME280 operating range (datasheet section 1): a reading outside it is a broken sensor or a forged message.
LIMITS = {
    "t": (-40.0, 85.0),
    "h": (0.0, 100.0),
    "p": (300.0, 1100.0),
}
RSSI_RANGE = (-130, 0)
# the other bounds of the contract's fields, for parse_telemetry / parse_status and PlainTelemetry alike
BOOT_MAX = 2**31 - 1  # the device's boot counter
SEQ_MAX = 2**53  # exact in a JSON number read as a double
TS_RANGE = (946_684_800_000, 4_102_444_800_000)  # unix ms: 2000-01-01 .. 2100-01-01
COUNT_MAX = 2**63 - 1  # up, drop: PostgreSQL bigint
FW_MAX_LEN = 32

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
TOPIC = re.compile(r"^devices/([^/]+)/(telemetry|status|acks|commands)$")
# orjson turns integers beyond 64 bits into floats where json keeps them exact: payloads with a run of 19+
# digits take the json path, so both paths return the same values.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")

COMMAND_OPS = ("set_interval", "set_thresholds", "led", "ping", "reboot", "get_config")
COMMAND_STATES = ("queued", "sent", "delivered", "failed", "expired")
# A command's state only moves forward: events may arrive out of order (the device's ack can overtake the
# bridge's "sent" report because they travel on different topics).
COMMAND_STATE_RANK = {"queued": 0, "sent": 1, "delivered": 2, "failed": 2, "expired": 2}
STATUS_STATES = ("online", "offline")
ALARM_STATES = ("raised", "acknowledged", "cleared")
SEVERITIES = ("critical", "major", "minor", "warning")
SEVERITY_RANK = {s: len(SEVERITIES) - i for i, s in enumerate(SEVERITIES)}  # critical 4 .. warning 1


class Rejected(ValueError):
    """A message that breaks the contract. ``reason`` says why, in words an operator understands."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- topics -----------------------------------------------------------------------------------------------

def split_topic(topic: str) -> tuple[str, str]:
    """``devices/<id>/<kind>`` -> (id, kind); raises Rejected for anything else."""
    match = TOPIC.match(topic)
    if not match:
        raise Rejected(f"unexpected topic {topic!r}")
    device_id, kind = match.groups()
    if not DEVICE_ID.match(device_id):
        raise Rejected(f"invalid device id {device_id!r} in topic")
    return device_id, kind


def topic_for(device_id: str, kind: str) -> str:
    return f"devices/{device_id}/{kind}"


# --- helpers ----------------------------------------------------------------------------------------------

def _load_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise Rejected(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    # Fast path: orjson accepts only strict UTF-8 JSON without raw control characters (so no raw NUL), rejects
    # NaN/Infinity and out-of-range floats, and returns what json would for everything it accepts (long
    # integers excepted, see _LONG_DIGITS). Anything it refuses goes through json below, which names the reason.
    data: Any = None
    if not _LONG_DIGITS.search(payload):
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = None
    if type(data) is dict:
        return _storable_current(data, b"\\u" in payload)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("payload is not UTF-8") from None
    if "\x00" in text:
        raise Rejected("payload contains a NUL character")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except Rejected:
        raise
    except ValueError as exc:
        raise Rejected(f"malformed JSON: {exc}") from None
    except RecursionError:  # 4 KB of "[" is within the size limit but beyond the parser's nesting limit
        raise Rejected("JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise Rejected(f"expected a JSON object, got {type(data).__name__}")
    return _storable_current(data, "\\u" in text)


def _storable_current(data: dict[str, Any], escaped: bool) -> dict[str, Any]:
    """``data`` if its text can be stored and it is this schema version. Only an escape (``escaped``: the raw
    payload has a ``\\u``) can carry NUL or a lone surrogate past the parser, so only then is the text walked."""
    if escaped:
        problem = unstorable_text(data)
        if problem:
            raise Rejected(problem)
    if data.get("v") != VERSION:
        raise Rejected(f"unsupported schema version v={data.get('v')!r}, expected {VERSION}")
    return data


def unstorable_text(data: Any) -> str | None:
    """Why ``data`` holds text no store can keep, or None: NUL (PostgreSQL text and JSONB refuse it) and lone
    UTF-16 surrogates (not encodable as UTF-8). JSON escapes smuggle both in; the API checks its input with this
    too."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "a string contains a NUL character"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string contains a lone UTF-16 surrogate"
    return None


def _reject_constant(name: str) -> Any:
    raise Rejected(f"{name} is not a number")


def _number(data: dict[str, Any], key: str, *, required: bool = True, lo: float | None = None,
            hi: float | None = None) -> float | None:
    value = data.get(key)
    if value is None:
        if required:
            raise Rejected(f"missing field {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"field {key!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise Rejected(f"field {key!r} is not finite")
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise Rejected(f"field {key!r}={value} outside {lo}..{hi}")
    return float(value)


def _integer(data: dict[str, Any], key: str, *, required: bool = True, lo: int = 0,
             hi: int = COUNT_MAX) -> int | None:
    value = data.get(key)
    if value is None:
        if required:
            raise Rejected(f"missing field {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Rejected(f"field {key!r} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise Rejected(f"field {key!r}={value} outside {lo}..{hi}")
    return value


def _string(data: dict[str, Any], key: str, *, required: bool = True, max_len: int = 64) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise Rejected(f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise Rejected(f"field {key!r} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise Rejected(f"field {key!r} longer than {max_len} characters")
    return value


def _check_id(data: dict[str, Any], device_id: str, *, required: bool) -> None:
    claimed = data.get("id")
    if claimed is None and not required:
        return
    if claimed != device_id:
        raise Rejected(f"device id {claimed!r} in payload differs from {device_id!r} in topic")


def now_ms() -> int:
    return int(time.time() * 1000)


# --- telemetry --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Telemetry:
    id: str
    boot: int
    seq: int
    ts: int | None  # unix ms from the device clock; None until the device synced its clock
    t: float | None
    h: float | None
    p: float | None
    rssi: int | None = None
    up: int | None = None
    fw: str | None = None
    drop: int = 0  # readings the device had to drop from a full offline backlog since the last report

    def to_json(self) -> bytes:
        data = {"v": VERSION, **{k: v for k, v in asdict(self).items() if v is not None}}
        if not self.drop:
            data.pop("drop", None)
        return json.dumps(data, separators=(",", ":")).encode()

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in (("t", self.t), ("h", self.h), ("p", self.p)) if v is not None}


def parse_telemetry(device_id: str, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> Telemetry:
    data = _load_object(payload, max_bytes)
    _check_id(data, device_id, required=True)
    t = _number(data, "t", required=False, lo=LIMITS["t"][0], hi=LIMITS["t"][1])
    h = _number(data, "h", required=False, lo=LIMITS["h"][0], hi=LIMITS["h"][1])
    p = _number(data, "p", required=False, lo=LIMITS["p"][0], hi=LIMITS["p"][1])
    if t is None and h is None and p is None:
        raise Rejected("telemetry carries none of t, h, p")
    rssi = _integer(data, "rssi", required=False, lo=RSSI_RANGE[0], hi=RSSI_RANGE[1])
    return Telemetry(
        id=device_id,
        boot=_integer(data, "boot", hi=BOOT_MAX),  # type: ignore[arg-type]
        seq=_integer(data, "seq", hi=SEQ_MAX),  # type: ignore[arg-type]
        ts=_integer(data, "ts", required=False, lo=TS_RANGE[0], hi=TS_RANGE[1]),
        t=t, h=h, p=p, rssi=rssi,
        up=_integer(data, "up", required=False),
        fw=_string(data, "fw", required=False, max_len=FW_MAX_LEN),
        drop=_integer(data, "drop", required=False) or 0,
    )


class PlainTelemetry(msgspec.Struct, frozen=True, gc=False):
    """A telemetry message as :func:`plain_telemetry` decodes it: the attributes of :class:`Telemetry`, with the
    contract's types and ranges declared on the fields, so msgspec checks them while it decodes (in C, one pass,
    no intermediate dict). ``drop`` is None when the message does not carry it."""

    v: Literal[1]  # VERSION (the fast path would defer every reading if they parted; the tests would fail)
    id: str
    boot: Annotated[int, msgspec.Meta(ge=0, le=BOOT_MAX)]
    seq: Annotated[int, msgspec.Meta(ge=0, le=SEQ_MAX)]
    ts: Annotated[int, msgspec.Meta(ge=TS_RANGE[0], le=TS_RANGE[1])] | None = None
    t: Annotated[float, msgspec.Meta(ge=LIMITS["t"][0], le=LIMITS["t"][1])] | None = None
    h: Annotated[float, msgspec.Meta(ge=LIMITS["h"][0], le=LIMITS["h"][1])] | None = None
    p: Annotated[float, msgspec.Meta(ge=LIMITS["p"][0], le=LIMITS["p"][1])] | None = None
    rssi: Annotated[int, msgspec.Meta(ge=RSSI_RANGE[0], le=RSSI_RANGE[1])] | None = None
    up: Annotated[int, msgspec.Meta(ge=0, le=COUNT_MAX)] | None = None
    fw: Annotated[str, msgspec.Meta(max_length=FW_MAX_LEN)] | None = None
    drop: Annotated[int, msgspec.Meta(ge=0, le=COUNT_MAX)] | None = None


_decode_plain = msgspec.json.Decoder(PlainTelemetry).decode
_PLAIN_REFUSED = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)


def plain_telemetry(device_id: str, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> PlainTelemetry | None:
    """The fast path of :func:`parse_telemetry` for what devices send (plain ASCII JSON): the message, or None to
    say "ask parse_telemetry", which then accepts or rejects with its own reason, so the contract's verdicts and
    reasons stay defined in one place. Never accepts what parse_telemetry rejects (tests/fuzz and
    tests/store/test_writer_fast_paths.py check that on every odd value); it may defer what parse_telemetry
    accepts (``"v": true``, a ``null`` drop, escapes, non-ASCII text, ...).

    Only ASCII without a backslash is taken: then no string can hold NUL, a lone surrogate or invalid UTF-8
    (msgspec does not look at the UTF-8 of fields it skips). Duplicate keys: the last one counts, as in
    parse_telemetry. On a reading, ~0.6 us against ~1.6-1.9 us for orjson plus the same checks in Python."""
    if len(payload) > max_bytes or not payload.isascii() or b"\\" in payload:
        return None
    try:
        msg = _decode_plain(payload)
    except _PLAIN_REFUSED:
        return None
    if msg.id != device_id or (msg.t is None and msg.h is None and msg.p is None):
        return None
    return msg


def check_telemetry(device_id: str, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
    """Validate a telemetry payload by exactly the rules of :func:`parse_telemetry` (the bridge only needs the
    verdict). Raises Rejected with parse_telemetry's reason."""
    if plain_telemetry(device_id, payload, max_bytes) is None:
        parse_telemetry(device_id, payload, max_bytes)


# --- status -----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Status:
    id: str
    state: str
    boot: int | None = None
    fw: str | None = None
    ts: int | None = None


def parse_status(device_id: str, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> Status:
    data = _load_object(payload, max_bytes)
    _check_id(data, device_id, required=False)
    state = data.get("state")
    if state not in STATUS_STATES:
        raise Rejected(f"field 'state' must be one of {', '.join(STATUS_STATES)}, got {state!r}")
    return Status(
        id=device_id, state=state,
        boot=_integer(data, "boot", required=False, hi=BOOT_MAX),
        fw=_string(data, "fw", required=False, max_len=FW_MAX_LEN),
        ts=_integer(data, "ts", required=False),
    )


# --- commands and acks ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Command:
    cid: str
    op: str
    args: dict[str, Any]
    exp: int | None  # unix ms after which the command must not be executed

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"v": VERSION, "cid": self.cid, "op": self.op, "args": self.args}
        if self.exp is not None:
            data["exp"] = self.exp
        return json.dumps(data, separators=(",", ":")).encode()

    def expired(self, at_ms: int | None = None) -> bool:
        return self.exp is not None and (at_ms if at_ms is not None else now_ms()) > self.exp


def validate_command_args(op: str, args: Any) -> dict[str, Any]:
    """Check a command's arguments before it is queued, so a device never sees a command it must refuse."""
    if op not in COMMAND_OPS:
        raise Rejected(f"unknown op {op!r}; expected one of {', '.join(COMMAND_OPS)}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise Rejected("field 'args' must be an object")
    if op == "set_interval":
        _integer(args, "s", lo=1, hi=86_400)
    elif op == "led":
        if args.get("state") not in ("on", "off", "blink"):
            raise Rejected("led needs args.state = on, off or blink")
    elif op == "set_thresholds":
        for key, value in args.items():
            if key not in LIMITS:
                raise Rejected(f"set_thresholds: unknown metric {key!r}; expected t, h or p")
            if not isinstance(value, dict):
                raise Rejected(f"set_thresholds: {key} must be an object with min/max")
            lo = _number(value, "min", required=False)
            hi = _number(value, "max", required=False)
            if lo is not None and hi is not None and lo > hi:
                raise Rejected(f"set_thresholds: {key}.min {lo} is above {key}.max {hi}")
    return args


def new_command(op: str, args: Any = None, ttl_s: int = 300) -> Command:
    args = validate_command_args(op, args)
    return Command(cid=str(uuid.uuid4()), op=op, args=args, exp=now_ms() + ttl_s * 1000)


def parse_command(payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> Command:
    data = _load_object(payload, max_bytes)
    cid = _string(data, "cid", max_len=64)
    op = _string(data, "op", max_len=32)
    args = validate_command_args(op, data.get("args"))  # type: ignore[arg-type]
    return Command(cid=cid, op=op, args=args, exp=_integer(data, "exp", required=False))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Ack:
    id: str
    cid: str
    ok: bool
    err: str | None = None
    result: dict[str, Any] | None = None


def parse_ack(device_id: str, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> Ack:
    data = _load_object(payload, max_bytes)
    _check_id(data, device_id, required=False)
    ok = data.get("ok")
    if not isinstance(ok, bool):
        raise Rejected("field 'ok' must be true or false")
    result = data.get("result")
    if result is not None and not isinstance(result, dict):
        raise Rejected("field 'result' must be an object")
    return Ack(id=device_id, cid=_string(data, "cid", max_len=64), ok=ok,  # type: ignore[arg-type]
               err=_string(data, "err", required=False, max_len=256), result=result)


@dataclass(frozen=True, slots=True)
class CommandStatus:
    """A step of a command's life reported by the cloud side (the bridge): sent or expired."""
    cid: str
    device: str
    state: str
    ts: int

    def to_json(self) -> bytes:
        return json.dumps({"v": VERSION, **asdict(self)}, separators=(",", ":")).encode()


def parse_command_status(payload: bytes) -> CommandStatus:
    data = _load_object(payload, MAX_PAYLOAD_BYTES)
    state = data.get("state")
    if state not in COMMAND_STATES:
        raise Rejected(f"unknown command state {state!r}")
    return CommandStatus(cid=_string(data, "cid"), device=_string(data, "device"),  # type: ignore[arg-type]
                         state=state, ts=_integer(data, "ts"))  # type: ignore[arg-type]


# --- alarms -----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AlarmEvent:
    alarm_id: str
    device: str
    tenant: str
    rule: str
    metric: str
    value: float | None
    threshold: float | None
    severity: str
    state: str
    ts: int

    def to_json(self) -> bytes:
        return json.dumps({"v": VERSION, **asdict(self)}, separators=(",", ":")).encode()


def parse_alarm_event(payload: bytes) -> AlarmEvent:
    data = _load_object(payload, MAX_PAYLOAD_BYTES)
    if data.get("state") not in ALARM_STATES:
        raise Rejected(f"unknown alarm state {data.get('state')!r}")
    if data.get("severity") not in SEVERITIES:
        raise Rejected(f"unknown severity {data.get('severity')!r}")
    return AlarmEvent(
        alarm_id=_string(data, "alarm_id"), device=_string(data, "device"),  # type: ignore[arg-type]
        tenant=_string(data, "tenant"), rule=_string(data, "rule"),  # type: ignore[arg-type]
        metric=_string(data, "metric"),  # type: ignore[arg-type]
        value=_number(data, "value", required=False), threshold=_number(data, "threshold", required=False),
        severity=data["severity"], state=data["state"], ts=_integer(data, "ts"),  # type: ignore[arg-type]
    )


# --- dead letters -----------------------------------------------------------------------------------------

def dead_letter(source: str, payload: bytes, reason: str, *, key: str | None = None,
                at_ms: int | None = None) -> bytes:
    """Wrap a rejected message so nothing is lost: the original bytes (base64 when not UTF-8) and why."""
    try:
        text: str | None = payload.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        text = base64.b64encode(payload).decode("ascii")
        encoding = "base64"
    return json.dumps({
        "v": VERSION, "source": source, "key": key, "reason": reason, "payload": text,
        "encoding": encoding, "ts": at_ms if at_ms is not None else now_ms(),
    }, separators=(",", ":")).encode()
