"""Users over their lifetime: an admin changes roles, resets passwords and removes users; everyone changes their own
password; a tenant always keeps an admin; sessions and WebSockets end when the login behind them no longer holds."""

from __future__ import annotations

import re
import time
import uuid

import pytest
import simple_websocket

from cloud.db import repo
from cloud import db
from tests.web.conftest import PASSWORD, login, make_tenant
from tests.web.test_ws import connect

NEW_PASSWORD = "a new and longer secret"


@pytest.fixture(autouse=True)
def forget_failed_attempts(world):
    """Wrong passwords here count against the login limit of 127.0.0.1 (30 per 5 minutes, shared through Redis
    on PostgreSQL): forget them after each test, so no later test finds the address blocked."""
    yield
    world.app.extensions["iot"].limiter.reset()


def add_user(world, role: str = "viewer", tenant=None) -> tuple[int, str]:
    tenant = tenant or world.a
    email = f"{role}-{uuid.uuid4().hex[:8]}@users.example"
    r = world.client().post("/api/v1/users", json={"email": email, "password": PASSWORD, "role": role},
                            headers=tenant.auth("admin"))
    assert r.status_code == 201, r.json
    return r.json["id"], email


def session_of(world, email: str, password: str = PASSWORD):
    client = world.client()
    csrf = login(client, email, password)
    return client, csrf


def can_log_in(world, email: str, password: str) -> bool:
    client = world.client()
    page = client.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = client.post("/login", data={"email": email, "password": password, "csrf_token": csrf})
    return r.status_code == 302


def test_admin_changes_a_role_and_it_applies_at_once(world):
    user_id, email = add_user(world, "viewer")
    client, csrf = session_of(world, email)
    assert client.get("/api/v1/me").json["role"] == "viewer"
    r = world.client().patch(f"/api/v1/users/{user_id}", json={"role": "operator"}, headers=world.a.auth("admin"))
    assert r.status_code == 200 and r.json["role"] == "operator" and r.json["email"] == email
    assert client.get("/api/v1/me").json["role"] == "operator"  # the same session, the new role


def test_removed_user_loses_every_session(world):
    user_id, email = add_user(world, "operator")
    client, _ = session_of(world, email)
    assert client.get("/api/v1/me").status_code == 200
    assert world.client().delete(f"/api/v1/users/{user_id}", headers=world.a.auth("admin")).status_code == 204
    assert client.get("/api/v1/me").status_code == 401
    assert client.get("/fleet").status_code == 302  # pages: back to the login form
    listed = world.client().get("/api/v1/users", headers=world.a.auth("admin")).json["items"]
    assert email not in [u["email"] for u in listed]
    assert not can_log_in(world, email, PASSWORD)
    assert world.client().delete(f"/api/v1/users/{user_id}", headers=world.a.auth("admin")).status_code == 404


def test_a_tenant_always_keeps_an_admin(world):
    tenant = make_tenant(world.backend.engine, "lastadmin", [])
    c = world.client()
    admins = [u for u in c.get("/api/v1/users", headers=tenant.auth("admin")).json["items"] if u["role"] == "admin"]
    assert len(admins) == 1
    only = admins[0]["id"]
    r = c.patch(f"/api/v1/users/{only}", json={"role": "operator"}, headers=tenant.auth("admin"))
    assert r.status_code == 409 and "last admin" in r.json["error"]
    r = c.delete(f"/api/v1/users/{only}", headers=tenant.auth("admin"))
    assert r.status_code == 409 and "last admin" in r.json["error"]
    # a role that stays admin is no demotion
    assert c.patch(f"/api/v1/users/{only}", json={"role": "admin"}, headers=tenant.auth("admin")).status_code == 200
    second, _ = add_user(world, "admin", tenant)
    assert c.patch(f"/api/v1/users/{only}", json={"role": "viewer"}, headers=tenant.auth("admin")).status_code == 200
    r = c.delete(f"/api/v1/users/{second}", headers=tenant.auth("admin"))
    assert r.status_code == 409, "the second admin is the last one now"
    with db.session_factory(world.backend.engine)() as s:
        roles = sorted(u.role for u in repo.list_users(s, tenant.id))
    assert roles.count("admin") == 1


