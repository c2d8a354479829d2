"""Dashboard / API benchmark on real PostgreSQL + Redis (cloud.nativestack) with the app under gunicorn gthread.

    python bench/bench_web.py            # full: 1,000 tenants, 10,000 devices, 1,000 WebSocket clients
    python bench/bench_web.py --quick    # same data size, fewer requests / clients (< 2 min)

Data: 1,000 tenants with one admin each and 10,000 devices; the measured tenant ("big") owns 1,000 of them
(the rest are spread over the other 999), with raw readings for the last 3 h, one-minute roll-ups for 25 h and
one-hour roll-ups for 8 days on the devices whose history is queried, a latest reading for every device (in the
database and in the Redis latest-value cache, as the writer leaves them) and some active alarms.

Measures, with concurrent clients on loopback (a bounded number of requests each):
  1. fleet page: GET /fleet with a logged-in session (first page of 200 devices of the 1,000);
  2. device history API: GET /api/v1/devices/<id>/history?range=24h with a Bearer token (1-minute roll-ups, 1,440
     points);
  3. WebSocket fan-out: N clients on /ws?access_token=... of one tenant; events published with
     RedisCache.publish (as the writer does); delay from publish to each client receiving it.

The load generators run on the same machine as the server (and, here, as whatever else shares the CPU):
the figures include their cost. Prints a table and, as the LAST line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud import db, nativestack  # noqa: E402
from cloud.cache import RedisCache  # noqa: E402
from cloud.db import maintenance, repo  # noqa: E402
from cloud.passwords import hash_password  # noqa: E402
from cloud.web.pages import FLEET_PAGE  # noqa: E402

PASSWORD = "bench password 1"
BIG_EMAIL = "admin@big.example"
AIM_P95_MS = 100.0
AIM_FANOUT_P99_MS = 500.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


# --- data ---------------------------------------------------------------------------------------------------

def seed(url: str, tenants: int, devices: int, big_devices: int, history_devices: int) -> dict:
    """Bulk-load everything with INSERT ... SELECT generate_series (seconds, not minutes)."""
    import psycopg

    engine = db.make_engine(url)
    maintenance.ensure_partitions(engine, days_ahead=1, days_back=9)
    with db.session_factory(engine)() as s:
        big = repo.create_tenant(s, "big")
        repo.create_user(s, big.id, BIG_EMAIL, PASSWORD, role="admin")
        _, token = repo.create_api_token(s, big.id, "bench", "viewer")
        s.commit()
        big_id = big.id
    engine.dispose()
    pw_hash = hash_password(PASSWORD)
    others = devices - big_devices
    per_other = -(-others // (tenants - 1))
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (name, retention_days, created_at) "
                     "SELECT 'tenant-' || g, 30, now() FROM generate_series(2, %s) g", (tenants,))
        conn.execute("INSERT INTO users (tenant_id, email, password_hash, role, created_at) "
                     "SELECT id, 'admin@' || name || '.example', %s, 'admin', now() FROM tenants WHERE id <> %s",
                     (pw_hash, big_id))
        device_cols = "id, tenant_id, name, status, last_seen, firmware, boot, created_at"
        conn.execute(f"INSERT INTO devices ({device_cols}) "
                     "SELECT 'big-' || lpad(g::text, 5, '0'), %s, 'Sensor ' || g, "
                     "CASE WHEN g %% 7 = 0 THEN 'offline' ELSE 'online' END, "
                     "now() - (g %% 600) * interval '1 second', '1.2.0', 1, now() "
                     "FROM generate_series(1, %s) g", (big_id, big_devices))
        conn.execute(f"INSERT INTO devices ({device_cols}) "
                     "SELECT 'd-' || t.id || '-' || g, t.id, 'Sensor ' || g, 'online', now(), '1.2.0', 1, now() "
                     "FROM tenants t CROSS JOIN generate_series(1, %s) g WHERE t.id <> %s "
                     "ORDER BY t.id, g LIMIT %s", (per_other, big_id, others))
        # latest reading of every big-tenant device, then 3 h of raw readings every 30 s for the history devices
        conn.execute("INSERT INTO telemetry (device_id, boot, seq, tenant_id, ts, received_at, t, h, p, rssi, up, "
                     "ts_estimated) SELECT id, 1, 100000, tenant_id, now() - interval '5 seconds', now(), 21.5, 45, "
                     "1013, -60, 100000, false FROM devices WHERE tenant_id = %s", (big_id,))
        hist = "(SELECT id FROM devices WHERE tenant_id = %s ORDER BY id LIMIT %s)"
        conn.execute("INSERT INTO telemetry (device_id, boot, seq, tenant_id, ts, received_at, t, h, p, rssi, up, "
                     "ts_estimated) SELECT d.id, 1, g, %s, now() - g * interval '30 seconds', now(), "
                     "20 + (g %% 10) / 10.0, 40 + g %% 7, 1000 + g %% 5, -60, g, false "
                     f"FROM {hist} d CROSS JOIN generate_series(1, 360) g",
                     (big_id, big_id, history_devices))
        for table, unit, count in (("telemetry_1m", "minute", 25 * 60), ("telemetry_1h", "hour", 8 * 24)):
            conn.execute(f"INSERT INTO {table} (device_id, bucket, tenant_id, n, t_n, t_sum, t_min, t_max, h_n, "
                         "h_sum, h_min, h_max, p_n, p_sum, p_min, p_max) "
                         f"SELECT d.id, date_trunc('{unit}', now()) - g * interval '1 {unit}', %s, 2, "
                         "2, 41 + (g % 10) / 5.0, 20, 21.5, 2, 90, 44, 46, 2, 2026, 1012, 1014 "
                         f"FROM {hist} d CROSS JOIN generate_series(0, {count}) g".replace("%", "%%")
                         .replace("%%s", "%s"), (big_id, big_id, history_devices))
        conn.execute("INSERT INTO alarms (id, tenant_id, device_id, rule, metric, severity, state, value, "
                     "threshold, raised_at) SELECT 'bench-' || id, tenant_id, id, 'hot', 't', "
                     "(ARRAY['critical','major','minor'])[1 + (abs(hashtext(id)) %% 3)], 'raised', 31, 30, now() "
                     "FROM devices WHERE tenant_id = %s ORDER BY id LIMIT 100", (big_id,))
        conn.execute("ANALYZE")
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("tenants", "users", "devices", "telemetry", "telemetry_1m", "telemetry_1h", "alarms")}
        big_ids = [r[0] for r in conn.execute("SELECT id FROM devices WHERE tenant_id = %s ORDER BY id", (big_id,))]
    return {"big_id": big_id, "token": token, "counts": counts, "big_devices": big_ids,
            "history_devices": big_ids[:history_devices]}


def fill_cache(redis_url: str, big_id: int, device_ids: list[str]) -> None:
    """The latest values the writer keeps in Redis for every device of the measured tenant."""
    cache = RedisCache(redis_url)
    now_ms = int(time.time() * 1000)
    cache.update_many([(big_id, d, {"t": 21.5, "h": 45.0, "p": 1013.0, "rssi": -60, "ts": now_ms, "seq": 100000,
                                    "boot": 1, "up": 100000, "last_seen": now_ms}) for d in device_ids])
    cache.close()


# --- the server ---------------------------------------------------------------------------------------------

class Server:
    def __init__(self, kind: str, db_url: str, redis_url: str, workers: int, threads: int, logdir: Path):
        self.port = nativestack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_")}
        env.update({"IOT_DATABASE_URL": db_url, "IOT_REDIS_URL": redis_url, "IOT_SECRET_KEY": "bench-secret",
                    "IOT_WEB_HOST": "127.0.0.1", "IOT_WEB_PORT": str(self.port), "IOT_WEB_WORKERS": str(workers),
                    "IOT_WEB_THREADS": str(threads), "IOT_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
        if kind == "gunicorn":
            cmd = [sys.executable, "-m", "cloud", "web"]
        else:  # the threaded Werkzeug server of the demo
            cmd = [sys.executable, "-c", "import time; from cloud import settings; from cloud.webserver import "
                   "WebServer; WebServer(settings.load()).start(); time.sleep(1e9)"]
        self.log_path = logdir / "web.log"
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(self.log_path, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"web server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("web server did not become healthy in 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group (start_new_session)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


# --- HTTP load ----------------------------------------------------------------------------------------------

def login(base: str):
    import requests

    s = requests.Session()
    page = s.get(base + "/login", timeout=10).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = s.post(base + "/login", data={"email": BIG_EMAIL, "password": PASSWORD, "csrf_token": csrf}, timeout=10,
               allow_redirects=False)
    assert r.status_code in (302, 303), f"login failed: {r.status_code} {r.text[:200]}"
    return s


def http_load(name: str, make_session, urls: list[str], total: int, concurrency: int, warmup: int,
              check) -> dict:
    """``concurrency`` threads, each with its own keep-alive session, ``total`` requests in all (after
    ``warmup``); latency of each request including reading the whole body."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(10 ** 9))

    def worker():
        s = make_session()
        mine = []
        while True:
            with lock:
                i = next(counter)
            if i >= total + warmup:
                break
            url = urls[i % len(urls)]
            t0 = time.perf_counter()
            try:
                r = s.get(url, timeout=30)
                body = r.content
                dt = time.perf_counter() - t0
                if r.status_code != 200 or not check(body):
                    with lock:
                        errors.append(f"{r.status_code} {body[:120]!r}")
                    continue
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors.append(repr(exc))
                continue
            if i >= warmup:
                mine.append(dt)
        with lock:
            latencies.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    log(f"{name}: {len(ms)} requests, {len(errors)} errors, {wall:.1f} s")
    if errors:
        log(f"{name}: first error: {errors[0]}")
    return {"requests": len(ms), "errors": len(errors), "concurrency": concurrency,
            "rps": round(len(ms) / wall, 1) if wall else None,
            "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1), "p99_ms": round(pct(ms, 99), 1),
            "max_ms": round(max(ms), 1) if ms else None}


