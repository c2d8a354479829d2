"""The native service harness really starts, serves, restarts and cleans up each service."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from cloud import nativestack
from cloud.nativestack import Kafka, Postgres, Redis, ServiceStartError, group_pids, pid_alive, port_is_free


def assert_gone(svc, pids):
    """After stop/kill: the port is free and no process of the service's group remains."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not port_is_free(svc.port):
        time.sleep(0.05)
    assert port_is_free(svc.port), f"port {svc.port} still in use"
    assert not group_pids(svc.pgid), f"processes left in group {svc.pgid}: {group_pids(svc.pgid)}"
    for pid in pids:
        assert not pid_alive(pid), f"pid {pid} still alive"
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"


# ---- MQTT ----------------------------------------------------------------------------------------


def test_mosquitto_pub_sub(mosquitto):
    import paho.mqtt.client as mqtt

    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    got = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-sub")
    sub.on_message = lambda c, u, msg: got.append((msg.topic, msg.payload))
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("t/#", qos=1)
    sub.loop_start()
    try:
        time.sleep(0.3)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-pub")
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        pub.publish("t/x", b"hello", qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert got == [("t/x", b"hello")]


# ---- Kafka ---------------------------------------------------------------------------------------


def _produce(bootstrap, topic, values):
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    for v in values:
        p.produce(topic, v)
    assert p.flush(30) == 0


def _consume(bootstrap, topic, n, timeout=30):
    from confluent_kafka import Consumer

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    # assign() all partitions instead of subscribe(): no group rebalance wait
    from confluent_kafka import TopicPartition

    md = c.list_topics(topic, timeout=10)
    c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    out = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                out.append(m.value())
    finally:
        c.close()
    return sorted(out)


def test_kafka_round_trip(kafka):
    assert kafka.bootstrap == f"127.0.0.1:{kafka.port}"
    kafka.create_topics(["rt"])
    md = kafka.admin().list_topics("rt", timeout=10)
    assert len(md.topics["rt"].partitions) == 6
    values = [f"m{i}".encode() for i in range(20)]
    _produce(kafka.bootstrap, "rt", values)
    assert _consume(kafka.bootstrap, "rt", 20) == sorted(values)
    # auto-created topics get num.partitions=6
    _produce(kafka.bootstrap, "auto-created", [b"x"])
    assert len(kafka.admin().list_topics("auto-created", timeout=10).topics["auto-created"].partitions) == 6


def test_kafka_restart_and_kill_keep_data(tmp_path, kafka_libs):
    k = Kafka(tmp_path / "k", libs=kafka_libs)
    try:
        k.start()
        k.create_topics(["keep"], partitions=2)
        _produce(k.bootstrap, "keep", [b"a", b"b"])
        port, pids = k.port, [k.pid]
        k.stop()
        assert_gone(k, pids)
        k.start()
        assert k.port == port
        _produce(k.bootstrap, "keep", [b"c"])
        assert _consume(k.bootstrap, "keep", 3) == [b"a", b"b", b"c"]
        pids = [k.pid]
        k.kill()
        assert_gone(k, pids)
        k.start()
        assert _consume(k.bootstrap, "keep", 3) == [b"a", b"b", b"c"]
    finally:
        pids = [k.pid] if k.pid else []
        k.close()
    assert_gone(k, pids)


# ---- PostgreSQL ----------------------------------------------------------------------------------


def test_postgres_query(postgres):
    import psycopg

    assert postgres.url == f"postgresql+psycopg://iot:iot@127.0.0.1:{postgres.port}/iot"
    with psycopg.connect(postgres.dsn) as conn:
        assert conn.execute("SELECT current_user, current_database(), 1 + 1").fetchone() == ("iot", "iot", 2)
        assert conn.execute("SHOW fsync").fetchone()[0] == "off"


def test_postgres_restart_and_kill(tmp_path):
    import psycopg

    pg = Postgres(tmp_path / "pg")
    try:
        pg.start()
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (v int)")
            conn.execute("INSERT INTO t VALUES (1)")
        pids = [pg.pid]
        pg.stop()
        assert_gone(pg, pids)
        pg.start()
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (2)")
            # a live backend: killing the postmaster must not leave it behind
            pids = [pg.pid, conn.info.backend_pid]
            pg.kill_postmaster()
        assert_gone(pg, pids)
        pg.start()
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT array_agg(v ORDER BY v) FROM t").fetchone()[0] == [1, 2]
    finally:
        pids = [pg.pid] if pg.pid else []
        pg.close()
    assert_gone(pg, pids)
    assert pg.base is None or not pg.base.exists()  # scratch cluster outside workdir removed by close()


def test_postgres_broken_config_raises_with_log(tmp_path):
    pg = Postgres(tmp_path / "bad", settings={"shared_buffers": "not-a-size"})
    with pytest.raises(ServiceStartError) as exc:
        pg.start()
    msg = str(exc.value)
    assert "postgres" in msg and "failed to start" in msg
    assert "shared_buffers" in msg  # the log tail names the bad setting
    assert not pg.running
    assert not group_pids(pg.pgid)
    pg.close()


# ---- Redis ---------------------------------------------------------------------------------------


def test_redis_set_get(redis):
    import redis as redis_lib

    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    r = redis_lib.Redis.from_url(redis.url)
    r.set("k", "v")
    assert r.get("k") == b"v"
    r.close()


def test_redis_restart_and_kill(tmp_path):
    import redis as redis_lib

    rs = Redis(tmp_path / "r")
    try:
        rs.start()
        r = redis_lib.Redis.from_url(rs.url)
        r.set("k", "v")
        pids = [rs.pid]
        rs.stop()
        assert_gone(rs, pids)
        rs.start()
        assert r.get("k") is None  # no persistence by design
        r.set("k", "w")
        pids = [rs.pid]
        rs.kill()
        assert_gone(rs, pids)
        rs.start()
        assert r.ping()
        r.close()
    finally:
        rs.close()


def test_mosquitto_restart_keeps_persistent_session(tmp_path):
    import paho.mqtt.client as mqtt

    m = nativestack.Mosquitto(tmp_path / "m")
    try:
        m.start()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="persist", clean_session=False)
        sub.connect("127.0.0.1", m.port)
        sub.subscribe("p/#", qos=1)
        sub.loop_start()
        time.sleep(0.3)
        sub.loop_stop()
        sub.disconnect()
        pids = [m.pid]
        m.stop()
        assert_gone(m, pids)
        m.start()
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pp")
        pub.connect("127.0.0.1", m.port)
        pub.loop_start()
        pub.publish("p/1", b"queued", qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        got = []
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="persist", clean_session=False)
        sub.on_message = lambda c, u, msg: got.append(msg.payload)
        sub.connect("127.0.0.1", m.port)
        sub.loop_start()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        sub.loop_stop()
        sub.disconnect()
        assert got == [b"queued"]
    finally:
        m.close()


