"""Bridge on the in-process bus (MemoryBus) against a real Mosquitto: forwarding, dead letters, manual acks
under backpressure, delivery failures, broker restart, commands. Fast (no Kafka)."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt
import pytest
from bridgekit import bridge_thread, telemetry, unique_settings, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from cloud import schema
from cloud.bus import BusError
from cloud.bus.memory import MemoryBus, MemoryProducer

pytestmark = pytest.mark.timeout(120)


def mqtt_client(url: str, client_id: str) -> mqtt.Client:
    port = int(url.rsplit(":", 1)[1])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    wait_for(c.is_connected, 10, "test client did not connect")
    return c


def drain(consumer, want: int, timeout: float = 20) -> list:
    records = []
    deadline = time.monotonic() + timeout
    while len(records) < want and time.monotonic() < deadline:
        records += consumer.poll_batch(10_000, 0.2)
    return records


class ControlledBus(MemoryBus):
    """A MemoryBus whose producers hold back delivery reports while ``held``, fail the first ``fail``, and
    report the next ``unconfirmed`` lean sends as delivered without an offset (what librdkafka's idempotent
    producer does for a batch it wrongly believes already written)."""

    def __init__(self):
        super().__init__(partitions=6)
        self.held = False
        self.fail = 0
        self.unconfirmed = 0

    def producer(self, name: str = "", **_):
        return ControlledProducer(self)


class _NoOffset:
    def offset(self) -> None:
        return None  # what confluent-kafka's Message.offset() returns when librdkafka has no valid offset


class ControlledProducer(MemoryProducer):
    def poll(self, timeout: float = 0.0) -> int:
        bus = self._bus
        if bus.held:
            time.sleep(min(timeout, 0.005))
            return 0
        served = 0
        while self._pending:
            callback, record = self._pending.popleft()
            if bus.fail > 0:
                bus.fail -= 1
                callback(BusError("simulated message timeout"), None)
            elif bus.unconfirmed > 0 and callable(getattr(record, "offset", None)):  # a Producer.send report
                bus.unconfirmed -= 1
                callback(None, _NoOffset())
            else:
                callback(None, record)
            served += 1
        return served


def test_forwards_valid_and_dead_letters_garbage(bridge_mosquitto):
    settings = unique_settings(bridge_mosquitto.url, None, max_payload_bytes=512)
    bus = MemoryBus()
    consumer = bus.consumer("check", [settings.topics.telemetry, settings.topics.status, settings.topics.acks,
                                      settings.topics.deadletter])
    with bridge_thread(settings, bus, commands=False) as bridge:
        pub = mqtt_client(bridge_mosquitto.url, "mem-pub")
        pub.publish("devices/m1/telemetry", telemetry("m1", 1, 0), qos=1)
        pub.publish("devices/m1/status", b'{"v":1,"state":"online","boot":1}', qos=1)
        pub.publish("devices/m1/acks", b'{"v":1,"cid":"c-1","ok":true}', qos=1)
        pub.publish("devices/m1/telemetry", b"\xff\xfe not utf-8", qos=1)
        pub.publish("devices/m1/telemetry", b"x" * 600, qos=1)
        pub.publish("devices/m1/telemetry", telemetry("m1", 1, 1), qos=1).wait_for_publish(5)
        records = drain(consumer, 6)
        pub.disconnect()
        pub.loop_stop()
        wait_for(lambda: bridge.health()[1]["acked"] == 6, 10, "not all acknowledged")
        ok, details = bridge.health()
        assert ok and details["inflight"] == 0
    by_topic = {}
    for r in records:
        by_topic.setdefault(r.topic, []).append(r)
    tele = by_topic[settings.topics.telemetry]
    assert [json.loads(r.value)["seq"] for r in tele] == [0, 1]
    # no headers: the MQTT topic is devices/<key>/<kind of the bus topic>, the record's timestamp the receipt time
    assert tele[0].key == "m1" and tele[0].headers == {}
    assert abs(tele[0].timestamp_ms - time.time() * 1000) < 60_000
    assert tele[0].value == telemetry("m1", 1, 0)[:0] + tele[0].value  # original bytes, not re-encoded
    assert by_topic[settings.topics.status][0].key == "m1"
    assert by_topic[settings.topics.acks][0].key == "m1"
    dead = [json.loads(r.value) for r in by_topic[settings.topics.deadletter]]
    assert dead[0]["reason"] == "payload is not UTF-8" and dead[0]["encoding"] == "base64"
    assert "exceeds the limit of 512" in dead[1]["reason"]


def test_backpressure_no_ack_before_delivery_then_everything_flows(bridge_mosquitto):
    settings = unique_settings(bridge_mosquitto.url, None, bridge_max_inflight=50)
    bus = ControlledBus()
    bus.held = True
    consumer = bus.consumer("check", [settings.topics.telemetry])
    with bridge_thread(settings, bus, commands=False) as bridge:
        pub = mqtt_client(bridge_mosquitto.url, "bp-pub")
        for seq in range(300):
            pub.publish("devices/bp/telemetry", telemetry("bp", 1, seq), qos=1)
        wait_for(lambda: bridge.health()[1]["inflight"] == 50, 10, "window not filled")
        time.sleep(0.5)
        _, details = bridge.health()
        assert details["inflight"] == 50, "the broker must hold the rest (receive maximum)"
        assert details["acked"] == 0, "nothing may be acknowledged before the bus confirmed it"
        assert details["received"] == 50
        bus.held = False
        wait_for(lambda: bridge.health()[1]["acked"] == 300, 20, "not everything flowed after release")
        pub.disconnect()
        pub.loop_stop()
    seqs = sorted({json.loads(r.value)["seq"] for r in drain(consumer, 300)})
    assert seqs == list(range(300))


def _stream_through_faulty_bus(url: str, device: str, **faults: int) -> tuple[dict, list]:
    """20 readings of ``device`` through a bridge whose bus fails the first deliveries as ``faults`` says
    (ControlledBus ``fail`` / ``unconfirmed``); returns the bridge's health once all 20 are acked, and the records."""
    settings = unique_settings(url, None)
    bus = ControlledBus()
    for name, count in faults.items():
        setattr(bus, name, count)
    consumer = bus.consumer("check", [settings.topics.telemetry])
    with bridge_thread(settings, bus, commands=False) as bridge:
        pub = mqtt_client(url, f"{device}-pub")
        for seq in range(20):
            pub.publish(f"devices/{device}/telemetry", telemetry(device, 1, seq), qos=1)
        wait_for(lambda: bridge.health()[1]["acked"] == 20, 20, "failed deliveries were not sent again")
        health = bridge.health()[1]
        pub.disconnect()
        pub.loop_stop()
    return health, drain(consumer, 25)