# --- WebSocket fan-out --------------------------------------------------------------------------------------

def _ws_proc(url: str, n_clients: int, n_events: int, ready_q, result_q, go_evt, timeout_s: float) -> None:
    """One load process: n_clients WebSockets; reports (event n, delay s) for every bench event received."""
    import websockets

    async def run():
        sem = asyncio.Semaphore(25)
        conns = []
        failed = 0

        async def connect():
            nonlocal failed
            async with sem:
                for _ in range(3):
                    try:
                        ws = await websockets.connect(url, open_timeout=60, ping_interval=None, max_size=None,
                                                      compression=None)
                        hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
                        assert hello["type"] == "hello", hello
                        conns.append(ws)
                        return
                    except Exception:  # noqa: BLE001
                        await asyncio.sleep(0.5)
                failed += 1

        await asyncio.gather(*(connect() for _ in range(n_clients)))
        ready_q.put((len(conns), failed))
        delays: list[tuple[int, float]] = []

        async def reader(ws):
            got = 0
            while got < n_events:
                msg = await ws.recv()
                now = time.time()
                if '"bench"' in msg:
                    event = json.loads(msg)
                    delays.append((event["n"], now - event["sent"]))
                    got += 1

        try:
            await asyncio.wait_for(asyncio.gather(*(reader(ws) for ws in conns)), timeout_s)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - reported as missing deliveries
            pass
        result_q.put(delays)
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)

    asyncio.run(run())


