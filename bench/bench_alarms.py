"""Alarm service benchmark on real Kafka (started with cloud.nativestack unless IOT_KAFKA_BOOTSTRAP is set). Not a test.

    python bench/bench_alarms.py            # 10,000 devices x 3 rules, 1,000,000 readings backlog
    python bench/bench_alarms.py --quick    # a smaller run to check the bench itself

Measures, for ONE alarm service (the AlarmService of `python -m cloud alarms`, with its defaults: rules and devices
loaded from SQLite by its own reloader, state checkpointed to its changelog topic every 5 s), run in a thread of
this process:

  1. throughput: readings/s evaluated from a backlog in Kafka (the readings are produced before the service starts;
     the clock starts at the first record, so the consumer-group join is not counted), and the CPU time the
     service's thread used per reading (from /proc: what one core would give it if nothing else ran), with the
     share of the time it was on a CPU and the share it was runnable but waiting for one (other load);
  2. latency: p50/p99 delay "reading produced -> alarm event received by a consumer of the alarms topic" at a steady
     produce rate, with ~1 % of the readings crossing a threshold. The readings are produced by a separate process,
     so the load generator does not compete with the service for this interpreter's GIL.

Kafka, the load and the service share this machine's cores (os.cpu_count() in the result).
Prints a table and, as the LAST line, one JSON object with the figures and os.cpu_count().
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud import db  # noqa: E402
from cloud import settings as settings_mod  # noqa: E402
from cloud.alarms import AlarmService  # noqa: E402
from cloud.bus.kafka import KafkaBus  # noqa: E402

log = logging.getLogger("bench")

RULES = [
    {"name": "hot", "kind": "threshold", "metric": "t", "max": 30.0, "hysteresis": 1.0, "severity": "critical"},
    {"name": "heating", "kind": "rate", "metric": "t", "rate_per_min": 30.0, "severity": "major"},
    {"name": "dry", "kind": "threshold", "metric": "h", "min": 10.0, "hysteresis": 2.0, "severity": "minor"},
]


def provision(engine, devices: int) -> list[str]:
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from cloud.db.models import Device, Rule, Tenant

    ids = [f"bench-{i:05d}" for i in range(devices)]
    with engine.begin() as conn:
        conn.execute(insert(Tenant), [{"id": 1, "name": "bench"}])
        conn.execute(insert(Device), [{"id": d, "tenant_id": 1, "name": d} for d in ids])
    with Session(engine) as session:
        session.add_all([Rule(tenant_id=1, **r) for r in RULES])
        session.commit()
    return ids


def reading(device: str, boot: int, seq: int, ts: int, t: float, h: float) -> bytes:
    return (f'{{"v":1,"id":"{device}","boot":{boot},"seq":{seq},"ts":{ts},"t":{t:.2f},"h":{h:.1f},'
            f'"p":1013.2,"rssi":-60,"up":{seq * 10},"fw":"1.0.0"}}').encode()


def produce_backlog(bus: KafkaBus, topic: str, devices: list[str], per_device: int) -> int:
    # idempotent (the default): a retried batch, common while a fresh broker elects its leaders, is not appended
    # after later ones, so each device's readings stay in order (the engine takes an older seq for a replay)
    producer = bus.producer("bench-load", **{"linger.ms": 20})
    rnd = random.Random(1)
    base = int(time.time() * 1000) - per_device * 10_000
    n = 0
    failed: list = []

    def report(err, _record) -> None:
        if err is not None:
            failed.append(err)

    for i in range(per_device):
        ts = base + i * 10_000
        for d in devices:
            # ~1 % of readings cross 30 degC (raise), the next reading is back to normal (clear)
            t = 35.0 if rnd.random() < 0.01 else 21.0 + rnd.random()
            producer.produce(topic, d, reading(d, 1, i + 1, ts, t, 45.0), on_delivery=report)
            n += 1
            if n % 50_000 == 0:
                producer.poll(0)
    remaining = producer.flush(120)
    producer.close()
    if failed or remaining:  # else the service would wait for readings that are not there
        raise RuntimeError(f"backlog: {len(failed)} readings not delivered ({failed[:1]}), {remaining} still queued")
    return n


def live_load(bootstrap: str, topic: str, n_devices: int, first_seq: int, rate: int, seconds: float,
              result) -> None:
    """The latency phase's readings at a steady rate, in a child process; puts (sent, seconds, start in unix ms)
    on ``result``."""
    bus = KafkaBus(bootstrap)
    producer = bus.producer("bench-live")
    devices = [f"bench-{i:05d}" for i in range(n_devices)]
    rnd = random.Random(2)
    seqs = {d: first_seq for d in devices}
    sent = 0
    t0 = time.monotonic()
    start_ms = int(time.time() * 1000)
    interval = 0.01
    per_tick = max(1, int(rate * interval))
    while time.monotonic() - t0 < seconds:
        tick_start = time.monotonic()
        now = int(time.time() * 1000)
        for _ in range(per_tick):
            d = devices[sent % len(devices)]
            seqs[d] += 1
            t = 35.0 if rnd.random() < 0.01 else 21.0 + rnd.random()
            producer.produce(topic, d, reading(d, 1, seqs[d], now, t, 45.0))
            sent += 1
        producer.poll(0)
        sleep = interval - (time.monotonic() - tick_start)
        if sleep > 0:
            time.sleep(sleep)
    producer.flush(30)
    result.put((sent, time.monotonic() - t0, start_ms))


def thread_sched(native_id: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of one thread of this process, from Linux's
    /proc/<pid>/task/<tid>/schedstat. The rest of the wall time the thread was blocked: waiting for Kafka data in
    consume() or for the GIL."""
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        run_ns, wait_ns, _slices = f.read().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--per-device", type=int, default=100, help="backlog readings per device")
    parser.add_argument("--rate", type=int, default=10_000, help="readings/s in the latency phase")
    parser.add_argument("--seconds", type=int, default=10, help="length of the latency phase (measured part)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="seconds of the latency phase before measuring (the load process starting up on the "
                             "same cores, the first checkpoint and timer pass after the backlog)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (Kafka data, SQLite)")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.per_device, args.rate, args.seconds, args.warmup = 1000, 20, 2000, 3, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("cloud").setLevel(logging.WARNING)

    workdir = Path(tempfile.mkdtemp(prefix="bench-alarms-"))
    services = []
    bootstrap = os.environ.get("IOT_KAFKA_BOOTSTRAP")
    try:
        if not bootstrap:
            from cloud import nativestack

            log.info("starting Kafka")
            kafka = nativestack.Kafka(workdir / "kafka", libs=nativestack.kafka_libs_dir(fetch=True)).start()
            services.append(kafka)
            bootstrap = kafka.bootstrap
        uid = uuid.uuid4().hex[:6]
        topics = settings_mod.Topics(telemetry=f"bench-tel-{uid}", status=f"bench-st-{uid}",
                                     alarms=f"bench-al-{uid}", control=f"bench-ctl-{uid}",
                                     acks=f"bench-acks-{uid}", command_status=f"bench-cs-{uid}",
                                     deadletter=f"bench-dl-{uid}")
        settings = settings_mod.load({}, kafka_bootstrap=bootstrap, topics=topics)
        bus = KafkaBus(bootstrap)
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": bootstrap})
        for fut in admin.create_topics([NewTopic(t, num_partitions=settings.kafka_partitions, replication_factor=1)
                                        for t in (topics.telemetry, topics.status, topics.alarms,
                                                  topics.control)]).values():
            fut.result(30)

        engine = db.make_engine(f"sqlite:///{workdir}/bench.db")
        db.upgrade(engine)
        devices = provision(engine, args.devices)

        log.info("producing a backlog of %d readings", args.devices * args.per_device)
        started = time.monotonic()
        backlog = produce_backlog(bus, topics.telemetry, devices, args.per_device)
        log.info("backlog produced in %.1fs", time.monotonic() - started)

        svc = AlarmService(settings, bus, engine, group=f"bench-{uid}", changelog=f"bench-state-{uid}")
        stop = threading.Event()
        thread = threading.Thread(target=svc.run, args=(stop,), name="alarms", daemon=True)
        thread.start()
        assert svc.started.wait(60), "alarm service did not start"

        def evaluated() -> int:
            c = svc.engine.counts
            return c["readings"] + c["duplicates"]

        while evaluated() == 0:
            time.sleep(0.001)
        first = time.monotonic()
        load_start = os.getloadavg()[0]
        run0, wait0 = thread_sched(thread.native_id)
        # done when every backlog reading was applied once (a rebalance makes the service read some twice: those
        # count as duplicates, i.e. as work, not as progress)
        progress, progress_at = 0, time.monotonic()
        while svc.engine.counts["readings"] < backlog:
            if not thread.is_alive():
                raise RuntimeError("alarm service died")
            if svc.engine.counts["readings"] != progress:
                progress, progress_at = svc.engine.counts["readings"], time.monotonic()
            elif time.monotonic() - progress_at > 30:
                raise RuntimeError(f"no progress for 30 s: {svc.engine.counts}")
            time.sleep(0.01)
        drain_s = time.monotonic() - first
        run1, wait1 = thread_sched(thread.native_id)
        cpu_us = (run1 - run0) / backlog * 1e6
        drain_ran, drain_waited = (run1 - run0) / drain_s * 100, (wait1 - wait0) / drain_s * 100
        throughput = backlog / drain_s
        events_backlog = svc.engine.counts["events"]
        replayed = svc.engine.counts["duplicates"]
        log.info("backlog: %d readings in %.2fs = %.0f/s (service thread: %.1f us CPU a reading, on a CPU %.0f%% "
                 "of the time, waiting for one %.0f%%), %d alarm events", backlog, drain_s, throughput, cpu_us,
                 drain_ran, drain_waited, events_backlog)

        # --- latency phase ----------------------------------------------------------------------------------
        timed: list[tuple[int, float]] = []  # (reading ts, delay ms) of each "raised" of the hot rule
        out = bus.consumer(f"bench-out-{uid}", [topics.alarms], **{"fetch.wait.max.ms": 5,
                                                                     "auto.offset.reset": "latest"})
        # join the group and get assigned before measuring
        deadline = time.monotonic() + 30
        while not out._consumer.assignment() and time.monotonic() < deadline:
            out.poll_batch(100, 0.1)
        phase_start_ms = int(time.time() * 1000)
        reader_stop = threading.Event()

        def read_events() -> None:
            consumer = out._consumer  # raw confluent consumer: take what is there, block only when empty
            while not reader_stop.is_set():
                msgs = consumer.consume(num_messages=1000, timeout=0) or consumer.consume(num_messages=1, timeout=0.05)
                received = time.time() * 1000
                for m in msgs:
                    if m.error() is not None:
                        continue
                    event = json.loads(m.value())
                    if event["state"] == "raised" and event["rule"] == "hot" and event["ts"] >= phase_start_ms:
                        timed.append((event["ts"], received - event["ts"]))

        reader = threading.Thread(target=read_events, daemon=True)
        reader.start()
        ctx = multiprocessing.get_context("spawn")
        live_result = ctx.Queue()
        live_start = evaluated()
        run0, wait0 = thread_sched(thread.native_id)
        live_t0 = time.monotonic()
        loader = ctx.Process(target=live_load, args=(bootstrap, topics.telemetry, len(devices), args.per_device,
                                                     args.rate, args.warmup + args.seconds, live_result),
                             daemon=True)
        loader.start()
        sent, live_s, live_start_ms = live_result.get(timeout=args.warmup + args.seconds + 120)
        loader.join(30)
        deadline = time.monotonic() + 30
        while evaluated() - live_start < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        run1, wait1 = thread_sched(thread.native_id)
        live_wall = time.monotonic() - live_t0
        live_ran, live_waited = (run1 - run0) / live_wall * 100, (wait1 - wait0) / live_wall * 100
        load_end = os.getloadavg()[0]
        time.sleep(1.0)
        reader_stop.set()
        reader.join(5)
        stop.set()
        thread.join(60)
        out.close()
        ok, health = svc.health()

        delays = [d for ts, d in timed if ts >= live_start_ms + args.warmup * 1000]
        p50, p99 = percentile(delays, 0.50), percentile(delays, 0.99)
        print()
        print(f"alarm service benchmark ({os.cpu_count()} CPUs; Kafka and the service on the same machine)")
        print(f"  devices x rules                      {args.devices:>10,} x {len(RULES)}")
        print(f"  backlog readings                     {backlog:>10,}")
        print(f"  readings evaluated / s (backlog)     {throughput:>10,.0f}")
        print(f"  service thread CPU per reading, us   {cpu_us:>10.1f}  (= {1e6 / cpu_us:,.0f}/s on a core of its own)")
        print(f"  service thread during the backlog    {drain_ran:>9.0f}% on a CPU, {drain_waited:.0f}% runnable but "
              f"waiting for one")
        print(f"  alarm events from the backlog        {events_backlog:>10,}")
        if replayed:
            print(f"  backlog readings taken as replays    {replayed:>10,}  (read again after a rebalance; recognised by "
                  f"(boot, seq))")
        print(f"  live phase: readings/s produced      {sent / live_s:>10,.0f}  ({sent:,} in {live_s:.1f}s)")
        print(f"  live phase: raised events measured   {len(delays):>10,}  (after the first {args.warmup} s)")
        print(f"  delay reading -> alarm event p50 ms  {p50:>10.1f}")
        print(f"  delay reading -> alarm event p99 ms  {p99:>10.1f}")
        print(f"  service thread during the live phase {live_ran:>9.0f}% on a CPU, {live_waited:.0f}% runnable but "
              f"waiting for one")
        print(f"  load average (1 min) start / end     {load_start:>10.1f} / {load_end:.1f}  (other work on the "
              f"machine included)")
        print(f"  device states checkpointed           {health.get('checkpoints', 0):>10,} checkpoints")
        if drain_waited >= 20 or live_waited >= 20:
            print(f"  note: the service thread was runnable but waiting for a CPU {drain_waited:.0f}% of the backlog "
                  f"phase and {live_waited:.0f}% of the live phase\n"
                  f"        (load average {load_start:.1f} on {os.cpu_count()} CPUs): both figures above are bounded "
                  f"by the other work on this machine;\n"
                  f"        its own cost is {cpu_us:.1f} us of CPU a reading: a core for this thread alone would give "
                  f"about {1e6 / cpu_us:,.0f} readings/s\n"
                  f"        (Kafka and librdkafka's fetch threads need CPU besides; this is a bound, not a measurement).")
        result = {"bench": "alarms", "devices": args.devices, "rules_per_device": len(RULES),
                  "backlog_readings": backlog, "readings_per_s": round(throughput),
                  "cpu_us_per_reading": round(cpu_us, 2), "backlog_thread_on_cpu_pct": round(drain_ran),
                  "backlog_thread_cpu_wait_pct": round(drain_waited),
                  "backlog_alarm_events": events_backlog, "backlog_replayed": replayed, "live_rate": round(sent / live_s),
                  "live_events": len(delays), "warmup_s": args.warmup, "p50_ms": round(p50, 1), "p99_ms": round(p99, 1),
                  "live_thread_on_cpu_pct": round(live_ran), "live_thread_cpu_wait_pct": round(live_waited),
                  "loadavg_1m": [round(load_start, 1), round(load_end, 1)],
                  "cpu_count": os.cpu_count()}
        print(json.dumps(result))
        return 0
    finally:
        for s in services:
            s.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
