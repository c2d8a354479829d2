"""Synthetic fleet: one real MQTT connection per device, a set total telemetry rate, bounded in time, loopback only.

``python -m cloud sim --synthetic`` (wired by the CLI) and the benchmarks (bench/bench_e2e.py, bench/chaos.py) use
it. Each device is a raw-socket MQTT 3.1.1 client with its own username/password (the device id is the client id,
as Mosquitto's ``use_username_as_clientid`` wants) that

* connects (clean session, keepalive 60 s, last will ``{"v":1,"state":"offline"}`` retained on its status topic)
  and publishes a retained ``online`` status;
* publishes telemetry with QoS 1 in the format of :func:`cloud.schema.parse_telemetry`, ``ts`` = the publish time
  (unix ms, this host's clock, so latencies downstream are publish -> X), ``boot`` random per run, ``seq`` from 0;
* keeps every reading the broker has not acknowledged (PUBACK) and publishes it again after a reconnect, like the
  firmware's backlog: a reading counts as *acknowledged* only once the broker sent its PUBACK.

The total rate is split evenly over worker processes (each owns a slice of the devices, one epoll loop), and inside
a worker devices take turns round-robin, so every device publishes about ``rate / devices`` readings per second.
A device with ``max_unacked`` readings outstanding skips its turn (backpressure is then visible as a rate below
target). Devices listed in ``alarm_devices`` run a temperature pattern that crosses 30 degC: readings with
``seq % 8`` in 2..4 carry t = 35.0, the others 21.x, so a ``max 30`` threshold rule raises at seq 2, 10, 18, ...
and clears at seq 5, 13, 21, ... (see :func:`alarm_phase`).

Only loopback addresses are accepted (this is a load generator; it must never point at another machine).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import multiprocessing as mp
import os
import random
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

log = logging.getLogger(__name__)

ALARM_PERIOD = 8
ALARM_HOT = range(2, 5)
HOT_T = 35.0
MAX_CONNECTING = 64  # per worker: outstanding CONNECTs (Mosquitto hashes every password, PBKDF2, one at a time)
# Between publishing rounds a worker sleeps this long and then reads every PUBACK that came meanwhile in one epoll
# pass. Waiting in epoll instead woke the worker for nearly every PUBACK: at 13,000 msg/s the load generator took
# 23.4 % of a core and Mosquitto 29.7 %, against 19.3 % and 27.7 % with the nap (interleaved in one run). Readings
# still carry the time they were built, and the rate is kept by the schedule (a round sends what is due).
PUBLISH_NAP_S = 0.004
CONNECT_TIMEOUT_S = 600


def alarm_phase(seq: int) -> bool:
    """True when the reading ``seq`` of an alarm device is hot (t = 35.0)."""
    return seq % ALARM_PERIOD in ALARM_HOT


def expected_alarm_seqs(acked: Iterable[int]) -> list[tuple[int, int | None]]:
    """For an alarm device whose readings ``acked`` were all delivered in order: (raise seq, clear seq or None)
    per episode of a ``max 30`` threshold rule with hysteresis < 5 and no duration."""
    seqs = set(acked)
    out = []
    if not seqs:
        return out
    for start in range(ALARM_HOT.start, max(seqs) + 1, ALARM_PERIOD):
        if start not in seqs:
            continue
        clear = start + len(ALARM_HOT)
        out.append((start, clear if clear in seqs else None))
    return out


def _check_loopback(host: str) -> None:
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    if not addr.is_loopback:
        raise ValueError(f"the synthetic fleet only targets loopback addresses, not {host} ({addr})")


# --- MQTT 3.1.1 packets -------------------------------------------------------------------------------------

def _remaining(n: int) -> bytes:
    if n < 128:  # the usual sizes first: a reading's PUBLISH is 1 or 2 bytes of length
        return bytes((n,))
    if n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_string(s: str | bytes) -> bytes:
    """An MQTT string: its length (2 bytes), then its bytes. A PUBLISH's topic is one; devices build theirs once."""
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id: str, username: str | None, password: str | None, keepalive: int = 60,
                   will_topic: str | None = None, will_payload: bytes = b"") -> bytes:
    flags = 0x02  # clean session
    payload = mqtt_string(client_id)
    if will_topic:
        flags |= 0x04 | 0x08 | 0x20  # will, will QoS 1, will retain
        payload += mqtt_string(will_topic) + mqtt_string(will_payload)
    if username is not None:
        flags |= 0x80
        payload += mqtt_string(username)
        if password is not None:
            flags |= 0x40
            payload += mqtt_string(password)
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + keepalive.to_bytes(2, "big") + payload
    return b"\x10" + _remaining(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, mid: int, retain: bool = False, dup: bool = False) -> bytes:
    """A QoS 1 PUBLISH. ``topic`` is the topic as an MQTT string (``mqtt_string``): a device builds it once, since this
    runs per reading on the cores the system under test uses."""
    header = 0x32 | (0x01 if retain else 0) | (0x08 if dup else 0)
    return b"".join((bytes((header,)), _remaining(len(topic) + 2 + len(payload)), topic, mid.to_bytes(2, "big"),
                     payload))


