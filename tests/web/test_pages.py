"""Pages and forms: login (cookie flags, rate limit, safe redirects), CSRF on every form, roles, escaping,
tenant isolation, provisioning."""

from __future__ import annotations

import re
import uuid

import pytest

from cloud.db import repo
from tests.web.conftest import PASSWORD, login, postgres_only
from tests.web.test_api import insert_alarm


def csrf_of(client, path="/fleet"):
    return re.search(r'data-csrf="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


def test_login_required_and_cookie_flags(world):
    c = world.client()
    r = c.get("/fleet")
    assert r.status_code == 302 and "/login" in r.location
    page = c.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = c.post("/login", data={"email": world.a.users["viewer"], "password": PASSWORD, "csrf_token": csrf})
    assert r.status_code == 302
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    r = c.get("/fleet")
    assert r.status_code == 200
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]


def test_login_without_csrf_is_refused(world):
    c = world.client()
    r = c.post("/login", data={"email": world.a.users["viewer"], "password": PASSWORD})
    assert r.status_code == 403


def test_login_rate_limit(world):
    c = world.client()
    page = c.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    email = world.a.users["admin"]
    for _ in range(5):
        r = c.post("/login", data={"email": email, "password": "nope-nope", "csrf_token": csrf})
        assert r.status_code == 401 and "wrong password" in r.get_data(as_text=True)
    r = c.post("/login", data={"email": email, "password": PASSWORD, "csrf_token": csrf})
    assert r.status_code == 429 and "Too many" in r.get_data(as_text=True)
    assert 1 <= int(r.headers["Retry-After"]) <= 300
    # let the other tests log in as this admin (forgets the (address, account) window)
    world.app.extensions["iot"].limiter.succeeded("127.0.0.1", email, None)


def test_open_redirect_refused(world):
    c = world.client()
    page = c.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = c.post("/login?next=//evil.example/x", data={"email": world.a.users["viewer"], "password": PASSWORD,
                                                     "csrf_token": csrf})
    assert r.status_code == 302 and r.location.endswith("/fleet")


def test_forms_need_csrf(world):
    c = world.client()
    login(c, world.a.users["admin"])
    dev = world.a.devices[0]
    for path, data in (("/logout", {}), (f"/devices/{dev}/rules", {"name": "x", "max": "30"}),
                       ("/admin/devices", {"id": "nocsrf-1"}), ("/admin/users", {"email": "x@y.z"}),
                       ("/admin/tokens", {"name": "t"})):
        r = c.post(path, data=data)
        assert r.status_code == 403, path
        r = c.post(path, data={**data, "csrf_token": "forged"})
        assert r.status_code == 403, path
    assert c.get("/api/v1/me").status_code == 200  # still logged in


def test_fleet_escapes_names_and_is_tenant_scoped(world):
    c = world.client()
    login(c, world.a.users["viewer"])
    html = c.get("/fleet").get_data(as_text=True)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert world.b.devices[0] not in html
    assert c.get(f"/devices/{world.b.devices[0]}").status_code == 404
    assert c.get(f"/devices/{world.a.devices[1]}").status_code == 200


def test_rules_form_roles(world):
    dev = world.a.devices[0]
    viewer = world.client()
    login(viewer, world.a.users["viewer"])
    r = viewer.post(f"/devices/{dev}/rules", data={"name": "v", "max": "30", "csrf_token": csrf_of(viewer)})
    assert r.status_code == 403
    op = world.client()
    login(op, world.a.users["operator"])
    name = "form-" + uuid.uuid4().hex[:6]
    r = op.post(f"/devices/{dev}/rules", data={"name": name, "kind": "threshold", "metric": "t", "max": "31.5",
                                               "severity": "minor", "enabled": "on", "csrf_token": csrf_of(op)})
    assert r.status_code == 302
    html = op.get(f"/devices/{dev}").get_data(as_text=True)
    assert name in html and "Rule added" in html
    r = op.post(f"/devices/{dev}/rules", data={"name": "bad", "kind": "threshold", "metric": "t", "min": "50",
                                               "max": "10", "csrf_token": csrf_of(op)}, follow_redirects=True)
    assert "Rule not saved" in r.get_data(as_text=True)
    # another tenant's device: 404
    r = op.post(f"/devices/{world.b.devices[0]}/rules", data={"name": "x", "max": "30", "csrf_token": csrf_of(op)})
    assert r.status_code == 404


def test_alarm_ack_form(world):
    dev = world.a.devices[0]
    alarm_id = insert_alarm(world, world.a.id, dev)
    b_alarm = insert_alarm(world, world.b.id, world.b.devices[0])
    c = world.client()
    login(c, world.a.users["operator"])
    assert alarm_id in c.get("/alarms").get_data(as_text=True)
    assert b_alarm not in c.get("/alarms?state=all").get_data(as_text=True)
    r = c.post(f"/alarms/{alarm_id}/ack", data={"csrf_token": csrf_of(c)})
    assert r.status_code == 302
    assert "acknowledged" in c.get(f"/alarms?state=acknowledged&device={dev}").get_data(as_text=True)
    assert c.post(f"/alarms/{b_alarm}/ack", data={"csrf_token": csrf_of(c)}).status_code == 404


