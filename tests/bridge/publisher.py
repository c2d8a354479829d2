"""Test publisher: N paho clients publish telemetry with QoS 1 (see bridgekit.start_publisher).

usage: publisher.py URL PREFIX DEVICES COUNT RATE BOOT QOS"""

from __future__ import annotations

import json
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud.settings import mqtt_parts


def main(argv: list[str]) -> int:
    url, prefix, devices, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    rate, boot, qos = float(argv[4]), int(argv[5]), int(argv[6])
    parts = mqtt_parts(url)
    clients = []
    for i in range(devices):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{i}", protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(50)
        c.max_queued_messages_set(0)
        c.connect(str(parts["host"]), int(parts["port"]), keepalive=60)
        c.loop_start()
        clients.append(c)
    # wait until every session is up: publishing before CONNACK would only queue
    deadline = time.monotonic() + 20
    while not all(c.is_connected() for c in clients):
        if time.monotonic() > deadline:
            print(json.dumps({"error": "publishers did not connect"}))
            return 1
        time.sleep(0.01)
    start = time.monotonic()
    infos = []
    sent = 0
    for seq in range(count):
        for i, c in enumerate(clients):
            payload = json.dumps({"v": 1, "id": f"{prefix}-{i}", "boot": boot, "seq": seq,
                                  "ts": int(time.time() * 1000), "t": 20.0 + (seq % 50) / 10, "h": 45.5,
                                  "p": 1001.25, "rssi": -60, "up": seq, "fw": "test"}, separators=(",", ":"))
            infos.append(c.publish(f"devices/{prefix}-{i}/telemetry", payload, qos=qos))
            sent += 1
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0.002:
                    time.sleep(ahead)
    if qos:
        for info in infos:
            while not info._published:  # paho resends after a reconnect; is_published() raises meanwhile
                time.sleep(0.005)
    elapsed = time.monotonic() - start
    for c in clients:
        c.disconnect()
        c.loop_stop()
    print(json.dumps({"published": sent, "seconds": round(elapsed, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
