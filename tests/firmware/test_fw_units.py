"""Emulator round trip, config validation and the backlog, each run in MicroPython."""

from __future__ import annotations

import json

import pytest

from .conftest import free_port, run_json


@pytest.mark.parametrize("env", [
    {"t": 21.5, "h": 45.0, "p": 1013.25},
    {"t": -39.5, "h": 2.0, "p": 310.0},
    {"t": 84.0, "h": 99.0, "p": 1099.0},
    {"t": 0.0, "h": 50.0, "p": 800.0},
])
def test_emulator_round_trip(run_mpy, tmp_path, env):
    (tmp_path / "sensor_env.json").write_text(json.dumps(env))
    script = r"""
import json, machine, bme280, time
i2c = machine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21), freq=100000)
out = {"scan": i2c.scan()}
out["forced"] = bme280.BME280(i2c, t_os=2, p_os=16, h_os=1).read()
n = bme280.BME280(i2c, mode=bme280.MODE_NORMAL, standby_ms=10)
time.sleep_ms(40)
out["normal"] = n.read()
print(json.dumps(out))
"""
    got = run_json(run_mpy, script, tmp_path)
    assert got["scan"] == [0x76]
    for mode in ("forced", "normal"):
        t, p, h = got[mode]
        assert t == pytest.approx(env["t"], abs=0.02)
        assert p == pytest.approx(env["p"], abs=0.02)
        assert h == pytest.approx(env["h"], abs=0.05)


def test_emulator_env_change_while_running_and_bmp280(run_mpy, tmp_path):
    script = r"""
import json, os, machine, bme280, time
i2c = machine.I2C(0)
s = bme280.BME280(i2c)
a = s.read()
with open("sensor_env.json", "w") as f:
    f.write('{"t": 30.0}')
b = s.read()
with open("sensor_env.json", "w") as f:
    f.write('{"t": -5.25, "h": 12.5}')
time.sleep_ms(1100)   # a new mtime on coarse-mtime filesystems
with open("sensor_env.json", "w") as f:
    f.write('{"t": -5.25, "h": 12.5}')
c = s.read()
print(json.dumps([a, b, c]))
"""
    a, b, c = run_json(run_mpy, script, tmp_path)
    assert 18 < a[0] < 25  # default drift around 21.5 +- a per-device offset of up to 2
    assert b[0] == pytest.approx(30.0, abs=0.02)
    assert c[0] == pytest.approx(-5.25, abs=0.02) and c[2] == pytest.approx(12.5, abs=0.05)
    cp = run_mpy("import machine, bme280\nbme280.BME280(machine.I2C(0))\n", tmp_path, env={"MPY_BME280": "bmp280"})
    assert cp.returncode != 0 and "no humidity" in cp.stdout + cp.stderr


def test_config_validation_names_bad_keys(run_mpy, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "mqtt": {"port": 70000, "host": "broker.local", "tls": "yes"}, "interval_s": -1, "device_id": "bad id!",
        "i2c": {"sda": "21"}, "sensor": {"address": "0x77"}, "thresholds": {"t": {"min": 5, "max": 1}},
        "bogus": 1}))
    script = r"""
import json, config
c = config.Config.load()
print(json.dumps({"data": c.data, "errors": c.errors, "public": c.public()}))
"""
    cp = run_mpy(script, tmp_path, env={"MPY_UNIQUE_ID": "a1b2c3d4e5f6"})
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    got = json.loads(out.strip().splitlines()[-1])
    for key in ("mqtt.port", "mqtt.tls", "interval_s", "device_id", "i2c.sda", "thresholds"):
        assert f"'{key}'" in out, key
        assert key in got["errors"]
    assert "unknown key 'bogus'" in out
    d = got["data"]
    assert d["mqtt"]["port"] == 1883 and d["mqtt"]["host"] == "broker.local" and d["mqtt"]["tls"] is False
    assert d["interval_s"] == 10 and d["i2c"]["sda"] == 21 and d["sensor"]["address"] == 0x77
    assert d["device_id"] == "esp32-a1b2c3d4e5f6"
    assert "password" not in got["public"]["wifi"] and "password" not in got["public"]["mqtt"]


def test_config_missing_and_broken_file_and_atomic_save(run_mpy, tmp_path):
    script = r"""
import json, os, config
c = config.Config.load()
c.set("interval_s", 7)
try:
    c.set("interval_s", 0)
except ValueError as e:
    print("ERR", e)
c.save()
print(json.dumps({"files": sorted(os.listdir(".")), "reloaded": config.Config.load().data["interval_s"]}))
"""
    cp = run_mpy(script, tmp_path)
    assert "config.json not found" in cp.stdout
    assert "ERR interval_s must be" in cp.stdout
    got = json.loads(cp.stdout.strip().splitlines()[-1])
    assert got["reloaded"] == 7 and "config.json.tmp" not in got["files"]
    (tmp_path / "config.json").write_text("{not json")
    cp = run_mpy("import config\nconfig.Config.load()\n", tmp_path)
    assert "not valid JSON" in cp.stdout


def test_backlog_ring_spill_order_drops_and_recovery(run_mpy, tmp_path):
    script = r"""
import json, backlog
b = backlog.Backlog(ram=4, file_max=10)
for i in range(1, 21):          # 20 readings, room for 14
    b.push('{"seq":%d}' % i)
out = {"len": len(b), "drops": b.take_drops(), "drops2": b.take_drops()}
got = []
for _ in range(3):
    got.append(json.loads(b.peek())["seq"]); b.pop()
b2 = backlog.Backlog(ram=4, file_max=10)   # a reboot: what is on flash comes back
out["recovered"] = len(b2)
while len(b):
    got.append(json.loads(b.peek())["seq"]); b.pop()
out["order"] = got
out["empty"] = b.peek()
import os
out["file_left"] = "backlog.jsonl" in os.listdir(".")
print(json.dumps(out))
"""
    got = run_json(run_mpy, script, tmp_path)
    assert got["len"] == 14 and got["drops"] == 6 and got["drops2"] == 0
    assert got["order"] == list(range(7, 21))  # oldest dropped, rest in order
    assert 7 <= got["recovered"] <= 10  # unread file entries 10..16 (+ at most a few consumed ones) come back
    assert got["empty"] is None and got["file_left"] is False


def test_link_wait_returns_when_the_broker_sends(run_mpy, tmp_path):
    """The main loop idles in Link.wait: one blocking poll on the MQTT socket that ends as soon as a packet
    arrives (a command is handled at once), the whole time when nothing comes, and a plain sleep offline."""
    port = free_port()
    script = r"""
import json, select, socket, time
from link import Link
addr = socket.getaddrinfo("127.0.0.1", %d)[0][-1]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(addr)
srv.listen(1)
cli = socket.socket()
cli.connect(addr)
peer = srv.accept()[0]

class Session:
    sock = cli

link = Link({}, "dev1", 1, "test")
link.client, link.up = Session(), True
link._poller = select.poll()  # as connect() registers the session's socket
link._poller.register(cli, select.POLLIN)

def timed(ms):
    t0 = time.ticks_ms()
    link.wait(ms)
    return time.ticks_diff(time.ticks_ms(), t0)

idle = timed(300)
peer.write(b"\x30")
woke = timed(10000)
link.up = False
offline = timed(200)
print(json.dumps([idle, woke, offline]))
""" % port
    idle, woke, offline = run_json(run_mpy, script, tmp_path)
    assert idle >= 290  # nothing arrived: the whole wait
    assert woke < 5000  # a byte arrived: back at once, not after 10 s
    assert offline >= 190
