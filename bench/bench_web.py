"""Dashboard / API benchmark on real PostgreSQL + Redis (cloud.nativestack) with the app under gunicorn gthread.

    python bench/bench_web.py            # full: 1,000 tenants, 10,000 devices, 1,000 WebSocket clients (~3 min)
    python bench/bench_web.py --quick    # same data size, 5 s phases, 250 WebSocket clients

Data: 1,000 tenants with one admin each and 10,000 devices; the measured tenant ("big") owns 1,000 of them
(the rest are spread over the other 999), with raw readings for the last 3 h, one-minute roll-ups for 25 h and
one-hour roll-ups for 8 days on the devices whose history is queried, a latest reading for every device (in the
database and in the Redis latest-value cache, as the writer leaves them) and some active alarms.

Measures, on loopback:
  1. fleet page: GET /fleet with a logged-in session (first page of 200 devices of the 1,000);
  2. device history API: GET /api/v1/devices/<id>/history?range=24h with a Bearer token (1-minute roll-ups, 1,440
     points) then the same with &format=columns (one array per field: what the
     dashboard's charts ask for);
     each first in OPEN loop at the offered rates of --rates (Poisson arrivals; a request's latency counts from
     its scheduled start, so a server that falls behind shows it), then in CLOSED loop (--concurrency clients
     back to back) for the maximum throughput -- whose latency is queueing (concurrency / throughput) and is
     not judged against the aim;
  3. WebSocket fan-out: N clients on /ws?access_token=... of one tenant; events published with
     RedisCache.publish (as the writer does); delay from publish to each client receiving it.

The load generators (one asyncio process per phase: raw HTTP/1.1 keep-alive, raw WebSocket frames) run on the
same machine as the server: each row reports the server's CPU per request and the cores the load generator
used. Prints a table and, as the LAST line, one JSON object with the figures.
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
import urllib.parse
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
GRACE_S = 5.0  # an open-loop phase waits this long after its last arrival, then counts what is open as late


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


# --- CPU accounting (/proc) ---------------------------------------------------------------------------------

def _proc_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """User + system CPU of a process tree (live processes only)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _proc_tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            # utime, stime, and cutime, cstime: the CPU of its children already reaped (PostgreSQL backends
            # come and go), so the sum over a tree only grows
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


# --- HTTP load: a light asyncio client (raw HTTP/1.1 keep-alive) in its own process ---------------------------

async def _http_request(pool: list, host: str, port: int, request: bytes):
    """One request on a pooled keep-alive connection (a fresh one if none is idle, or if the idle one was
    closed by the server); returns (status, body)."""
    for attempt in range(2):
        # a pooled connection may have just been closed by the server's keep-alive timeout: the retry always
        # opens a fresh one
        conn = pool.pop() if pool and not attempt else await asyncio.open_connection(host, port)
        reader, writer = conn
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            writer.close()
            if attempt:
                raise
            continue
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await reader.readexactly(length)
        if b"connection: close" in head.lower():
            writer.close()
        else:
            pool.append(conn)
        return status, body
    raise ConnectionError("unreachable")


def _load_proc(mode: str, host: str, port: int, paths: list[str], headers: str, check: bytes, min_count: int,
               rate: float, duration: float, concurrency: int, result_q) -> None:
    """mode "open": Poisson arrivals at ``rate``/s for ``duration`` s, each request on its own task whatever
    the server's state (latency from the SCHEDULED start, so a stalled server is not hidden); mode "closed":
    ``concurrency`` clients back to back for ``duration`` s (throughput at saturation)."""
    import random

    requests = [f"GET {p} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}\r\n".encode() for p in paths]

    def ok(status, body) -> bool:
        return status == 200 and body.count(check) >= min_count

    async def run():
        loop = asyncio.get_running_loop()
        pool: list = []
        lat: list[float] = []
        errors: list[str] = []

        async def one(i: int, t_sched: float):
            try:
                status, body = await asyncio.wait_for(
                    _http_request(pool, host, port, requests[i % len(requests)]), 30)
                if ok(status, body):
                    lat.append(loop.time() - t_sched)
                else:
                    errors.append(f"{status} {body[:120]!r}")
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(repr(exc))

        cpu0 = time.process_time()
        start = loop.time() + 0.1
        late = 0
        if mode == "open":
            rng = random.Random(1)
            tasks, t, i = [], start, 0
            while t < start + duration:
                delay = t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append((asyncio.create_task(one(i, t)), t))
                i += 1
                t += rng.expovariate(rate)
            # a server that fell behind is not waited for beyond GRACE_S: what is still open then is "late" and
            # enters the percentiles with the time waited so far (a lower bound), so the phase ends on time
            _, pending = await asyncio.wait([task for task, _ in tasks], timeout=GRACE_S)
            now = loop.time()
            for task, t_sched in tasks:
                if task in pending:  # its latency is at least this long: counted so, never left out
                    task.cancel()
                    lat.append(now - t_sched)
            late = len(pending)
        else:
            end = start + duration
            counter = iter(range(10 ** 9))

            async def client():
                while loop.time() < end:
                    await one(next(counter), loop.time())

            await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = loop.time() - start
        cpu = time.process_time() - cpu0
        for _, writer in pool:
            writer.close()
        result_q.put({"latencies": lat, "errors": errors, "wall": wall, "cpu": cpu, "late": late})

    asyncio.run(run())


