"""Real backing services (Mosquitto, Kafka, PostgreSQL, Redis) started natively on loopback.

Used by the pytest fixtures (tests/conftest.py), by ``make up`` and by the benchmarks. Every service:

* runs as a child process in its own process group (its own session) with ``workdir`` holding its
  config, data and log; the whole group is signalled on stop, so nothing is left behind;
* listens on ``127.0.0.1`` on a free port (``port=None``) or a given one; an "address already in use"
  race with another process is retried on fresh ports;
* is ready when ``start()`` returns (a real protocol round trip, not just an open port);
* raises :class:`ServiceStartError` carrying the tail of its log when it does not come up;
* supports ``stop()`` / ``start()`` on the same data (restart), ``restart()`` and ``kill()`` (SIGKILL of
  the process group, for fault tests); ``close()`` stops it and removes scratch data kept outside
  ``workdir``. Services still running when the interpreter exits are stopped by an ``atexit`` hook, and
  each child gets ``PR_SET_PDEATHSIG`` so it dies with the Python process even on SIGKILL.

CLI::

    python -m cloud.nativestack up --dir var/stack [--env-file var/stack/env.sh] [--web-port 8000]

starts what deploy/compose.yaml runs (:class:`Platform`): Mosquitto with accounts, ACLs and TLS
(:class:`SecureMosquitto`), Kafka, PostgreSQL, Redis, then kafka-init, db upgrade, the account watcher, bridge,
writer, alarms and web; prints ``export IOT_...=...`` lines and runs until SIGINT/SIGTERM. ``--backing-only``
starts just the four backing services (anonymous Mosquitto) as before.
"""

from __future__ import annotations

import abc
import argparse
import atexit
import base64
import ctypes
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "ServiceStartError",
    "Service",
    "Mosquitto",
    "SecureMosquitto",
    "Kafka",
    "Postgres",
    "Redis",
    "free_port",
    "port_is_free",
    "pid_alive",
    "kafka_libs_dir",
    "group_pids",
    "main",
    "Platform",
    "PlatformService",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_LINES = 60


class ServiceStartError(RuntimeError):
    """A service did not become ready; the message ends with the tail of its log."""


# --------------------------------------------------------------------------------------------------
# ports and processes
# --------------------------------------------------------------------------------------------------

