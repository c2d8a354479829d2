"""The production topology as `make up` starts it (cloud.nativestack.Platform): a device provisioned in the
database reaches the broker through the account watcher, the real firmware connects over TLS verifying our CA,
its readings go bridge -> Kafka -> writer -> PostgreSQL, and revoking it cuts it off with no restart."""

from __future__ import annotations

import time
import uuid

import pytest

from cloud import db
from cloud.db import repo
from cloud.nativestack import Platform
from cloud.sim import SimulatedDevice, device_config

from .test_mqtt_security import wait_for


@pytest.fixture(scope="module")
def platform(tmp_path_factory, kafka_libs):
    p = Platform(tmp_path_factory.mktemp("platform"), kafka_libs=str(kafka_libs),
                 services=("bridge", "writer"))
    p.start()
    yield p
    p.stop()


def test_provisioned_device_over_tls_end_to_end_then_revoked(platform, tmp_path):
    engine = platform.engine
    device_id = f"tls-{uuid.uuid4().hex[:6]}"
    with db.session_factory(engine)() as s:
        tenant = repo.create_tenant(s, f"sec-{device_id}")
        _, password = repo.create_device(s, tenant.id, device_id)
        s.commit()
        tenant_id = tenant.id
    m = platform.mosquitto
    flash = tmp_path / device_id
    flash.mkdir()
    (flash / "ca.crt").write_bytes(m.ca_file.read_bytes())
    cfg = device_config(device_id, f"mqtts://localhost:{m.tls_port}", interval=1, username=device_id,
                        password=password)
    cfg["mqtt"]["ca"] = "ca.crt"
    device = SimulatedDevice(device_id, flash, cfg)
    pid = m.pid
    device.start()
    try:
        def stored():
            with db.session_factory(engine)() as s:
                return repo.latest_readings(s, tenant_id, device_id, 5)

        try:
            wait_for(stored, 60, "a reading stored in PostgreSQL", step=0.3)
        except AssertionError:
            raise AssertionError(device.console()[-3000:])
        with db.session_factory(engine)() as s:
            repo.revoke_device(s, tenant_id, device_id)
            s.commit()
        wait_for(lambda: "MQTT down" in device.console(), 15, "the revoked device to be disconnected")
        time.sleep(3)
        console = device.console()
        tail = console[console.rindex("MQTT down"):]
        assert "MQTT up" not in tail, tail[-1500:]  # its reconnects are refused
        assert m.pid == pid and m.running
    finally:
        device.stop()
    assert all(s.running for s in platform.running())