def test_delivery_failure_is_retried_not_acked(bridge_mosquitto):
    health, records = _stream_through_faulty_bus(bridge_mosquitto.url, "f1", fail=5)
    assert health["delivery_failures"] == 5
    assert {json.loads(r.value)["seq"] for r in records} == set(range(20))


def test_delivery_report_without_offset_is_not_a_confirmation(bridge_mosquitto):
    health, records = _stream_through_faulty_bus(bridge_mosquitto.url, "u1", unconfirmed=5)
    assert health["delivery_failures"] == 5 and "without an offset" in health["last_delivery_error"]
    assert sorted(json.loads(r.value)["seq"] for r in records) == sorted([*range(20), *range(5)])


def test_broker_restart_reconnects_and_resubscribes(own_mosquitto):
    settings = unique_settings(own_mosquitto.url, None)
    bus = MemoryBus()
    consumer = bus.consumer("check", [settings.topics.telemetry])
    with bridge_thread(settings, bus, commands=False, keepalive=5) as bridge:
        pub = mqtt_client(own_mosquitto.url, "rs-pub")
        for seq in range(50):
            pub.publish("devices/r1/telemetry", telemetry("r1", 1, seq), qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        own_mosquitto.stop()
        wait_for(lambda: not bridge.health()[1]["mqtt_connected"], 10, "disconnect not noticed")
        assert not bridge.health()[0]
        own_mosquitto.start()
        wait_for(lambda: bridge.health()[0] and bridge._subscribed, 30, "bridge did not reconnect")
        pub = mqtt_client(own_mosquitto.url, "rs-pub2")
        for seq in range(50, 100):
            pub.publish("devices/r1/telemetry", telemetry("r1", 1, seq), qos=1).wait_for_publish(5)
        records = drain(consumer, 100)
        pub.disconnect()
        pub.loop_stop()
    assert {json.loads(r.value)["seq"] for r in records} == set(range(100))


def test_commands_on_memory_bus(bridge_mosquitto):
    settings = unique_settings(bridge_mosquitto.url, None)
    bus = MemoryBus()
    got = []
    sub = mqtt_client(bridge_mosquitto.url, "cmd-sub")
    sub.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    sub.subscribe("devices/+/commands", 1)
    status = bus.consumer("check", [settings.topics.command_status])
    with bridge_thread(settings, bus, ingest=False):
        cmd = schema.new_command("ping")
        producer = bus.producer()
        producer.produce(settings.topics.control, "mc1", cmd.to_json())
        records = drain(status, 1)
        wait_for(lambda: got, 10, "command not published")
    assert got == [("devices/mc1/commands", cmd.to_json())]
    assert schema.parse_command_status(records[0].value).state == "sent"
    sub.disconnect()
    sub.loop_stop()