_ports_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``, never the same one twice in this process."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with _ports_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port found")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tcp_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _live_processes():
    """(pid, ppid, pgrp) of every live (non-zombie) process, read from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." - comm may contain spaces/parens
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) >= 3 and rest[0] not in ("Z", "X"):
            yield int(entry), int(rest[1]), int(rest[2])


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    return [pid for pid, _ppid, pgrp in _live_processes() if pgrp == pgid]


def child_pids(parent: int) -> list[int]:
    """Live (non-zombie) children of ``parent``."""
    return [pid for pid, ppid, _pgrp in _live_processes() if ppid == parent]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")
    except OSError:
        return False


_libc = None


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: Path, lines: int = LOG_TAIL_LINES, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError as exc:
        return f"<no log: {exc}>"
    text = data.decode(errors="replace").splitlines()
    return "\n".join(text[-lines:])


_running: "weakref.WeakSet[Service]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for svc in list(_running):
        try:
            svc.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------------


class Service(abc.ABC):
    """Common life cycle. Subclasses implement ``_command``, ``_ready`` (abstract), ``_prepare`` and optionally
    ``_after_first_ready`` / ``_graceful_signal`` / ``_choose_ports``."""

    name = "service"
    start_timeout = 30.0
    stop_timeout = 20.0
    start_attempts = 5

    def __init__(self, workdir: str | os.PathLike, port: int | None = None):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._auto_port = port is None
        self.port: int = port if port is not None else free_port()
        self.proc: subprocess.Popen | None = None
        self._signalled: subprocess.Popen | None = None  # the process signal_stop() signalled
        self.pgid: int | None = None
        self.log_path = self.workdir / f"{self.name}.log"
        self._prepared = False
        self._started_once = False

    # ---- to implement ----
    def _choose_ports(self) -> None:
        self.port = free_port()

    def _prepare(self) -> None:
        """One-time setup (config, storage format, initdb)."""

    @abc.abstractmethod
    def _command(self) -> Sequence[str]:
        """The server's command line."""

    def _popen_kwargs(self) -> dict:
        return {}

    @abc.abstractmethod
    def _ready(self) -> bool:
        """True once the server answers (polled after start)."""

    def _after_first_ready(self) -> None:
        pass

    def _graceful_signal(self) -> int:
        return signal.SIGTERM

    # ---- public API ----
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "Service":
        if self.running:
            return self
        attempts = self.start_attempts if (self._auto_port and not self._started_once) else 1
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except _AddressInUse:
                self._kill_group()
                if attempt == attempts:
                    raise self._error("address already in use (gave up after %d attempts)" % attempts)
                self._choose_ports()
                self._prepared = False  # config files carry the port
            except BaseException:
                self._kill_group()
                raise
        return self  # not reached

    def signal_stop(self) -> None:
        """Send the graceful stop signal and return; ``stop`` then only waits. Lets several services shut down
        side by side (one after another, the platform's stop took up to the sum of their stop timeouts)."""
        if self.proc is not None and self.proc.poll() is None and self._signalled is not self.proc:
            try:
                os.kill(self.proc.pid, self._graceful_signal())
            except ProcessLookupError:
                pass
            self._signalled = self.proc  # once per process: a second SIGTERM/SIGINT may mean "now" to it

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop (signal, wait), then SIGKILL of the whole process group. Keeps the data."""
        if self.proc is None:
            return
        timeout = self.stop_timeout if timeout is None else timeout
        if self.proc.poll() is None:
            self.signal_stop()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash), keeping the data for a later ``start()``."""
        self._kill_group()

    def restart(self) -> "Service":
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove any scratch data kept outside ``workdir``."""
        self.stop()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def env(self) -> dict[str, str]:
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} port={self.port} pid={self.pid} workdir={self.workdir}>"

    # ---- internals ----
    def _error(self, msg: str) -> ServiceStartError:
        return ServiceStartError(
            f"{self.name} on 127.0.0.1:{self.port} failed to start: {msg}\n"
            f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def _spawn(self, cmd: Sequence[str], log_start: int, **kwargs) -> subprocess.Popen:
        logf = open(self.log_path, "ab")
        try:
            with open(self.log_path, "ab") as hdr:
                shown = [c if len(str(c)) < 300 else str(c)[:120] + "...(truncated)" for c in cmd]
                hdr.write(f"\n=== nativestack {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(map(str, shown))}\n".encode())
            return subprocess.Popen(
                [str(c) for c in cmd],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # PDEATHSIG fires when the *thread* that forked exits: only safe from the main thread
                preexec_fn=_set_pdeathsig if threading.current_thread() is threading.main_thread() else None,
                cwd=kwargs.pop("cwd", str(self.workdir)),
                **kwargs,
            )
        finally:
            logf.close()

    def _start_once(self) -> None:
        if not self._prepared:
            self._prepare()
            self._prepared = True
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = self._spawn(self._command(), log_start, **self._popen_kwargs())
        self.pgid = self.proc.pid  # start_new_session: pgid == pid
        _running.add(self)
        deadline = time.monotonic() + self.start_timeout
        first = not self._started_once
        while True:
            rc = self.proc.poll()
            if rc is not None:
                time.sleep(0.1)
                if "Address already in use" in _tail(self.log_path, 400, log_start):
                    raise _AddressInUse()
                raise self._error(f"process exited with status {rc}")
            try:
                ok = self._ready()
            except Exception:
                ok = False
            if ok and self.proc.poll() is None:  # not someone else answering on a port we lost
                break
            if time.monotonic() > deadline:
                if "Address already in use" in _tail(self.log_path, 400, log_start):
                    raise _AddressInUse()
                raise self._error(f"not ready after {self.start_timeout:.0f}s")
            time.sleep(0.1)
        if first:
            try:
                self._after_first_ready()
            except Exception as exc:
                raise self._error(f"post-start setup failed: {exc!r}") from exc
        self._started_once = True

    def _kill_group(self) -> None:
        if self.proc is None:
            return
        pgid = self.pgid or self.proc.pid
        for sig_round in range(50):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(0.1 if sig_round else 2)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.poll() is not None and not group_pids(pgid):
                break
        _running.discard(self)


class _AddressInUse(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# Mosquitto
# --------------------------------------------------------------------------------------------------


class Mosquitto(Service):
    """Mosquitto 2 broker: ``.port``, ``.url`` (``mqtt://127.0.0.1:port``)."""

    name = "mosquitto"
    start_timeout = 15.0

    def __init__(
        self,
        workdir: str | os.PathLike,
        port: int | None = None,
        config_extra: str = "",
        *,
        allow_anonymous: bool = True,
        password_file: str | os.PathLike | None = None,
        acl_file: str | os.PathLike | None = None,
        probe_username: str | None = None,
        probe_password: str | None = None,
        binary: str | None = None,
    ):
        super().__init__(workdir, port)
        self.config_extra = config_extra
        self.allow_anonymous = allow_anonymous
        self.password_file = password_file
        self.acl_file = acl_file
        self.probe_username = probe_username
        self.probe_password = probe_password
        self.binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.config_path = self.workdir / "mosquitto.conf"
        self.data_dir = self.workdir / "data"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def env(self) -> dict[str, str]:
        return {"IOT_MQTT_URL": self.url}

    def _prepare(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "autosave_interval 5",  # a crash (kill -9 in fault tests) must not forget the sessions
            # at least once: the default queue limit (1000) drops QoS 1 messages for an absent/slow bridge
            # (finite: with 0, Mosquitto 2.0.11 drops a client after an ACL-denied QoS 1 publish)
            "max_queued_messages 1000000",
            "max_queued_bytes 268435456",
            "log_dest stderr",  # stderr is redirected to mosquitto.log
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            # run as the current user: as root mosquitto would otherwise switch to the "mosquitto" user,
            # which cannot write into a root-owned temp dir
            f"user {getpass.getuser()}",
        ]
        if self.password_file:
            lines.append(f"password_file {Path(self.password_file).resolve()}")
        if self.acl_file:
            lines.append(f"acl_file {Path(self.acl_file).resolve()}")
        if self.config_extra:
            lines.append(self.config_extra)
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self) -> Sequence[str]:
        return [self.binary, "-c", self.config_path]

    def _ready(self) -> bool:
        if not _tcp_open(self.port):
            return False
        return mqtt_connack(self.port, username=self.probe_username, password=self.probe_password)


