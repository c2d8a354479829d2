"""repo.apply_alarm_events (one statement per batch on PostgreSQL) against apply_alarm_event, event by event:
random event orders, duplicates, out-of-order times, alarms that exist before the batch, events of another
tenant, random batch cuts -- the stored alarms must be the same."""

from __future__ import annotations

import dataclasses
import random

import pytest

from cloud import db, schema
from cloud.db import repo
from cloud.db.models import Alarm

from .helpers import provision

COLUMNS = ("tenant_id", "device_id", "rule", "metric", "severity", "state", "value", "threshold", "raised_at",
           "acknowledged_at", "cleared_at")


@pytest.fixture
def engine(any_url, engine_at):
    return engine_at(any_url)


def _random_events(rnd: random.Random, tenants: list[int], n: int) -> list[tuple[int, str, schema.AlarmEvent]]:
    """(tenant, alarm key, event) with the alarm key to be prefixed per path; mostly the first tenant."""
    out = []
    for _ in range(n):
        key = f"al-{rnd.randrange(4)}"
        tenant = tenants[0] if rnd.random() < 0.85 else tenants[1]
        state = rnd.choice(("raised", "raised", "acknowledged", "cleared"))
        value = None if rnd.random() < 0.2 else round(rnd.uniform(20, 40), 1)
        event = schema.AlarmEvent(key, "d-1", str(tenant), "hot", "t", value, 30.0, "major", state,
                                  1_700_000_000_000 + rnd.randrange(0, 10) * 1000)
        out.append((tenant, key, event))
    return out


def _as(prefix: str, event: schema.AlarmEvent) -> schema.AlarmEvent:
    return dataclasses.replace(event, alarm_id=f"{prefix}-{event.alarm_id}")


def _stored(session, prefix: str) -> dict[str, tuple]:
    rows = session.query(Alarm).filter(Alarm.id.like(f"{prefix}-%")).all()
    return {row.id.split("-", 1)[1]: tuple(getattr(row, c) for c in COLUMNS) for row in rows}


def _apply_alone(factory, apply, tenant: int, event: schema.AlarmEvent) -> bool:
    """One event in a transaction of its own; False if it was refused (another tenant's alarm)."""
    with factory() as s:
        try:
            apply(s, tenant, event)
            s.commit()
            return True
        except ValueError:
            s.rollback()
            return False


def test_batched_alarm_events_store_what_one_by_one_stores(engine):
    tenants = list(provision(engine, {"A": ["d-1"], "B": ["d-2"]}).values())
    factory = db.session_factory(engine)
    rnd = random.Random(20261204)
    for trial in range(60):
        before = _random_events(rnd, tenants, rnd.randrange(0, 4))  # alarms that exist before the batches
        events = _random_events(rnd, tenants, rnd.randrange(1, 14))
        cuts = sorted(rnd.sample(range(1, len(events)), rnd.randrange(0, min(3, len(events) - 1) + 1))
                      if len(events) > 1 else [])
        batches = [events[i:j] for i, j in zip([0, *cuts], [*cuts, len(events)])]
        ref, bat = f"r{trial}", f"b{trial}"
        for tenant, _, event in before:  # the same alarms exist on both sides before the batches
            for prefix in (ref, bat):
                _apply_alone(factory, repo.apply_alarm_event, tenant, _as(prefix, event))
        refused_ref = sum(not _apply_alone(factory, repo.apply_alarm_event, tenant, _as(ref, event))
                          for batch in batches for tenant, _, event in batch)
        refused_bat = 0
        for batch in batches:  # a refused batch is retried event by event, as the writer isolates it
            with factory() as s:
                try:
                    repo.apply_alarm_events(s, [(tenant, _as(bat, event)) for tenant, _, event in batch])
                    s.commit()
                    continue
                except ValueError:
                    s.rollback()
            refused_bat += sum(not _apply_alone(factory, lambda s, t, e: repo.apply_alarm_events(s, [(t, e)]),
                                                tenant, _as(bat, event)) for tenant, _, event in batch)
        with factory() as s:
            assert _stored(s, bat) == _stored(s, ref), (trial, before, batches)
        assert refused_bat == refused_ref, trial


def test_an_alarm_storm_is_stored_in_one_go(engine):
    tenant = provision(engine, {"A": [f"d-{i}" for i in range(3)]})["A"]
    factory = db.session_factory(engine)
    raised = [(tenant, schema.AlarmEvent(f"storm-{i}", f"d-{i % 3}", str(tenant), "hot", "t", 31.0 + i, 30.0,
                                         "major", "raised", 1_700_000_000_000 + i)) for i in range(2000)]
    with factory() as s:
        repo.apply_alarm_events(s, raised)
        s.commit()
    cleared = [(tenant, dataclasses.replace(e, value=None, state="cleared", ts=e.ts + 5000)) for _, e in raised[::2]]
    with factory() as s:
        repo.apply_alarm_events(s, cleared)
        s.commit()
    with factory() as s:
        rows = s.query(Alarm).filter(Alarm.id.like("storm-%")).all()
    assert len(rows) == 2000
    by_id = {row.id: row for row in rows}
    for i in range(2000):
        row = by_id[f"storm-{i}"]
        assert row.state == ("cleared" if i % 2 == 0 else "raised"), i
        assert row.value == 31.0 + i and row.tenant_id == tenant
        assert (row.cleared_at is not None) == (i % 2 == 0)
