"""Fault injection under steady load (`make chaos`). Not a test; bounded in time (about 5-8 minutes), loopback only.

    python bench/chaos.py [--devices 200] [--rate 300] [--down 3]

The production profile natively (bench_e2e.Stack: Mosquitto with per-device accounts, Kafka, PostgreSQL, Redis;
bridge, writer and alarm service as ``python -m cloud ...`` processes), a synthetic fleet (cloud.loadgen) at a
steady rate with 1 % of the devices raising and clearing a threshold alarm every 8 readings, two real firmware
processes, and a ping command to a firmware device every few seconds (recorded "queued" and produced to the
control topic exactly as the web tier does).

In turn, each for ``--down`` seconds and then started again on the same data: kill -9 of the bridge, the writer,
the alarm service, Kafka, PostgreSQL (the postmaster), Redis and Mosquitto, then a firmware device's network
(SimulatedDevice.set_network(False/True)). After the last fault the load runs on briefly, stops, the pipeline
drains, and the run is judged:

* every reading the broker acknowledged (PUBACK to the synthetic device) is in PostgreSQL exactly once, and the
  firmware devices' readings are stored once without gaps;
* every alarm episode the temperature pattern implies is in the alarms table exactly once (raised and cleared),
  and repeats of an event on the alarms topic carry the same alarm id (counted, harmless by design);
* every command ends in a final state (delivered, failed or expired).

Prints a table of faults survived and readings lost (each missing reading is attributed to the fault during
which it was published) and, as the LAST line, one JSON object. Writes bench/results/chaos.jsonl and
bench/results/chaos-<UTC time>.md. Exit status 0 only if nothing was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import (RESULTS, AlarmWatch, Stack, stop_on_sigterm, verify_alarms, verify_firmware,  # noqa: E402
                       verify_readings, wait_drained)

from cloud import schema  # noqa: E402
from cloud.loadgen import SyntheticFleet, synthetic_ids  # noqa: E402

FINAL = ("delivered", "failed", "expired")


class Commander:
    """A ping to one of the firmware devices every ``every`` seconds, the way the web tier sends commands."""

    def __init__(self, stack: Stack, devices: list[str], tenant_id: int, every: float, ttl_s: int):
        from cloud.bus.kafka import KafkaBus
        from cloud.db import session_factory

        self.stack = stack
        self.devices = devices
        self.tenant_id = tenant_id
        self.every = every
        self.ttl_s = ttl_s
        self.factory = session_factory(stack.engine)
        self.producer = KafkaBus(stack.kafka.bootstrap).producer("chaos-commands")
        self.cids: list[str] = []
        self.failed_to_queue = 0
        self.stop_evt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Commander":
        self.thread.start()
        return self

    def _run(self) -> None:
        from cloud.db import repo

        n = 0
        while not self.stop_evt.wait(self.every):
            device = self.devices[n % len(self.devices)]
            n += 1
            cmd = schema.new_command("ping", {}, self.ttl_s)
            try:
                with self.factory() as s:
                    repo.create_command(s, self.tenant_id, device, cmd, created_by="chaos")
                    s.commit()
            except Exception:  # noqa: BLE001 - PostgreSQL is down: the web tier would answer 5xx, nothing queued
                self.failed_to_queue += 1
                continue
            self.cids.append(cmd.cid)
            errors: list = []
            self.producer.produce(self.stack.env["IOT_TOPIC_CONTROL"] if "IOT_TOPIC_CONTROL" in self.stack.env
                                  else "iot-control", device, cmd.to_json(),
                                  on_delivery=lambda err, _r: errors.append(err) if err else None)
            # the web tier flushes for 10 s; during a Kafka outage the producer keeps retrying in the background
            self.producer.flush(10.0)

    def stop(self) -> None:
        self.stop_evt.set()
        self.thread.join(30)
        try:
            self.producer.flush(30)
        except Exception:  # noqa: BLE001
            pass

    def states(self) -> Counter:
        from sqlalchemy import text

        with self.stack.engine.connect() as conn:
            rows = conn.execute(text("SELECT status FROM commands WHERE cid = ANY(:c)"), {"c": self.cids}).all()
        return Counter(r[0] for r in rows)


def attribute(stack: Stack, boot: int, examples_missing: list[tuple[str, int]], faults: list[dict]) -> None:
    """Add ``lost`` to each fault: missing readings placed in time by their device's neighbouring stored reading."""
    from sqlalchemy import text

    for f in faults:
        f["lost"] = 0
    with stack.engine.connect() as conn:
        for device, seq in examples_missing:
            row = conn.execute(text("SELECT extract(epoch FROM ts) FROM telemetry WHERE device_id = :d AND boot = :b "
                                    "AND seq < :s ORDER BY seq DESC LIMIT 1"), {"d": device, "b": boot, "s": seq}
                               ).first()
            t = float(row[0]) if row else 0.0
            owner = faults[0] if faults else None
            for f in faults:
                if f["t_start"] <= t + 1.0:
                    owner = f
            if owner is not None:
                owner["lost"] += 1