@pytest.mark.parametrize("body, status, message", [
    ({}, 400, "give 'role' and/or 'password'"),
    ({"role": "root"}, 400, "role must be one of"),
    ({"password": "short"}, 400, "at least 10 characters"),
    ({"password": 1234567890123}, 400, "must be a string"),
])
def test_update_user_bad_input(world, body, status, message):
    user_id, _ = add_user(world)
    r = world.client().patch(f"/api/v1/users/{user_id}", json=body, headers=world.a.auth("admin"))
    assert r.status_code == status and message in r.json["error"], r.json


def test_only_admins_manage_users(world):
    user_id, _ = add_user(world)
    c = world.client()
    for role in ("operator", "viewer"):
        assert c.patch(f"/api/v1/users/{user_id}", json={"role": "admin"},
                       headers=world.a.auth(role)).status_code == 403
        assert c.delete(f"/api/v1/users/{user_id}", headers=world.a.auth(role)).status_code == 403
    assert c.patch("/api/v1/users/2147483647", json={"role": "viewer"}, headers=world.a.auth("admin")).status_code == 404


def test_password_reset_by_an_admin_ends_the_users_sessions(world):
    user_id, email = add_user(world)
    client, _ = session_of(world, email)
    r = world.client().patch(f"/api/v1/users/{user_id}", json={"password": NEW_PASSWORD},
                             headers=world.a.auth("admin"))
    assert r.status_code == 200
    assert client.get("/api/v1/me").status_code == 401
    assert not can_log_in(world, email, PASSWORD)
    assert can_log_in(world, email, NEW_PASSWORD)


