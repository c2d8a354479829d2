"""Restart, crash replay and two instances against a real Kafka broker (session fixture ``kafka``)."""

from __future__ import annotations

from collections import Counter

from tests.polling import wait_until

HOT = {"name": "hot", "metric": "t", "max": 30, "hysteresis": 1, "severity": "critical"}
SILENT = {"name": "silent", "kind": "nodata", "nodata_s": 600}


def test_kafka_crossing_ack_and_clear(kafka_rig):
    rig = kafka_rig([HOT])
    rig.start()
    rig.wait_assigned()
    rig.send("d1", 1, 0, t=25)
    rig.send("d1", 2, 10, t=35)
    events = rig.collect(until=1)
    assert [(e["state"], e["value"]) for e in events] == [("raised", 35.0)]
    # the web tier's acknowledgement: same event, state acknowledged, no src header
    import json

    ack = {**events[0], "state": "acknowledged"}
    rig.producer.produce(rig.topics.alarms, "d1", json.dumps(ack).encode())
    rig.producer.flush(10)
    svc = rig.instances[0][0]
    assert wait_until(lambda: svc.engine.active_alarms() and svc.engine.active_alarms()[0]["state"] == "acknowledged")
    rig.send("d1", 3, 20, t=20)
    events = rig.collect(until=2)
    assert [e["state"] for e in events] == ["raised", "cleared"]
    assert events[1]["alarm_id"] == events[0]["alarm_id"]


def test_kafka_restart_with_alarm_active_raises_once(kafka_rig):
    rig = kafka_rig([HOT, SILENT])
    a = rig.start()
    rig.wait_assigned()
    rig.send("d1", 1, 0, t=35)
    assert [e["state"] for e in rig.collect(until=1)] == ["raised"]
    rig.stop(a)  # clean stop: checkpoint (snapshot, flush, commit) then leave the group
    b = rig.start()
    rig.wait_assigned()
    assert b.engine.counts["restored"] >= 1
    assert b.engine.active_alarms()[0]["rule"] == "hot"
    rig.send("d1", 1, 0, t=35)  # a redelivery of the reading that raised
    rig.send("d1", 2, 10, t=36)  # still hot: no second "raised"
    rig.send("d1", 3, 20, t=20)
    events = rig.collect(until=2)
    assert [e["state"] for e in events] == ["raised", "cleared"]
    assert events[0]["alarm_id"] == events[1]["alarm_id"]
    assert b.engine.counts["duplicates"] == 1


def test_kafka_crash_after_snapshot_before_commit_replays_idempotently(kafka_rig):
    rig = kafka_rig([HOT])
    a = rig.start()
    rig.wait_assigned()
    a.io.commit = lambda offsets, asynchronous=False: None  # every checkpoint writes the snapshots, then "dies" before the commit
    rig.send("d1", 1, 0, t=25)
    rig.send("d1", 2, 10, t=35)
    assert [e["state"] for e in rig.collect(until=1)] == ["raised"]
    assert wait_until(lambda: a.engine.counts["checkpoints"] >= 1 and not a.engine.dirty)
    rig.stop(a)
    b = rig.start()  # replays both readings from offset 0 against the restored state
    rig.wait_assigned()
    assert wait_until(lambda: b.engine.counts["duplicates"] == 2)
    rig.send("d1", 3, 20, t=36)
    rig.send("d1", 4, 30, t=20)
    events = rig.collect(until=2)
    assert [e["state"] for e in events] == ["raised", "cleared"]


def test_kafka_two_instances_split_partitions_without_duplicates(kafka_rig):
    devices = {f"dev-{i:03d}": 1 for i in range(40)}
    rig = kafka_rig([HOT], devices)
    a = rig.start()
    rig.wait_assigned()
    # phase 1: A alone; every device crosses
    for i, d in enumerate(devices):
        rig.send(d, 1, 0, t=35)
    rig.collect(until=40)
    # B joins while A holds 40 active alarms: A checkpoints in its revoke callback, B restores its half
    b = rig.start()
    rig.wait_assigned()
    assert a.engine.parts and b.engine.parts and not set(a.engine.parts) & set(b.engine.parts)
    assert a.engine.active_count() + b.engine.active_count() == 40
    # phase 2: still hot (no new events), then every device clears and half of them cross again
    for d in devices:
        rig.send(d, 2, 10, t=36)
    for d in devices:
        rig.send(d, 3, 20, t=20)
    for d in list(devices)[:20]:
        rig.send(d, 4, 30, t=40)
    events = rig.collect(until=40 + 40 + 20, quiet=2.0)
    per_device = Counter((e["device"], e["state"]) for e in events)
    assert sum(1 for e in events if e["state"] == "raised") == 60, per_device
    assert sum(1 for e in events if e["state"] == "cleared") == 40, per_device
    assert len({(e["alarm_id"], e["state"]) for e in events}) == len(events), "duplicate events"
    for d in devices:
        states = [e["state"] for e in events if e["device"] == d]
        assert states == (["raised", "cleared", "raised"] if d in list(devices)[:20] else ["raised", "cleared"])
    assert a.engine.counts["readings"] > 0 and b.engine.counts["readings"] > 0