def missing_readings(stack: Stack, boot: int, acknowledged: dict) -> list[tuple[str, int]]:
    from sqlalchemy import text

    out = []
    with stack.engine.connect() as conn:
        for device, (_b, next_seq, unacked) in acknowledged.items():
            have = {r[0] for r in conn.execute(text("SELECT seq FROM telemetry WHERE device_id = :d AND boot = :b"),
                                               {"d": device, "b": boot})}
            out += [(device, s) for s in range(next_seq) if s not in unacked and s not in have]
    return out


def _missing_times(stack: Stack, boot: int, missing: list[tuple[str, int]]) -> dict:
    """When the lost readings were published: the time span of their neighbours (for the report)."""
    from sqlalchemy import text

    times = []
    with stack.engine.connect() as conn:
        for device, seq in missing:
            row = conn.execute(text("SELECT extract(epoch FROM ts) FROM telemetry WHERE device_id = :d AND boot = :b "
                                    "AND seq < :s ORDER BY seq DESC LIMIT 1"), {"d": device, "b": boot, "s": seq}
                               ).first()
            if row:
                times.append(float(row[0]))
    if not times:
        return {}
    return {"first": datetime.fromtimestamp(min(times), timezone.utc).isoformat(),
            "last": datetime.fromtimestamp(max(times), timezone.utc).isoformat(), "count": len(missing)}


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    started = time.time()
    print(f"chaos: {args.devices} synthetic devices at {args.rate} msg/s + {args.firmware} firmware, "
          f"{os.cpu_count()} CPUs, work dir {workdir}", flush=True)
    stack = Stack(workdir, secure=not args.anonymous)
    fleet = watch = commander = None
    firmware = []
    faults: list[dict] = []
    result: dict = {"bench": "chaos", "cpu_count": os.cpu_count(), "devices": args.devices, "rate": args.rate,
                    "started": datetime.now(timezone.utc).isoformat(),
                    "bridge": f"python -m cloud.bridge {args.bridge_args}" if args.bridge_args
                    else "python -m cloud bridge (as deployed: IOT_BRIDGE_SHARED from the environment)"}
    try:
        stack.start()
        ids = synthetic_ids(args.devices, "chaos")
        fw_ids = [f"fw-{i}" for i in range(args.firmware)]
        passwords = stack.provision(1, ids, fw_ids)
        stack.service("bridge", *(args.bridge_args.split() if args.bridge_args else ())).start()
        for name in ("writer", "alarms"):
            stack.service(name).start()
        watch = AlarmWatch(stack.kafka.bootstrap)
        alarm_devices = ids[::100] or ids[:1]
        fleet = SyntheticFleet("127.0.0.1", stack.device_port,
                               [(d, d, passwords[d]) if stack.secure else (d, None, None) for d in ids],
                               rate=args.rate, alarm_devices=alarm_devices, max_unacked=200)
        fleet.connect()
        from cloud.sim import SimulatedDevice, device_config

        firmware = [SimulatedDevice(d, workdir / "flash" / d, device_config(
            d, stack.device_url, interval=1, username=d if stack.secure else None,
            password=passwords[d] if stack.secure else None)) for d in fw_ids]
        for dev in firmware:
            dev.start()
        fleet.go()
        commander = Commander(stack, fw_ids, 1, args.command_every, args.command_ttl).start() if fw_ids else None
        print(f"  steady load running; settling {args.settle:.0f} s", flush=True)
        time.sleep(args.settle)

        svc = stack.services

        def service_fault(name):
            return (lambda: svc[name].kill(), lambda: svc[name].start(wait=90))

        plan = [
            ("bridge", *service_fault("bridge")),
            ("writer", *service_fault("writer")),
            ("alarms", *service_fault("alarms")),
            ("kafka", stack.kafka.kill, stack.kafka.start),
            ("postgresql", stack.pg.kill_postmaster, stack.pg.start),
            ("redis", stack.redis.kill, stack.redis.start),
            ("mosquitto", stack.mq.kill, stack.mq.start),
        ]
        if firmware:
            plan.append((f"network of {fw_ids[0]}", lambda: firmware[0].set_network(False),
                         lambda: firmware[0].set_network(True)))
        for name, kill, restart in plan:
            if args.only and not any(o in name for o in args.only.split(",")):
                continue
            f = {"fault": f"kill -9 {name}" if not name.startswith("network") else f"{name} down",
                 "at": datetime.now(timezone.utc).isoformat(),
                 "t_start": time.time(), "acked_before": fleet.acked()}
            print(f"  fault: {f['fault']} for {args.down if not name.startswith('network') else args.network_down:.0f} s ...", flush=True)
            kill()
            time.sleep(args.down if not name.startswith("network") else args.network_down)
            t_restart = time.monotonic()
            try:
                restart()
                f["restart_s"] = round(time.monotonic() - t_restart, 1)
                f["survived"] = True
            except Exception as exc:  # noqa: BLE001
                f["restart_s"] = None
                f["survived"] = False
                f["error"] = str(exc)[:300]
                print(f"    restart failed: {exc}", flush=True)
            # the pipeline is healthy again when every service reports ok
            t_ok = time.monotonic()
            deadline = t_ok + args.recover_timeout
            while time.monotonic() < deadline:
                if all((s.health() or {}).get("ok") for s in svc.values()):
                    break
                time.sleep(0.25)
            f["healthy_after_s"] = round(time.monotonic() - t_restart, 1)
            f["all_healthy"] = all((s.health() or {}).get("ok") for s in svc.values())
            f["service_restarts"] = {n: s.starts for n, s in svc.items()}
            print(f"    back after {f['healthy_after_s']} s (all services healthy: {f['all_healthy']}); "
                  f"fleet connected {fleet.connected()}/{len(ids)}", flush=True)
            faults.append(f)
            time.sleep(args.between)

        print(f"  faults done; load continues {args.tail:.0f} s, then drain", flush=True)
        time.sleep(args.tail)
        if commander:
            commander.stop()
        fleet.stop()
        fleet.wait(120)
        for dev in firmware:
            dev.stop()
        ack = fleet.acknowledged()
        total = sum(n - len(u) for _, n, u in ack.values())
        wait_drained(stack.engine, fleet.boot, total, args.drain_timeout)
        # commands: wait until every one is final (or the wait ends)
        if commander:
            deadline = time.monotonic() + args.command_ttl + 30
            while time.monotonic() < deadline:
                states = commander.states()
                if sum(states[s] for s in FINAL) >= len(commander.cids):
                    break
                time.sleep(1)
        time.sleep(3)
        readings = verify_readings(stack.engine, fleet.boot, ack)
        missing = missing_readings(stack, fleet.boot, ack) if readings["missing"] else []
        attribute(stack, fleet.boot, missing, faults)
        if missing:
            result["missing_examples"] = _missing_times(stack, fleet.boot, missing[:2000])
        alarms = verify_alarms(stack.engine, ack, alarm_devices)
        events = Counter((e.get("alarm_id"), e.get("state")) for _, _, e in watch.events
                         if e.get("device") in set(alarm_devices))
        alarms["topic_events"] = sum(events.values())
        alarms["topic_repeats_same_id"] = sum(n - 1 for n in events.values() if n > 1)
        result.update({
            "faults": faults, "readings": readings, "alarms": alarms,
            "firmware": verify_firmware(stack.engine, fw_ids) if fw_ids else None,
            "loadgen": {"sent": sum(n for _, n, _ in ack.values()), "disconnects": fleet.disconnects(),
                        "unacknowledged_at_end": sum(len(u) for _, _, u in ack.values())},
        })
        if commander:
            states = commander.states()
            result["commands"] = {"sent": len(commander.cids), "states": dict(states),
                                  "not_final": len(commander.cids) - sum(states[s] for s in FINAL),
                                  "not_queued_db_down": commander.failed_to_queue}
        exits = {n: s.proc.returncode for n, s in svc.items() if s.proc.poll() is not None}
        if exits:
            result["service_exits"] = exits
    finally:
        if commander:
            commander.stop_evt.set()
        if watch is not None:
            watch.close()
        if fleet is not None:
            fleet.close()
        for dev in firmware:
            dev.stop()
        stack.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = round(time.time() - started)
    return result