def test_provisioning_page(world):
    c = world.client()
    login(c, world.a.users["admin"])
    device_id = "page-" + uuid.uuid4().hex[:6]
    r = c.post("/admin/devices", data={"id": device_id, "name": "Lab", "csrf_token": csrf_of(c, "/admin")})
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and 'id="issued-password"' in html and 'download="config.json"' in html
    password = re.search(r'id="issued-password">([^<]+)<', html).group(1)
    assert password in html
    # shown once: not on the next view
    assert password not in c.get("/admin").get_data(as_text=True)
    r = c.post(f"/admin/devices/{device_id}/rotate", data={"csrf_token": csrf_of(c, "/admin")})
    assert re.search(r'id="issued-password">([^<]+)<', r.get_data(as_text=True)).group(1) != password
    r = c.post(f"/admin/devices/{device_id}/revoke", data={"csrf_token": csrf_of(c, "/admin")},
               follow_redirects=True)
    assert "revoked" in r.get_data(as_text=True)
    assert c.post(f"/admin/devices/{world.b.devices[0]}/revoke",
                  data={"csrf_token": csrf_of(c, "/admin")}).status_code == 404
    op = world.client()
    login(op, world.a.users["operator"])
    assert op.get("/admin").status_code == 403


def test_admin_users_and_tokens_pages(world):
    c = world.client()
    login(c, world.a.users["admin"])
    email = f"new-{uuid.uuid4().hex[:6]}@acme.example"
    r = c.post("/admin/users", data={"email": email, "password": "long enough pw", "role": "viewer",
                                     "csrf_token": csrf_of(c, "/admin")})
    assert r.status_code == 302 and email in c.get("/admin").get_data(as_text=True)
    r = c.post("/admin/tokens", data={"name": "grafana", "role": "viewer", "csrf_token": csrf_of(c, "/admin")})
    token = re.search(r'id="issued-token">([^<]+)<', r.get_data(as_text=True)).group(1)
    assert world.client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    b_html = c.get("/admin").get_data(as_text=True)
    assert world.b.users["admin"] not in b_html


@pytest.mark.parametrize("path, form", [
    ("/admin/tokens", {"name": "bad\x00name", "role": "viewer"}),
    ("/admin/users", {"email": "nul\x00@acme.example", "password": "long enough pw", "role": "viewer"}),
    ("/admin/webhooks", {"name": "hook\x00", "url": "https://hooks.example.com/", "min_severity": "minor"}),
    ("/admin/devices", {"id": "dev-nul", "name": "boiler\x00room"}),
    ("/account/password", {"current_password": "x\x00", "new_password": "long enough pw",
                           "confirm_password": "long enough pw"}),
])
def test_forms_refuse_text_no_store_can_keep(world, path, form):
    """A NUL in a form field is a 400 naming it, not a database error (PostgreSQL refuses NUL in text)."""
    c = world.client()
    login(c, world.a.users["admin"])
    r = c.post(path, data={**form, "csrf_token": csrf_of(c, "/admin")})
    assert r.status_code == 400 and "NUL" in r.get_data(as_text=True), (path, r.status_code)


def test_login_refuses_text_no_store_can_keep(world):
    c = world.client()
    page = c.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = c.post("/login", data={"email": "a\x00@acme.example", "password": "whatever it is", "csrf_token": csrf})
    assert r.status_code == 400 and "NUL" in r.get_data(as_text=True)


def test_logout(world):
    c = world.client()
    login(c, world.a.users["viewer"])
    r = c.post("/logout", data={"csrf_token": csrf_of(c)})
    assert r.status_code == 302
    assert c.get("/fleet").status_code == 302


def test_fleet_page_rows_match_the_device_list(world):
    """The fleet page reads with its own statement (PostgreSQL: the driver's cursor); for every sort and a
    search with LIKE metacharacters it shows the same devices, order, alarm counts and total as the API list."""
    import uuid as _uuid

    from cloud import db
    from cloud.db.models import Alarm, utcnow
    from cloud.web import data

    tid = world.a.id
    factory = db.session_factory(world.backend.engine)
    tag = _uuid.uuid4().hex[:6]
    with factory() as s:
        for i, name in enumerate(["Zeta 50%_off", "alpha", "Mid\\dle"]):
            repo.create_device(s, tid, f"fl-{tag}-{i}", name)
        s.add(Alarm(id=f"fl-{tag}", tenant_id=tid, device_id=f"fl-{tag}-1", rule="r", metric="t", severity="minor",
                    state="raised", raised_at=utcnow()))
        s.add(Alarm(id=f"fl-{tag}-x", tenant_id=world.b.id, device_id=f"fl-{tag}-1", rule="r", metric="t",
                    severity="minor", state="raised", raised_at=utcnow()))  # another tenant's: never counted
        s.commit()
    with factory() as s:
        for sort in ("name", "-name", "id", "-id", "status", "-last_seen"):
            for search in (None, "50%_", "\\d", tag, "nothing-like-this"):
                rows, total = data.fleet_page(s, tid, search, sort, 200, 0)
                ref, ref_total = data.device_page(s, tid, search, sort, 200, 0)
                assert total == ref_total, (sort, search)
                assert [(r[0], r[1], r[4]) for r in rows] == [(r.id, r.name, r.alarms) for r in ref], (sort, search)
        rows, total = data.fleet_page(s, tid, tag, "id", 200, 0)
        assert [r[4] for r in rows] == [0, 1, 0] and total == 3
        assert data.fleet_page(s, tid, "50%_", "name", 200, 0)[0][0][1] == "Zeta 50%_off"
        assert data.fleet_page(s, tid, tag, "id", 200, 5) == ([], 3)  # past the end: still the total