def ws_fanout(base: str, redis_url: str, tenant_id: int, token: str, clients: int, events: int,
              procs: int, gap_s: float) -> dict:
    url = base.replace("http://", "ws://") + f"/ws?access_token={token}"
    ctx = mp.get_context("spawn")
    ready_q, result_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    split = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    timeout_s = 60 + events * gap_s + 30
    ps = [ctx.Process(target=_ws_proc, args=(url, n, events, ready_q, result_q, go, timeout_s), daemon=True)
          for n in split if n]
    t0 = time.monotonic()
    for p in ps:
        p.start()
    connected = failed = 0
    for _ in ps:
        c, f = ready_q.get(timeout=300)
        connected, failed = connected + c, failed + f
    connect_s = time.monotonic() - t0
    log(f"ws: {connected} clients connected ({failed} failed) in {connect_s:.1f} s")
    time.sleep(1.0)
    cache = RedisCache(redis_url, socket_timeout=5)
    for n in range(events):
        cache.publish(tenant_id, {"type": "bench", "n": n, "sent": time.time()})
        time.sleep(gap_s)
    delays: list[tuple[int, float]] = []
    for _ in ps:
        delays.extend(result_q.get(timeout=timeout_s + 60))
    for p in ps:
        p.join(30)
    cache.close()
    ms = [d * 1000 for _, d in delays]
    per_event: dict[int, list[float]] = {}
    for n, d in delays:
        per_event.setdefault(n, []).append(d * 1000)
    to_all = [max(v) for v in per_event.values()]
    expected = connected * events
    return {"clients": connected, "connect_failed": failed, "connect_s": round(connect_s, 1), "events": events,
            "deliveries": len(ms), "missing": expected - len(ms),
            "p50_ms": round(pct(ms, 50), 1), "p99_ms": round(pct(ms, 99), 1), "max_ms": round(max(ms), 1) if ms else None,
            "to_all_median_ms": round(statistics.median(to_all), 1) if to_all else None,
            "to_all_max_ms": round(max(to_all), 1) if to_all else None}