def markdown(result: dict) -> str:
    rd, al = result.get("readings", {}), result.get("alarms", {})
    lines = [f"### Chaos run, {result['started'][:19]} UTC ({result['devices']} synthetic devices at "
             f"{result['rate']} msg/s, {result['cpu_count']} CPUs, {result['wall_s']} s; bridge: {result['bridge']})",
             "",
             "| fault | survived | back (all services healthy) after | readings lost |", "|---|---|---|---|"]
    for f in result.get("faults", []):
        lines.append(f"| {f['fault']} | {'yes' if f['survived'] and f['all_healthy'] else 'NO'} | "
                     f"{f['healthy_after_s']} s | {f.get('lost', 0)} |")
    lines += ["", "| check | result |", "|---|---|",
              f"| readings acknowledged by the broker / missing / duplicated | {rd.get('acknowledged', 0):,} / "
              f"{rd.get('missing')} / {rd.get('duplicates')} |",
              f"| alarm episodes expected / stored, cleared expected / stored | {al.get('expected_raised')} / "
              f"{al.get('raised')}, {al.get('expected_cleared')} / {al.get('cleared')} |",
              f"| alarm events on the topic / repeats with the same id | {al.get('topic_events')} / "
              f"{al.get('topic_repeats_same_id')} |"]
    if result.get("firmware"):
        f = result["firmware"]
        lines.append(f"| firmware readings stored / gaps / duplicates | {f['readings']} / {f['gaps']} / "
                     f"{f['duplicates']} |")
    if result.get("commands"):
        c = result["commands"]
        lines.append(f"| commands sent / not final | {c['sent']} / {c['not_final']} ({c['states']}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rate", type=float, default=300.0, help="total readings/s of the synthetic fleet")
    parser.add_argument("--firmware", type=int, default=2)
    parser.add_argument("--down", type=float, default=3.0, help="seconds each killed part stays down")
    parser.add_argument("--network-down", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=8.0)
    parser.add_argument("--between", type=float, default=6.0, help="seconds of steady load between faults")
    parser.add_argument("--tail", type=float, default=8.0)
    parser.add_argument("--recover-timeout", type=float, default=90.0)
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--command-every", type=float, default=3.0)
    parser.add_argument("--command-ttl", type=int, default=60)
    parser.add_argument("--only", help="comma-separated subset of faults (e.g. bridge,kafka)")
    parser.add_argument("--anonymous", action="store_true")
    parser.add_argument("--bridge-args", help="run the bridge as python -m cloud.bridge ARGS (e.g. --no-shared)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    result = run(args)
    text = markdown(result)
    print()
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "chaos.jsonl", "a") as f:
            f.write(json.dumps(result, separators=(",", ":"), default=str) + "\n")
        stamp = result["started"][:19].replace(":", "").replace("-", "")
        (RESULTS / f"chaos-{stamp}.md").write_text(text)
    rd = result.get("readings", {})
    summary = {"bench": "chaos", "cpu_count": os.cpu_count(), "faults": len(result.get("faults", [])),
               "survived": sum(1 for f in result.get("faults", []) if f["survived"] and f["all_healthy"]),
               "acknowledged": rd.get("acknowledged"), "lost": rd.get("missing"), "duplicates": rd.get("duplicates"),
               "lost_by_fault": {f["fault"]: f.get("lost", 0) for f in result.get("faults", [])},
               "alarms": {k: v for k, v in result.get("alarms", {}).items() if k != "examples"},
               "commands": result.get("commands"), "firmware": result.get("firmware"), "wall_s": result["wall_s"]}
    if result.get("missing_examples"):
        print("lost readings were published between", result["missing_examples"])
    print(json.dumps(summary, default=str))
    al = result.get("alarms", {})
    ok = (rd.get("missing") == 0 and rd.get("duplicates") == 0 and al.get("devices_wrong") == 0
          and (result.get("commands") or {}).get("not_final", 0) == 0
          and all(f["survived"] and f["all_healthy"] for f in result.get("faults", [])))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
