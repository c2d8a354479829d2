"""Benchmark of the MQTT -> Kafka bridge on real Mosquitto + Kafka (cloud.nativestack). Not a test.

    .venv/bin/python bench/bench_bridge.py [--messages 200000] [--publishers 2] [--devices 100]

Phases (same Mosquitto, same publishers, same message count):

1. mosquitto: raw broker throughput, N publisher processes -> Mosquitto -> one ``mosquitto_sub -q 1`` (C).
2. live: one bridge process (``python -m cloud.bridge``) while the N publishers run: end-to-end MQTT -> Kafka
   rate (first publish to last Kafka append) and publish -> Kafka-append latency (the telemetry topic uses
   LogAppendTime, the payload's ``ts`` is the publish time; both on this host's clock).
3. drain: the bridge is away while the publishers fill its persistent session, then it starts and drains the
   backlog alone: the bridge's own rate without publishers competing for the 2 cores.

After each bridge phase everything is read back from Kafka and the unique (id, boot, seq) are counted: lost =
published - unique. Publishers are raw-socket MQTT 3.1.1 clients (QoS 1, pipelined) so they cost little CPU.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from confluent_kafka import Consumer  # noqa: E402
from confluent_kafka.admin import NewTopic  # noqa: E402

from cloud import nativestack  # noqa: E402
from cloud.kafka_init import ensure_topics  # noqa: E402
from cloud.loadgen import connect_packet, mqtt_string, publish_packet  # noqa: E402
from cloud.settings import Topics, load  # noqa: E402

MOSQUITTO_CONF = "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n"


# --- raw MQTT 3.1.1 publisher (the load generator's packets) -----------------------------------------------

def publisher(port: int, prefix: str, first: int, devices: int, count: int, boot: int, start, done) -> None:
    socks = []
    for i in range(first, first + devices):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(connect_packet(f"{prefix}-{i}", None, None, keepalive=60))
        assert s.recv(4)[:2] == b"\x20\x02", "no CONNACK"
        s.setblocking(False)
        socks.append((s, f"{prefix}-{i}", mqtt_string(f"devices/{prefix}-{i}/telemetry")))
    start.wait()
    sent = acked = 0
    window = 20_000
    chunk = 10
    mid = 0
    for base in range(0, count, chunk):
        now_ms = int(time.time() * 1000)
        for s, device, topic in socks:
            parts = []
            for seq in range(base, min(count, base + chunk)):
                mid = mid % 65535 + 1
                payload = (f'{{"v":1,"id":"{device}","boot":{boot},"seq":{seq},"ts":{now_ms},"t":21.5,'
                           f'"h":45.5,"p":1001.25,"rssi":-60,"up":{seq},"fw":"bench"}}').encode()
                parts.append(publish_packet(topic, payload, mid))
            s.setblocking(True)
            s.sendall(b"".join(parts))
            s.setblocking(False)
            sent += len(parts)
        acked += _read_acks(socks, block=sent - acked > window)
    while acked < sent:
        acked += _read_acks(socks, block=True)
    done.put((sent, acked))
    for s, _, _ in socks:
        s.sendall(b"\xe0\x00")
        s.close()


_partial: dict[int, int] = {}


def _read_acks(socks, block: bool) -> int:
    """Count the PUBACKs (4 bytes each in MQTT 3.1.1) that arrived; a recv may split one."""
    got = 0
    ready = select.select([s for s, _, _ in socks], [], [], 1.0 if block else 0)[0]
    for s in ready:
        try:
            data = s.recv(1 << 20)
        except BlockingIOError:
            continue
        have = _partial.get(s.fileno(), 0) + len(data)
        got += have // 4
        _partial[s.fileno()] = have % 4
    return got


def run_publishers(port: int, prefix: str, processes: int, devices: int, per_device: int, boot: int = 1):
    """Start the publisher processes (connected, waiting); returns a function that releases them and waits."""
    ctx = mp.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    per_proc = devices // processes
    procs = [ctx.Process(target=publisher, args=(port, prefix, p * per_proc, per_proc, per_device, boot, start,
                                                  done), daemon=True) for p in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.5 + devices * 0.002)

    def go() -> tuple[float, float, int]:
        t0 = time.time()
        start.set()
        results = []
        deadline = time.monotonic() + 600
        while len(results) < len(procs):
            try:
                results.append(done.get(timeout=1))
            except Exception:  # noqa: BLE001 (queue.Empty)
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"publisher processes failed: exit codes {dead}") from None
        t1 = time.time()
        for p in procs:
            p.join(10)
        return t0, t1, sum(r[0] for r in results)

    return go


# --- phases ------------------------------------------------------------------------------------------------

def phase_mosquitto(mq, args) -> dict:
    total = args.devices * args.per_device
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mq.port), "-q", "1", "-V", "mqttv5",
                            "-t", "devices/+/telemetry", "-C", str(total), "-i", "bench-sub"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    go = run_publishers(mq.port, "raw", args.publishers, args.devices, args.per_device)
    t0, t_pub, sent = go()
    try:
        sub.wait(120)
    except subprocess.TimeoutExpired:
        sub.kill()
    t1 = time.time()
    return {"published": sent, "publish_s": round(t_pub - t0, 3), "seconds": round(t1 - t0, 3),
            "rate": round(sent / (t1 - t0)), "publish_rate": round(sent / (t_pub - t0)),
            "complete": sub.returncode == 0}


class BridgeProc:
    def __init__(self, env: dict, log: Path, client_id: str):
        self.port = nativestack.free_port()
        self.env = {**os.environ, **env, "IOT_METRICS_PORT": str(self.port), "PYTHONPATH": str(REPO)}
        self.log = log
        self.client_id = client_id
        self.proc = None

    def start(self):
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "cloud.bridge", "--client-id", self.client_id,
                                          "--no-commands"], cwd=REPO, env=self.env, stdout=f, stderr=f)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            h = self.health()
            if h and h.get("ok"):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"bridge did not become healthy; see {self.log}")

    def health(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return json.loads(r.read())
        except Exception:  # noqa: BLE001
            return None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def acked(self) -> int:
        h = self.health() or {}
        return h.get("services", {}).get("bridge", {}).get("acked", 0)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def read_back(bootstrap: str, topic: str, expected: int, prefix: str, timeout: float = 120):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 0,
                         "fetch.max.bytes": 50 * 1024 * 1024})
    consumer.subscribe([topic])
    unique: set = set()
    latencies: list[int] = []
    first_pub = None
    last_append = 0
    records = 0
    deadline = time.monotonic() + timeout
    idle_since = time.monotonic()
    marker = f'"id":"{prefix}-'.encode()
    while time.monotonic() < deadline:
        batch = consumer.consume(20_000, 0.5)
        if not batch:
            if len(unique) >= expected and time.monotonic() - idle_since > 1.0:
                break
            continue
        idle_since = time.monotonic()
        for m in batch:
            if m.error() is not None:
                continue
            value = m.value()
            if marker not in value:
                continue
            records += 1
            d = json.loads(value)
            unique.add((d["id"], d["boot"], d["seq"]))
            append_ms = m.timestamp()[1]
            latencies.append(append_ms - d["ts"])
            last_append = max(last_append, append_ms)
            first_pub = d["ts"] if first_pub is None else min(first_pub, d["ts"])
    consumer.close()
    return unique, records, latencies, first_pub, last_append


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return float(values[min(len(values) - 1, int(q * len(values)))])


def phase_bridge(mq, kafka, settings_env, topics: Topics, args, workdir: Path, drain: bool) -> dict:
    total = args.devices * args.per_device
    prefix = "drain" if drain else "live"
    # a bridge group of its own per phase: an earlier phase's persistent session would still get its share
    bridge = BridgeProc({**settings_env, "IOT_BRIDGE_GROUP": f"bench-{prefix}"}, workdir / f"bridge-{prefix}.log",
                        f"bench-bridge-{prefix}")
    if drain:
        bridge.start()  # creates the persistent session + subscription, then goes away
        bridge.stop()
        go = run_publishers(mq.port, prefix, args.publishers, args.devices, args.per_device)
        go()
        cpu0 = 0.0
        t0 = time.time()
        bridge.start()
        cpu0 = bridge.cpu_seconds()
    else:
        bridge.start()
        cpu0 = bridge.cpu_seconds()
        go = run_publishers(mq.port, prefix, args.publishers, args.devices, args.per_device)
        t0, _, _ = go()
    deadline = time.monotonic() + 300
    while bridge.acked() < total and time.monotonic() < deadline:
        time.sleep(0.05)  # each poll is an HTTP request the bridge serves: not too often
    t_acked = time.time()
    cpu = bridge.cpu_seconds() - cpu0
    metrics = bridge.metrics()
    bridge.stop()
    unique, records, latencies, first_pub, last_append = read_back(kafka.bootstrap, topics.telemetry, total, prefix)
    seconds = t_acked - t0
    out = {
        "published": total, "unique_in_kafka": len(unique), "records_in_kafka": records,
        "lost": total - len(unique), "duplicates": records - len(unique),
        "seconds": round(seconds, 3), "rate": round(total / seconds) if seconds > 0 else None,
        "bridge_cpu_s": round(cpu, 2), "bridge_cpu_us_per_msg": round(cpu / total * 1e6, 1),
    }
    if not drain:
        out["kafka_span_rate"] = round(total / ((last_append - first_pub) / 1000)) if last_append else None
        out["latency_ms_p50"] = pct(latencies, 0.50)
        out["latency_ms_p99"] = pct(latencies, 0.99)
        out["latency_ms_max"] = max(latencies) if latencies else None
    for line in metrics.splitlines():
        if line.startswith("iot_bridge_kafka_ack_latency_seconds_sum"):
            out["bridge_internal_latency_mean_ms"] = round(float(line.split()[-1]) / max(1, total) * 1000, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    args.devices -= args.devices % args.publishers
    args.per_device = max(1, args.messages // args.devices)
    total = args.devices * args.per_device
    if not shutil.which("mosquitto_sub"):
        print("mosquitto_sub not found (mosquitto-clients); the raw broker phase needs it")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    print(f"bench-bridge: {total} messages, {args.publishers} publisher processes x {args.devices // args.publishers}"
          f" devices, {os.cpu_count()} CPUs, work dir {workdir}", flush=True)
    mq = nativestack.Mosquitto(workdir / "mosquitto", config_extra=MOSQUITTO_CONF)
    kafka = nativestack.Kafka(workdir / "kafka")
    try:
        mq.start()
        kafka.start()
        topics = Topics()
        settings = load({}, mqtt_url=mq.url, kafka_bootstrap=kafka.bootstrap)
        admin = kafka.admin()
        # telemetry with broker append time, so the record timestamp is "when Kafka acknowledged it"
        admin.create_topics([NewTopic(topics.telemetry, num_partitions=settings.kafka_partitions,
                                      replication_factor=1,
                                      config={"message.timestamp.type": "LogAppendTime"})]
                            )[topics.telemetry].result(30)
        ensure_topics(settings, kafka.bootstrap)
        env = {"IOT_MQTT_URL": mq.url, "IOT_KAFKA_BOOTSTRAP": kafka.bootstrap, "IOT_LOG_LEVEL": "WARNING"}

        print("phase 1/3: mosquitto raw publish -> subscribe ...", flush=True)
        raw = phase_mosquitto(mq, args)
        print("phase 2/3: bridge with live publishers ...", flush=True)
        live = phase_bridge(mq, kafka, env, topics, args, workdir, drain=False)
        print("phase 3/3: bridge draining a backlog ...", flush=True)
        drain = phase_bridge(mq, kafka, env, topics, args, workdir, drain=True)
    finally:
        mq.close()
        kafka.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = [
        ("mosquitto raw pub->sub (mosquitto_sub -q 1)", f"{raw['rate']:,} msg/s", f"{raw['seconds']} s", "-", "-",
         "-"),
        ("bridge, live publishers (MQTT->Kafka)", f"{live['rate']:,} msg/s", f"{live['seconds']} s",
         f"{live['latency_ms_p50']:.0f} / {live['latency_ms_p99']:.0f} ms", f"{live['lost']}",
         f"{live['bridge_cpu_us_per_msg']} us"),
        ("bridge, draining a backlog", f"{drain['rate']:,} msg/s", f"{drain['seconds']} s", "-", f"{drain['lost']}",
         f"{drain['bridge_cpu_us_per_msg']} us"),
    ]
    head = ("phase", "throughput", "time", "p50 / p99 pub->Kafka", "lost", "bridge CPU/msg")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print()
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    live_vs_raw = round(live["rate"] / raw["rate"], 2) if raw["rate"] else None
    drain_vs_raw = round(drain["rate"] / raw["rate"], 2) if raw["rate"] else None
    print(f"\n{total} messages per phase; duplicates live={live['duplicates']} drain={drain['duplicates']}; "
          f"the bridge needs {live['bridge_cpu_us_per_msg']} us CPU per message live, "
          f"{drain['bridge_cpu_us_per_msg']} us draining (one core -> "
          f"~{round(1e6 / drain['bridge_cpu_us_per_msg']):,} msg/s ceiling)")
    print(f"bridge / raw Mosquitto in this run: live {live_vs_raw}, draining {drain_vs_raw} (aim: >= 0.5); "
          f"aim 25,000 msg/s: live {'met' if live['rate'] >= 25_000 else 'not met'}, "
          f"draining {'met' if drain['rate'] >= 25_000 else 'not met'}")
    result = {"bench": "bridge", "messages": total, "publishers": args.publishers, "devices": args.devices,
              "cpu_count": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
              "mosquitto_raw": raw, "bridge_live": live, "bridge_drain": drain,
              "rate_msg_s": live["rate"], "drain_rate_msg_s": drain["rate"], "live_vs_raw": live_vs_raw,
              "drain_vs_raw": drain_vs_raw, "latency_ms_p50": live["latency_ms_p50"],
              "latency_ms_p99": live["latency_ms_p99"], "lost": live["lost"] + drain["lost"]}
    print(json.dumps(result))
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