# --- one device ---------------------------------------------------------------------------------------------

class _Dev:
    __slots__ = ("id", "id_bytes", "user", "password", "topic", "status_topic", "boot", "seq", "sock", "state",
                 "outbuf", "inbuf", "unacked", "mid", "next_connect", "backoff", "alarm", "connects", "last_io",
                 "polling_out")

    def __init__(self, device_id: str, user: str | None, password: str | None, boot: int, alarm: bool):
        self.id = device_id
        self.user, self.password = user, password
        self.id_bytes = device_id.encode()
        self.topic = mqtt_string(f"devices/{device_id}/telemetry")  # as PUBLISH carries it (see publish_packet)
        self.status_topic = f"devices/{device_id}/status"
        self.boot = boot
        self.seq = 0
        self.sock: socket.socket | None = None
        self.state = "down"  # down | connecting | up
        self.outbuf = bytearray()
        self.inbuf = bytearray()
        self.unacked: dict[int, tuple[int, bytes]] = {}  # mid -> (seq or -1 for status, payload)
        self.mid = 0
        self.next_connect = 0.0
        self.backoff = 0.5
        self.alarm = alarm
        self.connects = 0
        self.last_io = 0.0
        self.polling_out = False  # registered for EPOLLOUT: changed only when it must (one syscall less per send)

    def next_mid(self) -> int:
        mid = self.mid
        for _ in range(65535):  # the next id is free in the usual case: one pass
            mid = mid % 65535 + 1
            if mid not in self.unacked:
                self.mid = mid
                return mid
        raise RuntimeError("no free packet id")


@dataclass
class WorkerResult:
    worker: int
    devices: dict[str, dict] = field(default_factory=dict)  # id -> {"boot", "next_seq", "unacked": [seqs]}
    sent: int = 0
    acked: int = 0
    connects: int = 0
    disconnects: int = 0


# shared counters per worker: sent, acked, connected, disconnects, behind (turns skipped for backpressure)
_NCOUNT = 5


