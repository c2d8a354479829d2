"""The synthetic fleet (cloud.loadgen) against real Mosquitto: the benchmarks trust its accounting, so check it.

Every reading it counts as acknowledged must have reached a subscriber of the broker, in order per device, with the
payload the pipeline expects (cloud.schema accepts it), and the alarm pattern must be the one bench_e2e assumes."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest

from cloud import schema
from cloud.loadgen import SyntheticFleet, alarm_phase, expected_alarm_seqs, synthetic_ids

pytestmark = pytest.mark.timeout(120)


def test_every_acknowledged_reading_reaches_a_subscriber_in_order(mosquitto):
    received: dict[str, list[schema.Telemetry]] = {}
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(_client, _userdata, msg):
        device = msg.topic.split("/")[1]
        reading = schema.parse_telemetry(device, msg.payload)
        with lock:
            received.setdefault(device, []).append(reading)

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="loadgen-check")
    sub.on_message = on_message
    sub.on_subscribe = lambda *_args: subscribed.set()
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("devices/+/telemetry", qos=1)
    sub.loop_start()
    try:
        assert subscribed.wait(10), "subscription not acknowledged"
        ids = synthetic_ids(40, "lg")
        fleet = SyntheticFleet("127.0.0.1", mosquitto.port, [(d, None, None) for d in ids], rate=400, duration=3,
                               workers=2, alarm_devices=ids[:4])
        try:
            fleet.connect(timeout=30)
            assert fleet.connected() == len(ids)
            fleet.go()
            fleet.wait(timeout=60)
        finally:
            fleet.close()
        acknowledged = fleet.acknowledged()
        expected = sum(next_seq - len(unacked) for _, next_seq, unacked in acknowledged.values())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                if sum(len(v) for v in received.values()) >= expected:
                    break
            time.sleep(0.1)
    finally:
        sub.loop_stop()
        sub.disconnect()

    assert expected >= 600, f"the fleet published too little to say anything ({expected})"
    assert fleet.acked() == expected
    for device, (boot, next_seq, unacked) in acknowledged.items():
        got = received.get(device, [])
        seqs = [r.seq for r in got]
        assert seqs == sorted(seqs), f"{device}: out of order"
        assert set(range(next_seq)) - unacked <= set(seqs), f"{device}: acknowledged readings missing"
        assert all(r.boot == boot for r in got)
        if device in ids[:4]:
            hot = [r.seq for r in got if r.t > 30]
            assert hot == [s for s in seqs if alarm_phase(s)]
            assert expected_alarm_seqs(seqs)[0] == (2, 5)
