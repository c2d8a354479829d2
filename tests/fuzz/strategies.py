"""Hypothesis strategies for the message contract: arbitrary bytes, JSON-shaped objects with the contract's keys
and hostile values (NaN, Infinity, huge integers, wrong types, nesting), and near-valid messages with one field
broken. Shared by the parser properties and the bridge dead-letter property."""

from __future__ import annotations

import json

from hypothesis import strategies as st

KEYS = ["v", "id", "boot", "seq", "ts", "t", "h", "p", "rssi", "up", "fw", "drop", "state", "cid", "ok", "err",
        "result", "args", "op", "exp", "device", "alarm_id", "tenant", "rule", "metric", "value", "threshold",
        "severity", "s"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63, -130, 85, 86, 1100, 300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([85.0, 85.0000001, -40.0, -40.0000001, 100.0, 1100.0, 299.99, 1e308, -0.0, 5e-324]),
    st.text(max_size=40),
    st.sampled_from(["online", "offline", "ping", "led", "set_interval", "set_thresholds", "reboot",
                     "get_config", "raised", "cleared", "acknowledged", "critical", "major", "\u0000", "\ud800",
                     "x" * 300]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def dumps(obj) -> bytes:
    # allow_nan: NaN / Infinity literals are exactly what a hostile device would send
    return json.dumps(obj, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


objects = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=12)


def valid_telemetry(device: str = "dev-1"):
    return st.fixed_dictionaries({
        "v": st.just(1), "id": st.just(device), "boot": st.integers(0, 2**31 - 1), "seq": st.integers(0, 2**53),
        "t": st.floats(-40, 85), "h": st.floats(0, 100), "p": st.floats(300, 1100),
    }, optional={"ts": st.integers(946_684_800_000, 4_102_444_800_000), "rssi": st.integers(-130, 0),
                 "up": st.integers(0, 2**40), "fw": st.text(max_size=32).filter(lambda s: "\x00" not in s
                                                                              and not _has_surrogate(s))})


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


def broken(valid):
    """A valid message with one field replaced by a hostile value, or one field removed."""
    return st.tuples(valid, st.sampled_from(KEYS), json_values, st.booleans()).map(
        lambda x: {k: v for k, v in x[0].items() if not (x[3] and k == x[1])} if x[3] else {**x[0], x[1]: x[2]})


def payloads(device: str = "dev-1"):
    return st.one_of(
        st.binary(max_size=200),
        objects.map(dumps),
        objects.map(lambda o: dumps({"v": 1, "id": device, **o})),
        broken(valid_telemetry(device)).map(dumps),
        valid_telemetry(device).map(dumps),
        st.text(max_size=80).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.integers(4000, 6000).map(lambda n: b'{"v":1,"pad":"' + b"x" * n + b'"}'),
        st.sampled_from([b"", b"null", b"[]", b"{}", b'{"v":1}', b"NaN", b'{"v":NaN}', b"\xff\xfe", b"\xc3\x28",
                         b'{"v":1,"id":"dev-1","boot":1,"seq":1,"t":Infinity}', b'{"v":1,"t":-Infinity}',
                         b'{"v":1,"id":"dev-1","boot":1,"seq":1,"t":1e999}', b'{"v":1,"v":2}', b"{" * 50]),
    )