def _worker(index: int, host: str, port: int, devices: list[tuple[str, str | None, str | None]], rate: float,
            duration: float, boot: int, alarm_ids: set[str], max_unacked: int, start_evt, stop_evt, counters,
            results, rate_value) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ep = select.epoll()
    devs = [_Dev(d, u, p, boot, d in alarm_ids) for d, u, p in devices]
    by_fd: dict[int, _Dev] = {}
    res = WorkerResult(index)
    fw = b"loadgen"

    def close(dev: _Dev, why: str) -> None:
        if dev.sock is not None:
            try:
                ep.unregister(dev.sock.fileno())
            except (OSError, ValueError):
                pass
            by_fd.pop(dev.sock.fileno(), None)
            try:
                dev.sock.close()
            except OSError:
                pass
        if dev.state == "up":
            res.disconnects += 1
            counters[index * _NCOUNT + 3] += 1
            counters[index * _NCOUNT + 2] -= 1
        dev.sock, dev.state = None, "down"
        dev.outbuf.clear()
        dev.inbuf.clear()
        dev.next_connect = time.monotonic() + dev.backoff * random.uniform(0.5, 1.0)
        dev.backoff = min(5.0, dev.backoff * 2)

    def flush(dev: _Dev) -> None:
        if not dev.outbuf or dev.sock is None:
            return
        try:
            n = dev.sock.send(dev.outbuf)
            del dev.outbuf[:n]
        except BlockingIOError:
            pass
        except OSError:
            close(dev, "send")
            return
        want_out = bool(dev.outbuf)
        if dev.sock is not None and want_out != dev.polling_out:
            try:
                ep.modify(dev.sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if want_out else 0))
                dev.polling_out = want_out
            except OSError:
                pass

    def send(dev: _Dev, data: bytes) -> None:
        """``data`` to the device's socket: straight away when nothing waits before it (no buffer: the usual case,
        one reading per device and turn), else behind what waits, in order."""
        if dev.outbuf:
            dev.outbuf += data
            flush(dev)
            return
        try:
            n = dev.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            close(dev, "send")
            return
        if n < len(data):
            dev.outbuf += data[n:]
            flush(dev)

    def start_connect(dev: _Dev) -> None:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            try:
                s.connect((host, port))
            except BlockingIOError:
                pass
        except OSError:
            dev.next_connect = time.monotonic() + 1.0
            return
        dev.sock, dev.state = s, "connecting"
        dev.connects += 1
        res.connects += 1
        by_fd[s.fileno()] = dev
        dev.outbuf += connect_packet(dev.id, dev.user, dev.password, 60, dev.status_topic,
                                     b'{"v":1,"state":"offline"}')
        ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT)
        dev.polling_out = True

    def on_connack(dev: _Dev, rc: int) -> None:
        if rc != 0:
            log.warning("device %s: CONNACK refused (rc=%d)", dev.id, rc)
            close(dev, "refused")
            dev.next_connect = time.monotonic() + 5.0
            return
        dev.state = "up"
        dev.backoff = 0.5
        counters[index * _NCOUNT + 2] += 1
        mid = dev.next_mid()
        status = json.dumps({"v": 1, "state": "online", "id": dev.id, "boot": dev.boot, "fw": "loadgen"},
                            separators=(",", ":")).encode()
        dev.unacked[mid] = (-1, status)
        dev.outbuf += publish_packet(mqtt_string(dev.status_topic), status, mid, retain=True)
        # readings the broker never acknowledged: again, in order (the firmware's backlog does the same)
        old = sorted(((s, p) for s, p in dev.unacked.values() if s >= 0), key=lambda x: x[0])
        if old:
            keep = {m: v for m, v in dev.unacked.items() if v[0] < 0}
            dev.unacked = keep
            for s, p in old:
                m = dev.next_mid()
                dev.unacked[m] = (s, p)
                dev.outbuf += publish_packet(dev.topic, p, m)
        dev.last_io = time.monotonic()
        flush(dev)

    def on_read(dev: _Dev) -> None:
        try:
            data = dev.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            close(dev, "recv")
            return
        if not data:
            close(dev, "eof")
            return
        if len(data) == 4 and data[0] == 0x40 and data[1] == 2 and not dev.inbuf:  # one PUBACK: the usual read
            entry = dev.unacked.pop((data[2] << 8) | data[3], None)
            if entry is not None and entry[0] >= 0:
                res.acked += 1
            return
        buf = dev.inbuf
        buf += data
        i = 0
        acked = 0
        while len(buf) - i >= 2:
            kind = buf[i] & 0xF0
            ln = buf[i + 1]  # CONNACK, PUBACK, PINGRESP are short: one length byte
            if ln & 0x80 or len(buf) - i < 2 + ln:
                if ln & 0x80:
                    close(dev, "protocol")
                    return
                break
            if kind == 0x20:
                on_connack(dev, buf[i + 3])
            elif kind == 0x40:
                mid = int.from_bytes(buf[i + 2:i + 4], "big")
                entry = dev.unacked.pop(mid, None)
                if entry is not None and entry[0] >= 0:
                    acked += 1
            i += 2 + ln
        del buf[:i]
        res.acked += acked  # the shared counter follows in publish_counts()

    def publish_counts() -> None:
        counters[index * _NCOUNT + 1] = res.acked

    # connect everything first, at most MAX_CONNECTING handshakes outstanding per worker (the broker checks a
    # PBKDF2 password per CONNECT, one at a time: a storm only overflows its listen backlog), then wait for go
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    pending = list(reversed(devs))
    connecting: dict[_Dev, float] = {}
    while time.monotonic() < deadline and (pending or connecting or any(d.state == "down" for d in devs)):
        now = time.monotonic()
        for dev in [d for d, t in connecting.items() if d.state != "connecting" or now - t > 15]:
            if dev.state == "connecting":  # no CONNACK in 15 s: try again
                close(dev, "connect timeout")
            connecting.pop(dev, None)
        while pending and len(connecting) < MAX_CONNECTING:
            dev = pending.pop()
            start_connect(dev)
            if dev.state == "connecting":
                connecting[dev] = now
        if not pending and len(connecting) < MAX_CONNECTING:
            for dev in devs:
                if dev.state == "down" and now >= dev.next_connect and len(connecting) < MAX_CONNECTING:
                    start_connect(dev)
                    if dev.state == "connecting":
                        connecting[dev] = now
        _pump(ep, by_fd, on_read, flush, 0.01)
        publish_counts()
    while not start_evt.is_set():
        _pump(ep, by_fd, on_read, flush, 0.05)
        if stop_evt.is_set():
            break

    # publish
    t0 = time.monotonic()
    sent = 0
    ring = 0
    ndev = len(devs)
    last_ping = t0
    last_reconnect = t0
    epoch_seen = None
    base_t, base_sent = t0, 0
    while not stop_evt.is_set():
        now = time.monotonic()
        if duration and now - t0 >= duration:
            break
        if rate_value.epoch != epoch_seen:  # the rate changed: pace from here
            epoch_seen = rate_value.epoch
            base_t, base_sent = now, sent
        worker_rate = rate_value.value / rate_value.workers
        due = int(worker_rate * (now - base_t)) - (sent - base_sent)
        if due > worker_rate * 0.5:  # fell behind by more than half a second: don't burst, slip the schedule
            base_sent -= due - int(worker_rate * 0.05)
            due = int(worker_rate * 0.05)
        skipped = 0
        now_ms = int(time.time() * 1000)
        while due > 0 and ndev:
            dev = devs[ring]
            ring = ring + 1 if ring + 1 < ndev else 0
            if dev.state != "up" or len(dev.unacked) >= max_unacked:
                skipped += 1
                if skipped >= ndev:
                    break
                continue
            skipped = 0
            seq = dev.seq
            dev.seq += 1
            if dev.alarm and alarm_phase(seq):
                t = HOT_T
            else:
                t = 21.0 + (seq % 7) * 0.25
            payload = (b'{"v":1,"id":"%s","boot":%d,"seq":%d,"ts":%d,"t":%.2f,"h":45.5,"p":1001.25,"rssi":-60,'
                       b'"up":%d,"fw":"%s"}' % (dev.id_bytes, dev.boot, seq, now_ms, t, seq, fw))
            mid = dev.next_mid()
            dev.unacked[mid] = (seq, payload)
            dev.last_io = now
            due -= 1
            sent += 1
            send(dev, publish_packet(dev.topic, payload, mid))  # as it is built: no second pass over the devices
        res.sent = sent
        counters[index * _NCOUNT] = sent
        if skipped:
            counters[index * _NCOUNT + 4] += 1
        time.sleep(PUBLISH_NAP_S)
        _pump(ep, by_fd, on_read, flush, 0)
        publish_counts()
        if now - last_reconnect > 0.1:
            last_reconnect = now
            for dev in devs:
                if dev.state == "down" and now >= dev.next_connect:
                    start_connect(dev)
                elif dev.state == "connecting" and dev.connects and now - dev.next_connect > 30:
                    close(dev, "connect timeout")
        # keepalive (60 s): only a device that sent nothing for 20 s pings, each at its own time (any packet
        # counts for the broker). Pinging the whole fleet every 20 s put 10,000 PINGREQs through the broker in one
        # burst, and the pipeline's slowest seconds came every 20 s (bench_e2e's commit seconds)
        if now - last_ping > 1:
            last_ping = now
            for dev in devs:
                if dev.state == "up" and not dev.outbuf and now - dev.last_io > 20:
                    dev.last_io = now
                    send(dev, b"\xc0\x00")

    # drain: wait (bounded) until the broker acknowledged everything outstanding
    drain_until = time.monotonic() + (30 if not stop_evt.is_set() else 5)
    while time.monotonic() < drain_until and any(any(s >= 0 for s, _ in d.unacked.values()) for d in devs):
        _pump(ep, by_fd, on_read, flush, 0.05)
        publish_counts()
        now = time.monotonic()
        for dev in devs:
            if dev.state == "down" and now >= dev.next_connect:
                start_connect(dev)
    for dev in devs:
        res.devices[dev.id] = {"boot": dev.boot, "next_seq": dev.seq,
                               "unacked": sorted(s for s, _ in dev.unacked.values() if s >= 0)}
        if dev.sock is not None and dev.state == "up":
            try:
                dev.sock.setblocking(True)
                dev.sock.sendall(bytes(dev.outbuf) + b"\xe0\x00")  # clean DISCONNECT: no last will
            except OSError:
                pass
        if dev.sock is not None:
            dev.sock.close()
    res.sent = sent
    results.put(res)


