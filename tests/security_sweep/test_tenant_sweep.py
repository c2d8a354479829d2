"""Every route of the web app, and the WebSocket, tried without login and across tenants.

Routes are discovered from the Flask URL map, so a new route is swept automatically; a route with a path
parameter this sweep does not know how to fill fails ``test_every_route_parameter_is_known`` until FILL learns it.

Tenant A owns a device (with a reading, a latest value and a command), an alarm, a rule, a user and an API token,
all carrying a unique marker. Tenant B (admin: the most powerful role) then calls every route with A's ids in
the path, by API token and by session cookie (with B's own valid CSRF token). Each answer must be 401/403/404
(or a redirect to the login page for pages without login) and must never contain any of A's markers; after the
sweep every A object is unchanged. The same without any credentials. On SQLite and on PostgreSQL + Redis.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest
from werkzeug.serving import make_server

from cloud import db, schema
from cloud import settings as settings_mod
from cloud.bus.memory import MemoryBus
from cloud.db import repo
from cloud.db.models import Telemetry

PASSWORD = "sweep horse battery staple"
# routes anyone may call: the login form, static files, health, metrics, the API description and its page
PUBLIC = {"static", "auth.login", "ops.healthz", "ops.metrics", "api.openapi", "pages.docs"}
# swept by the WebSocket tests below (a plain HTTP GET is no WebSocket handshake)
HTTP_SKIP = {"ws.live"}
# values tried for path parameters that are not object ids
ACTIONS = ["ack", "clear", "rotate", "revoke", "delete", "rename", "role"]


class Tenant:
    def __init__(self, engine, cache, label: str):
        self.marker = f"SWEEP{label.upper()}{uuid.uuid4().hex[:10]}"
        factory = db.session_factory(engine)
        with factory() as s:
            t = repo.create_tenant(s, f"{self.marker}-tenant")
            self.id = t.id
            self.email = f"admin-{self.marker.lower()}@{label}.example"
            self.user = repo.create_user(s, t.id, self.email, PASSWORD, "admin")
            self.other_email = f"viewer-{self.marker.lower()}@{label}.example"
            self.other_user = repo.create_user(s, t.id, self.other_email, PASSWORD, "viewer")
            token_row, self.token = repo.create_api_token(s, t.id, f"{self.marker}-token", "admin")
            self.token_id = token_row.id
            self.device_id = f"{self.marker.lower()}-dev"
            repo.create_device(s, t.id, self.device_id, f"{self.marker} sensor")
            cmd = schema.new_command("ping", {}, 300)
            repo.create_command(s, t.id, self.device_id, cmd, created_by=self.email)
            self.cid = cmd.cid
            rule = repo.create_rule(s, t.id, name=f"{self.marker[:20]}-rule", kind="threshold", metric="t",
                                    max=30.0, severity="major")
            self.rule_id = rule.id
            hook, _ = repo.create_webhook(s, t.id, f"{self.marker}-hook", f"https://{self.marker.lower()}.example/h")
            self.webhook_id = hook.id
            now_ms = int(time.time() * 1000)
            self.alarm_id = str(uuid.uuid4())
            repo.apply_alarm_event(s, t.id, schema.AlarmEvent(
                alarm_id=self.alarm_id, device=self.device_id, tenant=str(t.id), rule=f"{self.marker[:20]}-rule",
                metric="t", value=31.5, threshold=30.0, severity="major", state="raised", ts=now_ms))
            s.add(Telemetry(device_id=self.device_id, boot=1, seq=1, tenant_id=t.id,
                            ts=datetime.now(timezone.utc), t=21.5, h=40.0, p=1000.0))
            s.commit()
        cache.update(self.id, self.device_id, {"t": 21.5, "h": 40.0, "p": 1000.0, "ts": now_ms, "seq": 1,
                                               "boot": 1, "status": "online"})

    def markers(self) -> list[str]:
        return [self.marker, self.marker.lower(), self.device_id, self.cid, self.alarm_id, self.email,
                self.other_email]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def sweep(request, make_backend):
    from cloud.web import create_app

    url, engine, cache = make_backend(request, request.param, "sweep")
    settings = settings_mod.load({}, database_url=url, secret_key="sweep-" + uuid.uuid4().hex)
    app = create_app(settings, engine=engine, bus=MemoryBus(partitions=2), cache=cache)
    app.config["TESTING"] = True
    a, b = Tenant(engine, cache, "a"), Tenant(engine, cache, "b")
    yield app, engine, cache, a, b
    app.extensions["iot"].hub.close()
    engine.dispose()


# --- routes ---------------------------------------------------------------------------------------------------

def routes(app) -> list[tuple[str, str, object]]:
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in HTTP_SKIP:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((rule.endpoint, method, rule))
    return out


def fill(rule, owner: Tenant) -> list[str]:
    """URLs for ``rule`` pointing at ``owner``'s objects (one per value of non-id parameters)."""
    values = {"device_id": [owner.device_id], "cid": [owner.cid], "alarm_id": [owner.alarm_id],
              "rule_id": [owner.rule_id], "token_id": [owner.token_id], "user_id": [owner.user.id],
              "tenant_id": [owner.id], "webhook_id": [owner.webhook_id], "action": ACTIONS,
              "filename": ["app.css"]}
    unknown = [a for a in rule.arguments if a not in values]
    if unknown:
        raise KeyError(f"{rule.rule}: no value for path parameter(s) {unknown}; teach FILL in this file")
    combos: list[dict] = [{}]
    for arg in rule.arguments:
        combos = [{**c, arg: v} for c in combos for v in values[arg]]
    out = []
    for c in combos:
        url = rule.rule
        for arg, v in c.items():
            url = re.sub(r"<(?:[^:<>]+:)?" + arg + r">", str(v), url)
        out.append(url)
    return out


