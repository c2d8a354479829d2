"""Fixtures of the web tests: every test runs twice, on SQLite + in-memory cache and on PostgreSQL + Redis.

``world`` is one app (with its own MemoryBus, so a test can read back what the app produced) and two tenants,
each with an admin, an operator and a viewer (users and API tokens) and a few devices.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

import pytest
from werkzeug.serving import make_server

from cloud import db
from cloud import settings as settings_mod
from cloud.bus.memory import MemoryBus
from cloud.db import repo

PASSWORD = "correct horse battery"


@dataclass
class Backend:
    name: str
    url: str
    engine: object
    cache: object


@dataclass
class Tenant:
    id: int
    name: str
    devices: list[str]
    users: dict[str, str] = field(default_factory=dict)   # role -> email
    tokens: dict[str, str] = field(default_factory=dict)  # role -> bearer token

    def auth(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@dataclass
class World:
    backend: Backend
    app: object
    bus: MemoryBus
    cache: object
    a: Tenant
    b: Tenant
    settings: object

    def client(self):
        return self.app.test_client()


# a test that only means something on PostgreSQL + Redis (the production profile) runs on that backend alone,
# instead of being collected for SQLite and skipped there
postgres_only = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def backend(request, make_backend):
    """SQLite + in-memory cache, or a database of its own on the shared PostgreSQL + the shared Redis
    (``make_backend`` of tests/conftest.py: migrated, telemetry partitions created)."""
    url, engine, cache = make_backend(request, request.param, "web")
    yield Backend(request.param, url, engine, cache)
    engine.dispose()


def make_tenant(engine, label: str, devices: list[str] | None = None) -> Tenant:
    suffix = uuid.uuid4().hex[:8]
    factory = db.session_factory(engine)
    with factory() as s:
        t = repo.create_tenant(s, f"{label}-{suffix}")
        tenant = Tenant(id=t.id, name=t.name, devices=[])
        for role in ("admin", "operator", "viewer"):
            email = f"{role}-{suffix}@{label}.example"
            repo.create_user(s, t.id, email, PASSWORD, role)
            tenant.users[role] = email
            _row, token = repo.create_api_token(s, t.id, f"{role}-token", role)
            tenant.tokens[role] = token
        for name in devices or ["Cold room", "Boiler"]:
            device_id = f"{label}-{uuid.uuid4().hex[:8]}"
            repo.create_device(s, t.id, device_id, name)
            tenant.devices.append(device_id)
        s.commit()
    return tenant


@pytest.fixture(scope="module")
def world(backend):
    from cloud.web import create_app

    settings = settings_mod.load({}, database_url=backend.url, secret_key="test-secret-" + uuid.uuid4().hex)
    bus = MemoryBus(partitions=2)
    app = create_app(settings, engine=backend.engine, bus=bus, cache=backend.cache)
    app.config["TESTING"] = True
    a = make_tenant(backend.engine, "acme", ["Cold room", "<script>alert(1)</script>"])
    b = make_tenant(backend.engine, "other", ["Rival sensor"])
    yield World(backend, app, bus, backend.cache, a, b, settings)
    app.extensions["iot"].hub.close()


class LiveServer:
    def __init__(self, app):
        self.httpd = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def live(world):
    server = LiveServer(world.app)
    yield server
    server.stop()


def login(client, email: str, password: str = PASSWORD):
    """Log a Flask test client in through the form (with its CSRF token); returns the page CSRF token."""
    import re

    page = client.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = client.post("/login", data={"email": email, "password": password, "csrf_token": csrf})
    assert r.status_code == 302, r.get_data(as_text=True)
    page = client.get("/fleet").get_data(as_text=True)
    return re.search(r'data-csrf="([^"]+)"', page).group(1)
