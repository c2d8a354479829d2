"""validate_rule (what the API refuses and why) and AlarmService on the in-process bus with rules from SQLite."""

from __future__ import annotations

import json
import threading
import time

import pytest

from cloud.alarms import AlarmService, validate_rule
from cloud.alarms.engine import SOURCE_HEADER
from tests.polling import wait_until


@pytest.mark.parametrize("rule,message", [
    ({"name": "x", "min": 40, "max": 30}, "min 40 must be below max 30"),
    ({"name": "x", "metric": "co2", "max": 3}, "unknown metric 'co2'"),
    ({"name": "x", "max": 30, "duration_s": -5}, "duration_s must not be negative"),
    ({"name": "x", "max": 30, "hysteresis": -1}, "hysteresis must not be negative"),
    ({"name": "x", "min": 10, "max": 20, "hysteresis": 5}, "clearing band"),
    ({"name": "x"}, "needs min, max or both"),
    ({"name": "x", "kind": "rate"}, "rate_per_min above 0"),
    ({"name": "x", "kind": "nodata"}, "nodata_s above 0"),
    ({"name": "x", "kind": "bogus"}, "kind must be one of"),
    ({"name": "x", "max": 30, "severity": "huge"}, "severity must be one of"),
    ({"name": "", "max": 30}, "name is required"),
    ({"name": "x", "max": "hot"}, "max must be a number"),
    ({"name": "x", "max": float("nan")}, "finite"),
    ({"name": "x", "treshold": 30}, "unknown field(s) treshold"),
    ({"name": "x", "max": 30, "on_raise": {"op": "explode"}}, "on_raise: unknown op"),
    ({"name": "x", "max": 30, "on_raise": {"op": "led", "args": {"state": "purple"}}}, "on_raise"),
    ({"name": "x", "max": 30, "duration_s": 1.5}, "whole number"),
])
def test_invalid_rules_are_refused_with_a_clear_message(rule, message):
    with pytest.raises(ValueError) as err:
        validate_rule(rule)
    assert message in str(err.value)


def test_valid_rules_are_normalized():
    r = validate_rule({"name": " hot ", "metric": "temperature", "max": 30, "duration_s": 60, "id": 7,
                       "on_raise": {"op": "led", "args": {"state": "on"}}})
    assert r["name"] == "hot" and r["metric"] == "t" and r["kind"] == "threshold" and r["severity"] == "major"
    assert r["hysteresis"] == 0.0 and r["id"] == 7 and r["on_raise"] == {"op": "led", "args": {"state": "on"}}
    assert validate_rule({"name": "gone", "kind": "offline"})["metric"] == "status"
    assert validate_rule({"name": "q", "kind": "nodata", "nodata_s": 30})["nodata_s"] == 30
    assert validate_rule({"name": "r", "kind": "rate", "metric": "p", "rate_per_min": 1.5})["rate_per_min"] == 1.5


def test_service_on_memory_bus_with_rules_from_sqlite(tmp_path):
    """The embedded profile: AlarmService in a thread, rules and devices from SQLite, a rule edited in the
    database takes effect within seconds without a restart."""
    from sqlalchemy.orm import Session

    from cloud import db
    from cloud.bus.memory import MemoryBus
    from cloud.db.models import Device, Rule, Tenant
    from cloud.settings import load

    engine = db.make_engine(f"sqlite:///{tmp_path}/iot.db")
    db.upgrade(engine)
    with Session(engine) as s:
        s.add(Tenant(id=1, name="acme"))
        s.flush()
        s.add_all([Device(id="d1", tenant_id=1, name="one"), Device(id="d2", tenant_id=1, name="two")])
        s.flush()
        s.add(Rule(tenant_id=1, name="hot", metric="t", max=30.0, hysteresis=1.0, severity="critical"))
        s.add(Rule(tenant_id=1, device_id="d2", name="hot", metric="t", max=50.0))
        s.add(Rule(tenant_id=1, name="broken", metric="t", min=40.0, max=30.0))  # skipped with a warning
        s.commit()

    settings = load({})
    bus = MemoryBus(6)
    bus.ensure_topics(settings)
    svc = AlarmService(settings, bus, engine, reload_interval=0.2, commit_interval=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert svc.started.wait(10)
        out = bus.consumer("test-out", [settings.topics.alarms])
        producer = bus.producer()
        seq = iter(range(1, 1000))

        def send(device, t):
            body = {"v": 1, "id": device, "boot": 1, "seq": next(seq), "ts": int(time.time() * 1000), "t": t}
            producer.produce(settings.topics.telemetry, device, json.dumps(body).encode())

        events: list[dict] = []

        def collect(n, timeout=10.0):
            def got():
                events.extend(json.loads(r.value) for r in out.poll_batch(100, 0.05)
                              if r.headers.get(SOURCE_HEADER) == "alarms")
                return len(events) >= n
            return wait_until(got, timeout)

        send("d1", 35)
        send("d2", 35)
        assert collect(1)
        assert [(e["device"], e["state"], e["severity"]) for e in events] == [("d1", "raised", "critical")]
        ok, details = svc.health()
        assert ok and details["rules"] == 3 - 1 and details["devices"] == 2 and details["active_alarms"] == 1

        with Session(engine) as s:  # the operator raises the threshold: the alarm clears on the next reading
            rule = s.query(Rule).filter_by(device_id=None, name="hot").one()
            rule.max = 40.0
            s.commit()
        started = time.monotonic()
        assert wait_until(lambda: svc.rules.current.rules_for("d1")[0].max == 40.0, 5)
        assert time.monotonic() - started < 3
        send("d1", 35)
        assert collect(2)
        assert events[1]["state"] == "cleared" and events[1]["alarm_id"] == events[0]["alarm_id"]

        with Session(engine) as s:  # a device provisioned while the service runs gets its tenant's rules
            s.add(Device(id="d3", tenant_id=1, name="three"))
            s.commit()

        def d3_raised():
            send("d3", 45)
            collect(3, 0.2)
            return any(e["device"] == "d3" for e in events)
        started = time.monotonic()
        assert wait_until(d3_raised, 10)
        assert time.monotonic() - started < 6
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert svc.health()[0] is False  # not running any more


@pytest.mark.parametrize("device,rule,ts", [("d1", "hot", 0), ("bench-00042", "heating", 1795621328069),
                                            ("gerät-ü", "zu heiß", -5), ("", "", 2**53)])
def test_alarm_id_is_uuid5_of_device_rule_and_raise_time(device, rule, ts):
    import uuid

    from cloud.alarms.rules import _ALARM_NS, alarm_id

    assert alarm_id(device, rule, ts) == str(uuid.uuid5(_ALARM_NS, f"{device}\x1f{rule}\x1f{ts}"))