class SecureMosquitto(Mosquitto):
    """Mosquitto as production runs it (cloud.mqtt_auth): no anonymous access, accounts and ACLs generated from
    the database, reloaded with SIGHUP.

    Listeners (all on 127.0.0.1): ``.port`` for services (``_bridge``, ``_monitor`` accounts; ``.url`` carries the
    bridge's credentials), ``.device_port`` plain MQTT for devices, ``.tls_port`` TLS for devices with a
    certificate from :mod:`cloud.ca` (``.ca_file``; pass ``ca_dir`` to use an existing CA). ``.sync(engine)``
    writes the accounts from the database and reloads the broker; ``.set_devices(text)`` writes a password file
    directly (tests without a database)."""

    name = "mosquitto"

    def __init__(self, workdir: str | os.PathLike, port: int | None = None, *, tls: bool = True,
                 ca_dir: str | os.PathLike | None = None, auth_dir: str | os.PathLike | None = None,
                 service_passwords: Mapping[str, str] | None = None, config_extra: str = "",
                 binary: str | None = None):
        super().__init__(workdir, port, config_extra, allow_anonymous=False, binary=binary)
        from cloud import mqtt_auth

        self.device_port = free_port()
        self.tls_port = free_port() if tls else None
        self.tls = tls
        self.auth_dir = Path(auth_dir) if auth_dir else self.workdir / "auth"
        self.ca_dir = Path(ca_dir) if ca_dir else self.workdir / "certs"
        secrets_file = self.workdir / "service-accounts"
        if service_passwords is None:
            if secrets_file.exists():
                service_passwords = dict(line.split(":", 1) for line in secrets_file.read_text().split())
            else:
                import secrets as _secrets

                service_passwords = {n: _secrets.token_urlsafe(18) for n in ("_bridge", "_monitor")}
                fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write("".join(f"{k}:{v}\n" for k, v in service_passwords.items()))
        self.accounts = [mqtt_auth.ServiceAccount(k, v) for k, v in service_passwords.items()]
        self.service_passwords = dict(service_passwords)
        self.probe_username = "_monitor" if "_monitor" in service_passwords else None
        self.probe_password = service_passwords.get("_monitor")

    # ---- addresses ----
    @property
    def url(self) -> str:
        """The services' URL (bridge account)."""
        return self.account_url("_bridge")

    def account_url(self, account: str) -> str:
        from urllib.parse import quote

        return f"mqtt://{account}:{quote(self.service_passwords[account], safe='')}@127.0.0.1:{self.port}"

    @property
    def device_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.device_port}"

    @property
    def tls_url(self) -> str | None:
        return f"mqtts://localhost:{self.tls_port}" if self.tls_port else None

    @property
    def ca_file(self) -> Path:
        return self.ca_dir / "ca.crt"

    def env(self) -> dict[str, str]:
        return {"IOT_MQTT_URL": self.url}

    # ---- accounts ----
    def sync(self, engine) -> bool:
        """Accounts from the database -> files -> SIGHUP (if running); returns once the broker has reloaded, so
        a caller never races the reload (a client connecting meanwhile would see the old accounts)."""
        from cloud import mqtt_auth

        before = self._reloads()
        changed = mqtt_auth.sync(engine, self.auth_dir, self.accounts, pid=self.pid if self.running else None)
        if changed and self.running:
            self._await_reload(before)
        return changed

    def set_devices(self, password_file_text: str) -> bool:
        from cloud import mqtt_auth

        before = self._reloads()
        changed = mqtt_auth.sync(None, self.auth_dir, self.accounts, pid=self.pid if self.running else None,
                                 device_text=password_file_text)
        if changed and self.running:
            self._await_reload(before)
        return changed

    def reload(self) -> None:
        if self.running:
            before = self._reloads()
            os.kill(self.proc.pid, signal.SIGHUP)
            self._await_reload(before)

    def _reloads(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("Reloading config.")
        except OSError:
            return 0

    def _await_reload(self, before: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._reloads() <= before:
            if time.monotonic() > deadline:
                raise ServiceStartError(f"mosquitto did not reload within {timeout}s\n{self.log_tail()}")
            time.sleep(0.02)
        time.sleep(0.05)  # the log line comes first; the new files are in force right after

    # ---- life cycle ----
    def _choose_ports(self) -> None:
        self.port = free_port()
        self.device_port = free_port()
        if self.tls:
            self.tls_port = free_port()

    def _prepare(self) -> None:
        from cloud import ca, mqtt_auth

        self.data_dir.mkdir(exist_ok=True)
        if not (self.auth_dir / mqtt_auth.DEVICES_PASSWD).exists():
            mqtt_auth.sync(None, self.auth_dir, self.accounts, device_text="")
        else:
            self.set_devices((self.auth_dir / mqtt_auth.DEVICES_PASSWD).read_text())
        tls_args: dict = {}
        if self.tls:
            if not ((self.ca_dir / "server.crt").exists() and (self.ca_dir / "server.key").exists()):
                ca.make_ca(self.ca_dir, ["localhost"], ["127.0.0.1"])
            tls_args = {"tls_port": self.tls_port, "tls_bind": "127.0.0.1",
                        "certfile": str(self.ca_dir / "server.crt"), "keyfile": str(self.ca_dir / "server.key")}
        extra = [
            "log_dest stderr", "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true", "log_timestamp true", "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            f"user {getpass.getuser()}",
        ]
        if self.config_extra:
            extra.append(self.config_extra)
        self.config_path.write_text(mqtt_auth.mosquitto_conf(
            self.auth_dir, service_port=self.port, service_bind="127.0.0.1", device_port=self.device_port,
            device_bind="127.0.0.1", persistence_dir=str(self.data_dir), extra=extra, **tls_args))


def mqtt_connack(port: int, host: str = "127.0.0.1", timeout: float = 3.0, username=None, password=None) -> bool:
    """Connect with paho and wait for a CONNACK (any return code counts: the broker is answering)."""
    import paho.mqtt.client as mqtt

    got: list = []
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"nativestack-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    client.on_connect = lambda c, userdata, flags, rc, props=None: got.append(rc)
    if username is not None:
        client.username_pw_set(username, password)
    try:
        client.connect(host, port, keepalive=10)
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        return bool(got)
    finally:
        try:
            client.disconnect()
        except Exception:
            pass
        try:
            client.socket() and client.socket().close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------------
# Kafka (KRaft, one combined broker + controller)
# --------------------------------------------------------------------------------------------------


def kafka_version() -> str:
    pom = REPO_ROOT / "tools" / "kafka" / "pom.xml"
    try:
        m = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    return "4.1.1"


def kafka_libs_dir(fetch: bool = False) -> Path:
    """The directory of Kafka jars: ``$IOT_KAFKA_LIBS``, else the tools/fetch-kafka.sh cache
    (``${IOT_CACHE:-~/.cache/iot-platform}/kafka-<version>/libs``); with ``fetch=True`` the script is run
    when the cache is missing or incomplete."""
    env = os.environ.get("IOT_KAFKA_LIBS")
    if env:
        return Path(env)
    cache = Path(os.environ.get("IOT_CACHE") or Path.home() / ".cache" / "iot-platform")
    libs = cache / f"kafka-{kafka_version()}" / "libs"
    complete = (libs.parent / ".complete").exists()
    if fetch and not complete:
        script = REPO_ROOT / "tools" / "fetch-kafka.sh"
        out = subprocess.run(
            ["bash", str(script)], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise ServiceStartError(
                f"tools/fetch-kafka.sh failed (status {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        printed = out.stdout.strip().splitlines()
        if printed and Path(printed[-1]).is_dir():
            return Path(printed[-1])
    return libs


def kafka_classpath(libs: Path) -> str:
    jars = sorted(p for p in Path(libs).glob("*.jar"))
    if not any(p.name.startswith("kafka_") for p in jars):
        raise ServiceStartError(f"no Kafka jars in {libs} (run tools/fetch-kafka.sh)")
    # Maven's nearest-wins resolution picks slf4j-api 1.7 (from kafka-clients) but the log4j2 binding
    # needs slf4j 2: when both are present keep only the 2.x API, or all logging is silently dropped.
    if any(p.name.startswith("slf4j-api-2.") for p in jars):
        jars = [p for p in jars if not p.name.startswith("slf4j-api-1.")]
    return os.pathsep.join(str(p) for p in jars)


def _random_cluster_id() -> str:
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


_LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="{log}" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="kafka.controller" level="INFO"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Root level="INFO"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


class Kafka(Service):
    """Apache Kafka (KRaft, one node that is broker and controller): ``.port``, ``.bootstrap``."""

    name = "kafka"
    start_timeout = 90.0
    stop_timeout = 30.0

    def __init__(
        self,
        workdir: str | os.PathLike,
        port: int | None = None,
        partitions: int = 6,
        *,
        libs: str | os.PathLike | None = None,
        java: str | None = None,
        heap: tuple[str, str] = ("256m", "512m"),
        jvm_opts: Iterable[str] = (),
        properties: Mapping[str, object] | None = None,
    ):
        super().__init__(workdir, port)
        self.controller_port = free_port()
        self.partitions = partitions
        self.libs = Path(libs) if libs else kafka_libs_dir()
        java_home = os.environ.get("JAVA_HOME")
        self.java = (
            java
            or os.environ.get("IOT_JAVA")
            or (str(Path(java_home) / "bin" / "java") if java_home else None)
            or shutil.which("java")
            or "/usr/bin/java"
        )
        self.heap = heap
        self.jvm_opts = list(jvm_opts)
        self.properties = dict(properties or {})
        self.cluster_id = _random_cluster_id()
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "server.properties"
        self.log4j_path = self.workdir / "log4j2.xml"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"IOT_KAFKA_BOOTSTRAP": self.bootstrap}

    def _choose_ports(self) -> None:
        self.port = free_port()
        self.controller_port = free_port()

    def _write_config(self) -> None:
        props: dict[str, object] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": self.partitions,
            "default.replication.factor": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 6,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "min.insync.replicas": 1,
            "group.initial.rebalance.delay.ms": 0,
            "auto.create.topics.enable": "true",
            "num.network.threads": 2,
            "num.io.threads": 4,
            "log.segment.bytes": 64 * 1024 * 1024,
            # a restart after kill() waits for the old broker registration to expire: keep that short
            "broker.heartbeat.interval.ms": 1000,
            "broker.session.timeout.ms": 4000,
        }
        props.update(self.properties)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.log4j_path.write_text(_LOG4J2_XML.format(log=self.log_path))

    def _java_base(self) -> list[str]:
        return [
            self.java,
            f"-Xms{self.heap[0]}",
            f"-Xmx{self.heap[1]}",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_path}",
            f"-Dkafka.logs.dir={self.workdir}",
            *self.jvm_opts,
            "-cp",
            kafka_classpath(self.libs),
        ]

    def _prepare(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        self._write_config()
        if (self.data_dir / "meta.properties").exists():
            return
        cmd = [
            self.java, "-Xmx256m", f"-Dlog4j2.configurationFile={self.log4j_path}",
            "-cp", kafka_classpath(self.libs),
            "kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", str(self.config_path),
        ]  # fmt: skip
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== nativestack: {' '.join(cmd[:1] + cmd[-6:])}\n".encode())
            logf.flush()
            rc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir,
                timeout=120, start_new_session=True,
            ).returncode  # fmt: skip
        if rc != 0:
            raise self._error(f"storage format failed with status {rc}")

    def _command(self) -> Sequence[str]:
        return [*self._java_base(), "kafka.Kafka", str(self.config_path)]

    def admin(self, **conf):
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0, **conf})

    def _ready(self) -> bool:
        if not _tcp_open(self.port):
            return False
        md = self.admin(**{"socket.timeout.ms": 2000}).list_topics(timeout=3)
        return 1 in md.brokers

    def create_topics(self, names: Iterable[str], partitions: int | None = None, config: Mapping | None = None):
        """Create topics (ignores ones that already exist) and wait for them."""
        from confluent_kafka import KafkaError
        from confluent_kafka.admin import NewTopic

        topics = [
            NewTopic(n, num_partitions=partitions or self.partitions, replication_factor=1, config=dict(config or {}))
            for n in names
        ]
        if not topics:
            return
        admin = self.admin()  # keep a reference: the futures fail if the client is destroyed
        for name, fut in admin.create_topics(topics, operation_timeout=30).items():
            try:
                fut.result(30)
            except Exception as exc:
                err = exc.args[0] if exc.args else None
                if getattr(err, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        # wait until every partition has a leader
        deadline = time.monotonic() + 30
        wanted = {t.topic for t in topics}
        while True:
            md = admin.list_topics(timeout=10)
            ok = all(
                n in md.topics and md.topics[n].error is None and md.topics[n].partitions
                and all(p.leader >= 0 for p in md.topics[n].partitions.values())
                for n in wanted
            )
            if ok or time.monotonic() > deadline:
                return
            time.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    env = os.environ.get("IOT_PG_BIN")
    if env:
        return Path(env)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    )
    if candidates:
        return candidates[-1]
    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    return Path("/usr/lib/postgresql/15/bin")


