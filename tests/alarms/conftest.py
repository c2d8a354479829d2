"""Rigs for the alarm tests: drive the engine synchronously on the in-process bus, or run AlarmService threads
on real Kafka (session fixture ``kafka`` from tests/conftest.py)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from cloud.alarms.catalog import build_catalog
from cloud.alarms.engine import SOURCE, SOURCE_HEADER, AlarmEngine
from cloud.alarms.io import MemoryIO
from cloud.alarms.rules import validate_rule
from cloud.alarms.service import AlarmService
from cloud.bus.memory import MemoryBus
from cloud.settings import Topics, load

# device clocks in the scenarios: an hour ago, so scenario times (seconds from BASE) stay in the past
BASE = int(time.time() * 1000) - 3_600_000


def catalog_of(rules: list[dict], devices: dict[str, int] | None = None):
    rows = []
    for r in rules:
        r = dict(r)
        device = r.pop("device_id", None)
        rows.append({"tenant_id": 1, "device_id": device, **validate_rule(r)})
    return build_catalog(devices or {"d1": 1, "d2": 1}, rows)


def reading(device: str, seq: int, at_s: float | None, boot: int = 1, **metrics) -> bytes:
    data = {"v": 1, "id": device, "boot": boot, "seq": seq,
            "ts": None if at_s is None else BASE + int(at_s * 1000), **metrics}
    return json.dumps({k: v for k, v in data.items() if v is not None}).encode()


class MemoryRig:
    """The engine on a MemoryBus, pumped synchronously by the test; time = wall clock + ``skew`` seconds."""

    def __init__(self, rules: list[dict], devices: dict[str, int] | None = None):
        self.base = BASE
        self.bus = MemoryBus(6)
        self.settings = load({})
        self.bus.ensure_topics(self.settings)
        self.topics = self.settings.topics
        self.catalog = catalog_of(rules, devices)
        self.skew = 0.0
        self.producer = self.bus.producer()
        self.out = self.bus.consumer("test-out", [self.topics.alarms, self.topics.control])
        self.seq: dict[str, int] = {}
        self.start()

    def start(self) -> None:
        self.io = MemoryIO(self.bus, "alarms", [self.topics.telemetry, self.topics.status, self.topics.alarms])
        self.engine = AlarmEngine(self.io, self.topics, "alarms-state", lambda: self.catalog,
                                  clock=lambda: time.time() + self.skew, commit_interval=0)
        self.io.ensure_changelog("alarms-state", self.topics.telemetry, 6, 1)

    def restart(self) -> None:
        self.engine.checkpoint()
        self.io.close()
        self.start()

    def pump(self) -> None:
        while True:
            records = self.io.poll(10_000, 0)
            if not records:
                break
            self.engine.process(records)
        self.engine.checkpoint()

    def send(self, device: str, at_s: float | None, seq: int | None = None, boot: int = 1, **metrics) -> None:
        if seq is None:
            seq = self.seq.get(device, 0) + 1
        self.seq[device] = max(seq, self.seq.get(device, 0))
        self.producer.produce(self.topics.telemetry, device, reading(device, seq, at_s, boot, **metrics))
        self.pump()

    def status(self, device: str, state: str) -> None:
        self.producer.produce(self.topics.status, device, json.dumps({"v": 1, "state": state}).encode())
        self.pump()

    def tick(self, skew_s: float) -> None:
        self.skew = skew_s
        self.pump()
        self.engine.tick()
        self.pump()

    def external(self, event: dict, state: str) -> None:
        """What the web tier does after updating the alarm row: the same event with another state, no src."""
        self.producer.produce(self.topics.alarms, event["device"], json.dumps({**event, "state": state}).encode())
        self.pump()

    def drain(self) -> tuple[list[dict], list[dict]]:
        events, commands = [], []
        for r in self.out.poll_batch(100_000, 0):
            if r.headers.get(SOURCE_HEADER) != SOURCE:
                continue
            (events if r.topic == self.topics.alarms else commands).append({**json.loads(r.value), "_key": r.key})
        return events, commands


@pytest.fixture
def memory_rig():
    return MemoryRig


# --- Kafka ------------------------------------------------------------------------------------------------

class KafkaRig:
    """Unique topics per test on the shared broker; AlarmService instances in threads."""

    def __init__(self, kafka, rules: list[dict], devices: dict[str, int] | None = None):
        from cloud.bus.kafka import KafkaBus

        uid = uuid.uuid4().hex[:8]
        self.kafka = kafka
        self.topics = Topics(telemetry=f"tel-{uid}", status=f"st-{uid}", acks=f"acks-{uid}", alarms=f"al-{uid}",
                             control=f"ctl-{uid}", command_status=f"cs-{uid}", deadletter=f"dl-{uid}")
        self.settings = load({}, kafka_bootstrap=kafka.bootstrap, topics=self.topics)
        kafka.create_topics([self.topics.telemetry, self.topics.status, self.topics.alarms, self.topics.control],
                            partitions=6)
        self.group = f"alarms-{uid}"
        self.changelog = f"alarms-state-{uid}"
        self.bus = KafkaBus(kafka.bootstrap)
        self.catalog = catalog_of(rules, devices)
        self.producer = self.bus.producer("test")
        self.out = self.bus.consumer(f"out-{uid}", [self.topics.alarms])
        self.instances: list[tuple[AlarmService, threading.Event, threading.Thread]] = []
        self.events: list[dict] = []

    def start(self, **kw) -> AlarmService:
        svc = AlarmService(self.settings, self.bus, group=self.group, changelog=self.changelog,
                           catalog_loader=lambda: self.catalog, reload_interval=0.2, commit_interval=0.2,
                           tick_interval=0.2, **kw)
        stop = threading.Event()
        thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
        thread.start()
        assert svc.started.wait(30)
        self.instances.append((svc, stop, thread))
        return svc

    def stop(self, svc: AlarmService) -> None:
        for item in list(self.instances):
            if item[0] is svc:
                item[1].set()
                item[2].join(60)
                assert not item[2].is_alive()
                self.instances.remove(item)

    def close(self) -> None:
        for svc, _, _ in list(self.instances):
            self.stop(svc)
        self.out.close()

    def send(self, device: str, seq: int, at_s: float, **metrics) -> None:
        self.producer.produce(self.topics.telemetry, device, reading(device, seq, at_s, **metrics))
        self.producer.flush(10)

    def processed(self) -> int:
        return sum(s.engine.counts["readings"] + s.engine.counts["duplicates"]
                   for s, _, _ in self.instances if s.engine is not None)

    def wait_assigned(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owned = [set(s.engine.parts) for s, _, _ in self.instances if s.engine is not None]
            if len(owned) == len(self.instances) and all(owned) and set().union(*owned) == set(range(6)) \
                    and sum(len(o) for o in owned) == 6:
                return
            time.sleep(0.1)
        raise AssertionError(f"partitions not assigned: {[sorted(s.engine.parts) for s, _, _ in self.instances]}")

    def collect(self, until: int | None = None, quiet: float = 1.5, timeout: float = 30) -> list[dict]:
        """Read alarm events produced by the engines until ``until`` are there (and then ``quiet`` more
        seconds without a new one, to catch duplicates)."""
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            got = False
            for r in self.out.poll_batch(1000, 0.2):
                if r.headers.get(SOURCE_HEADER) == SOURCE:
                    self.events.append(json.loads(r.value))
                    got = True
            if got:
                last_new = time.monotonic()
            if (until is None or len(self.events) >= until) and time.monotonic() - last_new >= quiet:
                break
        return self.events


@pytest.fixture
def kafka_rig(request):
    kafka = request.getfixturevalue("kafka")
    rigs = []

    def make(rules, devices=None):
        rig = KafkaRig(kafka, rules, devices)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