FILL = fill
BODY = {"op": "ping", "args": {}, "name": "sweep", "id": "sweep-new-device", "role": "viewer", "kind": "threshold",
        "metric": "t", "max": 40, "severity": "minor", "email": "sweep@nowhere.example", "password": PASSWORD}


def test_every_route_parameter_is_known(sweep):
    app, _, _, a, _ = sweep
    for endpoint, method, rule in routes(app):
        fill(rule, a)  # raises for a parameter nobody taught the sweep


def _leaks(text: str, owner: Tenant, url: str = "") -> list[str]:
    """Markers of ``owner`` in ``text``, except those the caller put in the URL itself (a login redirect or a
    404 message may echo the requested path)."""
    return [m for m in owner.markers() if m in text and m not in url]


def _login(client, email: str) -> str:
    page = client.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = client.post("/login", data={"email": email, "password": PASSWORD, "csrf_token": csrf})
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    page = client.get("/fleet").get_data(as_text=True)
    return re.search(r'data-csrf="([^"]+)"', page).group(1)


def _call(client, method: str, url: str, *, headers=None, csrf: str | None = None):
    headers = dict(headers or {})
    if url.startswith("/api/"):
        if csrf:
            headers["X-CSRF-Token"] = csrf
        return client.open(url, method=method, headers=headers,
                           json=BODY if method in ("POST", "PUT", "PATCH") else None)
    data = {**{k: str(v) for k, v in BODY.items() if not isinstance(v, dict)}, **({"csrf_token": csrf} if csrf else {})}
    return client.open(url, method=method, headers=headers, data=data if method == "POST" else None)


def test_without_login_nothing_but_public_routes(sweep):
    app, _, _, a, _ = sweep
    client = app.test_client()
    problems = []
    for endpoint, method, rule in routes(app):
        for url in fill(rule, a):
            r = _call(client, method, url)
            text = r.get_data(as_text=True)
            leaks = _leaks(text + json.dumps(dict(r.headers)), a, url)
            if leaks:
                problems.append(f"{method} {url} -> {r.status_code} leaks {leaks}")
            if endpoint in PUBLIC:
                continue
            to_login = r.status_code in (302, 303) and "/login" in r.headers.get("Location", "")
            if not (r.status_code in (401, 403) or to_login):
                problems.append(f"{method} {url} -> {r.status_code} without login")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("how", ["token", "session"])