def test_fleet_rows_follow_renames_and_live_values(world):
    """Each row's id/name part is escaped once and kept: a renamed device shows its new name (escaped), and the
    live values, status and last-seen come fresh from the cache on every render."""
    c = world.client()
    login(c, world.a.users["viewer"])
    dev = world.a.devices[0]
    world.cache.update(world.a.id, dev, {"t": 21.456, "h": 40.04, "p": 1001.25, "ts": 1_700_000_000_000, "seq": 1,
                                         "boot": 1, "status": "online", "last_seen": 1_700_000_000_123})
    page = c.get("/fleet").get_data(as_text=True)
    row = page[page.index(f'<tr data-device="{dev}">'):]
    row = row[:row.index("</tr>")]
    assert '<td class="num t">21.46</td>' in row and '<td class="num h">40.0</td>' in row
    assert '<td class="num p">1001.2</td>' in row or '<td class="num p">1001.3</td>' in row
    assert '<span class="badge online">online</span>' in row and "2023-11-14T22:13:20.123Z" in row
    old_name = c.get(f"/api/v1/devices/{dev}", headers=world.a.auth()).json["name"]
    evil = '"><img src=x onerror=alert(2)>'
    try:
        assert c.patch(f"/api/v1/devices/{dev}", json={"name": evil},
                       headers=world.a.auth("admin")).status_code == 200
        world.cache.update(world.a.id, dev, {"t": None, "h": 55.5, "p": None, "status": "offline",
                                             "last_seen": 1_700_000_001_000})
        page = c.get("/fleet").get_data(as_text=True)
        assert evil not in page and "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
        row = page[page.index(f'<tr data-device="{dev}">'):]
        row = row[:row.index("</tr>")]
        assert '<td class="num h">55.5</td>' in row and '<span class="badge offline">offline</span>' in row
        assert ">" + old_name + "<" not in row
    finally:
        c.patch(f"/api/v1/devices/{dev}", json={"name": old_name}, headers=world.a.auth("admin"))


def test_session_cookie_is_resigned_only_when_stale_or_changed(world, monkeypatch):
    """A permanent session slides, but its cookie is signed and sent again only when older than
    SESSION_REFRESH_S (or when the session changed), not with every response."""
    import cloud.web as web

    c = world.client()
    login(c, world.a.users["viewer"])
    r = c.get("/fleet")
    assert r.status_code == 200 and "Set-Cookie" not in r.headers and "Cookie" in r.headers.get("Vary", "")
    monkeypatch.setattr(web, "SESSION_REFRESH_S", 0)
    r = c.get("/fleet")
    assert r.status_code == 200 and "iot_session=" in r.headers.get("Set-Cookie", "")
    assert "HttpOnly" in r.headers["Set-Cookie"] and "Expires=" in r.headers["Set-Cookie"]
    monkeypatch.setattr(web, "SESSION_REFRESH_S", 3600)
    assert "Set-Cookie" not in c.get("/fleet").headers
    r = c.post("/logout", data={"csrf_token": csrf_of(c)})  # a changed session is always sent
    assert r.status_code == 302 and "iot_session=" in r.headers.get("Set-Cookie", "")
    assert c.get("/fleet").status_code == 302


@postgres_only
def test_web_engine_sessions_run_in_utc_whatever_the_server_default(world):
    """The web tier's own engine (cloud.web.web_engine, not cloud.db.make_engine) sets TimeZone=UTC too."""
    from cloud.web import web_engine

    with world.backend.engine.connect() as conn:
        name = conn.exec_driver_sql("SELECT current_database()").scalar()
        conn.exec_driver_sql(f"ALTER DATABASE {name} SET TimeZone = 'Asia/Kolkata'")
        conn.commit()
    engine = web_engine(world.backend.url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
    finally:
        engine.dispose()
        with world.backend.engine.connect() as conn:
            conn.exec_driver_sql(f"ALTER DATABASE {name} RESET TimeZone")
            conn.commit()