DB_PIDS: list[int] = []  # PostgreSQL and Redis process trees: their CPU per request is reported too


def settle(server: "Server", limit_s: float = 15.0) -> float:
    """Wait until the server is idle (under 0.1 cores over half a second): an overloaded phase leaves requests
    queued in the server after its clients gave up, and they must not be billed to the next phase."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        c0 = cpu_seconds(server.proc.pid)
        time.sleep(0.5)
        if cpu_seconds(server.proc.pid) - c0 < 0.05:
            break
    return time.monotonic() - t0


def http_phase(server: "Server", name: str, mode: str, paths: list[str], headers: str, check: bytes,
               min_count: int, *, rate: float = 0.0, duration: float, concurrency: int = 0) -> dict:
    waited = settle(server)
    if waited > 5:
        log(f"{name}: waited {waited:.0f} s for the server to finish the previous phase's backlog")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    host, port = "127.0.0.1", server.port
    p = ctx.Process(target=_load_proc, args=(mode, host, port, paths, headers, check, min_count, rate, duration,
                                             concurrency, q), daemon=True)
    p.start()
    time.sleep(0.05)
    cpu0, db0, t0 = cpu_seconds(server.proc.pid), sum(cpu_seconds(p) for p in DB_PIDS), time.monotonic()
    res = q.get(timeout=duration + GRACE_S + 120)
    server_cpu, wall = cpu_seconds(server.proc.pid) - cpu0, time.monotonic() - t0
    db_cpu = sum(cpu_seconds(p) for p in DB_PIDS) - db0
    p.join(10)
    ms = [x * 1000 for x in res["latencies"]]
    n = len(ms) - res.get("late", 0)  # completed in time
    out = {"mode": mode, "offered_rps": rate if mode == "open" else None,
           "concurrency": concurrency if mode == "closed" else None, "requests": n, "errors": len(res["errors"]),
           "achieved_rps": round(n / res["wall"], 1) if res["wall"] else None,
           "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1), "p99_ms": round(pct(ms, 99), 1),
           "max_ms": round(max(ms), 1) if ms else None,
           "late": res.get("late", 0),
           "server_cpu_ms_per_req": round(server_cpu * 1000 / max(1, len(ms) + len(res["errors"])), 1),
           "db_cpu_ms_per_req": round(db_cpu * 1000 / max(1, len(ms) + len(res["errors"])), 1),
           "server_cores": round(server_cpu / wall, 2) if wall else None,
           "loadgen_cores": round(res["cpu"] / res["wall"], 2) if res["wall"] else None}
    what = f"{rate:g} req/s offered" if mode == "open" else f"closed loop x{concurrency}"
    log(f"{name} ({what}): {n} ok, {res.get('late', 0)} late, {len(res['errors'])} errors, p95 {out['p95_ms']} ms, "
        f"{out['achieved_rps']} req/s, server {out['server_cpu_ms_per_req']} CPU ms/request")
    if res["errors"]:
        log(f"{name}: first error: {res['errors'][0]}")
    return out


def login(base: str) -> str:
    """Log in through the form (CSRF token included); returns the session cookie header value."""
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(base + "/login", timeout=10).read().decode()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"email": BIG_EMAIL, "password": PASSWORD, "csrf_token": csrf}).encode()
    opener.open(base + "/login", data=form, timeout=10).read()  # redirect to /fleet followed
    cookie = "; ".join(f"{c.name}={c.value}" for c in jar if c.name == "iot_session")
    assert cookie, "login failed"
    return cookie


# --- WebSocket fan-out: raw asyncio clients (handshake + unmasked server frames) ------------------------------

def _ws_proc(host: str, port: int, path: str, n_clients: int, n_events: int, ready_q, result_q,
             timeout_s: float) -> None:
    """One load process: n_clients WebSockets; reports (event n, delay s) for every bench event received."""
    import base64

    async def run():
        loop = asyncio.get_running_loop()
        delays: list[tuple[int, float]] = []
        done = asyncio.Event()
        remaining = [0]

        class Proto(asyncio.Protocol):
            def __init__(self):
                self.buf = b""
                self.open = False
                self.hello = loop.create_future()
                self.got = 0

            def connection_made(self, transport):
                self.transport = transport
                key = base64.b64encode(os.urandom(16)).decode()
                transport.write((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                 "Sec-WebSocket-Version: 13\r\n\r\n").encode())

            def data_received(self, data):
                now = time.time()
                self.buf += data
                if not self.open:
                    end = self.buf.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    if self.buf[9:12] != b"101":
                        self.hello.set_exception(ConnectionError(self.buf[:80]))
                        return
                    self.open, self.buf = True, self.buf[end + 4:]
                while len(self.buf) >= 2:
                    b0, b1 = self.buf[0], self.buf[1]
                    n, off = b1 & 0x7F, 2
                    if n == 126:
                        if len(self.buf) < 4:
                            return
                        n, off = int.from_bytes(self.buf[2:4], "big"), 4
                    elif n == 127:
                        if len(self.buf) < 10:
                            return
                        n, off = int.from_bytes(self.buf[2:10], "big"), 10
                    if len(self.buf) < off + n:
                        return
                    payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
                    opcode = b0 & 0x0F
                    if opcode == 0x9:  # ping -> masked pong
                        mask = os.urandom(4)
                        self.transport.write(bytes((0x8A, 0x80 | len(payload))) + mask +
                                             bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))
                    elif opcode == 0x1:
                        if not self.hello.done():
                            self.hello.set_result(json.loads(payload))
                        elif b'"bench"' in payload:
                            event = json.loads(payload)
                            delays.append((event["n"], now - event["sent"]))
                            self.got += 1
                            if self.got == n_events:
                                remaining[0] -= 1
                                if not remaining[0]:
                                    done.set()

            def connection_lost(self, exc):
                if not self.hello.done():
                    self.hello.set_exception(ConnectionError("closed"))

        sem = asyncio.Semaphore(25)
        conns = []
        failed = 0

        async def connect():
            nonlocal failed
            async with sem:
                for _ in range(3):
                    try:
                        transport, proto = await loop.create_connection(Proto, host, port)
                        hello = await asyncio.wait_for(proto.hello, 30)
                        assert hello["type"] == "hello", hello
                        conns.append((transport, proto))
                        return
                    except Exception:  # noqa: BLE001
                        await asyncio.sleep(0.5)
                failed += 1

        await asyncio.gather(*(connect() for _ in range(n_clients)))
        remaining[0] = len(conns)
        ready_q.put((len(conns), failed))
        cpu0 = time.process_time()
        if conns:
            try:
                await asyncio.wait_for(done.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass  # reported as missing deliveries
        result_q.put((delays, time.process_time() - cpu0))
        for transport, _ in conns:
            transport.close()

    asyncio.run(run())


def ws_fanout(server: "Server", redis_url: str, tenant_id: int, token: str, clients: int, events: int,
              procs: int, gap_s: float) -> dict:
    path = f"/ws?access_token={token}"
    ctx = mp.get_context("spawn")
    ready_q, result_q = ctx.Queue(), ctx.Queue()
    split = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    timeout_s = 30 + events * gap_s + 30
    ps = [ctx.Process(target=_ws_proc, args=("127.0.0.1", server.port, path, n, events, ready_q, result_q,
                                             timeout_s), daemon=True)
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
    cpu0, w0 = cpu_seconds(server.proc.pid), time.monotonic()
    for n in range(events):
        cache.publish(tenant_id, {"type": "bench", "n": n, "sent": time.time()})
        time.sleep(gap_s)
    delays: list[tuple[int, float]] = []
    client_cpu = 0.0
    for _ in ps:
        d, c = result_q.get(timeout=timeout_s + 60)
        delays.extend(d)
        client_cpu += c
    server_cpu, wall = cpu_seconds(server.proc.pid) - cpu0, time.monotonic() - w0
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
            "gap_s": gap_s, "deliveries": len(ms), "missing": expected - len(ms),
            "p50_ms": round(pct(ms, 50), 1), "p99_ms": round(pct(ms, 99), 1), "max_ms": round(max(ms), 1) if ms else None,
            "to_all_median_ms": round(statistics.median(to_all), 1) if to_all else None,
            "to_all_max_ms": round(max(to_all), 1) if to_all else None,
            "server_cores": round(server_cpu / wall, 2), "client_cores": round(client_cpu / wall, 2)}


# --- main ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter phases and fewer WebSocket clients (< 2 min)")
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--big-devices", type=int, default=1000, help="devices of the measured tenant")
    ap.add_argument("--rates", default="50,100,200", help="offered request rates (req/s) of the open-loop phases")
    ap.add_argument("--duration", type=float, default=None, help="seconds per HTTP phase")
    ap.add_argument("--concurrency", type=int, default=8, help="clients of the closed-loop (max throughput) phase")
    ap.add_argument("--ws-clients", type=int, default=None, help="0 skips the WebSocket fan-out")
    ap.add_argument("--ws-events", type=int, default=None)
    ap.add_argument("--ws-procs", type=int, default=2, help="client processes for the WebSockets")
    ap.add_argument("--server", choices=("gunicorn", "werkzeug"), default="gunicorn")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    ap.add_argument("--threads", type=int, default=None, help="gunicorn threads per worker")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (server and service logs)")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    duration = args.duration or (5.0 if args.quick else 10.0)
    ws_clients = args.ws_clients if args.ws_clients is not None else (250 if args.quick else 1000)
    ws_events = args.ws_events or (5 if args.quick else 20)
    history_devices = 20 if args.quick else 100
    # each open WebSocket holds a thread of its worker for its lifetime (flask-sock); the clients spread over
    # the workers unevenly, so each worker gets room for all of them
    threads = args.threads or max(64, ws_clients + 100)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-web-"))
    services = []
    server = None
    phases: dict[str, list[dict]] = {"fleet": [], "history": [], "history_columns": []}
    try:
        pg = nativestack.Postgres(work / "pg")
        rd = nativestack.Redis(work / "redis")
        for svc in (pg, rd):
            services.append(svc)
            svc.start()
        DB_PIDS[:] = [svc.pid for svc in (pg, rd) if svc.pid]
        db.upgrade(pg.url)
        t0 = time.monotonic()
        data = seed(pg.url, args.tenants, args.devices, args.big_devices, history_devices)
        fill_cache(rd.url, data["big_id"], data["big_devices"])
        seed_s = time.monotonic() - t0
        log(f"seeded in {seed_s:.1f} s: {data['counts']}")

        server = Server(args.server, pg.url, rd.url, args.workers, threads, work)
        log(f"{args.server} up at {server.url} (workers {args.workers}, threads {threads})")
        base = server.url
        cookie = login(base)
        with urllib.request.urlopen(urllib.request.Request(base + "/fleet", headers={"Cookie": cookie}),
                                    timeout=30) as r:
            assert r.status == 200 and data["big_devices"][0] in r.read().decode()
        hist_paths = [f"/api/v1/devices/{d}/history?range=24h" for d in data["history_devices"]]
        with urllib.request.urlopen(urllib.request.Request(
                base + hist_paths[0], headers={"Authorization": f"Bearer {data['token']}"}), timeout=30) as r:
            sample = json.loads(r.read())
        targets = {
            "fleet": (["/fleet"], f"Cookie: {cookie}\r\n", b"big-00001", 1),
            "history": (hist_paths, f"Authorization: Bearer {data['token']}\r\n", b'"ts"', 1400),
            # what the dashboard's charts ask for: the same points as one array per field
            "history_columns": ([p + "&format=columns" for p in hist_paths],
                                f"Authorization: Bearer {data['token']}\r\n", b'"columns":{"ts":[', 1),
        }
        for name, (paths, headers, check, min_count) in targets.items():
            http_phase(server, name + " warm-up", "closed", paths, headers, check, min_count, duration=2.0,
                       concurrency=2)
            for rate in rates:
                phases[name].append(http_phase(server, name, "open", paths, headers, check, min_count, rate=rate,
                                               duration=duration))
            phases[name].append(http_phase(server, name, "closed", paths, headers, check, min_count,
                                           duration=duration, concurrency=args.concurrency))
        history_points, history_bucket = len(sample["points"]), sample.get("bucket_s")
        fanout = ws_fanout(server, rd.url, data["big_id"], data["token"], ws_clients, ws_events,
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
    labels = {"fleet": f"fleet page GET /fleet ({min(FLEET_PAGE, args.big_devices)} of {args.big_devices:,} "
                       "devices)",
              "history": f"history API range=24h ({history_points} points)",
              "history_columns": "history API range=24h format=columns"}
    rows: list[tuple] = []
    for name, results in phases.items():
        for r in results:
            if r["mode"] == "open":
                load = f"open loop {r['offered_rps']:g} req/s"
                ok = r["p95_ms"] < AIM_P95_MS and r["errors"] == 0
            else:
                load = f"closed x{r['concurrency']}: max"
                ok = None  # latency here is queueing (concurrency / throughput), not judged against the aim
            notes = (f"{r['achieved_rps']} req/s, {r['errors']} errors ({r['late']} late), CPU per request: web "
                     f"{r['server_cpu_ms_per_req']} ms, PostgreSQL+Redis {r['db_cpu_ms_per_req']} ms; web "
                     f"{r['server_cores']} cores, load generator {r['loadgen_cores']} cores")
            rows.append((labels[name], load, r["p50_ms"], r["p95_ms"], r["p99_ms"], notes, ok))
    if fanout:
        rows.append((f"WebSocket fan-out to {fanout['clients']} clients", f"1 event / {fanout['gap_s']:g} s",
                     fanout["p50_ms"], None, fanout["p99_ms"],
                     f"{fanout['deliveries']} deliveries, {fanout['missing']} missing; to all: median "
                     f"{fanout['to_all_median_ms']} ms, max {fanout['to_all_max_ms']} ms; server "
                     f"{fanout['server_cores']} cores, clients {fanout['client_cores']} cores",
                     fanout["p99_ms"] < AIM_FANOUT_P99_MS and fanout["missing"] == 0))
    print()
    print(f"bench_web: {data['counts']['tenants']} tenants, {data['counts']['devices']} devices, "
          f"server {args.server} ({args.workers} workers x {threads} threads), {os.cpu_count()} CPUs shared by "
          f"server, PostgreSQL, Redis and the load generators; load average {load1:.1f} at the end")
    print("open loop: Poisson arrivals at the offered rate, latency from each request's scheduled start; closed "
          f"loop: {args.concurrency} clients back to back (its latency is queueing: concurrency / throughput)")
    print(f"{'measurement':<46} {'load':<22} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  aim  notes")
    for name, load, p50, p95, p99, notes, ok in rows:
        fmt = lambda v: f"{v:8.1f}" if isinstance(v, (int, float)) else f"{'-':>8}"  # noqa: E731
        verdict = "ok " if ok else ("MISS" if ok is False else " -  ")
        print(f"{name:<46} {load:<22} {fmt(p50)} {fmt(p95)} {fmt(p99)}  {verdict} {notes}")
    print(f"aims: HTTP p95 < {AIM_P95_MS:.0f} ms (open-loop rows), fan-out p99 < {AIM_FANOUT_P99_MS:.0f} ms; "
          f"total {total_s:.0f} s (seeding {seed_s:.1f} s)")
    judged = [r[-1] for r in rows if r[-1] is not None]
    result = {"bench": "web", "quick": args.quick, "cpu_count": os.cpu_count(), "loadavg_1m": round(load1, 2),
              "server": args.server, "workers": args.workers, "threads": threads, "counts": data["counts"],
              "phase_s": duration, "fleet": phases["fleet"], "history": {"points": history_points,
                                                                        "bucket_s": history_bucket,
                                                                        "phases": phases["history"],
                                                                        "columns_phases": phases["history_columns"]},
              "ws_fanout": fanout, "aims_met": all(judged), "seed_s": round(seed_s, 1),
              "total_s": round(total_s, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