def test_other_tenant_cannot_reach_or_change_anything(sweep, how):
    app, engine, cache, a, b = sweep
    client = app.test_client()
    headers, csrf = {}, None
    if how == "token":
        headers = {"Authorization": f"Bearer {b.token}"}
    else:
        csrf = _login(client, b.email)
    problems, checked = [], 0
    for endpoint, method, rule in routes(app):
        if endpoint == "auth.logout":
            continue  # would end the session under test; it touches no tenant data
        for url in fill(rule, a):
            r = _call(client, method, url, headers=headers, csrf=csrf)
            checked += 1
            text = r.get_data(as_text=True)
            if r.status_code >= 500:
                problems.append(f"{method} {url} -> {r.status_code}")
            leaks = _leaks(text + json.dumps(dict(r.headers)), a, url)
            if leaks:
                problems.append(f"{method} {url} -> {r.status_code} shows tenant A's {leaks}")
            if rule.arguments - {"filename", "action"} and r.status_code < 300 and endpoint not in PUBLIC:
                problems.append(f"{method} {url} -> {r.status_code}: tenant B reached tenant A's object")
            if how == "session" and r.status_code in (302, 303) and "/login" in r.headers.get("Location", ""):
                problems.append(f"{method} {url}: the session was lost (the sweep would prove nothing)")
    assert checked > 30
    assert not problems, "\n".join(problems)
    _assert_untouched(engine, a)
    # control: the same credentials do reach B's own objects, so the refusals above were about the tenant
    own = _call(client, "GET", f"/api/v1/devices/{b.device_id}" if how == "token" else f"/devices/{b.device_id}",
                headers=headers, csrf=csrf)
    assert own.status_code == 200 and b.device_id in own.get_data(as_text=True)


def _assert_untouched(engine, a: Tenant) -> None:
    from cloud.db.models import Alarm, ApiToken, Command, Device, Rule, User, Webhook

    with db.session_factory(engine)() as s:
        device = s.get(Device, a.device_id)
        assert device is not None and device.revoked_at is None and device.tenant_id == a.id
        assert device.name == f"{a.marker} sensor"
        assert s.get(Command, a.cid).status == "queued"
        alarm = s.get(Alarm, a.alarm_id)
        assert alarm.state == "raised" and alarm.acknowledged_at is None and alarm.cleared_at is None
        assert s.get(Rule, a.rule_id) is not None
        assert s.get(ApiToken, a.token_id).revoked_at is None
        assert s.get(User, a.user.id).role == "admin" and s.get(User, a.other_user.id).role == "viewer"
        assert s.get(Webhook, a.webhook_id).url == f"https://{a.marker.lower()}.example/h"
        assert repo.authenticate(s, a.email, PASSWORD) is not None  # password unchanged


# --- WebSocket --------------------------------------------------------------------------------------------------

class _Server:
    def __init__(self, app):
        self.httpd = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _ws(server, query: str = "", headers=None):
    from tests import wsclient

    return wsclient.connect(server.url.replace("http://", "ws://") + "/ws" + query, headers=headers)


def _frames(ws, seconds: float) -> list[dict]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        raw = ws.receive(timeout=0.1)
        if raw is not None:
            out.append(json.loads(raw))
    return out


def test_websocket_without_login_is_refused(sweep):
    import simple_websocket

    app, *_ = sweep
    server = _Server(app)
    try:
        for query in ("", "?access_token=", "?access_token=not-a-token", "?tenant=1"):
            with pytest.raises((simple_websocket.ConnectionError, simple_websocket.ConnectionClosed)):
                ws = _ws(server, query)
                frames = _frames(ws, 0.5)
                ws.close()
                raise AssertionError(f"/ws{query} accepted without login: {frames}")
    finally:
        server.stop()


def test_websocket_subscription_never_crosses_tenants(sweep):
    app, _, cache, a, b = sweep
    server = _Server(app)
    sockets = []
    try:
        # B, by token, also trying to name A's tenant in every way a client might
        for query in (f"?access_token={b.token}", f"?access_token={b.token}&tenant={a.id}",
                      f"?access_token={b.token}&tenant_id={a.id}"):
            ws = _ws(server, query)
            sockets.append(ws)
            hello = _frames(ws, 1.0)
            assert hello and hello[0]["type"] == "hello" and hello[0]["tenant"] == b.id, hello
            ws.send(json.dumps({"subscribe": a.id, "tenant": a.id, "device": a.device_id}))
        a_ws = _ws(server, f"?access_token={a.token}")
        sockets.append(a_ws)
        assert _frames(a_ws, 1.0)[0]["tenant"] == a.id
        time.sleep(0.3)
        cache.publish(a.id, {"type": "reading", "device": a.device_id, "t": 23.0, "marker": a.marker})
        cache.publish(b.id, {"type": "reading", "device": b.device_id, "t": 24.0, "marker": b.marker})
        got_a = _frames(a_ws, 2.0)
        assert any(f.get("marker") == a.marker for f in got_a), got_a
        for ws in sockets[:-1]:
            frames = _frames(ws, 1.0)
            assert not any(_leaks(json.dumps(f), a) for f in frames), frames
            assert any(f.get("marker") == b.marker for f in frames), frames
    finally:
        for ws in sockets:
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass
        server.stop()
