"""REST API: authentication, input validation, tenant isolation on every route, commands onto the bus."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid

import pytest
from sqlalchemy import select

from cloud.db import repo
from cloud import db
from cloud.db.models import User
from tests.web.conftest import login

API_ROUTES_WITH_IDS = [
    # (method, path template, json body) -- {d} another tenant's device, {c} command, {a} alarm, {r} rule, {t} token
    ("GET", "/api/v1/devices/{d}", None),
    ("GET", "/api/v1/devices/{d}/latest", None),
    ("PATCH", "/api/v1/devices/{d}", {"name": "stolen"}),
    ("GET", "/api/v1/devices/{d}/history?range=1h", None),
    ("GET", "/api/v1/devices/{d}/readings", None),
    ("GET", "/api/v1/devices/{d}/commands", None),
    ("POST", "/api/v1/devices/{d}/commands", {"op": "ping", "args": {}}),
    ("POST", "/api/v1/devices/{d}/rotate", None),
    ("POST", "/api/v1/devices/{d}/revoke", None),
    ("GET", "/api/v1/commands/{c}", None),
    ("GET", "/api/v1/alarms/{a}", None),
    ("POST", "/api/v1/alarms/{a}/ack", None),
    ("POST", "/api/v1/alarms/{a}/clear", None),
    ("GET", "/api/v1/rules/{r}", None),
    ("PUT", "/api/v1/rules/{r}", {"max": 40}),
    ("PATCH", "/api/v1/rules/{r}", {"max": 40}),
    ("DELETE", "/api/v1/rules/{r}", None),
    ("DELETE", "/api/v1/tokens/{t}", None),
    ("PATCH", "/api/v1/users/{u}", {"role": "viewer", "password": "stolen password"}),
    ("DELETE", "/api/v1/users/{u}", None),
    ("DELETE", "/api/v1/webhooks/{w}", None),
    ("POST", "/api/v1/webhooks/{w}/test", None),
    ("GET", "/api/v1/rules?device={d}", None),
    ("POST", "/api/v1/rules", {"name": "x", "device": "{d}", "metric": "t", "max": 30}),
]


@pytest.fixture(scope="module")
def b_objects(world):
    """Objects owned by tenant B: a command, an alarm, a rule, a token, its admin user."""
    c = world.client()
    dev = world.b.devices[0]
    r = c.post(f"/api/v1/devices/{dev}/commands", json={"op": "ping"}, headers=world.b.auth("operator"))
    assert r.status_code == 202, r.json
    rule = c.post("/api/v1/rules", json={"name": "b-hot", "device": dev, "metric": "t", "max": 30},
                  headers=world.b.auth("operator")).json
    alarm_id = insert_alarm(world, world.b.id, dev)
    with db.session_factory(world.backend.engine)() as s:
        tok, _ = repo.create_api_token(s, world.b.id, "b-extra", "viewer")
        s.commit()
        token_id = tok.id
        user_id = s.scalar(select(User.id).where(User.email == world.b.users["admin"]))
        hook, _ = repo.create_webhook(s, world.b.id, "b-hook", "https://b.example/hook")
        s.commit()
        hook_id = hook.id
    return {"d": dev, "c": r.json["cid"], "a": alarm_id, "r": rule["id"], "t": token_id, "u": user_id, "w": hook_id}


def insert_alarm(world, tenant_id: int, device_id: str) -> str:
    from cloud.db.models import Alarm, utcnow
    alarm_id = "al-" + uuid.uuid4().hex[:10]
    with db.session_factory(world.backend.engine)() as s:
        s.add(Alarm(id=alarm_id, tenant_id=tenant_id, device_id=device_id, rule="hot", metric="t",
                    severity="major", state="raised", value=31.0, threshold=30.0, raised_at=utcnow()))
        s.commit()
    return alarm_id


def fill(template, objects):
    if isinstance(template, str):
        return template.format(**objects)
    if isinstance(template, dict):
        return {k: fill(v, objects) for k, v in template.items()}
    return template


def test_auth_required_everywhere(world):
    c = world.client()
    paths = [r.rule for r in world.app.url_map.iter_rules() if r.rule.startswith("/api/v1")]
    assert len(paths) > 15
    for rule in world.app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1") or rule.rule.endswith("openapi.json"):
            continue
        path = re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?([^>]+)>", lambda m: "1" if "int" in m.group(0) else "x", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            r = c.open(path, method=method, json={} if method != "GET" else None)
            # no session: writes fail on CSRF (403) or auth (401), reads on auth (401); never 2xx
            assert r.status_code in (401, 403), (method, path, r.status_code)
            assert "error" in r.json
    r = c.get("/api/v1/devices", headers={"Authorization": "Bearer nonsense"})
    assert r.status_code == 401 and "token" in r.json["error"]


def test_list_devices_and_pagination(world):
    c = world.client()
    r = c.get("/api/v1/devices?sort=-name&limit=1", headers=world.a.auth("viewer"))
    assert r.status_code == 200
    assert r.json["total"] == 2 and len(r.json["items"]) == 1 and r.json["limit"] == 1
    ids = {d["id"] for d in c.get("/api/v1/devices", headers=world.a.auth("viewer")).json["items"]}
    assert ids == set(world.a.devices)
    r = c.get("/api/v1/devices?search=cold", headers=world.a.auth("viewer"))
    assert [d["name"] for d in r.json["items"]] == ["Cold room"]
    for bad in ("limit=0", "limit=501", "limit=x", "offset=-1", "sort=password"):
        r = c.get("/api/v1/devices?" + bad, headers=world.a.auth("viewer"))
        assert r.status_code == 400 and r.json["error"], bad


def test_latest_from_cache_and_db(world):
    c = world.client()
    dev = world.a.devices[0]
    world.cache.update(world.a.id, dev, {"t": 21.5, "h": 40.0, "p": 1001.2, "rssi": -60, "ts": 1_700_000_000_000,
                                         "seq": 7, "boot": 3})
    r = c.get(f"/api/v1/devices/{dev}/latest", headers=world.a.auth("viewer"))
    assert r.status_code == 200
    assert r.json["device"] == dev and r.json["t"] == 21.5 and r.json["seq"] == 7 and r.json["ts"] == 1_700_000_000_000
    assert set(r.json) >= {"device", "t", "h", "p", "rssi", "ts", "seq", "boot", "status", "last_seen"}
    # no cache entry: from the database
    from cloud.db.models import Telemetry, utcnow
    dev2 = world.a.devices[1]
    with db.session_factory(world.backend.engine)() as s:
        s.add(Telemetry(device_id=dev2, boot=1, seq=1, tenant_id=world.a.id, ts=utcnow(), t=19.0, h=50.0,
                        p=990.0, rssi=-70))
        s.commit()
    r = c.get(f"/api/v1/devices/{dev2}/latest", headers=world.a.auth("viewer"))
    assert r.status_code == 200 and r.json["t"] == 19.0 and r.json["seq"] == 1
    r = c.get(f"/api/v1/devices/{dev2}/readings", headers=world.a.auth("viewer"))
    assert r.json["items"][0]["t"] == 19.0
    r = c.get(f"/api/v1/devices/{dev2}/history?range=1h", headers=world.a.auth("viewer"))
    assert r.status_code == 200 and r.json["points"][0]["t"] == 19.0 and isinstance(r.json["points"][0]["ts"], int)
    for bad in ("range=2y", "start=yesterday", "start=2030-01-01T00:00:00Z&end=2029-01-01T00:00:00Z",
                "format=xml"):
        assert c.get(f"/api/v1/devices/{dev2}/history?{bad}", headers=world.a.auth("viewer")).status_code == 400
    r = c.get("/api/v1/devices/does-not-exist/latest", headers=world.a.auth("viewer"))
    assert r.status_code == 404 and "not found" in r.json["error"]


def test_command_is_stored_and_produced(world):
    c = world.client()
    dev = world.a.devices[0]
    r = c.post(f"/api/v1/devices/{dev}/commands", json={"op": "set_interval", "args": {"s": 30}, "ttl_s": 120},
               headers=world.a.auth("operator"))
    assert r.status_code == 202, r.json
    cid = r.json["cid"]
    assert r.json["status"] == "queued"
    consumer = world.bus.consumer("test-" + uuid.uuid4().hex, [world.settings.topics.control])
    records = [rec for rec in consumer.poll_batch(timeout=0.5) if json.loads(rec.value)["cid"] == cid]
    consumer.close()
    assert len(records) == 1
    assert records[0].key == dev
    msg = json.loads(records[0].value)
    assert msg["op"] == "set_interval" and msg["args"] == {"s": 30} and msg["v"] == 1 and msg["exp"] > 0
    r = c.get(f"/api/v1/commands/{cid}", headers=world.a.auth("viewer"))
    assert r.status_code == 200
    assert r.json["cid"] == cid and r.json["device"] == dev and r.json["status"] == "queued"
    assert r.json["created_by"] == "token:operator-token" and "created_at" in r.json and "result" in r.json
    listed = c.get(f"/api/v1/devices/{dev}/commands", headers=world.a.auth("viewer")).json
    assert cid in [x["cid"] for x in listed["items"]]


@pytest.mark.parametrize("body, message", [
    ({"op": "dance"}, "unknown op"),
    ({"op": "led", "args": {"state": "purple"}}, "led"),
    ({"op": "set_interval", "args": {"s": 0}}, "'s'"),
    ({"op": "ping", "args": []}, "args"),
    ({"op": "ping", "ttl_s": 0}, "ttl_s"),
    ({"op": 5}, "op"),
    ({}, "op"),
])
def test_command_bad_input(world, body, message):
    r = world.client().post(f"/api/v1/devices/{world.a.devices[0]}/commands", json=body,
                            headers=world.a.auth("operator"))
    assert r.status_code == 400 and message in r.json["error"], r.json


def test_command_non_json_body(world):
    r = world.client().post(f"/api/v1/devices/{world.a.devices[0]}/commands", data="op=ping",
                            headers=world.a.auth("operator"))
    assert r.status_code == 400 and "JSON" in r.json["error"]


def test_roles(world):
    c = world.client()
    dev = world.a.devices[0]
    r = c.post(f"/api/v1/devices/{dev}/commands", json={"op": "ping"}, headers=world.a.auth("viewer"))
    assert r.status_code == 403 and "operator" in r.json["error"]
    r = c.post("/api/v1/rules", json={"name": "v", "metric": "t", "max": 30}, headers=world.a.auth("viewer"))
    assert r.status_code == 403
    r = c.post("/api/v1/tokens", json={"name": "x"}, headers=world.a.auth("operator"))
    assert r.status_code == 403
    r = c.post("/api/v1/devices", json={"id": "x-1"}, headers=world.a.auth("operator"))
    assert r.status_code == 403


def test_tokens_admin(world):
    c = world.client()
    r = c.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}, headers=world.a.auth("admin"))
    assert r.status_code == 201 and r.json["token"]
    token, token_id = r.json["token"], r.json["id"]
    me = c.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json
    assert me["role"] == "operator" and me["tenant_id"] == world.a.id
    assert c.post("/api/v1/tokens", json={"name": ""}, headers=world.a.auth("admin")).status_code == 400
    assert c.post("/api/v1/tokens", json={"name": "x", "role": "root"}, headers=world.a.auth("admin")).status_code == 400
    assert c.delete(f"/api/v1/tokens/{token_id}", headers=world.a.auth("admin")).json["revoked"] is True
    assert c.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_provision_rotate_revoke(world):
    c = world.client()
    device_id = "prov-" + uuid.uuid4().hex[:8]
    r = c.post("/api/v1/devices", json={"id": device_id, "name": "New"}, headers=world.a.auth("admin"))
    assert r.status_code == 201, r.json
    password = r.json["credentials"]["password"]
    assert password and r.json["config"]["mqtt_password"] == password and r.json["config"]["device_id"] == device_id
    assert c.post("/api/v1/devices", json={"id": device_id}, headers=world.a.auth("admin")).status_code == 409
    assert c.post("/api/v1/devices", json={"id": "bad id!"}, headers=world.a.auth("admin")).status_code == 400
    with db.session_factory(world.backend.engine)() as s:
        assert repo.verify_device_password(s, device_id, password)
    r = c.patch(f"/api/v1/devices/{device_id}", json={"name": "Renamed"}, headers=world.a.auth("admin"))
    assert r.status_code == 200 and r.json["name"] == "Renamed"
    assert c.patch(f"/api/v1/devices/{device_id}", json={"name": ""}, headers=world.a.auth("admin")).status_code == 400
    r = c.post(f"/api/v1/devices/{device_id}/rotate", headers=world.a.auth("admin"))
    new_password = r.json["credentials"]["password"]
    assert new_password != password
    r = c.post(f"/api/v1/devices/{device_id}/revoke", headers=world.a.auth("admin"))
    assert r.json["device"]["revoked"] is True
    r = c.post(f"/api/v1/devices/{device_id}/commands", json={"op": "ping"}, headers=world.a.auth("admin"))
    assert r.status_code == 409


def test_rules_crud_and_validation(world):
    c = world.client()
    h = world.a.auth("operator")
    dev = world.a.devices[0]
    r = c.post("/api/v1/rules", json={"name": "too-hot", "device": dev, "metric": "t", "max": 30}, headers=h)
    assert r.status_code == 201, r.json
    rid = r.json["id"]
    assert c.patch(f"/api/v1/rules/{rid}", json={"max": 35}, headers=h).json["max"] == 35
    r = c.put(f"/api/v1/rules/{rid}", json={"min": 50, "max": 35}, headers=h)
    assert r.status_code == 400 and "min" in r.json["error"]
    assert c.post("/api/v1/rules", json={"name": "x", "metric": "t"}, headers=h).status_code == 400
    assert c.post("/api/v1/rules", json={"name": "x", "metric": "t", "max": 1, "evil": 1}, headers=h).status_code == 400
    items = c.get(f"/api/v1/rules?device={dev}", headers=world.a.auth("viewer")).json["items"]
    assert rid in [x["id"] for x in items]
    assert c.delete(f"/api/v1/rules/{rid}", headers=h).status_code == 204
    assert c.get(f"/api/v1/rules/{rid}", headers=h).status_code == 404


def test_alarms_list_ack_clear(world):
    c = world.client()
    dev = world.a.devices[0]
    alarm_id = insert_alarm(world, world.a.id, dev)
    r = c.get(f"/api/v1/alarms?state=active&device={dev}", headers=world.a.auth("viewer"))
    assert alarm_id in [a["id"] for a in r.json["items"]]
    assert {a["device_name"] for a in r.json["items"]} == {"Cold room"}
    r = c.get(f"/api/v1/alarms/{alarm_id}", headers=world.a.auth("viewer"))
    assert r.status_code == 200 and r.json["id"] == alarm_id and r.json["state"] == "raised"
    assert r.json["device"] == dev and r.json["device_name"] == "Cold room"
    assert c.get("/api/v1/alarms/al-none", headers=world.a.auth("viewer")).status_code == 404
    assert c.get("/api/v1/alarms?state=bogus", headers=world.a.auth("viewer")).status_code == 400
    assert c.post(f"/api/v1/alarms/{alarm_id}/ack", headers=world.a.auth("viewer")).status_code == 403
    r = c.post(f"/api/v1/alarms/{alarm_id}/ack", headers=world.a.auth("operator"))
    assert r.status_code == 200 and r.json["state"] == "acknowledged" and r.json["acknowledged_by"]
    r = c.post(f"/api/v1/alarms/{alarm_id}/clear", headers=world.a.auth("operator"))
    assert r.json["state"] == "cleared"
    consumer = world.bus.consumer("alarm-test-" + uuid.uuid4().hex, [world.settings.topics.alarms])
    events = [json.loads(x.value) for x in consumer.poll_batch(timeout=0.5)]
    consumer.close()
    assert [e["state"] for e in events if e["alarm_id"] == alarm_id] == ["acknowledged", "cleared"]


def test_cross_tenant_every_route(world, b_objects):
    """Tenant A's admin aims at every one of tenant B's objects: always 404, and B's objects are unchanged."""
    c = world.client()
    for method, template, body in API_ROUTES_WITH_IDS:
        path = fill(template, b_objects)
        r = c.open(path, method=method, json=fill(body, b_objects), headers=world.a.auth("admin"))
        assert r.status_code == 404, (method, path, r.status_code, r.json)
        assert "error" in r.json
    # B's objects are intact and visible to B
    hb = world.b.auth("admin")
    assert c.get(f"/api/v1/devices/{b_objects['d']}", headers=hb).json["revoked"] is False
    assert c.get(f"/api/v1/rules/{b_objects['r']}", headers=hb).status_code == 200
    assert c.get(f"/api/v1/commands/{b_objects['c']}", headers=hb).status_code == 200
    assert [w["id"] for w in c.get("/api/v1/webhooks", headers=hb).json["items"]] == [b_objects["w"]]
    users = {u["id"]: u["role"] for u in c.get("/api/v1/users", headers=hb).json["items"]}
    assert users[b_objects["u"]] == "admin"
    login(world.client(), world.b.users["admin"])  # B's admin still signs in with the password it had
    alarms = c.get("/api/v1/alarms", headers=hb).json["items"]
    assert [a["state"] for a in alarms if a["id"] == b_objects["a"]] == ["raised"]
    # and lists never leak
    for path in ("/api/v1/devices", "/api/v1/alarms", "/api/v1/commands", "/api/v1/rules", "/api/v1/tokens",
                 "/api/v1/users", "/api/v1/webhooks"):
        text = c.get(path, headers=world.a.auth("admin")).get_data(as_text=True)
        assert b_objects["d"] not in text and world.b.users["admin"] not in text, path