# What `make up` and the end-to-end benchmark give PostgreSQL (the tests keep the small defaults): the telemetry
# key index grows with every reading and inserts land all over it, so it must stay in memory (measured by
# bench_writer: 256 MB of buffers was the ingest bottleneck at 10 million rows), and checkpoints should not
# come every few seconds under load.
DURABLE_PG_SETTINGS = {"shared_buffers": "1GB", "max_wal_size": "2GB"}


class Postgres(Service):
    """PostgreSQL cluster (initdb + postmaster in the foreground): ``.port``, ``.url`` (SQLAlchemy),
    ``.dsn`` (psycopg), ``.admin_dsn`` (superuser ``postgres``).

    As root, initdb/postgres run as the ``postgres`` OS user (they refuse root). When that user cannot
    reach ``workdir`` (e.g. pytest's 0700 /tmp/pytest-of-root), the cluster lives in a private
    ``/tmp/iot-pg-*`` directory (symlinked as ``workdir/pgdata``) that ``close()`` removes.
    """

    name = "postgres"
    start_timeout = 30.0
    stop_timeout = 20.0

    def __init__(
        self,
        workdir: str | os.PathLike,
        port: int | None = None,
        *,
        fsync: bool = False,
        settings: Mapping[str, object] | None = None,
        user: str = "iot",
        password: str = "iot",
        database: str = "iot",
        os_user: str | None = None,
        bin_dir: str | os.PathLike | None = None,
    ):
        super().__init__(workdir, port)
        self.fsync = fsync
        self.settings = dict(settings or {})
        self.user, self.password, self.database = user, password, database
        self.bin_dir = Path(bin_dir) if bin_dir else postgres_bin_dir()
        if os_user is None and os.geteuid() == 0:
            os_user = "postgres"
        self.os_user = os_user
        self.base: Path | None = None  # directory owned by os_user: data/ and run/ (socket)
        self._external_base = False

    # ---- URLs ----
    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def admin_dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname=postgres"

    @property
    def data_dir(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base is not None
        return self.base / "run"

    @property
    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError, AssertionError):
            return None

    def env(self) -> dict[str, str]:
        return {"IOT_DATABASE_URL": self.url}

    # ---- helpers ----
    def _ids(self) -> tuple[int | None, int | None]:
        if not self.os_user:
            return None, None
        import pwd

        pw = pwd.getpwnam(self.os_user)
        return pw.pw_uid, pw.pw_gid

    def _as_user(self) -> dict:
        uid, gid = self._ids()
        if uid is None:
            return {}
        return {"user": uid, "group": gid, "extra_groups": [], "env": {**_clean_env(), "HOME": str(self.base)}}

    def _user_can_use(self, path: Path) -> bool:
        if not self.os_user:
            return True
        r = subprocess.run(["test", "-x", str(path)], **self._as_user_probe())
        return r.returncode == 0

    def _as_user_probe(self) -> dict:
        uid, gid = self._ids()
        return {"user": uid, "group": gid, "extra_groups": [], "env": _clean_env(), "cwd": "/"}

    def _setup_base(self) -> None:
        if self.base is not None:
            return
        link = self.workdir / "pgdata"
        candidate = self.workdir / "pg"
        # unix socket paths are limited to 107 bytes
        fits = len(str(candidate / "run" / f".s.PGSQL.{self.port}.lock")) < 100
        if fits and self._user_can_use(self.workdir):
            candidate.mkdir(exist_ok=True)
            self.base = candidate
        else:
            root = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
            self.base = Path(tempfile.mkdtemp(prefix="iot-pg-", dir=root))
            self._external_base = True
            try:
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(self.base)
            except OSError:
                pass
        (self.base / "run").mkdir(exist_ok=True)
        uid, gid = self._ids()
        if uid is not None:
            for p in (self.base, self.base / "run"):
                os.chown(p, uid, gid)
        os.chmod(self.base, 0o700)

    # ---- life cycle ----
    def _prepare(self) -> None:
        self._setup_base()
        if (self.data_dir / "PG_VERSION").exists():
            return
        pwfile = self.base / ".pw"
        pwfile.write_text("postgres\n")
        uid, gid = self._ids()
        if uid is not None:
            os.chown(pwfile, uid, gid)
        cmd = [
            self.bin_dir / "initdb", "-D", self.data_dir, "-U", "postgres", f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== nativestack: {' '.join(map(str, cmd))}\n".encode())
            logf.flush()
            r = subprocess.run(
                [str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=str(self.base), timeout=120, start_new_session=True, **self._as_user(),
            )  # fmt: skip
        pwfile.unlink(missing_ok=True)
        if r.returncode != 0:
            raise self._error(f"initdb failed with status {r.returncode}")

    def _command(self) -> Sequence[str]:
        settings: dict[str, object] = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "on" if self.fsync else "off",
            # synchronous_commit stays on: with fsync off a commit is only a write() to the page cache,
            # and a committed row then survives kill -9 of the postmaster (fault tests rely on it)
            "full_page_writes": "on" if self.fsync else "off",
            "max_connections": 200,
            "shared_buffers": "128MB",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] ",
            "log_min_messages": "warning",
        }
        settings.update(self.settings)
        cmd: list[object] = [self.bin_dir / "postgres", "-D", self.data_dir]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        return cmd

    def _popen_kwargs(self) -> dict:
        return {"cwd": str(self.base), **self._as_user()}

    def _graceful_signal(self) -> int:
        return signal.SIGINT  # "fast" shutdown: roll back open transactions, disconnect clients

    def _ready(self) -> bool:
        if not _tcp_open(self.port):
            return False
        import psycopg

        if not self._started_once:
            with psycopg.connect(self.admin_dsn, connect_timeout=2):
                return True
        with psycopg.connect(self.dsn, connect_timeout=2):
            return True

    def _after_first_ready(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,)).fetchone()
            if not exists:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                        sql.Identifier(self.user), sql.Literal(self.password)
                    )
                )
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(self.database), sql.Identifier(self.user)
                    )
                )
        with psycopg.connect(self.dsn, connect_timeout=5):
            pass

    def kill_postmaster(self) -> None:
        """SIGKILL only the postmaster, as a crash would; the group is reaped too. Its backends are not in that
        group (each calls setsid() at start), they notice the postmaster's death and exit by themselves: wait
        for them (bounded; any left after 10 s are killed), so the server is really gone when this returns."""
        pid = self.postmaster_pid or self.pid
        children = child_pids(pid) if pid else []
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._kill_group()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(c) for c in children):
            time.sleep(0.02)
        for child in children:
            if pid_alive(child):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        self.stop()
        if self._external_base and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            try:
                (self.workdir / "pgdata").unlink()
            except OSError:
                pass
            self.base = None
            self._prepared = False
            self._started_once = False


