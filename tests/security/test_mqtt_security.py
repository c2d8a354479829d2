"""Device security on a REAL Mosquitto 2 configured the way production runs it (cloud.mqtt_auth via
cloud.nativestack.SecureMosquitto): accounts come from the database, ACLs confine each device to its own topics,
anonymous clients are refused, revocation/rotation/provisioning reach the broker with SIGHUP (no restart), and
the TLS listener only talks to clients that trust our CA -- checked with paho and with the real firmware on the
MicroPython unix port.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud import ca, db, mqtt_auth
from cloud.db import repo
from cloud.nativestack import SecureMosquitto, mqtt_connack
from cloud.sim import SimulatedDevice, device_config

V5 = paho.MQTTv5
V311 = paho.MQTTv311


def wait_for(pred, timeout=10.0, what="condition", step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Client:
    """A paho client that records CONNACK, messages, SUBACKs, PUBACK reason codes and disconnects."""

    def __init__(self, port: int, username: str | None, password: str | None, *, client_id: str | None = None,
                 protocol=V5, tls_ca: str | Path | None = None, host: str = "127.0.0.1", reconnect=False):
        self.connack: list = []
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: list = []
        self.pubacks: dict[int, object] = {}
        self.disconnects: list = []
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                             protocol=protocol)
        if username is not None:
            self.c.username_pw_set(username, password)
        if tls_ca is not None:
            ctx = ssl.create_default_context(cafile=str(tls_ca))
            self.c.tls_set_context(ctx)
        self.c.on_connect = lambda c, u, f, rc, p=None: self.connack.append(rc)
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self.subacks.append(rcs)
        self.c.on_publish = lambda c, u, mid, rc, p=None: self.pubacks.__setitem__(mid, rc)
        self.c.on_disconnect = lambda c, u, f, rc, p=None: self.disconnects.append(rc)
        if not reconnect:
            self.c.reconnect_delay_set(60, 120)
        self.c.connect(host, port, keepalive=30)
        self.c.loop_start()
        wait_for(lambda: self.connack or self.disconnects, 5, "CONNACK")

    @property
    def ok(self) -> bool:
        return bool(self.connack) and not self.connack[0].is_failure

    def sub(self, *topics: str) -> list:
        n = len(self.subacks)
        self.c.subscribe([(t, 1) for t in topics])
        wait_for(lambda: len(self.subacks) > n, 5, "SUBACK")
        return self.subacks[-1]

    def pub(self, topic: str, payload: bytes = b"{}", retain=False):
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        wait_for(lambda: info.mid in self.pubacks or self.disconnects, 5, f"PUBACK for {topic}")
        return self.pubacks.get(info.mid)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(*args, **kwargs) -> Client:
        c = Client(*args, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.close()
        except Exception:
            pass


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('secdb') / 'iot.db'}"
    db.upgrade(url)
    eng = db.make_engine(url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def tenant_id(engine):
    with db.session_factory(engine)() as s:
        t = repo.create_tenant(s, "security")
        s.commit()
        return t.id


def provision(engine, tenant_id: int, device_id: str) -> str:
    with db.session_factory(engine)() as s:
        _, password = repo.create_device(s, tenant_id, device_id)
        s.commit()
    return password


@pytest.fixture(scope="module")
def broker(request, tmp_path_factory, engine):
    b = SecureMosquitto(tmp_path_factory.mktemp("secure-mosquitto"))
    request.addfinalizer(b.close)
    b.start()
    b.sync(engine)
    return b


@pytest.fixture
def pair(broker, engine, tenant_id):
    """Two freshly provisioned devices (ids unique per test) -> {id: password}."""
    tag = uuid.uuid4().hex[:6]
    creds = {f"a-{tag}": provision(engine, tenant_id, f"a-{tag}"), f"b-{tag}": provision(engine, tenant_id, f"b-{tag}")}
    assert broker.sync(engine)
    return creds


def _bridge(broker, clients) -> Client:
    return clients(broker.port, "_bridge", broker.service_passwords["_bridge"], client_id=f"bridge-{uuid.uuid4().hex[:6]}")


# --- authentication ---------------------------------------------------------------------------------------------

def test_anonymous_is_refused_on_every_listener(broker, clients):
    for port in (broker.port, broker.device_port):
        for proto in (V5, V311):
            c = clients(port, None, None, protocol=proto)
            assert not c.ok, f"anonymous accepted on {port}"
    c = clients(broker.tls_port, None, None, tls_ca=broker.ca_file, host="localhost")
    assert not c.ok


def test_wrong_password_and_unknown_user_are_refused(broker, pair, clients):
    a = next(iter(pair))
    assert not clients(broker.device_port, a, "not-the-password").ok
    assert not clients(broker.device_port, "nobody", "x").ok
    assert clients(broker.device_port, a, pair[a]).ok


def test_devices_and_services_cannot_cross_listeners(broker, pair, clients):
    a = next(iter(pair))
    assert not clients(broker.port, a, pair[a]).ok, "a device logged in on the service listener"
    assert not clients(broker.device_port, "_bridge", broker.service_passwords["_bridge"]).ok


def test_device_ids_cannot_collide_with_service_accounts(engine, tenant_id):
    with db.session_factory(engine)() as s, pytest.raises(ValueError):
        repo.create_device(s, tenant_id, "_bridge")


# --- authorisation ----------------------------------------------------------------------------------------------

def test_device_cannot_publish_as_another(broker, pair, clients):
    a, b = pair
    bridge = _bridge(broker, clients)
    bridge.sub("devices/+/telemetry", "devices/+/status", "devices/+/acks")
    dev = clients(broker.device_port, a, pair[a])
    assert dev.ok
    assert not dev.pub(f"devices/{a}/telemetry", b"own").is_failure
    # every way of speaking for b is refused (MQTT 5 PUBACK 0x87 Not authorized) and never reaches the bridge
    for kind in ("telemetry", "status", "acks"):
        rc = dev.pub(f"devices/{b}/{kind}", b"forged")
        assert rc is not None and rc.is_failure and rc.value == 0x87, (kind, rc)
    # nor may a device write commands (even its own) or anything outside devices/<id>/
    for topic in (f"devices/{a}/commands", f"devices/{b}/commands", "devices/x", "other/topic", f"{a}/telemetry"):
        rc = dev.pub(topic, b"forged")
        assert rc.is_failure, topic
    wait_for(lambda: (f"devices/{a}/telemetry", b"own") in bridge.messages, 5, "own telemetry at the bridge")
    time.sleep(0.3)
    assert all(payload != b"forged" for _, payload in bridge.messages), bridge.messages


def test_device_cannot_read_another_devices_commands(broker, pair, clients):
    a, b = pair
    dev_a = clients(broker.device_port, a, pair[a])
    dev_b = clients(broker.device_port, b, pair[b])
    dev_b.sub(f"devices/{b}/commands")
    acks = dev_a.sub(f"devices/{a}/commands", f"devices/{b}/commands", "devices/+/commands", "#")
    assert not acks[0].is_failure
    # Mosquitto's ACL file grants the SUBSCRIBE but checks "read" on every delivery: nothing of b's arrives
    bridge = _bridge(broker, clients)
    assert not bridge.pub(f"devices/{b}/commands", b"for-b").is_failure
    assert not bridge.pub(f"devices/{a}/commands", b"for-a").is_failure
    wait_for(lambda: (f"devices/{a}/commands", b"for-a") in dev_a.messages, 5, "a's own command")
    wait_for(lambda: (f"devices/{b}/commands", b"for-b") in dev_b.messages, 5, "b's command at b")
    time.sleep(0.3)
    assert set(dev_a.messages) == {(f"devices/{a}/commands", b"for-a")}  # (once per matching subscription)


def test_a_device_cannot_kick_another_off_with_its_client_id(broker, pair, clients):
    a, b = pair
    dev_b = clients(broker.device_port, b, pair[b], client_id=b)
    assert dev_b.ok
    clients(broker.device_port, a, pair[a], client_id=b)  # the broker uses the username as client id
    time.sleep(0.5)
    assert dev_b.disconnects == []


def test_bridge_account_uses_shared_subscriptions_and_sends_commands(broker, pair, clients):
    a, _ = pair
    bridge = _bridge(broker, clients)
    acks = bridge.sub("$share/g/devices/+/telemetry")
    assert not acks[0].is_failure
    dev = clients(broker.device_port, a, pair[a])
    dev.pub(f"devices/{a}/telemetry", b"x")
    wait_for(lambda: bridge.messages, 5, "shared subscription delivery")
    # nothing beyond its rights: $SYS and foreign topics are not delivered, and it cannot publish telemetry
    spy = _bridge(broker, clients)
    spy.sub("#", "$SYS/#")
    assert spy.pub(f"devices/{a}/telemetry", b"forged").is_failure
    monitor = clients(broker.port, "_monitor", broker.service_passwords["_monitor"])
    monitor.pub("other/topic", b"y")
    time.sleep(1.2)
    assert not any(t.startswith("$SYS") or t == "other/topic" for t, _ in spy.messages), spy.messages[:5]


# --- changes without a restart ---------------------------------------------------------------------------------

def test_revoked_device_is_cut_off_without_a_broker_restart(broker, pair, clients, engine, tenant_id):
    a, b = pair
    pid = broker.pid
    dev_a = clients(broker.device_port, a, pair[a])
    dev_b = clients(broker.device_port, b, pair[b])
    with db.session_factory(engine)() as s:
        repo.revoke_device(s, tenant_id, a)
        s.commit()
    t0 = time.monotonic()
    assert broker.sync(engine)
    wait_for(lambda: dev_a.disconnects, 5, "the revoked device's session to be closed")
    cut_after = time.monotonic() - t0
    assert not clients(broker.device_port, a, pair[a]).ok
    assert broker.pid == pid and broker.running, "the broker was restarted"
    assert dev_b.disconnects == [] and not dev_b.pub(f"devices/{b}/telemetry").is_failure
    assert cut_after < 3


def test_rotation_invalidates_the_old_password_and_its_session(broker, pair, clients, engine, tenant_id):
    a, _ = pair
    old = clients(broker.device_port, a, pair[a])
    with db.session_factory(engine)() as s:
        new_password = repo.rotate_device_password(s, tenant_id, a)
        s.commit()
    broker.sync(engine)
    wait_for(lambda: old.disconnects, 5, "the session on the old password to be closed")
    assert not clients(broker.device_port, a, pair[a]).ok
    fresh = clients(broker.device_port, a, new_password)
    assert fresh.ok and not fresh.pub(f"devices/{a}/telemetry").is_failure


def test_new_device_can_connect_after_sync(broker, engine, tenant_id, clients):
    device_id = f"new-{uuid.uuid4().hex[:6]}"
    password = provision(engine, tenant_id, device_id)
    assert not clients(broker.device_port, device_id, password).ok  # not yet on the broker
    broker.sync(engine)
    assert clients(broker.device_port, device_id, password).ok


def test_sync_without_changes_does_not_reload(broker, engine):
    broker.sync(engine)
    size = broker.log_path.stat().st_size
    assert broker.sync(engine) is False
    time.sleep(0.2)
    assert "Reloading" not in broker.log_path.read_bytes()[size:].decode(errors="replace")


def test_watcher_applies_database_changes_on_its_own(broker, engine, tenant_id, clients):
    watcher = mqtt_auth.Watcher(engine, broker.auth_dir, broker.accounts, interval=0.2, pid=broker.pid).start()
    try:
        device_id = f"w-{uuid.uuid4().hex[:6]}"
        password = provision(engine, tenant_id, device_id)
        wait_for(lambda: clients(broker.device_port, device_id, password).ok, 5, "the watcher to add the device")
        dev = clients(broker.device_port, device_id, password)
        with db.session_factory(engine)() as s:
            repo.revoke_device(s, tenant_id, device_id)
            s.commit()
        wait_for(lambda: dev.disconnects, 5, "the watcher to cut the revoked device off")
        assert watcher.health()[0]
    finally:
        watcher.stop()


def test_generated_files_are_private(broker):
    for name in (mqtt_auth.DEVICES_PASSWD, mqtt_auth.SERVICES_PASSWD):
        path = broker.auth_dir / name
        assert path.stat().st_mode & 0o077 == 0, f"{name} is readable by others"
        assert ":$7$" in path.read_text() or name == mqtt_auth.DEVICES_PASSWD
    assert "pattern write devices/%u/telemetry" in (broker.auth_dir / mqtt_auth.DEVICES_ACL).read_text()


# --- TLS ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return ca.make_ca(tmp_path_factory.mktemp("other-ca"), ["localhost"], ["127.0.0.1"])


def test_tls_with_our_ca_works_and_with_another_ca_fails(broker, pair, clients, other_ca):
    a, _ = pair
    good = clients(broker.tls_port, a, pair[a], tls_ca=broker.ca_file, host="localhost")
    assert good.ok and not good.pub(f"devices/{a}/telemetry").is_failure
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(broker.tls_port, a, pair[a], tls_ca=other_ca.ca_crt, host="localhost")
    # the certificate names localhost and 127.0.0.1 only
    ctx = ssl.create_default_context(cafile=str(broker.ca_file))
    import socket

    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="broker.example.com")


def test_tls_listener_still_requires_credentials(broker, clients):
    assert not clients(broker.tls_port, "nobody", "x", tls_ca=broker.ca_file, host="localhost").ok


# --- the real firmware ---------------------------------------------------------------------------------------

# make test installs the unix port and umqtt.simple: if either is missing these tests fail (SimulatedDevice says why)


def _tls_device(tmp_path: Path, device_id: str, password: str, port: int, ca_file: Path | None, ca_name="ca.der"):
    cfg = device_config(device_id, f"mqtts://localhost:{port}", interval=1, username=device_id, password=password)
    flash = tmp_path / device_id
    flash.mkdir(parents=True)
    if ca_file is not None:
        (flash / ca_name).write_bytes(ca_file.read_bytes())
        cfg["mqtt"]["ca"] = ca_name
    return SimulatedDevice(device_id, flash, cfg)


@pytest.mark.parametrize("ca_name", ["ca.der", "ca.crt"])
def test_firmware_over_tls_with_our_ca(broker, pair, clients, tmp_path, ca_name):
    a, _ = pair
    bridge = _bridge(broker, clients)
    bridge.sub(f"devices/{a}/telemetry", f"devices/{a}/status")
    ca_file = broker.ca_dir / ca_name
    device = _tls_device(tmp_path, a, pair[a], broker.tls_port, ca_file, ca_name)
    device.start()
    try:
        wait_for(lambda: any(t.endswith("/telemetry") for t, _ in bridge.messages), 30,
                 "telemetry from the firmware over TLS") or None
        assert "WARNING" not in device.console()
        # ... and it receives its commands over the same verified session
        wait_for(lambda: "MQTT up" in device.console(), 10, "link up")
    except AssertionError:
        raise AssertionError(device.console()[-3000:])
    finally:
        device.stop()


def test_firmware_refuses_a_broker_signed_by_another_ca(broker, pair, clients, tmp_path, other_ca):
    a, _ = pair
    bridge = _bridge(broker, clients)
    bridge.sub(f"devices/{a}/#")
    device = _tls_device(tmp_path, a, pair[a], broker.tls_port, other_ca.ca_der)
    device.start()
    try:
        wait_for(lambda: device.console().count("MQTT connect to") >= 1, 20, "a failed connect attempt")
        time.sleep(1)
        assert "MQTT up" not in device.console(), device.console()[-2000:]
        assert bridge.messages == []
        assert "not correctly signed" in device.console() or "CERT" in device.console().upper()
    finally:
        device.stop()


def test_firmware_with_another_devices_password_cannot_connect(broker, pair, tmp_path):
    a, b = pair
    cfg = device_config(a, broker.device_url, interval=1, username=a, password=pair[b])
    device = SimulatedDevice(a, tmp_path / a, cfg)
    device.start()
    try:
        wait_for(lambda: "MQTT connect to" in device.console(), 20, "a refused connect")
        assert "MQTT up" not in device.console()
    finally:
        device.stop()


def test_broker_probe_answers(broker):
    assert mqtt_connack(broker.port, username="_monitor", password=broker.service_passwords["_monitor"])


def test_cli_sync_and_watch(engine, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    url = str(engine.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_")}
    env.update({"IOT_DATABASE_URL": url, "SVC": "bridge:pw1,_monitor:pw2,connect:"})
    out = subprocess.run([sys.executable, "-m", "cloud.mqtt_auth", "sync", "--dir", str(tmp_path / "a"),
                          "--service-env", "SVC"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    services = (tmp_path / "a" / mqtt_auth.SERVICES_PASSWD).read_text()
    assert services.startswith("_bridge:$7$") and "_monitor:$7$" in services and "_connect" not in services
    assert "user _bridge\ntopic read devices/+/telemetry" in (tmp_path / "a" / mqtt_auth.SERVICES_ACL).read_text()
    watch = subprocess.Popen([sys.executable, "-m", "cloud.mqtt_auth", "watch", "--dir", str(tmp_path / "b"),
                              "--service-env", "SVC", "--interval", "0.2", "--metrics-port", "0"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (tmp_path / "b" / mqtt_auth.DEVICES_PASSWD).exists(), 20, "the watcher's first sync")
    finally:
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(20) == 0, watch.stdout.read()
