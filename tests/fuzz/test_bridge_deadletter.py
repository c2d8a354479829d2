"""Every input the contract rejects, sent through a REAL bridge, lands in the dead-letter topic (with the
original bytes and a reason) and the bridge keeps running; every accepted input lands in its kind's topic.

The pipeline is the demo's: the embedded MQTT broker (cloud/broker.py, amqtt) and the in-process bus
(MemoryBus), so hypothesis can push hundreds of messages through in seconds; the bridge is the production class.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from cloud import schema
from cloud.broker import EmbeddedBroker
from cloud.bridge import Bridge
from cloud.bus.memory import MemoryBus
from cloud.nativestack import free_port
from cloud.settings import load
from tests.fuzz.strategies import payloads

pytestmark = pytest.mark.timeout(300)

PARSERS = {"telemetry": schema.parse_telemetry, "status": schema.parse_status, "acks": schema.parse_ack}
DEVICE_IDS = st.one_of(st.sampled_from(["dev-1", "dev-2", "a.b_c-d"]),
                       st.sampled_from(["-bad", "x" * 70, "sp ace", "ümlaut", "dev$1"]))


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Pipeline:
    def __init__(self):
        self.broker = EmbeddedBroker("127.0.0.1", free_port()).start()
        self.bus = MemoryBus(partitions=2)
        self.settings = load({}, mqtt_url=self.broker.url, bridge_group=f"fuzz{uuid.uuid4().hex[:6]}")
        self.bus.ensure_topics(self.settings)
        self.bridge = Bridge(self.settings, self.bus, shared=False, mqtt_version=4, commands=False,
                             client_id=f"fuzz-bridge-{uuid.uuid4().hex[:6]}")
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        _wait(lambda: self.bridge._subscribed or self.errors, 20, "the bridge to subscribe")
        t = self.settings.topics
        self.topic_of = {"telemetry": t.telemetry, "status": t.status, "acks": t.acks}
        self.consumer = self.bus.consumer("fuzz-reader", [t.telemetry, t.status, t.acks, t.deadletter])
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fuzz-pub-{uuid.uuid4().hex[:6]}")
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", self.broker.port)
        self.client.loop_start()
        _wait(self.client.is_connected, 10, "the publisher to connect")

    def _run(self):
        try:
            self.bridge.run(self.stop)
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(exc)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()
        self.stop.set()
        self.thread.join(30)
        self.broker.stop()


@pytest.fixture(scope="module")
def pipeline():
    p = Pipeline()
    yield p
    p.close()


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(batch=st.lists(st.tuples(DEVICE_IDS, st.sampled_from(list(PARSERS)), payloads("dev-1")), min_size=1,
                      max_size=12))
def test_every_rejected_message_is_dead_lettered(pipeline, batch):
    expected: Counter = Counter()
    for device, kind, payload in batch:
        topic = f"devices/{device}/{kind}"
        try:
            schema.split_topic(topic)
            PARSERS[kind](device, payload, pipeline.settings.max_payload_bytes)
            expected[(pipeline.topic_of[kind], topic, payload)] += 1
        except schema.Rejected:
            expected[(pipeline.settings.topics.deadletter, topic, payload)] += 1
        except Exception:  # a parser bug (e.g. RecursionError): the bridge must still dead-letter it
            expected[(pipeline.settings.topics.deadletter, topic, payload)] += 1
        info = pipeline.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
    got: Counter = Counter()
    kind_of = {topic: kind for kind, topic in pipeline.topic_of.items()}
    deadline = time.monotonic() + 20
    while sum(got.values()) < len(batch) and time.monotonic() < deadline:
        records = pipeline.consumer.poll_batch(1000, 0.2)
        for record in records:
            if record.topic == pipeline.settings.topics.deadletter:
                letter = json.loads(record.value)
                original = base64.b64decode(letter["payload"]) if letter["encoding"] == "base64" \
                    else letter["payload"].encode("utf-8", "surrogatepass")
                assert letter["reason"], letter
                got[(record.topic, letter["source"], original)] += 1
            else:
                # a valid record carries no headers: its MQTT topic is devices/<key>/<kind of its bus topic>
                assert record.headers == {}, record.headers
                got[(record.topic, f"devices/{record.key}/{kind_of[record.topic]}", record.value)] += 1
        pipeline.consumer.commit(records)
    assert got == expected
    assert not pipeline.errors, pipeline.errors
    assert pipeline.thread.is_alive()
    ok, details = pipeline.bridge.health()
    assert ok, details