def _clean_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------


class Redis(Service):
    """redis-server without persistence: ``.port``, ``.url`` (``redis://127.0.0.1:port/0``)."""

    name = "redis"
    start_timeout = 15.0

    def __init__(
        self,
        workdir: str | os.PathLike,
        port: int | None = None,
        *,
        args_extra: Sequence[str] = (),
        binary: str | None = None,
    ):
        super().__init__(workdir, port)
        self.args_extra = list(args_extra)
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def env(self) -> dict[str, str]:
        return {"IOT_REDIS_URL": self.url}

    def _command(self) -> Sequence[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "no",
            "--daemonize", "no", "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            "--loglevel", "notice", *self.args_extra,
        ]  # fmt: skip

    def _ready(self) -> bool:
        # raw RESP PING with a hard timeout (redis-py retries would stretch a failed probe to seconds)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    data += chunk
                return data.startswith(b"+PONG") or data.startswith(b"-NOAUTH")
        except OSError:
            return False


class Prometheus(Service):
    """Prometheus (Debian's package) scraping ``/metrics`` of the given ``targets`` ({job: "host:port"}), like
    deploy/prometheus.yml does in compose: ``.port``, ``.url``."""

    name = "prometheus"
    start_timeout = 30.0

    def __init__(self, workdir: str | os.PathLike, targets: Mapping[str, str], port: int | None = None, *,
                 scrape_interval: str = "5s", binary: str | None = None):
        super().__init__(workdir, port)
        self.targets = dict(targets)
        self.scrape_interval = scrape_interval
        self.binary = binary or shutil.which("prometheus") or "/usr/bin/prometheus"
        self.config_path = self.workdir / "prometheus.yml"

    @staticmethod
    def available() -> bool:
        return shutil.which("prometheus") is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare(self) -> None:
        jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
                       for job, target in sorted(self.targets.items()))
        self.config_path.write_text(f"global:\n  scrape_interval: {self.scrape_interval}\nscrape_configs:\n{jobs}")
        (self.workdir / "data").mkdir(exist_ok=True)

    def _command(self) -> Sequence[str]:
        return [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=2d"]

    def _ready(self) -> bool:
        return _http_ok(f"{self.url}/-/ready")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def start_all(base: str | os.PathLike, *, kafka_libs: str | None = None, secure: bool = False,
              durable: bool = False) -> list[Service]:
    """Start Mosquitto (``secure``: :class:`SecureMosquitto`), PostgreSQL, Redis and Kafka under ``base``;
    all or nothing. ``durable``: PostgreSQL with fsync on, as in production (the tests leave it off for speed;
    a process crash loses nothing either way, only a machine crash would)."""
    base = Path(base)
    services: list[Service] = []
    try:
        for factory in (
            lambda: SecureMosquitto(base / "mosquitto") if secure else Mosquitto(base / "mosquitto"),
            lambda: Postgres(base / "postgres", fsync=durable, settings=DURABLE_PG_SETTINGS if durable else None),
            lambda: Redis(base / "redis"),
            lambda: Kafka(base / "kafka", libs=kafka_libs or kafka_libs_dir(fetch=True)),
        ):
            svc = factory()
            services.append(svc)
            svc.start()
    except BaseException:
        for svc in reversed(services):
            svc.close()
        raise
    return services


# --------------------------------------------------------------------------------------------------
# our own services (what deploy/compose.yaml runs), as processes of this interpreter
# --------------------------------------------------------------------------------------------------


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except Exception:
        return False


class PlatformService(Service):
    """``python -m cloud <command>`` with ``env``; ready when ``/healthz`` on ``health_port`` answers 200."""

    start_timeout = 90.0
    stop_timeout = 30.0

    def __init__(self, workdir, command: str, env: Mapping[str, str], *, port: int | None = None,
                 health_path: str = "/healthz", args: Sequence[str] = ()):
        self.name = command
        super().__init__(workdir, port)
        self.command = command
        self.args = list(args)
        self.base_env = dict(env)
        self.health_path = health_path

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.health_path}"

    def _environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_")}
        env.update(self.base_env)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.command == "web":
            env["IOT_WEB_PORT"] = str(self.port)
        else:
            env["IOT_METRICS_PORT"] = str(self.port)
        return env

    def _command(self) -> Sequence[str]:
        return [sys.executable, "-m", "cloud", self.command, *self.args]

    def _popen_kwargs(self) -> dict:
        return {"env": self._environ(), "cwd": str(self.workdir)}

    def _ready(self) -> bool:
        return _http_ok(self.health_url)