def _pump(ep, by_fd, on_read, flush, timeout: float) -> None:
    for fd, events in ep.poll(timeout):
        dev = by_fd.get(fd)
        if dev is None:
            continue
        if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
            on_read(dev)
            if dev.sock is None:
                continue
        if events & select.EPOLLOUT:
            flush(dev)


class _RateControl:
    """Total rate, shared with the workers (a change restarts the pacing epoch)."""

    def __init__(self, ctx, rate: float, workers: int):
        self._rate = ctx.Value("d", rate, lock=False)
        self._epoch = ctx.Value("d", 0.0, lock=False)
        self.workers = workers

    @property
    def value(self) -> float:
        return self._rate.value

    @property
    def epoch(self) -> float:
        return self._epoch.value

    def set(self, rate: float) -> None:
        self._rate.value = rate
        self._epoch.value = time.monotonic()


# --- the fleet ---------------------------------------------------------------------------------------------

class SyntheticFleet:
    """``devices``: [(device id, username, password)]; ``rate``: total readings/s; ``duration``: seconds of
    publishing after :meth:`go` (0 = until :meth:`stop`)."""

    def __init__(self, host: str, port: int, devices: list[tuple[str, str | None, str | None]], *, rate: float,
                 duration: float = 0, workers: int | None = None, boot: int | None = None,
                 alarm_devices: Iterable[str] = (), max_unacked: int = 50):
        _check_loopback(host)
        if not devices:
            raise ValueError("no devices")
        self.host, self.port = host, port
        self.devices = devices
        self.duration = duration
        self.workers = max(1, min(workers or max(1, min(4, len(devices) // 500 + 1)), len(devices)))
        self.boot = boot if boot is not None else random.randrange(1, 2**31 - 1)
        self.alarm_devices = set(alarm_devices)
        self.max_unacked = max_unacked
        ctx = mp.get_context("fork")
        self._ctx = ctx
        self.rate = _RateControl(ctx, float(rate), self.workers)
        self._start, self._stop = ctx.Event(), ctx.Event()
        self._counters = ctx.Array("q", [0] * (_NCOUNT * self.workers), lock=False)
        self._results = ctx.Queue()
        self._procs: list = []
        self.results: list[WorkerResult] = []
        self.t_go: float | None = None

    # life cycle
    def connect(self, timeout: float = 600) -> "SyntheticFleet":
        """Start the workers and wait until every device is connected (or ``timeout``)."""
        slices = [self.devices[i::self.workers] for i in range(self.workers)]
        for i, devs in enumerate(slices):
            p = self._ctx.Process(target=_worker, name=f"loadgen-{i}", daemon=True, args=(
                i, self.host, self.port, devs, self.rate.value, self.duration, self.boot,
                self.alarm_devices & {d for d, _, _ in devs}, self.max_unacked, self._start, self._stop,
                self._counters, self._results, self.rate))
            p.start()
            self._procs.append(p)
        deadline = time.monotonic() + timeout
        while self.connected() < len(self.devices) and time.monotonic() < deadline:
            if not all(p.is_alive() for p in self._procs):
                raise RuntimeError("a load generator worker died while connecting")
            time.sleep(0.1)
        return self

    def go(self) -> None:
        self.rate.set(self.rate.value)
        self.t_go = time.time()
        self._start.set()

    def set_rate(self, rate: float) -> None:
        self.rate.set(float(rate))

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> list[WorkerResult]:
        """Wait for the workers to finish (duration over, or after :meth:`stop`) and collect their results."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.results) < len(self._procs):
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                self.results.append(self._results.get(timeout=left))
            except Exception:  # noqa: BLE001 - queue.Empty
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not any(p.is_alive() for p in self._procs):
                    break
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        return self.results

    def close(self) -> None:
        self._stop.set()
        for p in self._procs:
            if p.is_alive():
                p.join(10)
            if p.is_alive():
                p.kill()

    # live figures
    def _sum(self, k: int) -> int:
        return sum(self._counters[i * _NCOUNT + k] for i in range(self.workers))

    def sent(self) -> int:
        return self._sum(0)

    def acked(self) -> int:
        return self._sum(1)

    def connected(self) -> int:
        return self._sum(2)

    def disconnects(self) -> int:
        return self._sum(3)

    def backpressure_turns(self) -> int:
        return self._sum(4)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid]

    # after wait()
    def acknowledged(self) -> dict[str, tuple[int, int, set[int]]]:
        """device id -> (boot, next seq, unacknowledged seqs): every seq below next_seq not in the set was
        acknowledged by the broker."""
        out = {}
        for r in self.results:
            for device_id, d in r.devices.items():
                out[device_id] = (d["boot"], d["next_seq"], set(d["unacked"]))
        return out


def synthetic_ids(count: int, prefix: str = "syn") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(count)]


# --- CLI: python -m cloud.loadgen (and `python -m cloud sim --synthetic` through run_synthetic) ------------

def run_synthetic(settings, *, devices: int, prefix: str, rate: float, duration: float,
                  credentials_file: str | None = None, workers: int | None = None,
                  stop_event: threading.Event | None = None, out=sys.stdout) -> int:
    """Publish from ``devices`` synthetic devices to ``settings.mqtt_url`` (loopback only) at ``rate`` readings/s
    for ``duration`` seconds; credentials from ``credentials_file`` (lines ``device_id:password``) or the URL's."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(settings.mqtt_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    creds: dict[str, str] = {}
    if credentials_file:
        for line in open(credentials_file, encoding="utf-8"):
            if ":" in line:
                d, pw = line.rstrip("\n").split(":", 1)
                creds[d] = pw
        ids = sorted(creds)[:devices] if creds else synthetic_ids(devices, prefix)
        fleet_devices = [(d, d, creds.get(d)) for d in ids]
    else:
        user = unquote(parts.username) if parts.username else None
        pw = unquote(parts.password) if parts.password else None
        fleet_devices = [(d, user, pw) for d in synthetic_ids(devices, prefix)]
    fleet = SyntheticFleet(host, port, fleet_devices, rate=rate, duration=duration, workers=workers)
    stop = stop_event
    if stop is None:
        from cloud.service import install_stop_signals

        stop = threading.Event()
        install_stop_signals(stop)
    try:
        fleet.connect()
        print(f"{fleet.connected()}/{len(fleet_devices)} synthetic devices connected to {host}:{port}; "
              f"publishing {rate:g} readings/s for {duration:g} s", file=out, flush=True)
        fleet.go()
        t0 = time.monotonic()
        while time.monotonic() - t0 < duration and not stop.is_set():
            stop.wait(min(5.0, max(0.1, duration - (time.monotonic() - t0))))
            el = time.monotonic() - t0
            print(f"  {el:5.0f} s  sent {fleet.sent():,}  acked {fleet.acked():,}  "
                  f"({fleet.acked() / max(el, 1e-9):,.0f}/s)  connected {fleet.connected()}", file=out, flush=True)
        fleet.stop()
        fleet.wait(60)
    finally:
        fleet.close()
    ack = fleet.acknowledged()
    unacked = sum(len(u) for _, _, u in ack.values())
    print(json.dumps({"devices": len(fleet_devices), "sent": sum(n for _, n, _ in ack.values()),
                      "unacknowledged": unacked, "boot": fleet.boot}), file=out, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from cloud import settings as settings_mod

    parser = argparse.ArgumentParser(prog="python -m cloud.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--prefix", default="syn")
    parser.add_argument("--rate", type=float, default=1000.0, help="total readings per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of publishing")
    parser.add_argument("--credentials", help="file of device_id:password lines (default: the URL's credentials)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = settings_mod.load()
    return run_synthetic(settings, devices=args.devices, prefix=args.prefix, rate=args.rate,
                         duration=args.duration, credentials_file=args.credentials, workers=args.workers)


if __name__ == "__main__":
    raise SystemExit(main())
