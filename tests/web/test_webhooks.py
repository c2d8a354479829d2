"""Alarm webhooks in the API and on the admin page (the deliveries themselves: tests/test_notifier.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re

import pytest

from cloud import db
from cloud.db import repo
from tests.web.conftest import login
from tests.webhook_receiver import Receiver


def test_create_list_delete(world):
    c, h = world.client(), world.a.auth("admin")
    r = c.post("/api/v1/webhooks", json={"name": "ops pager", "url": "https://hooks.example.com/iot",
                                         "min_severity": "major"}, headers=h)
    assert r.status_code == 201, r.json
    created = r.json
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 30
    assert created["url"] == "https://hooks.example.com/iot" and created["min_severity"] == "major"
    listed = c.get("/api/v1/webhooks", headers=h).json["items"]
    mine = [w for w in listed if w["id"] == created["id"]]
    assert mine == [{k: v for k, v in created.items() if k != "secret"}]  # the secret is shown once only
    assert "secret" not in c.get("/api/v1/webhooks", headers=h).get_data(as_text=True)
    default = c.post("/api/v1/webhooks", json={"name": "all", "url": "https://hooks.example.com/all"}, headers=h)
    assert default.json["min_severity"] == "warning"  # every alarm event
    assert c.delete(f"/api/v1/webhooks/{created['id']}", headers=h).status_code == 204
    assert c.delete(f"/api/v1/webhooks/{created['id']}", headers=h).status_code == 404
    assert created["id"] not in [w["id"] for w in c.get("/api/v1/webhooks", headers=h).json["items"]]


@pytest.mark.parametrize("body, message", [
    ({"url": "https://hooks.example.com/"}, "missing field 'name'"),
    ({"name": "x"}, "field 'url'"),
    ({"name": "x", "url": 42}, "field 'url'"),
    ({"name": "x", "url": "javascript:alert(1)"}, "http:// or https://"),
    ({"name": "x", "url": "http://127.0.0.1:6379/"}, "not a public address"),
    ({"name": "x", "url": "http://192.168.1.10/hook"}, "not a public address"),
    ({"name": "x", "url": "https://hooks.example.com/", "min_severity": "fatal"}, "min_severity must be one of"),
])
def test_bad_webhooks_are_refused_with_a_message(world, body, message):
    r = world.client().post("/api/v1/webhooks", json=body, headers=world.a.auth("admin"))
    assert r.status_code == 400 and message in r.json["error"], r.json


def test_only_admins_manage_webhooks(world):
    c = world.client()
    for role in ("operator", "viewer"):
        assert c.get("/api/v1/webhooks", headers=world.a.auth(role)).status_code == 403
        r = c.post("/api/v1/webhooks", json={"name": "x", "url": "https://hooks.example.com/"},
                   headers=world.a.auth(role))
        assert r.status_code == 403


def test_admin_page_adds_and_deletes_a_webhook(world):
    client = world.client()
    csrf = login(client, world.a.users["admin"])
    r = client.post("/admin/webhooks", data={"name": "page hook", "url": "https://hooks.example.com/page",
                                             "min_severity": "critical", "csrf_token": csrf})
    assert r.status_code == 200
    page = r.get_data(as_text=True)
    secret = re.search(r'id="issued-webhook-secret">(whsec_[^<]+)<', page).group(1)
    assert "https://hooks.example.com/page" in page
    assert secret not in client.get("/admin").get_data(as_text=True)  # shown once
    r = client.post("/admin/webhooks", data={"name": "inside", "url": "http://10.0.0.5/x", "min_severity": "minor",
                                             "csrf_token": csrf})
    assert r.status_code == 400 and "not a public address" in r.get_data(as_text=True)
    hook_id = [w["id"] for w in world.client().get("/api/v1/webhooks", headers=world.a.auth("admin")).json["items"]
               if w["name"] == "page hook"][0]
    r = client.post(f"/admin/webhooks/{hook_id}/delete", data={"csrf_token": csrf})
    assert r.status_code == 302
    assert "Webhook page hook deleted." in client.get("/admin").get_data(as_text=True)
    assert client.post(f"/admin/webhooks/{hook_id}/delete", data={"csrf_token": csrf}).status_code == 404


@pytest.fixture
def receiver():
    endpoint = Receiver(status_for=lambda path: 404 if path == "/missing" else 200)
    yield endpoint
    endpoint.close()


def test_send_test_event(world, receiver, monkeypatch):
    url = receiver.url
    with db.session_factory(world.backend.engine)() as s:  # a loopback URL, as only allow_private would accept
        hook, secret = repo.create_webhook(s, world.a.id, "test me", url + "/hook")
        missing, _ = repo.create_webhook(s, world.a.id, "gone", url + "/missing")
        s.commit()
        hook_id, missing_id = hook.id, missing.id
    c, h = world.client(), world.a.auth("admin")
    # private addresses not allowed (the default): refused at delivery, no request made
    r = c.post(f"/api/v1/webhooks/{hook_id}/test", headers=h)
    assert r.status_code == 200 and r.json["delivered"] is False and "not a public address" in r.json["detail"]
    assert receiver.requests == []
    iot = world.app.extensions["iot"]
    monkeypatch.setattr(iot, "settings", dataclasses.replace(iot.settings, webhook_allow_private=True))
    r = c.post(f"/api/v1/webhooks/{hook_id}/test", headers=h)
    assert r.json == {"delivered": True, "status": 200, "detail": "HTTP 200"}
    path, headers, body = (receiver.requests[-1][k] for k in ("path", "headers", "body"))
    event = json.loads(body)
    assert path == "/hook" and event["type"] == "test" and event["tenant"] == str(world.a.id)
    assert "alarm_id" not in event and headers["X-IoT-Delivery"].startswith("test.")
    assert headers["X-IoT-Signature"] == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    r = c.post(f"/api/v1/webhooks/{missing_id}/test", headers=h)
    assert r.json == {"delivered": False, "status": 404, "detail": "HTTP 404"}
    # the admin page's button says the same in a message
    client = world.client()
    csrf = login(client, world.a.users["admin"])
    assert f"/admin/webhooks/{hook_id}/test" in client.get("/admin").get_data(as_text=True)
    client.post(f"/admin/webhooks/{hook_id}/test", data={"csrf_token": csrf})
    assert "Test event delivered (HTTP 200)." in client.get("/admin").get_data(as_text=True)
    client.post(f"/admin/webhooks/{missing_id}/test", data={"csrf_token": csrf})
    assert "Test event not delivered: HTTP 404." in client.get("/admin").get_data(as_text=True)
    assert world.client().post("/api/v1/webhooks/2147483647/test", headers=h).status_code == 404
    assert world.client().post(f"/api/v1/webhooks/{hook_id}/test", headers=world.a.auth("operator")).status_code == 403
