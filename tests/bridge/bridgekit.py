"""Helpers for the bridge tests: publishers, Kafka read-back, bridge runners (thread and subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from confluent_kafka import Consumer

from cloud.settings import Settings, Topics, load

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
PUBLISHER = Path(__file__).with_name("publisher.py")


def unique_settings(mqtt_url: str, bootstrap: str | None, **overrides) -> Settings:
    """Settings with topic names and a bridge group of their own, so tests sharing a Kafka/Mosquitto do not
    see each other's records or shared-subscription groups."""
    tag = uuid.uuid4().hex[:8]
    topics = Topics(**{name: f"t{tag}-{value}" for name, value in vars(Topics()).items()})
    return load({}, mqtt_url=mqtt_url, kafka_bootstrap=bootstrap, topics=topics, bridge_group=f"g{tag}",
                **overrides)


def settings_env(settings: Settings) -> dict[str, str]:
    env = {"IOT_MQTT_URL": settings.mqtt_url, "IOT_BRIDGE_GROUP": settings.bridge_group,
           "IOT_BRIDGE_MAX_INFLIGHT": str(settings.bridge_max_inflight), "IOT_LOG_LEVEL": "INFO"}
    if settings.kafka_bootstrap:
        env["IOT_KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
    for name, value in vars(settings.topics).items():
        env[f"IOT_TOPIC_{name.upper()}"] = value
    return env


def telemetry(device: str, boot: int = 1, seq: int = 0, **extra) -> bytes:
    return json.dumps({"v": 1, "id": device, "boot": boot, "seq": seq, "ts": int(time.time() * 1000),
                       "t": 21.5, "h": 40.0, "p": 1000.0, **extra}, separators=(",", ":")).encode()


# --- publishers --------------------------------------------------------------------------------------------

def start_publisher(url: str, prefix: str, devices: int, count: int, rate: float = 0.0, boot: int = 1,
                    qos: int = 1) -> subprocess.Popen:
    """A publisher subprocess: ``devices`` MQTT clients ``<prefix>-<i>``, ``count`` telemetry messages each
    (seq 0..count-1), at ``rate`` messages/s in total (0: as fast as possible). Prints one JSON line when
    the broker acknowledged everything."""
    return subprocess.Popen([PYTHON, str(PUBLISHER), url, prefix, str(devices), str(count), str(rate), str(boot),
                             str(qos)], stdout=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_publisher(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"publisher failed ({proc.returncode}): {out!r}"
    return json.loads(out.decode().strip().splitlines()[-1])


# --- Kafka read-back ---------------------------------------------------------------------------------------

def read_topic(bootstrap: str, topic: str, *, until=None, timeout: float = 60, idle: float = 0) -> list:
    """All records of ``topic`` from the beginning (fresh consumer group). Stops when ``until(records)`` is
    true, after ``idle`` seconds without new records (if > 0 and something arrived), or at ``timeout``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 0})
    consumer.subscribe([topic])
    records = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(5000, 0.5)
            for msg in batch:
                if msg.error() is None:
                    records.append(msg)
            if batch:
                last_new = time.monotonic()
            if until is not None and until(records):
                break
            if idle and records and time.monotonic() - last_new > idle:
                break
    finally:
        consumer.close()
    return records


def unique_readings(records) -> set:
    out = set()
    for msg in records:
        data = json.loads(msg.value())
        out.add((data["id"], data["boot"], data["seq"]))
    return out


def check_stream(records, prefix: str, devices: int, count: int, boot: int = 1, ordered: bool = True) -> dict:
    """Assert every (device, boot, seq) is present, keyed by its device, and each device's first occurrences
    are in publish order (``ordered``). Returns the counts (records, unique, duplicates)."""
    per_device: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for msg in records:
        data = json.loads(msg.value())
        assert msg.key().decode() == data["id"]
        per_device[data["id"]].append((data["boot"], data["seq"]))
    missing = []
    duplicates = 0
    for i in range(devices):
        device = f"{prefix}-{i}"
        firsts, got = [], set()
        for item in per_device.get(device, []):
            if item in got:
                duplicates += 1
            else:
                got.add(item)
                firsts.append(item)
        lost = {(boot, s) for s in range(count)} - got
        if lost:
            missing.append((device, len(lost), sorted(lost)[:5]))
        if ordered:
            assert firsts == sorted(firsts), f"{device}: out of order: {firsts[:20]}"
    assert not missing, f"missing readings (device, how many, first): {missing[:10]}"
    return {"records": len(records), "unique": devices * count, "duplicates": duplicates}


# --- bridge runners ----------------------------------------------------------------------------------------

def wait_for(predicate, timeout: float, message: str = "condition not met", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{message} within {timeout}s")


@contextmanager
def bridge_thread(settings: Settings, bus, **options):
    """A Bridge running in a thread of the test process; yields it, stops it on exit."""
    from cloud.bridge import Bridge

    bridge = Bridge(settings, bus, **options)
    stop = threading.Event()
    errors: list[BaseException] = []

    def target():
        try:
            bridge.run(stop)
        except BaseException as exc:  # noqa: BLE001
            traceback.print_exc()  # where the bridge thread died (the assertion below shows only the error)
            errors.append(exc)

    thread = threading.Thread(target=target, name="bridge-under-test", daemon=True)
    thread.start()
    try:
        wait_for(lambda: (bridge._subscribed or not options.get("ingest", True)) and
                 (bridge._cmd_connected or not options.get("commands", True)) or errors,
                 20, "bridge did not connect")
        assert not errors, errors
        yield bridge
    finally:
        stop.set()
        thread.join(40)
        assert not thread.is_alive(), "bridge did not stop"
        assert not errors, errors


class BridgeProcess:
    """``python -m cloud.bridge`` as a subprocess (for kill -9), configured through IOT_* variables."""

    def __init__(self, settings: Settings, client_id: str, log_path: Path, extra_args: tuple[str, ...] = ()):
        from cloud.nativestack import free_port

        self.settings = settings
        self.client_id = client_id
        self.log_path = log_path
        self.extra_args = extra_args
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "BridgeProcess":
        env = {**os.environ, **settings_env(self.settings), "IOT_METRICS_PORT": str(self.port),
               "PYTHONPATH": str(REPO)}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([PYTHON, "-m", "cloud.bridge", "--client-id", self.client_id,
                                          *self.extra_args], cwd=REPO, env=env, stdout=logf, stderr=logf)
        wait_for(self.healthy, timeout, f"bridge {self.client_id} not healthy (log: {self.log_path})", 0.1)
        return self

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())
        except OSError:
            return None

    def healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, \
            f"bridge exited: {self.log_path.read_text()[-2000:]}"
        h = self.health()
        return bool(h and h["ok"])

    def counts(self) -> dict:
        h = self.health() or {}
        return h.get("services", {}).get("bridge", {})

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
