"""The writer's fast paths must behave exactly like the slow ones they shortcut: the telemetry fast path
(``schema.plain_telemetry``, which the writer and the bridge use) against ``schema.parse_telemetry`` (the contract),
the batched histogram update against ``observe``."""

from __future__ import annotations

import json
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from cloud import schema
from cloud.writer import _observe_many

BASE = {"v": 1, "id": "d1", "boot": 3, "seq": 7, "ts": 1_700_000_000_000, "t": 21.5, "h": 40.0, "p": 1000.0,
        "rssi": -60, "up": 12, "fw": "1.2.3"}
ODD_VALUES = [None, True, False, 0, 1, -1, 0.5, -0.5, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**63,
              -40, -40.0001, 85, 85.0001, 100, 100.5, 300, 1100, 1100.1, -130, -131, 946_684_800_000,
              946_684_799_999, 4_102_444_800_000, 4_102_444_800_001, "x", "1", "a" * 32, "a" * 33, [], {}, 1e308]


def _fast_telemetry(device: str, payload: bytes, max_bytes: int) -> schema.Telemetry | None:
    """The fast path's message as the ``schema.Telemetry`` parse_telemetry returns (None: deferred to it)."""
    m = schema.plain_telemetry(device, payload, max_bytes)
    return None if m is None else schema.Telemetry(m.id, m.boot, m.seq, m.ts, m.t, m.h, m.p, m.rssi, m.up, m.fw,
                                                   m.drop or 0)


def _slow(device: str, payload: bytes, max_bytes: int = 4096):
    try:
        return schema.parse_telemetry(device, payload, max_bytes)
    except schema.Rejected as exc:
        return ("rejected", exc.reason)


def _check(device: str, payload: bytes, max_bytes: int = 4096) -> None:
    fast = _fast_telemetry(device, payload, max_bytes)
    if fast is not None:  # None means "ask the full parser", always allowed
        assert fast == _slow(device, payload, max_bytes), payload
        assert [type(getattr(fast, f)) for f in ("t", "h", "p")] == \
            [type(getattr(_slow(device, payload, max_bytes), f)) for f in ("t", "h", "p")]


def test_fast_telemetry_takes_the_plain_reading():
    payload = json.dumps(BASE).encode()
    assert schema.plain_telemetry("d1", payload, 4096) is not None  # not deferred: this is the fast path's case
    assert _fast_telemetry("d1", payload, 4096) == schema.parse_telemetry("d1", payload)
    minimal = {"v": 1, "id": "d1", "boot": 0, "seq": 0, "t": 20}
    assert _fast_telemetry("d1", json.dumps(minimal).encode(), 4096) == \
        schema.parse_telemetry("d1", json.dumps(minimal).encode())


@pytest.mark.parametrize("key", sorted(set(BASE) | {"drop", "extra"}))
def test_fast_telemetry_agrees_on_every_odd_field_value(key):
    for value in ODD_VALUES:
        _check("d1", json.dumps({**BASE, key: value}).encode())
    without = {k: v for k, v in BASE.items() if k != key}
    _check("d1", json.dumps(without).encode())


@pytest.mark.parametrize("payload", [
    b"", b"{", b"[]", b"null", b'"x"', b"{}", json.dumps({**BASE, "t": None, "h": None, "p": None}).encode(),
    json.dumps(BASE).encode().replace(b"21.5", b"NaN"), json.dumps(BASE).encode().replace(b"21.5", b"Infinity"),
    json.dumps(BASE).encode().replace(b"1.2.3", b"\\u0000"), json.dumps(BASE).encode().replace(b"1.2.3", b"\\ud800"),
    json.dumps(BASE).encode().replace(b"1.2.3", b"\x00"), json.dumps(BASE).encode() + b"\xff",
    json.dumps(BASE).encode("utf-16"), json.dumps(BASE, indent=2).encode(), b" " * 5000 + json.dumps(BASE).encode(),
    # what the fast path's decoder skips is still checked: invalid UTF-8 or deep nesting in an unknown field
    json.dumps({**BASE, "x": "?"}).encode().replace(b"?", b"\xff"),
    json.dumps({**BASE, "x": "?"}).encode().replace(b'"?"', b"[" * 1500 + b"]" * 1500),
    json.dumps({**BASE, "x": "?"}).encode().replace(b'"?"', b"[" * 900 + b"]" * 900),
    json.dumps({**BASE, "x": "?"}).encode().replace(b'"?"', b"1" * 40),
    # duplicate keys: the last one counts
    json.dumps(BASE).encode().replace(b'"t": 21.5', b'"t": 500, "t": 21.5'),
    json.dumps(BASE).encode().replace(b'"t": 21.5', b'"t": 21.5, "t": 500'),
    json.dumps(BASE).encode().replace(b'"id": "d1"', b'"id": "d2", "id": "d1"'),
    json.dumps(BASE).encode().replace(b'"v": 1', b'"v": true'),
    json.dumps(BASE).encode().replace(b'"v": 1', b'"v": 1.0'),
    json.dumps({**BASE, "fw": "\u00e9" * 32}, ensure_ascii=False).encode(),
    json.dumps({**BASE, "fw": "\u00e9" * 33}, ensure_ascii=False).encode(),
])
def test_fast_telemetry_defers_or_agrees_on_malformed_payloads(payload):
    _check("d1", payload)
    _check("other", payload)


def test_fast_telemetry_random_payloads_agree():
    rnd = random.Random(5)
    keys = sorted(set(BASE) | {"drop"})
    for _ in range(3000):
        data = dict(BASE)
        for key in rnd.sample(keys, rnd.randint(0, 4)):
            if rnd.random() < 0.3:
                data.pop(key, None)
            else:
                data[key] = rnd.choice(ODD_VALUES + [rnd.uniform(-200, 1200), rnd.randint(-10**6, 10**13)])
        _check(rnd.choice(["d1", "d2"]), json.dumps(data).encode(), rnd.choice([4096, 100]))


def test_observe_many_matches_observe():
    buckets = (0.01, 0.1, 1, 10)
    a = Histogram("a_seconds", "a", buckets=buckets, registry=CollectorRegistry())
    b = Histogram("b_seconds", "b", buckets=buckets, registry=CollectorRegistry())
    values = [0.0, 0.01, 0.010001, 0.1, 0.5, 1, 9.99, 10, 11, 1e9] + [random.random() * 20 for _ in range(500)]
    for v in values:
        a.observe(v)
    _observe_many(b, values)
    _observe_many(b, [])

    def samples(h):
        return [(s.name.split("_", 1)[1], s.labels.get("le"), round(s.value, 6))
                for m in h.collect() for s in m.samples if not s.name.endswith("_created")]

    assert samples(a) == samples(b)
