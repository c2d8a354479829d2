"""The whole firmware (firmware/main.py) on the MicroPython unix port with a 120 kB heap (ESP32-ish),
against a real Mosquitto, observed with paho-mqtt."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

from .conftest import RESET_EXIT_CODE, Broker, wait_for

TELEMETRY_KEYS = {"v", "id", "boot", "seq", "ts", "t", "h", "p", "rssi", "up", "fw"}


def cmd(rec, dev_id, op, args=None, cid=None, exp=None):
    cid = cid or str(uuid.uuid4())
    body = {"v": 1, "cid": cid, "op": op, "args": args or {}}
    if exp is not None:
        body["exp"] = exp
    rec.publish(f"devices/{dev_id}/commands", json.dumps(body))
    return cid


def ack_for(rec, cid, n=1, timeout=10):
    return rec.wait("/acks", lambda m: m.get("cid") == cid, timeout=timeout, n=n)


def test_telemetry_status_heap_and_last_will(fw_broker, device, mqtt):
    rec = mqtt(fw_broker.port)
    dev = device(fw_broker.port, "fw-tel", interval_s=0.3).start()
    online = rec.wait("fw-tel/status", lambda m: m["state"] == "online")[0]
    assert online["v"] == 1 and online["id"] == "fw-tel" and online["fw"] and 0 <= online["boot"] < 2**31
    tel = rec.wait("fw-tel/telemetry", n=5)
    for m in tel:
        assert set(m) == TELEMETRY_KEYS, m
        assert m["v"] == 1 and m["id"] == "fw-tel" and m["boot"] == online["boot"] and m["fw"] == online["fw"]
        assert 15 < m["t"] < 30 and 30 < m["h"] < 60 and 1000 < m["p"] < 1030
        assert round(m["t"], 2) == m["t"] and round(m["p"], 2) == m["p"]
        assert isinstance(m["rssi"], int) and -130 < m["rssi"] < 0 and isinstance(m["up"], int)
    assert [m["seq"] for m in tel] == list(range(1, len(tel) + 1))
    stamped = [m["ts"] for m in tel if m["ts"] is not None]
    assert stamped and abs(stamped[-1] - time.time() * 1000) < 5000  # unix ms once NTP-synced
    # the contract's own parser accepts what the firmware sends
    from cloud import schema
    for m in tel:
        schema.parse_telemetry("fw-tel", json.dumps(m).encode())
    schema.parse_status("fw-tel", json.dumps(online).encode())
    # the online status is retained: a late subscriber sees it
    late = mqtt(fw_broker.port, topics=("devices/fw-tel/status",))
    assert late.wait("status")[0]["state"] == "online"
    heap = int(re.search(r"free heap after start-up: (\d+)", dev.console()).group(1))
    assert heap > 20000, dev.console()
    dev.kill()  # power cut: the broker publishes the last will
    off = rec.wait("fw-tel/status", lambda m: m["state"] == "offline")[-1]
    assert off == {"v": 1, "state": "offline", "id": "fw-tel"}


def test_commands_ping_unknown_duplicate_expired_led(fw_broker, device, mqtt):
    rec = mqtt(fw_broker.port)
    dev = device(fw_broker.port, "fw-cmd", interval_s=1).start()
    rec.wait("fw-cmd/status", lambda m: m["state"] == "online")
    cid = cmd(rec, "fw-cmd", "ping")
    a = ack_for(rec, cid)[0]
    assert a["ok"] is True and a["result"]["pong"] is True and isinstance(a["result"]["up"], int)
    assert a["v"] == 1 and a["err"] is None
    bad = cmd(rec, "fw-cmd", "self_destruct")
    b = ack_for(rec, bad)[0]
    assert b["ok"] is False and "unknown op" in b["err"]
    badarg = cmd(rec, "fw-cmd", "set_interval", {"s": "soon"})
    assert "interval_s" in ack_for(rec, badarg)[0]["err"]
    expired = cmd(rec, "fw-cmd", "led", {"state": "on"}, exp=int(time.time() * 1000) - 60000)
    e = ack_for(rec, expired)[0]
    assert e["ok"] is False and "expired" in e["err"]
    # duplicate cid: executed once, the same ack answered again
    dup = cmd(rec, "fw-cmd", "ping")
    first = ack_for(rec, dup)[0]
    time.sleep(1.2)
    cmd(rec, "fw-cmd", "ping", cid=dup)
    acks = ack_for(rec, dup, n=2)
    assert acks[0] == acks[1] == first  # same "up": not run again
    assert "repeated cid" in dev.console()
    led = cmd(rec, "fw-cmd", "led", {"state": "on"})
    assert ack_for(rec, led)[0]["ok"] is True
    wait_for(lambda: (dev.flash / "led").exists() and (dev.flash / "led").read_text() == "on", 5, what="LED on")
    from cloud import schema
    for m in rec.json("fw-cmd/acks"):
        schema.parse_ack("fw-cmd", json.dumps(m).encode())


def test_set_interval_and_thresholds_persist_across_restart(fw_broker, device, mqtt):
    rec = mqtt(fw_broker.port)
    dev = device(fw_broker.port, "fw-persist", interval_s=1,
                 extra_config={"wifi": {"ssid": "lab", "password": "wifi-secret"}}).start()
    rec.wait("fw-persist/status", lambda m: m["state"] == "online")
    cid = cmd(rec, "fw-persist", "set_interval", {"s": 3})
    assert ack_for(rec, cid)[0] == {"v": 1, "id": "fw-persist", "cid": cid, "ok": True, "err": None,
                                    "result": {"interval_s": 3}}
    th = cmd(rec, "fw-persist", "set_thresholds", {"t": {"min": 0, "max": 35}})
    assert ack_for(rec, th)[0]["ok"] is True
    saved = json.loads((dev.flash / "config.json").read_text())
    assert saved["interval_s"] == 3 and saved["thresholds"]["t"] == {"min": 0, "max": 35}
    dev.kill()
    dev.start()
    rec.wait("fw-persist/status", lambda m: m["state"] == "online", n=2)
    g = cmd(rec, "fw-persist", "get_config")
    conf = ack_for(rec, g)[0]["result"]
    assert conf["interval_s"] == 3 and conf["thresholds"]["t"] == {"min": 0, "max": 35}
    assert "wifi-secret" not in json.dumps(conf) and "password" not in conf["wifi"]


def test_reboot_acks_then_resets(fw_broker, device, mqtt):
    rec = mqtt(fw_broker.port)
    dev = device(fw_broker.port, "fw-reboot", interval_s=1).start()
    rec.wait("fw-reboot/status", lambda m: m["state"] == "online")
    cid = cmd(rec, "fw-reboot", "reboot")
    assert ack_for(rec, cid)[0]["ok"] is True
    assert dev.wait_exit(10) == RESET_EXIT_CODE
    off = rec.wait("fw-reboot/status", lambda m: m["state"] == "offline")[-1]
    assert off["reason"] == "reboot"


def test_outage_buffers_and_replays_in_order(tmp_path, device, mqtt):
    broker = Broker(tmp_path / "broker", persistence=True)
    broker.start()
    try:
        rec = mqtt(broker.port, client_id="fw-outage-observer", clean=False)
        dev = device(broker.port, "fw-outage", interval_s=0.25,
                     extra_config={"backlog": {"ram": 4, "file": 200}}).start()
        rec.wait("fw-outage/telemetry", n=3)
        broker.stop()
        time.sleep(3)  # ~12 readings taken while the broker is gone: RAM ring spills to flash
        broker.start()
        before = max(m["seq"] for m in rec.json("fw-outage/telemetry"))
        rec.wait("fw-outage/telemetry", lambda m: m["seq"] > before + 15, timeout=25)
        # Wi-Fi loss (host: a wifi_down file in the flash dir) is detected and recovered from as well
        (dev.flash / "wifi_down").write_text("")
        time.sleep(1.5)
        (dev.flash / "wifi_down").unlink()
        mark = max(m["seq"] for m in rec.json("fw-outage/telemetry"))
        rec.wait("fw-outage/telemetry", lambda m: m["seq"] > mark + 8, timeout=25)
        seqs = [m["seq"] for m in rec.json("fw-outage/telemetry")]
        unique = sorted(set(seqs))
        assert unique == list(range(1, unique[-1] + 1)), f"gap in {seqs}"
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == unique, f"out of order: {seqs}"  # replay is oldest first
        assert "Wi-Fi lost" in dev.console() and "MQTT down" in dev.console()
        assert not any("drop" in m for m in rec.json("fw-outage/telemetry"))
    finally:
        broker.stop()


def test_client_pid_wraps_and_qos1_has_no_nagle_delay(fw_broker, run_mpy, tmp_path, mqtt):
    rec = mqtt(fw_broker.port, topics=("fw/pid",))
    script = f"""
import json, time
from link import Client
c = Client("fw-pid", "127.0.0.1", {fw_broker.port}, keepalive=10)
c.set_callback(lambda t, m: None)
c.connect()
c.pid = 65530
pids = []
for i in range(10):
    c.publish("fw/pid", str(i), qos=1)
    pids.append(c.pid)
t0 = time.ticks_ms()
for i in range(50):
    c.publish("fw/pid", "x", qos=1)
dt = time.ticks_diff(time.ticks_ms(), t0)
c.disconnect()
print(json.dumps({{"pids": pids, "ms_per_qos1": dt / 50}}))
"""
    from .conftest import run_json
    got = run_json(run_mpy, script, tmp_path)
    assert got["pids"] == [65531, 65532, 65533, 65534, 65535, 1, 2, 3, 4, 5]
    assert got["ms_per_qos1"] < 20, got  # Nagle + delayed ACK would make this ~40 ms
    wait_for(lambda: len(rec.msgs) >= 60, 10, what="60 publishes")
