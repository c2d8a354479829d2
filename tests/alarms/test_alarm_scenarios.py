"""The scenario table on the in-process bus: readings in, alarm events out (the engine, its state store and the
rule logic exactly as in production; only the backbone differs)."""

from __future__ import annotations

import time

import pytest

HOT = {"name": "hot", "metric": "t", "max": 30, "hysteresis": 1, "severity": "critical"}

# (id, rules, steps, expected [(rule, state, value)]) -- value None = not checked
# steps: ("r", at_s, {metrics}) reading of d1 | ("r", at_s, {metrics}, seq, boot) | ("status", state) |
#        ("tick", skew_s) | ("ack",) | ("clear",) | ("rules", [...]) | ("restart",) | ("replay", seq, at_s, {..})
SCENARIOS = [
    ("crossing-and-clearing", [HOT],
     [("r", 0, {"t": 25}), ("r", 10, {"t": 31}), ("r", 20, {"t": 32}), ("r", 30, {"t": 28.5})],
     [("hot", "raised", 31), ("hot", "cleared", 28.5)]),
    ("flapping-inside-hysteresis-band-is-one-alarm", [{**HOT, "hysteresis": 2}],
     [("r", 0, {"t": 31}), ("r", 10, {"t": 29.5}), ("r", 20, {"t": 30.5}), ("r", 30, {"t": 28.5}),
      ("r", 40, {"t": 31}), ("r", 50, {"t": 27.9})],
     [("hot", "raised", 31), ("hot", "cleared", 27.9)]),
    ("duration-not-reached", [{**HOT, "duration_s": 60}],
     [("r", 0, {"t": 31}), ("r", 30, {"t": 32}), ("r", 50, {"t": 29}), ("r", 60, {"t": 31}), ("r", 100, {"t": 31})],
     []),
    ("duration-reached", [{**HOT, "duration_s": 60}],
     [("r", 0, {"t": 31}), ("r", 30, {"t": 32}), ("r", 59, {"t": 31}), ("r", 60, {"t": 33})],
     [("hot", "raised", 33)]),
    ("min-threshold", [{"name": "cold", "metric": "temperature", "min": 5, "hysteresis": 0.5}],
     [("r", 0, {"t": 6}), ("r", 10, {"t": 4}), ("r", 20, {"t": 5.2}), ("r", 30, {"t": 5.5})],
     [("cold", "raised", 4), ("cold", "cleared", 5.5)]),
    ("other-metric", [{"name": "dry", "metric": "h", "min": 20}],
     [("r", 0, {"t": 20, "h": 50}), ("r", 10, {"t": 20}), ("r", 20, {"t": 20, "h": 10})],
     [("dry", "raised", 10)]),
    ("rate-of-change", [{"name": "heating", "kind": "rate", "metric": "t", "rate_per_min": 2}],
     [("r", 0, {"t": 20}), ("r", 20, {"t": 20.2}), ("r", 40, {"t": 20.5}), ("r", 60, {"t": 21}),
      ("r", 80, {"t": 24}), ("r", 100, {"t": 24.5}), ("r", 140, {"t": 24.1}), ("r", 200, {"t": 24.2})],
     [("heating", "raised", 3.8), ("heating", "cleared", None)]),
    ("rate-of-change-across-a-restart", [{"name": "heating", "kind": "rate", "metric": "t", "rate_per_min": 2}],
     [("r", 0, {"t": 20}), ("r", 20, {"t": 20.2}), ("r", 40, {"t": 20.5}), ("restart",), ("r", 60, {"t": 21}),
      ("r", 80, {"t": 24}), ("restart",), ("r", 100, {"t": 24.5}), ("r", 140, {"t": 24.1}), ("r", 200, {"t": 24.2})],
     [("heating", "raised", 3.8), ("heating", "cleared", None)]),
    ("non-numeric-metric-is-not-evaluated", [HOT],
     [("r", 0, {"t": True}), ("r", 10, {"t": "35"}), ("r", 20, {"h": 50}), ("r", 30, {"t": 35})],
     [("hot", "raised", 35)]),
    ("offline-via-last-will", [{"name": "offline", "kind": "offline", "severity": "warning"}],
     [("r", 0, {"t": 20}), ("status", "offline"), ("status", "offline"), ("status", "online")],
     [("offline", "raised", None), ("offline", "cleared", None)]),
    ("offline-for-a-duration", [{"name": "offline", "kind": "offline", "duration_s": 30}],
     [("r", 0, {"t": 20}), ("status", "offline"), ("tick", 10), ("tick", 40), ("tick", 50), ("r", 10, {"t": 20})],
     [("offline", "raised", None), ("offline", "cleared", None)]),
    ("offline-back-before-duration", [{"name": "offline", "kind": "offline", "duration_s": 30}],
     [("status", "offline"), ("tick", 10), ("status", "online"), ("tick", 60)],
     []),
    ("no-data", [{"name": "silent", "kind": "nodata", "nodata_s": 30}],
     [("r", 0, {"t": 20}), ("tick", 10), ("tick", 31), ("tick", 60), ("r", 60, {"t": 20}), ("tick", 61)],
     [("silent", "raised", None), ("silent", "cleared", None)]),
    ("acknowledge-then-clear", [HOT],
     [("r", 0, {"t": 35}), ("ack",), ("r", 10, {"t": 36}), ("r", 20, {"t": 20})],
     [("hot", "raised", 35), ("hot", "cleared", 20)]),
    ("manual-clear-while-condition-holds-raises-a-new-alarm", [HOT],
     [("r", 0, {"t": 35}), ("clear",), ("r", 10, {"t": 36})],
     [("hot", "raised", 35), ("hot", "raised", 36)]),
    ("rule-change-while-active", [HOT],
     [("r", 0, {"t": 35}), ("rules", [{**HOT, "max": 40}]), ("r", 10, {"t": 35}), ("r", 20, {"t": 41})],
     [("hot", "raised", 35), ("hot", "cleared", 35), ("hot", "raised", 41)]),
    ("rule-removed-while-active", [HOT],
     [("r", 0, {"t": 35}), ("rules", []), ("tick", 0), ("r", 10, {"t": 36})],
     [("hot", "raised", 35), ("hot", "cleared", None)]),
    ("restart-with-alarm-active", [HOT],
     [("r", 0, {"t": 35}), ("restart",), ("replay", 1, 0, {"t": 35}), ("r", 10, {"t": 36}), ("r", 20, {"t": 20})],
     [("hot", "raised", 35), ("hot", "cleared", 20)]),
    ("late-reading", [HOT],
     [("r", 0, {"t": 25}, 1, 1), ("r", 10, {"t": 31}, 2, 1), ("r", 30, {"t": 25}, 4, 1),
      ("r", 20, {"t": 35}, 3, 1),  # seq 3 arrives after seq 4
      ("r", 25, {"t": 35}, 1, 2),  # a new boot whose clock is behind: late, cannot re-raise
      ("r", 40, {"t": 26}, 2, 2)],
     [("hot", "raised", 31), ("hot", "cleared", 25)]),
    ("duplicate-redelivery", [HOT],
     [("r", 0, {"t": 25}, 1, 1), ("r", 10, {"t": 25}, 2, 1), ("replay", 2, 10, {"t": 40}),
      ("replay", 1, 0, {"t": 40})],
     []),
    ("unsynced-clock-uses-backbone-time", [HOT],
     [("r", None, {"t": 25}), ("r", None, {"t": 31}), ("r", None, {"t": 20})],
     [("hot", "raised", 31), ("hot", "cleared", 20)]),
]


