"""The first end-to-end slice, in both profiles, with the real firmware and the real services:

1. a firmware process on the MicroPython unix port publishes telemetry and its retained status;
2. the bridge moves it to iot-sensordata keyed by device id;
3. the writer stores it idempotently on (device, boot, seq);
4. GET /api/v1/devices/<id>/latest returns the reading;
5. POST /api/v1/devices/<id>/commands {"op":"ping"} travels iot-control -> bridge -> devices/<id>/commands, the
   firmware acks on devices/<id>/acks, and GET /api/v1/commands/<cid> shows "delivered" with the result.

Production: every service is its own `python -m cloud ...` process on Mosquitto, Kafka, PostgreSQL and Redis.
Embedded: `python -m cloud demo` as a user runs it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cloud import db
from cloud.db import repo
from cloud.db.models import Telemetry, Tenant
from cloud.nativestack import free_port
from cloud.sim import SimulatedDevice, device_config
from tests.webhook_receiver import Receiver

REPO = Path(__file__).resolve().parents[2]


def call(base: str, token: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_for(what: str, probe, timeout: float, diagnostics=lambda: ""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last answer: {last!r}\n{diagnostics()}")


def drive_slice(base: str, token: str, device_id: str, diagnostics) -> tuple[dict, dict]:
    """Steps 4 and 5 through the public API; returns the latest reading and the finished command."""
    def latest():
        code, body = call(base, token, "GET", f"/api/v1/devices/{device_id}/latest")
        return body if code == 200 and body.get("t") is not None else None

    reading = wait_for(f"a reading of {device_id} via the API", latest, 90, diagnostics)
    assert -40 <= reading["t"] <= 85 and 0 <= reading["h"] <= 100 and 300 <= reading["p"] <= 1100
    assert isinstance(reading["seq"], int) and isinstance(reading["boot"], int)

    code, created = call(base, token, "POST", f"/api/v1/devices/{device_id}/commands", {"op": "ping"})
    assert code == 202, created
    cid = created["cid"]
    assert created["status"] == "queued"

    def finished():
        code, body = call(base, token, "GET", f"/api/v1/commands/{cid}")
        assert code == 200, body
        return body if body["status"] in ("delivered", "failed", "expired") else None

    command = wait_for(f"command {cid} to finish", finished, 60, diagnostics)
    assert command["status"] == "delivered", command
    assert command["ok"] is True and command["result"]["pong"] is True

    code, body = call(base, token, "POST", f"/api/v1/devices/{device_id}/commands", {"op": "dance"})
    assert code == 400 and "unknown op" in body["error"]
    return reading, command


def assert_stored_once_without_gaps(engine, device_id: str) -> int:
    """Every reading of the device is in the database exactly once, and no seq is missing within a boot."""
    with db.session_factory(engine)() as session:
        rows = session.execute(select(Telemetry.boot, func.count(), func.min(Telemetry.seq), func.max(Telemetry.seq),
                                      func.count(func.distinct(Telemetry.seq)))
                               .where(Telemetry.device_id == device_id).group_by(Telemetry.boot)).all()
    assert rows, f"no telemetry stored for {device_id}"
    total = 0
    for boot, count, low, high, distinct in rows:
        assert count == distinct == high - low + 1, f"boot {boot}: {count} rows for seq {low}..{high}"
        total += count
    return total


def no_process_in(directory: Path) -> list[int]:
    """PIDs whose working directory is under ``directory`` (the firmware processes run in their flash dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
                state = (entry / "stat").read_text().split(") ", 1)[1][0]
            except OSError:
                continue
            if cwd.startswith(str(directory)) and state != "Z":
                found.append(int(entry.name))
    return found


# --- embedded profile ---------------------------------------------------------------------------------------

def test_slice_embedded_profile(tmp_path):
    web_port, mqtt_port = free_port(), free_port()
    receiver = Receiver()
    data_dir = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in list(env):
        if name.startswith("IOT_"):
            del env[name]
    demo = subprocess.Popen(
        [sys.executable, "-m", "cloud", "demo", "--port", str(web_port), "--mqtt-port", str(mqtt_port),
         "--data-dir", str(data_dir), "--interval", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            output.append(line)
            if "Press Ctrl-C" in line:
                break
        banner = "".join(output)
        assert "Press Ctrl-C" in banner, banner
        assert f"http://127.0.0.1:{web_port}/" in banner
        password = re.search(r"password: (\S+)", banner).group(1)
        assert password

        engine = db.make_engine(f"sqlite:///{data_dir / 'iot.db'}")
        with db.session_factory(engine)() as session:
            tenant = session.scalar(select(Tenant).where(Tenant.name == "demo"))
            _, token = repo.create_api_token(session, tenant.id, "e2e", "operator")
            repo.create_webhook(session, tenant.id, "e2e", receiver.url + "/demo")  # the demo allows loopback
            session.commit()

        base = f"http://127.0.0.1:{web_port}"
        console = lambda: (data_dir / "devices" / "demo-1" / "console.log").read_text(errors="replace")[-3000:]  # noqa: E731
        drive_slice(base, token, "demo-1", console)
        for device_id in ("demo-2", "demo-3"):
            wait_for(f"{device_id} latest", lambda d=device_id: call(base, token, "GET",
                                                                    f"/api/v1/devices/{d}/latest")[1].get("t"), 30)
        # README: warming an emulated sensor raises the demo's first rule, and the alarm reaches a webhook
        (data_dir / "devices" / "demo-2" / "sensor_env.json").write_text('{"t": 31.5}')
        wait_for("demo-2's alarm at the webhook", lambda: receiver.requests, 60)
        event = receiver.bodies("/demo")[0]
        assert (event["device"], event["rule"], event["state"]) == ("demo-2", "too-hot", "raised")
        # the dashboard answers a logged-out browser with the login page
        with urllib.request.urlopen(base + "/login", timeout=10) as response:
            assert response.status == 200 and b"password" in response.read().lower()
        time.sleep(2)  # let the writer catch up with what the devices published meanwhile
        assert assert_stored_once_without_gaps(engine, "demo-1") >= 2
        engine.dispose()
    finally:
        receiver.close()
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            code = demo.wait()
        rest = demo.stdout.read()
    assert code == 0, "".join(output) + rest
    assert "demo stopped" in rest
    assert no_process_in(data_dir) == [], "firmware processes left behind"


# --- production profile --------------------------------------------------------------------------------------

@pytest.fixture
def e2e_database(postgres):
    """A database of its own on the shared PostgreSQL server, so other tests' rows cannot interfere."""
    import psycopg

    name = f"e2e_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(postgres.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" OWNER iot')
    yield postgres.url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres.admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_slice_production_profile(tmp_path, mosquitto, kafka, redis, e2e_database):
    run_id = f"e2e{int(time.time())}"
    receiver = Receiver()
    web_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_")}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "IOT_PROFILE": "production",
        "IOT_MQTT_URL": mosquitto.url,
        "IOT_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "IOT_DATABASE_URL": e2e_database,
        "IOT_REDIS_URL": redis.url,
        "IOT_SECRET_KEY": "e2e-secret",
        "IOT_WEB_PORT": str(web_port),
        "IOT_WEB_WORKERS": "1",
        "IOT_WEB_THREADS": "16",
        "IOT_BRIDGE_GROUP": run_id,
        "IOT_KAFKA_PARTITIONS": "3",
        "IOT_WEBHOOK_ALLOW_PRIVATE": "true",  # the webhook's receiver is this test, on loopback
        # topics of their own, so this run shares nothing with other tests on the same Kafka
        **{f"IOT_TOPIC_{kind}": f"{run_id}.{kind.lower()}" for kind in
           ("TELEMETRY", "STATUS", "ACKS", "ALARMS", "CONTROL", "COMMAND_STATUS", "DEADLETTER")},
    })

    def once(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "cloud", *args], env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"

    once("kafka-init")
    once("db", "upgrade")

    engine = db.make_engine(e2e_database)
    device_id = f"{run_id}-dev"
    with db.session_factory(engine)() as session:
        tenant = repo.create_tenant(session, f"{run_id}-tenant")
        repo.create_device(session, tenant.id, device_id, "e2e sensor")
        _, token = repo.create_api_token(session, tenant.id, "e2e", "operator")
        # every reading of the device (about 21 degC) is above this: the alarm service raises at once, and the
        # notifier POSTs the event to the webhook below
        repo.create_rule(session, tenant.id, name="e2e-hot", kind="threshold", metric="t", max=0.0,
                         severity="critical", device_id=device_id)
        _, webhook_secret = repo.create_webhook(session, tenant.id, "e2e", receiver.url + "/alarms")
        session.commit()

    logs: dict[str, Path] = {}
    services: dict[str, subprocess.Popen] = {}
    device = SimulatedDevice(device_id, tmp_path / "flash" / device_id, device_config(device_id, mosquitto.url,
                                                                                        interval=1))

    def diagnostics() -> str:
        parts = [f"--- {name} ---\n{path.read_text(errors='replace')[-3000:]}" for name, path in logs.items()]
        return "\n".join(parts) + f"\n--- firmware console ---\n{device.console()[-3000:]}"

    try:
        for name in ("bridge", "writer", "alarms", "notifier", "web"):
            logs[name] = tmp_path / f"{name}.log"
            services[name] = subprocess.Popen([sys.executable, "-m", "cloud", name], env=env, cwd=tmp_path,
                                              stdout=logs[name].open("wb"), stderr=subprocess.STDOUT,
                                              start_new_session=True)
        device.start()
        base = f"http://127.0.0.1:{web_port}"
        wait_for("the web service", lambda: _healthy(base), 60, diagnostics)
        drive_slice(base, token, device_id, diagnostics)
        time.sleep(2)
        assert assert_stored_once_without_gaps(engine, device_id) >= 2

        import redis as redis_lib

        cached = redis_lib.Redis.from_url(redis.url).hgetall(f"iot:latest:{device_id}")
        assert cached, "latest values are not in Redis"
        # the alarm, from the device through bridge, Kafka, alarm service, Kafka and notifier to the webhook
        wait_for("the alarm at the webhook", lambda: receiver.requests, 60, diagnostics)
        body, signature = receiver.requests[0]["body"], receiver.requests[0]["headers"]["X-IoT-Signature"]
        event = json.loads(body)
        assert (event["device"], event["rule"], event["state"], event["severity"]) == \
            (device_id, "e2e-hot", "raised", "critical")
        assert signature == "sha256=" + hmac.new(webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    finally:
        device.stop()
        codes = {}
        for name, proc in services.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in services.items():
            try:
                codes[name] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = proc.wait()
        engine.dispose()
        receiver.close()
    assert codes == {"bridge": 0, "writer": 0, "alarms": 0, "notifier": 0, "web": 0}, diagnostics()


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