def run_once(command: Sequence[str], env: Mapping[str, str], log_path: Path, timeout: float = 300) -> None:
    """A one-shot job (kafka-init, db upgrade) like compose's; raises ServiceStartError with its log."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("IOT_")}
    full.update(env)
    full["PYTHONPATH"] = str(REPO_ROOT)
    with open(log_path, "ab") as logf:
        logf.write(f"\n=== nativestack: {' '.join(command)}\n".encode())
        logf.flush()
        rc = subprocess.run([sys.executable, "-m", *command], env=full, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=str(REPO_ROOT), timeout=timeout).returncode
    if rc != 0:
        raise ServiceStartError(f"`python -m {' '.join(command)}` failed with status {rc}\n"
                                f"--- {log_path} ---\n{_tail(log_path)}")


class Platform:
    """The production topology of deploy/compose.yaml on loopback, natively:

    SecureMosquitto (accounts from the database, TLS listener with a CA from cloud.ca), PostgreSQL, Redis, Kafka;
    then the one-shot ``kafka-init`` and ``db upgrade``; the account watcher (cloud.mqtt_auth.Watcher, a thread
    here, SIGHUP to the broker); then ``bridge``, ``writer``, ``alarms``, ``notifier`` and ``web`` as processes.
    ``env()`` is what the services got; ``stop()`` stops everything in reverse order."""

    SERVICES = ("bridge", "writer", "alarms", "notifier", "web")

    def __init__(self, base: str | os.PathLike, *, kafka_libs: str | None = None, web_port: int | None = None,
                 services: Sequence[str] = SERVICES, secret_key: str | None = None, extra_env=None,
                 durable: bool = False):
        self.base = Path(base).resolve()
        self.kafka_libs = kafka_libs
        self.web_port = web_port
        self.service_names = list(services)
        self.secret_key = secret_key
        self.extra_env = dict(extra_env or {})
        self.durable = durable
        self.backing: list[Service] = []
        self.services: dict[str, PlatformService] = {}
        self.watcher = None
        self.engine = None
        self.prometheus: Prometheus | None = None

    @property
    def mosquitto(self) -> "SecureMosquitto":
        return self.backing[0]  # type: ignore[return-value]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for svc in self.backing:
            env.update(svc.env())
        env["IOT_PROFILE"] = "production"
        secret_file = self.base / "secret_key"
        if self.secret_key:
            env["IOT_SECRET_KEY"] = self.secret_key
        else:
            if not secret_file.exists():
                import secrets as _secrets

                fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(_secrets.token_urlsafe(48))
            env["IOT_SECRET_KEY"] = secret_file.read_text().strip()
        env.update(self.extra_env)
        return env

    def start(self) -> "Platform":
        from cloud import db, mqtt_auth

        self.base.mkdir(parents=True, exist_ok=True)
        try:
            self.backing = start_all(self.base, kafka_libs=self.kafka_libs, secure=True, durable=self.durable)
            env = self.env()
            logs = self.base / "jobs.log"
            run_once(["cloud", "kafka-init"], env, logs)
            run_once(["cloud", "db", "upgrade"], env, logs)
            self.engine = db.make_engine(env["IOT_DATABASE_URL"])
            self.watcher = mqtt_auth.Watcher(self.engine, self.mosquitto.auth_dir, self.mosquitto.accounts,
                                             interval=1.0, pid=self.mosquitto.pid)
            self.watcher.once()
            self.watcher.start()
            for name in self.service_names:
                port = self.web_port if name == "web" else None
                svc = PlatformService(self.base / name, name, env, port=port)
                self.services[name] = svc
                svc.start()
            if Prometheus.available():  # as in compose: every service's /metrics, scraped every 5 s
                self.prometheus = Prometheus(self.base / "prometheus",
                                             {name: f"127.0.0.1:{svc.port}" for name, svc in self.services.items()})
                self.prometheus.start()
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> list[Service]:
        return [*self.backing, *self.services.values(), *([self.prometheus] if self.prometheus else [])]

    def stop(self) -> None:
        if self.prometheus is not None:
            self.prometheus.close()
            self.prometheus = None
        # each tier shuts down side by side: the services first (they flush to the backing ones), then those
        apps = list(reversed(list(self.services.values())))
        for svc in apps:
            svc.signal_stop()
        for svc in apps:
            svc.close()
        if self.watcher is not None:
            self.watcher.stop()
        if self.engine is not None:
            self.engine.dispose()
        for svc in self.backing:
            svc.signal_stop()
        for svc in reversed(self.backing):
            svc.close()
        self.services.clear()
        self.backing = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud.nativestack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the production topology (like deploy/compose.yaml) natively; "
                                   "run until SIGINT/SIGTERM")
    up.add_argument("--dir", required=True, help="working directory for configs, data and logs")
    up.add_argument("--env-file", help="also write the export lines to this file")
    up.add_argument("--kafka-libs", help="directory of Kafka jars (default: $IOT_KAFKA_LIBS or the cache)")
    up.add_argument("--backing-only", action="store_true",
                    help="only Mosquitto (anonymous, as in the tests), Kafka, PostgreSQL and Redis")
    up.add_argument("--web-port", type=int, default=None, help="dashboard port (default: IOT_WEB_PORT or 8000)")
    args = parser.parse_args(argv)

    from cloud.service import install_stop_signals

    stop = threading.Event()
    install_stop_signals(stop)
    platform: Platform | None = None
    try:
        if args.backing_only:
            services = start_all(args.dir, kafka_libs=args.kafka_libs, durable=True)
            env: dict[str, str] = {}
            for svc in services:
                env.update(svc.env())
        else:
            web_port = args.web_port or int(os.environ.get("IOT_WEB_PORT") or 8000)
            if not port_is_free(web_port):
                taken, web_port = web_port, free_port()
                print(f"nativestack: port {taken} is taken, the dashboard uses {web_port}", file=sys.stderr)
            platform = Platform(args.dir, kafka_libs=args.kafka_libs, web_port=web_port, durable=True).start()
            services = platform.running()
            env = platform.env()
    except ServiceStartError as exc:
        print(f"nativestack: {exc}", file=sys.stderr)
        return 1
    try:
        lines = [f"export {k}={shlex_quote(v)}" for k, v in env.items()]
        text = "\n".join(lines) + "\n"
        if args.env_file:
            Path(args.env_file).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(args.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        sys.stdout.write(text)
        if platform is not None:
            m = platform.mosquitto
            web = platform.services.get("web")
            print(f"# dashboard:  {web.health_url.rsplit('/', 1)[0] if web else '-'}/")
            print(f"# devices:    {m.device_url} (plain), {m.tls_url} (TLS, CA {m.ca_file})")
            print("# accounts:   provisioned devices reach the broker within ~1 s (mqtt-auth watcher)")
            for name, svc in platform.services.items():
                print(f"# {name + ':':11} {svc.health_url}  log {svc.log_path}")
            if platform.prometheus is not None:
                print(f"# prometheus: {platform.prometheus.url}/targets")
            else:
                print("# prometheus: not installed (apt-get install prometheus), metrics still on each /metrics")
        sys.stdout.flush()
        print(f"# nativestack up in {Path(args.dir).resolve()}; Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop.is_set():
            for svc in services:
                if not svc.running:
                    print(f"nativestack: {svc.name} exited unexpectedly:\n{svc.log_tail(20)}", file=sys.stderr)
                    stop.set()
            stop.wait(1.0)
    finally:
        if platform is not None:
            platform.stop()
        else:
            for svc in reversed(services):
                svc.close()
    return 0


def shlex_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


if __name__ == "__main__":
    sys.exit(main())