# --- main ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests and WebSocket clients (< 2 min)")
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--big-devices", type=int, default=1000, help="devices of the measured tenant")
    ap.add_argument("--requests", type=int, default=None, help="measured requests per endpoint")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP clients")
    ap.add_argument("--ws-clients", type=int, default=None, help="0 skips the WebSocket fan-out")
    ap.add_argument("--ws-events", type=int, default=None)
    ap.add_argument("--ws-procs", type=int, default=4, help="client processes for the WebSockets")
    ap.add_argument("--server", choices=("gunicorn", "werkzeug"), default="gunicorn")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    ap.add_argument("--threads", type=int, default=None, help="gunicorn threads per worker")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (server and service logs)")
    args = ap.parse_args(argv)
    n_requests = args.requests or (150 if args.quick else 1000)
    ws_clients = args.ws_clients if args.ws_clients is not None else (250 if args.quick else 1000)
    ws_events = args.ws_events or (5 if args.quick else 20)
    history_devices = 20 if args.quick else 100
    threads = args.threads or max(64, ws_clients + 100)  # each open WebSocket holds a thread (any worker)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-web-"))
    services = []
    server = None
    try:
        pg = nativestack.Postgres(work / "pg")
        rd = nativestack.Redis(work / "redis")
        for svc in (pg, rd):
            services.append(svc)
            svc.start()
        db.upgrade(pg.url)
        t0 = time.monotonic()
        data = seed(pg.url, args.tenants, args.devices, args.big_devices, history_devices)
        fill_cache(rd.url, data["big_id"], data["big_devices"])
        seed_s = time.monotonic() - t0
        log(f"seeded in {seed_s:.1f} s: {data['counts']}")

        server = Server(args.server, pg.url, rd.url, args.workers, threads, work)
        log(f"{args.server} up at {server.url} (workers {args.workers}, threads {threads})")
        base = server.url
        first = login(base)
        page = first.get(base + "/fleet", timeout=30)
        assert page.status_code == 200 and data["big_devices"][0] in page.text, page.status_code
        cookies = first.cookies.get_dict()

        def session_with_cookie():
            import requests
            s = requests.Session()
            s.cookies.update(cookies)
            return s

        def session_with_token():
            import requests
            s = requests.Session()
            s.headers["Authorization"] = f"Bearer {data['token']}"
            return s

        fleet = http_load("fleet page", session_with_cookie, [base + "/fleet"], n_requests, args.concurrency,
                          warmup=20, check=lambda body: b"big-00001" in body)
        hist_urls = [f"{base}/api/v1/devices/{d}/history?range=24h" for d in data["history_devices"]]
        history = http_load("history API", session_with_token, hist_urls, n_requests, args.concurrency,
                            warmup=20, check=lambda body: body.count(b'"ts"') >= 1400)
        sample = json.loads(session_with_token().get(hist_urls[0], timeout=30).content)
        history["points"] = len(sample["points"])
        history["bucket_s"] = sample.get("bucket_s")
        fanout = ws_fanout(base, rd.url, data["big_id"], data["token"], ws_clients, ws_events,
                           max(1, args.ws_procs), gap_s=0.5) if ws_clients else None
    finally:
        if server is not None:
            server.stop()
        for svc in reversed(services):
            try:
                svc.close()
            except Exception as exc:  # noqa: BLE001
                log(f"stopping {svc.name}: {exc}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    total_s = time.monotonic() - started
    load1 = os.getloadavg()[0]  # the load generators and anything else on the machine count too
    rows: list[tuple] = [
        (f"fleet page GET /fleet ({min(FLEET_PAGE, args.big_devices)} of {args.big_devices:,} devices)",
         fleet["p50_ms"], fleet["p95_ms"], fleet["p99_ms"],
         f"{fleet['rps']} req/s, {fleet['errors']} errors", fleet["p95_ms"] < AIM_P95_MS),
        (f"history API range=24h ({history['points']} points)", history["p50_ms"], history["p95_ms"],
         history["p99_ms"], f"{history['rps']} req/s, {history['errors']} errors", history["p95_ms"] < AIM_P95_MS),
    ]
    if fanout:
        rows.append((f"WebSocket fan-out to {fanout['clients']} clients", fanout["p50_ms"], None, fanout["p99_ms"],
                     f"{fanout['deliveries']} deliveries, {fanout['missing']} missing; to all: median "
                     f"{fanout['to_all_median_ms']} ms, max {fanout['to_all_max_ms']} ms",
                     fanout["p99_ms"] < AIM_FANOUT_P99_MS and fanout["missing"] == 0))
    print()
    print(f"bench_web: {data['counts']['tenants']} tenants, {data['counts']['devices']} devices, "
          f"server {args.server} ({args.workers} workers x {threads} threads), {args.concurrency} concurrent "
          f"HTTP clients, {os.cpu_count()} CPUs, load average {load1:.1f} at the end")
    print(f"{'measurement':<48} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  aim  notes")
    for name, p50, p95, p99, notes, ok in rows:
        fmt = lambda v: f"{v:8.1f}" if isinstance(v, (int, float)) else f"{'-':>8}"  # noqa: E731
        print(f"{name:<48} {fmt(p50)} {fmt(p95)} {fmt(p99)}  {'ok ' if ok else 'MISS'} {notes}")
    print(f"aims: HTTP p95 < {AIM_P95_MS:.0f} ms, fan-out p99 < {AIM_FANOUT_P99_MS:.0f} ms; total {total_s:.0f} s "
          f"(seeding {seed_s:.1f} s)")
    result = {"bench": "web", "quick": args.quick, "cpu_count": os.cpu_count(), "loadavg_1m": round(load1, 2),
              "server": args.server, "workers": args.workers, "threads": threads, "counts": data["counts"],
              "fleet": fleet, "history": history, "ws_fanout": fanout,
              "aims_met": all(r[-1] for r in rows), "seed_s": round(seed_s, 1), "total_s": round(total_s, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
