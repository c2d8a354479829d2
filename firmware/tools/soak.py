#!/usr/bin/env python3
"""Soak test: the firmware's MQTT link (firmware/lib/link.py, the class main.py uses) on the MicroPython unix port
doing N QoS 1 publish cycles against a real Mosquitto on loopback.

    .venv/bin/python firmware/tools/soak.py [--cycles 100000] [--sample-every N] [--heapsize 120000]

Checks: no publish error (also past umqtt's packet-id wrap at 65,535), every message arrived at a CPython subscriber,
and the free heap after gc.collect() does not trend down. Prints a table, then as the LAST line one JSON object.
Exit status 0 only when all checks pass. `make soak` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cloud.nativestack import Mosquitto  # noqa: E402

FIRMWARE = REPO / "firmware"
MPY_LIB = REPO / "build" / "mpy-lib"
MPY = Path(os.environ.get("MICROPYTHON", REPO / ".venv" / "bin" / "micropython"))
DRIVER = Path(__file__).resolve().parent / "soak_driver.py"
TOPIC = "devices/soak/telemetry"
# free heap may drift down by at most this much per 10k cycles (fragmentation noise, not a leak)
SLOPE_TOLERANCE = 64.0


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of free heap (bytes) per 10k cycles."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if not sxx:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx * 10000


class Counter:
    """paho-mqtt 2 subscriber (QoS 1) counting the distinct seq numbers it received."""

    def __init__(self, port: int):
        import paho.mqtt.client as paho
        self.seen: set[int] = set()
        self.total = 0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="soak-counter", protocol=paho.MQTTv311)
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(TOPIC, 1)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        if not self.ready.wait(10):
            raise RuntimeError("subscriber: no SUBACK")

    def _on_message(self, client, userdata, msg):
        seq = json.loads(msg.payload)["seq"]
        with self.lock:
            self.total += 1
            self.seen.add(seq)

    def received(self) -> int:
        with self.lock:
            return len(self.seen)

    def missing(self, n: int) -> list[int]:
        with self.lock:
            return [i for i in range(1, n + 1) if i not in self.seen][:10]

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def run(args) -> dict:
    if not MPY.exists():
        raise SystemExit(f"MicroPython unix binary not found at {MPY} (make venv)")
    if not (MPY_LIB / "umqtt" / "simple.py").exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "fetch_umqtt.py"), str(MPY_LIB)], check=True)
    every = args.sample_every or max(100, min(2000, args.cycles // 20))
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        counter = None
        missing: list[int] = []
        try:
            counter = Counter(broker.port)
            env = dict(os.environ, MICROPYPATH=os.pathsep.join(
                str(p) for p in (FIRMWARE / "lib", FIRMWARE / "host", MPY_LIB)))
            cmd = [str(MPY), "-X", f"heapsize={args.heapsize}", str(DRIVER), "127.0.0.1", str(broker.port),
                   str(args.cycles), str(every)]
            t0 = time.monotonic()
            try:
                cp = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=args.timeout)
                out, err, rc = cp.stdout, cp.stderr, cp.returncode
            except subprocess.TimeoutExpired as e:
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                err, rc = f"timed out after {args.timeout}s", -1
            wall = time.monotonic() - t0
            heap: list[tuple[int, int]] = []
            errors: list[str] = []
            done = {}
            for line in out.splitlines():
                if line.startswith("heap "):
                    _, c, f = line.split()
                    heap.append((int(c), int(f)))
                elif line.startswith("err "):
                    errors.append(line[4:])
                elif line.startswith("done "):
                    done = json.loads(line[5:])
            if rc != 0 or not done:
                errors.append(f"micropython exit {rc}: {(err or '').strip()[-500:]}")
            cycles = done.get("cycles", max((c for c, _ in heap), default=0))
            # QoS 1 to the subscriber: let the backlog drain while it still makes progress (5 s without news)
            last, idle = -1, time.monotonic()
            while counter.received() < cycles and time.monotonic() - idle < 5:
                if counter.received() != last:
                    last, idle = counter.received(), time.monotonic()
                time.sleep(0.05)
            received = counter.received()
            missing = counter.missing(cycles)
        finally:
            if counter:
                counter.close()
            broker.close()
    frees = [f for _, f in heap]
    # the first sample is taken right after connect: steady state starts at the first sample after some cycles
    steady = heap[1:] if len(heap) > 2 else heap
    elapsed = done.get("elapsed_ms", wall * 1000) / 1000
    res = {
        "cycles": cycles,
        "requested": args.cycles,
        "seconds": round(elapsed, 2),
        "cycles_per_s": round(cycles / elapsed, 1) if elapsed else 0.0,
        "heap_first": frees[0] if frees else None,
        "heap_last": frees[-1] if frees else None,
        "heap_min": min(frees) if frees else None,
        "heap_max": max(frees) if frees else None,
        "heapsize": args.heapsize,
        "heap_slope_per_10k": round(slope(steady), 1),
        "heap_samples": len(heap),
        "pid_wraps": done.get("pid_wraps"),
        "received": received,
        "lost": max(0, cycles - received),
        "duplicates": counter.total - received if counter else 0,
        "first_missing": missing,
        "errors": len(errors),
        "error_messages": errors[:5],
        "cpu_count": os.cpu_count(),
    }
    res["ok"] = (not errors and cycles == args.cycles and res["lost"] == 0
                 and res["heap_slope_per_10k"] >= -SLOPE_TOLERANCE)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100_000)
    ap.add_argument("--sample-every", type=int, default=0, help="heap sample period (default: cycles/20, <=2000)")
    ap.add_argument("--heapsize", type=int, default=120_000, help="MicroPython heap (an ESP32 has ~110 kB free)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds (default: 60 + 10 ms per cycle)")
    args = ap.parse_args(argv)
    if not args.timeout:
        args.timeout = 60 + args.cycles * 0.01
    r = run(args)
    rows = [
        ("cycles (QoS 1 publishes)", f"{r['cycles']} of {r['requested']}"),
        ("time", f"{r['seconds']} s"),
        ("cycles/s", f"{r['cycles_per_s']}"),
        ("packet-id wraps", f"{r['pid_wraps']}"),
        ("heap free first/last", f"{r['heap_first']} / {r['heap_last']} bytes (heapsize {r['heapsize']})"),
        ("heap free min/max", f"{r['heap_min']} / {r['heap_max']} bytes ({r['heap_samples']} samples)"),
        ("heap slope", f"{r['heap_slope_per_10k']} bytes per 10k cycles (limit -{SLOPE_TOLERANCE:g})"),
        ("messages received", f"{r['received']} (lost {r['lost']}, duplicates {r['duplicates']})"),
        ("errors", f"{r['errors']}" + (f": {r['error_messages']}" if r["errors"] else "")),
        ("cpu count", f"{r['cpu_count']}"),
        ("result", "PASS" if r["ok"] else "FAIL"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(json.dumps(r), flush=True)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
