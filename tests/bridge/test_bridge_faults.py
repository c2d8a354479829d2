"""Faults in the middle of a stream: the bridge process is killed with SIGKILL and restarted; Kafka is stopped
for 10 s. In both cases every reading must reach Kafka (duplicates are allowed and reported)."""

from __future__ import annotations

import time

import pytest
from bridgekit import (BridgeProcess, bridge_thread, check_stream, read_topic, start_publisher, unique_readings,
                       unique_settings, wait_for, wait_publisher)

from cloud import nativestack
from cloud.bus.kafka import KafkaBus
from cloud.kafka_init import ensure_topics

pytestmark = pytest.mark.timeout(240)


def test_kill_9_bridge_mid_stream_then_restart_loses_nothing(kafka, bridge_mosquitto, tmp_path):
    settings = unique_settings(bridge_mosquitto.url, kafka.bootstrap)
    ensure_topics(settings, kafka.bootstrap)
    bridge = BridgeProcess(settings, "bridge-kill9", tmp_path / "bridge.log", ("--no-commands",)).start()
    devices, count = 20, 250
    pub = start_publisher(bridge_mosquitto.url, "k9", devices, count, rate=1000)
    try:
        wait_for(lambda: bridge.counts().get("acked", 0) > 500, 20, "stream did not start")
        bridge.kill()  # SIGKILL: no flush, no acks, no disconnect
        time.sleep(1.0)  # the broker queues for the persistent session meanwhile
        bridge.start()
        wait_publisher(pub)
        records = read_topic(kafka.bootstrap, settings.topics.telemetry, timeout=60,
                             until=lambda r: len(r) >= devices * count and
                             len(unique_readings(r)) >= devices * count)
    finally:
        bridge.stop()
    counts = check_stream(records, "k9", devices, count)
    print(f"kill -9: {counts['records']} records for {counts['unique']} readings, {counts['duplicates']} duplicates")


def test_kafka_down_10s_mid_stream_loses_nothing(bridge_mosquitto, tmp_path, kafka_libs):
    own_kafka = nativestack.Kafka(tmp_path / "kafka", libs=kafka_libs)  # not the session one: we stop it
    own_kafka.start()
    try:
        settings = unique_settings(bridge_mosquitto.url, own_kafka.bootstrap, bridge_max_inflight=1000)
        ensure_topics(settings, own_kafka.bootstrap)
        # a short message timeout so deliveries FAIL during the outage: the retry path is exercised
        # (with the default 120 s the producer just waits and nothing fails)
        bus = KafkaBus(own_kafka.bootstrap)
        devices, count = 20, 300
        with bridge_thread(settings, bus, commands=False,
                           producer_options={"message.timeout.ms": 3000}) as bridge:
            pub = start_publisher(bridge_mosquitto.url, "kd", devices, count, rate=400)
            wait_for(lambda: bridge.health()[1]["acked"] > 300, 20, "stream did not start")
            own_kafka.stop()
            stopped = time.monotonic()
            max_inflight = 0
            while time.monotonic() - stopped < 10:
                max_inflight = max(max_inflight, bridge.health()[1]["inflight"])
                time.sleep(0.05)
            during = bridge.health()
            own_kafka.start()
            wait_publisher(pub)
            records = read_topic(own_kafka.bootstrap, settings.topics.telemetry, timeout=90,
                                 until=lambda r: len(unique_readings(r)) >= devices * count)
            wait_for(lambda: bridge.health()[1]["inflight"] == 0, 30, "inflight did not drain")
            after = wait_for(lambda: bridge.health()[0] and bridge.health(), 20, "bridge not healthy again")
    finally:
        own_kafka.close()
    assert max_inflight <= settings.bridge_max_inflight, "backpressure window exceeded"
    assert max_inflight == settings.bridge_max_inflight, "the window should fill while Kafka is down"
    assert not during[0] and not during[1]["bus_ok"], "health must report the failing bus"
    assert after[1]["delivery_failures"] > 0, "the outage should have failed (and retried) deliveries"
    counts = check_stream(records, "kd", devices, count, ordered=False)
    print(f"kafka outage: {counts['records']} records for {counts['unique']} readings, "
          f"{counts['duplicates']} duplicates, {after[1]['delivery_failures']} delivery failures retried")
