"""schemathesis against the running web service: every operation of /api/v1/openapi.json, with generated (valid
and invalid) parameters and bodies, authenticated as a tenant admin. The property: no 5xx, ever.

The app runs in a real HTTP server (werkzeug, threaded) on loopback, on SQLite and on PostgreSQL + Redis, with
an in-process bus (what it produces is not under test here). Destructive operations (revoke, delete) run too;
the tenant starts with three devices.

Text no store can hold (NUL, unpaired surrogates) is refused with a 400 by the API itself.
"""

from __future__ import annotations

import threading
import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from werkzeug.serving import make_server

from cloud import db
from cloud import settings as settings_mod
from cloud.bus.memory import MemoryBus
from cloud.db import repo

pytestmark = pytest.mark.timeout(600)


class _Server:
    def __init__(self, app):
        self.httpd = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api_server(request, make_backend):
    from cloud.web import create_app

    url, engine, cache = make_backend(request, request.param, "fuzz")
    settings = settings_mod.load({}, database_url=url, secret_key="fuzz-" + uuid.uuid4().hex)
    app = create_app(settings, engine=engine, bus=MemoryBus(partitions=2), cache=cache)
    with db.session_factory(engine)() as s:
        tenant = repo.create_tenant(s, f"fuzz-{uuid.uuid4().hex[:6]}")
        _, token = repo.create_api_token(s, tenant.id, "fuzz", "admin")
        for i in range(3):
            repo.create_device(s, tenant.id, f"fuzz-{uuid.uuid4().hex[:6]}-{i}", f"sensor {i}")
        s.commit()
        tenant_id = tenant.id
    server = _Server(app)
    server.token = token
    server.engine = engine
    server.tenant_id = tenant_id
    with pytest.MonkeyPatch.context() as patch:
        # generated webhooks name generated hosts, and "send a test event" would look them up and call them:
        # tests send nothing off this machine, so every address lookup fails here (the API answers 200, delivered
        # false, which is what it answers for an unreachable endpoint)
        patch.setattr("cloud.webhooks.resolve", _no_network)
        yield server
    server.stop()
    app.extensions["iot"].hub.close()
    engine.dispose()


def _no_network(host: str, port: int, allow_private: bool) -> list[str]:
    raise OSError(f"no lookups of {host!r} from the tests")


def _operations_from_code() -> dict:
    """The operations of the OpenAPI document, known at collection time (the server serves the same document)."""
    from cloud.web.openapi import spec

    schema = schemathesis.openapi.from_dict(spec())
    return {r.ok().label: r.ok() for r in schema.get_all_operations()}


def _operation_labels() -> list[str]:
    return list(_operations_from_code())


@pytest.fixture(scope="module")
def api_operations(api_server):
    schema = schemathesis.openapi.from_url(f"{api_server.url}/api/v1/openapi.json")
    return {r.ok().label: r.ok() for r in schema.get_all_operations()}


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("label", _operation_labels())
def test_no_server_errors(api_server, api_operations, label, mode):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    # schemathesis leaves out the document's own URL when it loads it from the server
    operation = api_operations.get(label) or _operations_from_code()[label]

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(base_url=api_server.url,
                             headers={"Authorization": f"Bearer {api_server.token}"}, timeout=20)
        if response.status_code < 500:
            return
        what = (f"{case.method} {case.formatted_path} -> {response.status_code} query={case.query!r} "
                f"body={getattr(case, 'body', None)!r}")
        raise AssertionError(f"{what}: {response.text[:500]}")

    try:
        run()
    except Unsatisfiable:
        pytest.skip(f"no {mode} input can be generated for {label}")


EXAMPLES = 15
