"""The message contract: every class of bad input is rejected with a reason that names the problem."""

import json

import pytest

from cloud import schema
from cloud.schema import Rejected

GOOD = {"v": 1, "id": "dev-1", "boot": 7, "seq": 42, "ts": 1_764_000_000_000, "t": 21.5, "h": 40.25,
        "p": 1013.2, "rssi": -61, "up": 120, "fw": "0.1.0"}


def payload(**changes) -> bytes:
    data = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data).encode()


def test_good_telemetry_round_trips():
    reading = schema.parse_telemetry("dev-1", payload())
    assert (reading.id, reading.boot, reading.seq, reading.t, reading.h, reading.p) == ("dev-1", 7, 42, 21.5, 40.25,
                                                                                       1013.2)
    assert schema.parse_telemetry("dev-1", reading.to_json()) == reading


def test_unsynced_clock_is_allowed():
    assert schema.parse_telemetry("dev-1", payload(ts=None)).ts is None


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "malformed JSON"),
    (b"[1,2]", "expected a JSON object"),
    (b"\xff\xfe", "not UTF-8"),
    (payload(v=2), "unsupported schema version"),
    (payload(t="21.5"), "'t' must be a number"),
    (payload(seq=1.5), "'seq' must be an integer"),
    (payload(seq=True), "'seq' must be an integer"),
    (payload(boot=...), "missing field 'boot'"),
    (b'{"v":1,"id":"dev-1","boot":1,"seq":1,"t":NaN}', "NaN is not a number"),
    (b'{"v":1,"id":"dev-1","boot":1,"seq":1,"t":Infinity}', "Infinity is not a number"),
    (b'{"v":1,"id":"dev-1","boot":1,"seq":1,"t":1e999}', "'t' is not finite"),
    (payload(t=85.1), "outside -40.0..85.0"),
    (payload(t=-40.5), "outside -40.0..85.0"),
    (payload(h=100.5), "outside 0.0..100.0"),
    (payload(p=299.0), "outside 300.0..1100.0"),
    (payload(p=1100.5), "outside 300.0..1100.0"),
    (payload(rssi=12), "'rssi'=12 outside"),
    (payload(t=..., h=..., p=...), "none of t, h, p"),
    (payload(id="dev-2"), "differs from 'dev-1' in topic"),
    (payload(id=...), "differs from 'dev-1' in topic"),
    (payload(fw="x" * 100), "longer than 32"),
    (b'{"v":1,"id":"dev-1","boot":1,"seq":1,"t":20,"pad":"' + b"x" * 5000 + b'"}', "exceeds the limit of 4096"),
])
def test_bad_telemetry_is_rejected_with_a_reason(raw, reason):
    with pytest.raises(Rejected) as caught:
        schema.parse_telemetry("dev-1", raw)
    assert reason in caught.value.reason


def test_topics():
    assert schema.split_topic("devices/dev-1/telemetry") == ("dev-1", "telemetry")
    for bad in ("devices/dev-1/other", "devices//telemetry", "sensors/x/telemetry", "devices/a/b/telemetry",
                "devices/$bad/telemetry"):
        with pytest.raises(Rejected):
            schema.split_topic(bad)


def test_status_and_ack():
    assert schema.parse_status("d", b'{"v":1,"state":"offline"}').state == "offline"
    with pytest.raises(Rejected, match="state"):
        schema.parse_status("d", b'{"v":1,"state":"sleepy"}')
    ack = schema.parse_ack("d", b'{"v":1,"cid":"c1","ok":true,"result":{"pong":true}}')
    assert ack.ok and ack.result == {"pong": True}
    with pytest.raises(Rejected, match="'ok'"):
        schema.parse_ack("d", b'{"v":1,"cid":"c1","ok":"yes"}')


def test_commands_are_validated_before_they_are_queued():
    command = schema.new_command("set_interval", {"s": 10}, ttl_s=60)
    assert schema.parse_command(command.to_json()) == command
    assert not command.expired()
    assert command.expired(at_ms=command.exp + 1)
    for op, args, reason in [("dance", {}, "unknown op"), ("set_interval", {"s": 0}, "outside 1..86400"),
                             ("led", {"state": "purple"}, "on, off or blink"),
                             ("set_thresholds", {"t": {"min": 30, "max": 10}}, "above"),
                             ("set_thresholds", {"x": {}}, "unknown metric"), ("ping", [1], "must be an object")]:
        with pytest.raises(Rejected, match=reason):
            schema.new_command(op, args)


def test_dead_letter_keeps_the_original_bytes():
    letter = json.loads(schema.dead_letter("devices/d/telemetry", b"\xff\x00", "payload is not UTF-8", key="d"))
    assert letter["encoding"] == "base64" and letter["payload"] == "/wA=" and letter["reason"] == "payload is not UTF-8"
    letter = json.loads(schema.dead_letter("devices/d/telemetry", b"{oops", "malformed JSON"))
    assert letter["payload"] == "{oops" and letter["encoding"] == "utf-8"
