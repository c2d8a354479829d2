"""The data layer on SQLite and PostgreSQL: tenant isolation, validation, credentials, commands, history."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cloud import db, schema
from cloud.db import repo
from cloud.db.models import Telemetry
from cloud.passwords import verify_password

from .helpers import provision


@pytest.fixture
def engine(any_url, engine_at):
    return engine_at(any_url)


@pytest.fixture
def session(engine):
    with db.session_factory(engine)() as s:
        yield s


def _add_readings(session, tenant_id, device, start, n, step_s=60):
    from cloud.db.maintenance import create_partitions

    create_partitions(session.get_bind(), {(start + timedelta(seconds=i * step_s)).date() for i in range(n)})
    for i in range(n):
        session.add(Telemetry(device_id=device, boot=1, seq=i, tenant_id=tenant_id, ts=start + timedelta(seconds=i * step_s),
                              received_at=start, t=20.0 + i, h=50.0, p=1000.0))
    session.commit()


def test_tenant_isolation(engine, session):
    ids = provision(engine, {"A": ["a-1", "a-2"], "B": ["b-1"]})
    a, b = ids["A"], ids["B"]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    _add_readings(session, a, "a-1", now - timedelta(minutes=30), 5)
    _add_readings(session, b, "b-1", now - timedelta(minutes=30), 5)
    cmd_b = repo.create_command(session, b, "b-1", schema.new_command("ping"), "x@b")
    rule_b = repo.create_rule(session, b, name="hot", max=30)
    tok_b, _ = repo.create_api_token(session, b, "ci")
    session.commit()

    # A sees its own devices only, and nothing of B's by id
    devices, total = repo.list_devices(session, a)
    assert {d.id for d in devices} == {"a-1", "a-2"} and total == 2
    assert repo.list_devices(session, a, search="b-")[1] == 0
    assert repo.get_device(session, a, "b-1") is None
    assert repo.latest_readings(session, a, "b-1") == []
    assert repo.history(session, a, "b-1", now - timedelta(hours=1), now)["points"] == []
    assert len(repo.history(session, b, "b-1", now - timedelta(hours=1), now)["points"]) == 5
    assert repo.get_command(session, a, cmd_b.cid) is None
    assert repo.list_commands(session, a) == ([], 0)
    assert repo.get_rule(session, a, rule_b.id) is None
    assert repo.list_rules(session, a) == []
    assert repo.list_api_tokens(session, a) == []
    assert repo.revoke_api_token(session, a, tok_b.id) is None
    with pytest.raises(repo.NotFound):
        repo.update_rule(session, a, rule_b.id, max=10)
    assert repo.delete_rule(session, a, rule_b.id) is False
    with pytest.raises(repo.NotFound):
        repo.create_command(session, a, "b-1", schema.new_command("ping"))
    with pytest.raises(repo.NotFound):
        repo.rotate_device_password(session, a, "b-1")
    with pytest.raises(repo.NotFound):
        repo.revoke_device(session, a, "b-1")
    with pytest.raises(ValueError, match="not found"):
        repo.create_rule(session, a, name="x", max=3, device_id="b-1")  # a rule on another tenant's device
    assert repo.list_alarms(session, a) == ([], 0)
    event = schema.AlarmEvent("al-b", "b-1", str(b), "hot", "t", 31.0, 30.0, "major", "raised", 1_700_000_000_000)
    repo.apply_alarm_event(session, b, event)
    session.commit()
    assert repo.ack_alarm(session, a, "al-b", "x@a") is None
    assert repo.clear_alarm(session, a, "al-b", "x@a") is None
    assert repo.list_alarms(session, b)[1] == 1
    assert repo.device_tenant_map(session) == {"a-1": a, "a-2": a, "b-1": b}


def test_users_and_tokens(engine, session):
    a = provision(engine, {"A": []})["A"]
    user = repo.create_user(session, a, "Ann@Example.com", "correct horse", "admin")
    session.commit()
    assert repo.authenticate(session, "ann@example.com", "correct horse").id == user.id
    assert repo.authenticate(session, "ann@example.com", "wrong") is None
    assert repo.authenticate(session, "nobody@example.com", "x") is None
    assert user.password_hash.startswith("scrypt$")
    with pytest.raises(ValueError, match="already exists"):
        repo.create_user(session, a, "ann@example.com", "another pass", "viewer")
    with pytest.raises(ValueError, match="role"):
        repo.create_user(session, a, "bob@example.com", "password1", "root")
    tok, secret = repo.create_api_token(session, a, "ci", "operator")
    session.commit()
    assert tok.token_hash != secret and len(tok.token_hash) == 64
    assert repo.authenticate_token(session, secret).id == tok.id
    repo.revoke_api_token(session, a, tok.id)
    session.commit()
    assert repo.authenticate_token(session, secret) is None


def test_device_credentials(engine, session):
    a = provision(engine, {"A": []})["A"]
    device, password = repo.create_device(session, a, "dev-7", "Kitchen")
    session.commit()
    assert verify_password(password, device.password_hash) and device.password_hash.startswith("$7$")
    assert repo.verify_device_password(session, "dev-7", password)
    assert "dev-7:$7$" in repo.mosquitto_password_file(session)
    new = repo.rotate_device_password(session, a, "dev-7")
    session.commit()
    assert not repo.verify_device_password(session, "dev-7", password)
    assert repo.verify_device_password(session, "dev-7", new)
    repo.revoke_device(session, a, "dev-7")
    session.commit()
    assert not repo.verify_device_password(session, "dev-7", new)
    assert "dev-7" not in repo.mosquitto_password_file(session)
    with pytest.raises(ValueError, match="already taken"):
        repo.create_device(session, a, "dev-7")
    with pytest.raises(ValueError, match="device id"):
        repo.create_device(session, a, "bad/id")


def test_rule_validation(engine, session):
    a = provision(engine, {"A": ["d1"]})["A"]
    cases = [
        ({"name": "r", "min": 30, "max": 10}, "min 30 must be below max 10"),
        ({"name": "r", "metric": "co2", "max": 10}, "unknown metric 'co2'"),
        ({"name": "r", "max": 10, "duration_s": -5}, "duration_s must not be negative"),
        ({"name": "r"}, "needs min, max or both"),
        ({"name": "r", "max": 500}, "outside the sensor range"),
        ({"name": "r", "max": 10, "severity": "huge"}, "severity"),
        ({"name": "r", "max": 10, "on_raise": {"op": "explode"}}, "on_raise: unknown op"),
        ({"name": "r", "kind": "nodata"}, "needs nodata_s above 0"),
        ({"name": "", "max": 10}, "name"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            repo.create_rule(session, a, **fields)
    rule = repo.create_rule(session, a, name="hot", metric="t", max=30, hysteresis=0.5, duration_s=60,
                            on_raise={"op": "led", "args": {"state": "on"}})
    override = repo.create_rule(session, a, name="hot", metric="t", max=35, device_id="d1")
    session.commit()
    with pytest.raises(ValueError, match="already exists"):
        repo.create_rule(session, a, name="hot", max=31)
    assert [r.id for r in repo.list_rules(session, a, device_id="d1")] == [rule.id, override.id]
    with pytest.raises(ValueError, match="must be below max"):
        repo.update_rule(session, a, rule.id, min=40)
    assert repo.update_rule(session, a, rule.id, min=5).min == 5


def test_commands_move_forward_only(engine, session):
    a = provision(engine, {"A": ["d1"]})["A"]
    row = repo.create_command(session, a, "d1", schema.new_command("set_interval", {"s": 10}), "ann")
    session.commit()
    assert row.status == "queued" and row.expires_at is not None
    assert repo.advance_command(row, "delivered", ok=True, result={"s": 10})
    assert repo.advance_command(row, "sent")  # late "sent" records sent_at only
    assert row.status == "delivered" and row.sent_at is not None and row.ok is True
    assert not repo.advance_command(row, "expired")
    with pytest.raises(ValueError, match="args.s|'s'"):
        repo.create_command(session, a, "d1", schema.Command("c2", "set_interval", {"s": 0}, None))


def test_history_resolution(engine, session):
    a = provision(engine, {"A": ["d1"]})["A"]
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    _add_readings(session, a, "d1", now - timedelta(hours=2), 120)
    from cloud.db.maintenance import refresh_rollups

    refresh_rollups(engine, now - timedelta(hours=3), now + timedelta(minutes=1))
    raw = repo.history(session, a, "d1", now - timedelta(hours=2), now)
    assert raw["resolution"] == "raw" and len(raw["points"]) == 120
    minute = repo.history(session, a, "d1", now - timedelta(days=1), now)
    assert minute["resolution"] == "1m" and minute["bucket_s"] == 60 and len(minute["points"]) == 120
    assert minute["points"][0]["t"] == pytest.approx(20.0) and minute["points"][0]["ts"].tzinfo is not None
    hour = repo.history(session, a, "d1", now - timedelta(days=10), now)
    assert hour["resolution"] == "1h" and sum(p["n"] for p in hour["points"]) == 120
    first = hour["points"][0]
    assert first["t_min"] <= first["t"] <= first["t_max"]
    latest = repo.latest_readings(session, a, "d1", 3)
    assert [r.seq for r in latest] == [119, 118, 117]


def test_latest_readings_across_partitions(engine, session):
    """PostgreSQL asks the partitions from yesterday on first and reads further back only when it needs more
    rows: the answer is the same newest-first list either way, on both databases."""
    a = provision(engine, {"A": ["d1", "d2"]})["A"]
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    _add_readings(session, a, "d1", now - timedelta(days=4), 100, step_s=3600)  # 4 days back up to now + 3 h
    _add_readings(session, a, "d2", now - timedelta(days=5), 3, step_s=3600)  # only readings before the bound
    expected = sorted(range(100), key=lambda i: -i)
    for limit in (1, 10, 30, 60, 99, 100, 500):  # within the newest partitions, across the bound, everything
        got = repo.latest_readings(session, a, "d1", limit)
        assert [r.seq for r in got] == expected[:limit], limit
        assert all(r.ts.tzinfo is not None and r.tenant_id == a for r in got)
    assert [r.seq for r in repo.latest_readings(session, a, "d2", 10)] == [2, 1, 0]
    assert repo.latest_readings(session, a, "nope", 10) == []


def test_latest_readings_inside_and_outside_a_transaction(engine, session):
    """A read that opens the session's first transaction runs on its own (no BEGIN/ROLLBACK round trips) and
    leaves the connection as it found it; inside an open transaction it sees that transaction's rows."""
    a = provision(engine, {"A": ["d1"]})["A"]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    _add_readings(session, a, "d1", now - timedelta(minutes=10), 3)
    assert [r.seq for r in repo.latest_readings(session, a, "d1", 5)] == [2, 1, 0]
    postgres = engine.dialect.name == "postgresql"
    if postgres:
        from psycopg.pq import TransactionStatus

        driver = session.connection().connection.driver_connection
        assert driver.autocommit is False and driver.info.transaction_status == TransactionStatus.IDLE
    session.add(Telemetry(device_id="d1", boot=2, seq=0, tenant_id=a, ts=now, received_at=now, t=1.0))
    session.flush()  # uncommitted: only this transaction sees it
    assert [(r.boot, r.seq) for r in repo.latest_readings(session, a, "d1", 2)] == [(2, 0), (1, 2)]
    session.rollback()
    assert [(r.boot, r.seq) for r in repo.latest_readings(session, a, "d1", 2)] == [(1, 2), (1, 1)]
    points = repo.history(session, a, "d1", now - timedelta(hours=1), now, "raw")["points"]
    assert [p["seq"] for p in points] == [0, 1, 2]
    if postgres:
        assert session.connection().connection.driver_connection.autocommit is False
    session.commit()  # nothing open: a no-op, not an error


def test_rollup_tables_vacuumed_for_inserts(pg_url, engine_at):
    """Roll-up history is an index-only scan, index-only only where the visibility map says so: both roll-up
    tables are vacuumed after a fixed number of new rows (migration 0005), not after 20 % growth."""
    engine = engine_at(pg_url)

    def options() -> dict[str, dict[str, str]]:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT relname, reloptions FROM pg_class "
                                        "WHERE relname IN ('telemetry_1m', 'telemetry_1h')").all()
        return {name: dict(o.split("=", 1) for o in opts or []) for name, opts in rows}

    found = options()
    assert found["telemetry_1m"]["autovacuum_vacuum_insert_threshold"] == "20000"
    assert found["telemetry_1h"]["autovacuum_vacuum_insert_threshold"] == "10000"
    assert all(found[t]["autovacuum_vacuum_insert_scale_factor"] == "0" for t in found)
    assert all(found[t]["autovacuum_vacuum_scale_factor"] == "0.02" for t in found)  # migration 0002's, kept
    db.downgrade(pg_url, "0004")
    assert all("autovacuum_vacuum_insert_threshold" not in o for o in options().values())
    db.upgrade(pg_url)
    assert options() == found