def test_own_password_change_keeps_this_session_and_ends_the_others(world):
    _, email = add_user(world, "operator")
    here, csrf = session_of(world, email)
    elsewhere, _ = session_of(world, email)
    body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    assert here.post("/api/v1/me/password", json=body).status_code == 403  # no CSRF token
    r = here.post("/api/v1/me/password", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 204, r.get_data(as_text=True)
    assert here.get("/api/v1/me").json["email"] == email
    assert elsewhere.get("/api/v1/me").status_code == 401
    assert can_log_in(world, email, NEW_PASSWORD) and not can_log_in(world, email, PASSWORD)


def test_own_password_change_refusals(world):
    _, email = add_user(world)
    client, csrf = session_of(world, email)
    h = {"X-CSRF-Token": csrf}
    r = client.post("/api/v1/me/password", json={"current_password": "wrong one!", "new_password": NEW_PASSWORD},
                    headers=h)
    assert r.status_code == 400 and "current password is wrong" in r.json["error"]
    r = client.post("/api/v1/me/password", json={"current_password": PASSWORD, "new_password": "short"}, headers=h)
    assert r.status_code == 400 and "at least 10 characters" in r.json["error"]
    r = client.post("/api/v1/me/password", json={"new_password": NEW_PASSWORD}, headers=h)
    assert r.status_code == 400 and "current_password" in r.json["error"]
    r = world.client().post("/api/v1/me/password", json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
                            headers=world.a.auth("admin"))
    assert r.status_code == 400 and "API token has no password" in r.json["error"]
    assert can_log_in(world, email, PASSWORD)


def test_guessing_the_current_password_hits_the_login_limit(world):
    _, email = add_user(world)
    client, csrf = session_of(world, email)
    statuses = [client.post("/api/v1/me/password", json={"current_password": f"guess number {i}",
                                                         "new_password": NEW_PASSWORD},
                            headers={"X-CSRF-Token": csrf}).status_code for i in range(6)]
    assert statuses[:5] == [400] * 5 and statuses[5] == 429
    r = client.post("/api/v1/me/password", json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, "refused even with the right password"


# --- pages ----------------------------------------------------------------------------------------------------

def test_admin_page_sets_roles_and_removes_users(world):
    user_id, email = add_user(world, "viewer")
    admin, csrf = session_of(world, world.a.users["admin"])
    page = admin.get("/admin").get_data(as_text=True)
    assert f'/admin/users/{user_id}/role' in page and f'/admin/users/{user_id}/delete' in page
    r = admin.post(f"/admin/users/{user_id}/role", data={"role": "operator", "csrf_token": csrf})
    assert r.status_code == 302
    assert f"{email} is now operator." in admin.get("/admin").get_data(as_text=True)
    r = admin.post(f"/admin/users/{user_id}/role", data={"role": "root", "csrf_token": csrf})
    assert r.status_code == 400
    r = admin.post(f"/admin/users/{user_id}/delete", data={"csrf_token": csrf})
    assert r.status_code == 302
    assert f"User {email} removed." in admin.get("/admin").get_data(as_text=True)
    assert admin.post(f"/admin/users/{user_id}/delete", data={"csrf_token": csrf}).status_code == 404
    assert admin.post(f"/admin/users/{user_id}/promote", data={"csrf_token": csrf}).status_code == 404


def test_admin_page_refuses_to_remove_the_last_admin(world):
    tenant = make_tenant(world.backend.engine, "lastadminpage", [])
    admin, csrf = session_of(world, tenant.users["admin"])
    me = [u for u in world.client().get("/api/v1/users", headers=tenant.auth("admin")).json["items"]
          if u["email"] == tenant.users["admin"]][0]
    r = admin.post(f"/admin/users/{me['id']}/delete", data={"csrf_token": csrf})
    assert r.status_code == 409 and "last admin" in r.get_data(as_text=True)
    assert admin.get("/api/v1/me").status_code == 200


def test_account_page_changes_the_password(world):
    _, email = add_user(world, "viewer")
    client, csrf = session_of(world, email)
    page = client.get("/fleet").get_data(as_text=True)
    assert 'href="/account"' in page
    assert "Change password" in client.get("/account").get_data(as_text=True)
    form = {"current_password": PASSWORD, "new_password": NEW_PASSWORD, "confirm_password": "not the same one",
            "csrf_token": csrf}
    r = client.post("/account/password", data=form)
    assert r.status_code == 400 and "new one twice" in r.get_data(as_text=True)
    r = client.post("/account/password", data={**form, "current_password": "wrong one!",
                                               "confirm_password": NEW_PASSWORD})
    assert r.status_code == 400 and "The current password is wrong." in r.get_data(as_text=True)
    r = client.post("/account/password", data={**form, "confirm_password": NEW_PASSWORD})
    assert r.status_code == 302
    assert "Password changed." in client.get("/account").get_data(as_text=True)
    assert can_log_in(world, email, NEW_PASSWORD)


# --- WebSocket ------------------------------------------------------------------------------------------------

def _closed_within(ws, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ws.receive(timeout=0.2)
        except simple_websocket.ConnectionClosed:
            return True
    return False


def test_websocket_ends_when_its_user_is_removed_or_its_token_revoked(world, live, monkeypatch):
    monkeypatch.setattr("cloud.web.ws.RECHECK_S", 0.3)
    user_id, email = add_user(world, "viewer")
    client, _ = session_of(world, email)
    cookie = client.get_cookie("iot_session")
    by_session, _ = connect(live, headers={"Cookie": f"iot_session={cookie.value}"})
    r = world.client().post("/api/v1/tokens", json={"name": "ws", "role": "viewer"}, headers=world.a.auth("admin"))
    by_token, _ = connect(live, token=r.json["token"])
    kept_user, kept_email = add_user(world, "viewer")
    kept_client, _ = session_of(world, kept_email)
    kept, _ = connect(live, headers={"Cookie": f"iot_session={kept_client.get_cookie('iot_session').value}"})
    try:
        assert not _closed_within(by_session, 1.0) and not _closed_within(by_token, 0.1)
        assert world.client().delete(f"/api/v1/users/{user_id}", headers=world.a.auth("admin")).status_code == 204
        assert world.client().delete(f"/api/v1/tokens/{r.json['id']}", headers=world.a.auth("admin")).status_code == 200
        assert _closed_within(by_session, 5.0), "the removed user's WebSocket stayed open"
        assert _closed_within(by_token, 5.0), "the revoked token's WebSocket stayed open"
        assert not _closed_within(kept, 1.0), "a valid login's WebSocket was closed"
    finally:
        for ws in (by_session, by_token, kept):
            try:
                ws.close()
            except simple_websocket.ConnectionClosed:
                pass  # closed by the server, as it should be