@pytest.mark.parametrize("name,rules,steps,expected", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(memory_rig, name, rules, steps, expected):
    rig = memory_rig(rules)
    emitted: list[dict] = []
    for step in steps:
        kind = step[0]
        if kind == "r":
            seq, boot = (step[3], step[4]) if len(step) > 3 else (None, 1)
            rig.send("d1", step[1], seq=seq, boot=boot, **step[2])
        elif kind == "replay":
            rig.send("d1", step[2], seq=step[1], **step[3])
        elif kind == "status":
            rig.status("d1", step[1])
        elif kind == "tick":
            rig.tick(step[1])
        elif kind in ("ack", "clear"):
            emitted += rig.drain()[0]
            active = [e for e in emitted if e["state"] == "raised"]
            assert active, "nothing to acknowledge"
            event = {k: v for k, v in active[-1].items() if k != "_key"}
            rig.external(event, "acknowledged" if kind == "ack" else "cleared")
            if kind == "clear":
                emitted.append({**event, "state": "cleared", "_key": "d1", "_external": True})
            if kind == "ack":
                assert rig.engine.active_alarms()[0]["state"] == "acknowledged"
        elif kind == "rules":
            rig.catalog = _catalog(step[1])
        elif kind == "restart":
            emitted += rig.drain()[0]
            rig.restart()
        emitted += rig.drain()[0]
    emitted += rig.drain()[0]
    got = [(e["rule"], e["state"], e["value"]) for e in emitted if not e.get("_external")]
    assert [(r, s) for r, s, _ in got] == [(r, s) for r, s, _ in expected], got
    for (_, _, value), (_, _, want) in zip(got, expected):
        if want is not None:
            assert value == pytest.approx(want), got
    # lifecycle invariants: keyed by device id, a cleared event carries the id of the alarm it clears, at most one
    # active alarm per device and rule
    active: dict[str, str] = {}
    for e in emitted:
        assert e["_key"] == "d1" and e["device"] == "d1" and e["tenant"] == "1"
        if e["state"] == "raised":
            assert e["rule"] not in active, f"second active alarm for {e['rule']}"
            active[e["rule"]] = e["alarm_id"]
        elif e["state"] == "cleared":
            assert active.pop(e["rule"]) == e["alarm_id"]


def _catalog(rules):
    from cloud.alarms.catalog import build_catalog
    from cloud.alarms.rules import validate_rule

    return build_catalog({"d1": 1, "d2": 1}, [{"tenant_id": 1, "device_id": r.get("device_id"),
                                               **validate_rule({k: v for k, v in r.items() if k != "device_id"})}
                                              for r in rules])


def test_manual_clear_then_ack_of_old_alarm_is_ignored(memory_rig):
    rig = memory_rig([HOT])
    rig.send("d1", 0, t=35)
    first = rig.drain()[0][0]
    rig.external(first, "cleared")
    rig.send("d1", 10, t=36)
    second = rig.drain()[0][0]
    assert second["state"] == "raised" and second["alarm_id"] != first["alarm_id"]
    rig.external(first, "acknowledged")  # an ack for the old alarm must not touch the new one
    assert rig.engine.active_alarms()[0]["state"] == "raised"


def test_device_override_and_severity(memory_rig):
    rig = memory_rig([HOT, {**HOT, "device_id": "d2", "max": 40, "severity": "minor"},
                      {"name": "cold", "min": 0, "device_id": "d2", "enabled": False}])
    rig.send("d1", 0, t=35)
    rig.send("d2", 0, t=35)
    rig.send("d2", 10, t=41)
    events = rig.drain()[0]
    assert sorted((e["device"], e["severity"], e["threshold"]) for e in events) == [("d1", "critical", 30.0),
                                                                               ("d2", "minor", 40.0)]


def test_unknown_device_is_ignored(memory_rig):
    rig = memory_rig([HOT])
    rig.send("stranger", 0, t=80)
    assert rig.drain() == ([], [])
    assert rig.engine.device_state("stranger") is None


def test_commands_on_raise_and_clear(memory_rig):
    rig = memory_rig([{**HOT, "on_raise": {"op": "led", "args": {"state": "on"}},
                       "on_clear": {"op": "led", "args": {"state": "off"}}}])
    rig.send("d1", 0, t=35)
    rig.send("d1", 10, t=20)
    events, commands = rig.drain()
    assert [e["state"] for e in events] == ["raised", "cleared"]
    assert [(c["_key"], c["op"], c["args"]) for c in commands] == [("d1", "led", {"state": "on"}),
                                                                   ("d1", "led", {"state": "off"})]
    assert len({c["cid"] for c in commands}) == 2 and all(c["exp"] > 0 for c in commands)


def test_crash_after_snapshot_before_commit_replays_without_duplicates(memory_rig):
    rig = memory_rig([HOT])
    rig.io.commit = lambda offsets, asynchronous=False: None  # the process dies after every snapshot, before any commit
    rig.send("d1", 0, t=25)
    rig.send("d1", (time.time() * 1000 - rig.base) / 1000 + 1, t=35)  # the device clock is right again
    assert [e["state"] for e in rig.drain()[0]] == ["raised"]
    rig.restart()  # the new instance replays the whole input from offset 0 against the restored state
    rig.send("d1", 20, t=36)
    assert rig.drain()[0] == []
    assert rig.engine.counts["duplicates"] == 2 and rig.engine.counts["restored"] == 1


def test_future_device_clock_does_not_block_later_readings(memory_rig):
    rig = memory_rig([HOT])
    rig.send("d1", 10 * 86_400, t=20)  # a clock 10 days ahead: backbone time is used instead
    rig.send("d1", (time.time() * 1000 - rig.base) / 1000 + 1, t=35)  # the device clock is right again
    assert [e["state"] for e in rig.drain()[0]] == ["raised"]


def test_events_are_alarm_events_of_the_schema(memory_rig):
    """The engine writes its events itself (orjson, no dataclass round trip): cloud.schema must read every one
    back as the same AlarmEvent, with no field missing or extra."""
    import dataclasses
    import json

    from cloud.schema import VERSION, AlarmEvent, parse_alarm_event

    rig = memory_rig([HOT, {"name": "heating", "kind": "rate", "metric": "t", "rate_per_min": 2}])
    for i, t in enumerate((20, 20, 20, 20, 35, 36, 20, 20)):
        rig.send("d1", i * 20, t=t)
    raw = [r for r in rig.out.poll_batch(1000, 0) if r.topic == rig.topics.alarms]
    assert {(json.loads(r.value)["rule"], json.loads(r.value)["state"]) for r in raw} == \
        {("hot", "raised"), ("hot", "cleared"), ("heating", "raised"), ("heating", "cleared")}
    for r in raw:
        data = json.loads(r.value)
        event = parse_alarm_event(r.value)
        assert data == {"v": VERSION, **dataclasses.asdict(event)}
        assert set(data) == {"v"} | {f.name for f in dataclasses.fields(AlarmEvent)}


def _unpumped(rig, device: str, at_s: float, t: float) -> None:
    """A reading processed by the engine without the rig's synchronous checkpoint."""
    from tests.alarms.conftest import reading

    seq = rig.seq[device] = rig.seq.get(device, 0) + 1
    rig.producer.produce(rig.topics.telemetry, device, reading(device, seq, at_s, t=t))
    rig.engine.process(rig.io.poll(1000, 0))


def test_pipelined_checkpoint_commits_only_after_every_record_is_delivered(memory_rig, monkeypatch):
    from cloud.alarms import engine as engine_mod

    monkeypatch.setattr(engine_mod, "SNAPSHOT_CHUNK", 1)  # one snapshot per loop iteration
    rig = memory_rig([HOT])
    commits: list[dict] = []
    real_commit = rig.io.commit
    rig.io.commit = lambda offsets, asynchronous=False: (commits.append(dict(offsets)),
                                                         real_commit(offsets, asynchronous))
    changelog = rig.bus.consumer("changelog-reader", ["alarms-state"])
    _unpumped(rig, "d1", 0, 35)  # raises: an event waits for its delivery report
    _unpumped(rig, "d2", 0, 20)
    rig.engine.maybe_checkpoint()  # offsets set aside, the first of two snapshots produced
    assert rig.engine.dirty == {} and len(changelog.poll_batch(10, 0)) == 1
    rig.io.serve()
    rig.engine.maybe_checkpoint()  # the second snapshot: only now does the epoch close
    assert commits == [] and len(changelog.poll_batch(10, 0)) == 1
    rig.engine.maybe_checkpoint()  # nothing delivered yet (the reports are served by io.serve)
    assert commits == []
    _unpumped(rig, "d1", 10, 36)  # input read meanwhile is not part of this checkpoint
    rig.io.serve()
    rig.engine.maybe_checkpoint()
    assert len(commits) == 1
    # d1's and d2's reading (one partition or two), not the one read after the checkpoint started
    assert sum(o for (topic, _p), o in commits[0].items() if topic == rig.topics.telemetry) == 2
    d1 = (rig.topics.telemetry, next(p for p, part in rig.engine.parts.items() if "d1" in part))
    rig.engine.checkpoint()  # the synchronous one (revoke, stop) commits the rest
    assert len(commits) == 2 and commits[1][d1] == commits[0][d1] + 1


def test_failed_delivery_is_never_committed(memory_rig):
    from cloud.bus import BusError

    rig = memory_rig([HOT])
    commits: list[dict] = []
    rig.io.commit = lambda offsets, asynchronous=False: commits.append(dict(offsets))
    real_produce = rig.io.produce

    def broker_loses_snapshots(topic, key, value, headers=None, partition=None, on_delivery=None):
        if topic == "alarms-state" and on_delivery is not None:
            report = on_delivery
            on_delivery = lambda _err, record: report(BusError("not enough replicas"), record)  # noqa: E731
        real_produce(topic, key, value, headers, partition, on_delivery)

    rig.io.produce = broker_loses_snapshots
    _unpumped(rig, "d1", 0, 35)
    rig.engine.maybe_checkpoint()
    rig.io.serve()
    with pytest.raises(RuntimeError, match="not committed"):
        rig.engine.maybe_checkpoint()
    with pytest.raises(RuntimeError, match="not committed"):
        rig.engine.checkpoint()
    assert commits == []


def test_records_of_a_partition_given_away_during_the_poll_are_not_processed(memory_rig):
    """A rebalance can run inside the consumer's poll, after some records of a revoked partition were fetched: the
    engine must not build state or raise alarms for them (the partition's new owner reads them again)."""
    from tests.alarms.conftest import reading

    rig = memory_rig([HOT])
    rig.send("d1", 0, t=25)
    p = next(p for p, part in rig.engine.parts.items() if "d1" in part)
    rig.producer.produce(rig.topics.telemetry, "d1", reading("d1", 2, 10, t=35))
    records = rig.io.poll(100, 0)
    assert [r[1] for r in records] == [p]
    rig.engine.revoke({p})  # what the rebalance callback does
    rig.engine.process(records)
    assert rig.engine.device_state("d1") is None and rig.drain() == ([], [])
    assert (rig.topics.telemetry, p) not in rig.engine.offsets
    rig.engine.assign({p})  # back again: the kept state is exact, the record is read again and raises once
    rig.engine.process(records)
    assert [e["state"] for e in rig.drain()[0]] == ["raised"]