def test_port_conflict_is_retried(tmp_path):
    import socket

    # occupy the port the service picked: start() must move to another free port
    rs = Redis(tmp_path / "r")
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", rs.port))
    blocker.listen()
    taken = rs.port
    try:
        rs.start()
        assert rs.port != taken
    finally:
        rs.close()
        blocker.close()


def test_cli_up(tmp_path, kafka_libs):
    import signal
    import subprocess
    import sys

    env = {**os.environ, "IOT_KAFKA_LIBS": str(kafka_libs)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud.nativestack", "up", "--dir", str(tmp_path / "stack")],
        cwd=nativestack.REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(4)]
        exports = dict(l.removeprefix("export ").strip().split("=", 1) for l in lines if l.startswith("export "))
        assert set(exports) == {"IOT_MQTT_URL", "IOT_KAFKA_BOOTSTRAP", "IOT_DATABASE_URL", "IOT_REDIS_URL"}, lines
        kport = int(exports["IOT_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1])
        assert not port_is_free(kport)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, proc.stderr.read()
    for url in exports.values():
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert port_is_free(port)


def test_prometheus_scrapes_a_service_metrics(tmp_path):
    """`make up` runs Prometheus like compose does: it must really scrape our services' /metrics."""
    import json
    import threading
    import time
    import urllib.request

    from cloud.service import OpsServer

    class Idle:
        name = "idle"

        def run(self, stop: threading.Event) -> None:
            stop.wait()

        def health(self):
            return True, {}

    ops = OpsServer([Idle()]).start()
    prom = nativestack.Prometheus(tmp_path / "prometheus", {"idle": f"127.0.0.1:{ops.port}"}, scrape_interval="1s")
    try:
        prom.start()
        deadline = time.monotonic() + 30
        health = None
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{prom.url}/api/v1/targets", timeout=5) as response:
                targets = json.load(response)["data"]["activeTargets"]
            health = [t["health"] for t in targets if t["labels"]["job"] == "idle"]
            if health == ["up"]:
                break
            time.sleep(0.5)
        assert health == ["up"], prom.log_tail()
    finally:
        prom.close()
        ops.stop()
    assert nativestack.port_is_free(prom.port)