def test_every_api_route_with_an_id_is_tried_across_tenants(world):
    """API_ROUTES_WITH_IDS (the cross-tenant test above) names every /api/v1 route and method that takes an
    object id: a new route cannot be added without its cross-tenant check."""
    tried = {(m, re.sub(r"\{[a-z]\}", "{}", t.split("?")[0])) for m, t, _ in API_ROUTES_WITH_IDS}
    for rule in world.app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1") or "<" not in rule.rule:
            continue
        path = re.sub(r"<[^>]+>", "{}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (method, path) in tried, (method, rule.rule)


def test_session_auth_needs_csrf_on_writes(world):
    c = world.client()
    csrf = login(c, world.a.users["operator"])
    dev = world.a.devices[0]
    assert c.get("/api/v1/me").json["auth"] == "session"
    r = c.post(f"/api/v1/devices/{dev}/commands", json={"op": "ping"})
    assert r.status_code == 403 and "CSRF" in r.json["error"]
    r = c.post(f"/api/v1/devices/{dev}/commands", json={"op": "ping"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 202


def test_openapi_covers_every_route(world):
    c = world.client()
    spec = c.get("/api/v1/openapi.json").json
    assert spec["openapi"].startswith("3.")
    documented = {(p, m.upper()) for p, item in spec["paths"].items() for m in item}
    for rule in world.app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1"):
            continue
        path = re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, (path, method)
    assert c.get("/docs").status_code == 200


def test_unknown_api_route_is_json(world):
    r = world.client().get("/api/v1/nope", headers=world.a.auth())
    assert r.status_code == 404 and r.json["error"]
    r = world.client().get("/api/v1/rules/99999999999999999999999", headers=world.a.auth())
    assert r.status_code == 404 and r.json["error"]


def test_health_and_metrics(world):
    c = world.client()
    r = c.get("/healthz")
    assert r.status_code == 200 and r.json["ok"] is True
    c.get("/api/v1/me", headers=world.a.auth())
    text = c.get("/metrics").get_data(as_text=True)
    assert "iot_web_requests_total" in text and "iot_web_request_seconds" in text and "iot_web_ws_clients" in text


def test_history_points_are_the_repositorys(world):
    """The web tier reads history with its own query on PostgreSQL (epoch ms and averages computed by the
    database); its points must be exactly what cloud.db.repo.history gives, at every resolution."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import insert

    from cloud.db.models import Telemetry, Telemetry1h, Telemetry1m
    from cloud.web import data

    tid = world.a.id
    factory = db.session_factory(world.backend.engine)
    dev = f"hist-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc).replace(microsecond=123000)
    with factory() as s:
        repo.create_device(s, tid, dev, "history check")
        s.execute(insert(Telemetry), [
            {"device_id": dev, "boot": 7, "seq": i, "tenant_id": tid, "ts": now - timedelta(minutes=i, seconds=i),
             "received_at": now, "t": 20 + i / 3, "h": None if i % 5 == 0 else 40.5 + i, "p": 1000.25 + i,
             "rssi": -60, "up": i, "ts_estimated": False} for i in range(30)])
        for model, unit in ((Telemetry1m, 60), (Telemetry1h, 3600)):
            first = datetime.fromtimestamp(int(now.timestamp()) // unit * unit, timezone.utc)
            s.execute(insert(model), [
                {"device_id": dev, "bucket": first - timedelta(seconds=i * unit), "tenant_id": tid, "n": 3,
                 "t_n": 3, "t_sum": 61.7 + i / 7, "t_min": 20.1, "t_max": 20.9 + i,
                 "h_n": 0 if i % 4 == 0 else 2, "h_sum": None if i % 4 == 0 else 90.1 + i, "h_min": None,
                 "h_max": 45.5, "p_n": 3, "p_sum": 3030.3, "p_min": 1009.9, "p_max": 1010.2} for i in range(50)])
        s.commit()
    for span, bucket in ((timedelta(hours=1), None), (timedelta(hours=24), 60), (timedelta(days=7), 3600)):
        start, end = now - span, now + timedelta(seconds=1)
        with factory() as s:
            mine = data.history(s, tid, dev, start, end)
            theirs = repo.history(s, tid, dev, start, end)
        for p in theirs["points"]:
            p["ts"] = int(p["ts"].timestamp() * 1000)
        assert mine["bucket_s"] == theirs["bucket_s"] == bucket
        assert all(row[0].__class__ is int for row in mine["rows"])  # ts as unix ms, on both databases
        points = data.history_points(mine)
        assert len(points) > 10 and points == theirs["points"]
        assert all(list(p) == list(q) for p, q in zip(points, theirs["points"]))  # same key order
        # and the API serves exactly these points (PostgreSQL: as the query built them)
        window = f"start={int(start.timestamp() * 1000)}&end={int(end.timestamp() * 1000)}"
        r = world.client().get(f"/api/v1/devices/{dev}/history?{window}", headers=world.a.auth("viewer"))
        assert r.status_code == 200 and r.json["bucket_s"] == bucket and r.json["device"] == dev
        assert list(r.json) == ["device", "start", "end", "bucket_s", "points"]
        assert r.json["points"] == theirs["points"]
        assert all(list(p) == list(q) for p, q in zip(r.json["points"], theirs["points"]))  # same key order
        # format=columns: the same values, one array per field in the points' key order
        cols = world.client().get(f"/api/v1/devices/{dev}/history?{window}&format=columns",
                                  headers=world.a.auth("viewer"))
        assert cols.status_code == 200
        assert list(cols.json) == ["device", "start", "end", "bucket_s", "columns"]
        assert {k: cols.json[k] for k in ("device", "start", "end", "bucket_s")} == \
            {k: r.json[k] for k in ("device", "start", "end", "bucket_s")}
        assert list(cols.json["columns"]) == list(theirs["points"][0])
        assert cols.json["columns"] == {k: [p[k] for p in theirs["points"]] for k in theirs["points"][0]}
        # format=csv: the same values as a file, the time in ISO 8601 UTC first
        text = world.client().get(f"/api/v1/devices/{dev}/history?{window}&format=csv",
                                  headers=world.a.auth("viewer"))
        assert text.status_code == 200 and text.mimetype == "text/csv"
        assert text.headers["Content-Disposition"].startswith(f'attachment; filename="{dev}_')
        rows = list(csv.reader(io.StringIO(text.get_data(as_text=True))))
        assert rows[0] == ["time", *theirs["points"][0]]
        assert len(rows) == len(theirs["points"]) + 1
        for row, point in zip(rows[1:], theirs["points"]):
            assert datetime.fromisoformat(row[0].replace("Z", "+00:00")) == \
                datetime.fromtimestamp(point["ts"] / 1000, timezone.utc)
            assert row[1:] == ["" if v is None else str(v) for v in point.values()]


def test_history_of_a_device_without_points_and_of_another_tenants(world):
    """The history query returns rows only while the tenant owns the device; with no rows the ownership is
    checked on its own: an own device without points is an empty 200, another tenant's device a 404."""
    c = world.client()
    with db.session_factory(world.backend.engine)() as s:
        dev = f"empty-{uuid.uuid4().hex[:8]}"
        repo.create_device(s, world.a.id, dev, "no readings yet")
        s.commit()
    for rng in ("1h", "24h", "7d"):
        r = c.get(f"/api/v1/devices/{dev}/history?range={rng}", headers=world.a.auth("viewer"))
        assert r.status_code == 200 and r.json["points"] == [] and r.json["device"] == dev, rng
        r = c.get(f"/api/v1/devices/{dev}/history?range={rng}&format=columns", headers=world.a.auth("viewer"))
        fields = ["ts", "t", "h", "p", "rssi", "seq", "boot"] if rng == "1h" else \
            ["ts", "n", "t", "t_min", "t_max", "h", "h_min", "h_max", "p", "p_min", "p_max"]
        assert r.status_code == 200 and r.json["columns"] == {k: [] for k in fields}, rng
        assert list(r.json["columns"]) == fields, rng
        r = c.get(f"/api/v1/devices/{dev}/history?range={rng}&format=csv", headers=world.a.auth("viewer"))
        assert r.status_code == 200 and r.get_data(as_text=True) == ",".join(["time", *fields]) + "\r\n", rng
        for fmt in ("", "&format=columns", "&format=csv"):
            r = c.get(f"/api/v1/devices/{dev}/history?range={rng}{fmt}", headers=world.b.auth("viewer"))
            assert r.status_code == 404 and "not found" in r.json["error"], rng
            r = c.get(f"/api/v1/devices/{world.a.devices[0]}/history?range={rng}{fmt}",
                      headers=world.b.auth("admin"))
            assert r.status_code == 404, rng
