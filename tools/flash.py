"""Copy the firmware to a physical ESP32 running MicroPython, with mpremote (`make flash PORT=/dev/ttyUSB0`).

    python tools/flash.py --port /dev/ttyUSB0 [--config path/to/config.json]

The config.json is the one the dashboard's provisioning page hands out for the device (Wi-Fi, broker,
credentials). umqtt.simple is installed on the board with `mpremote mip install` when it is missing.
MicroPython itself is flashed once with esptool (see README.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = REPO / "firmware"


def mpremote(port: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("mpremote") or str(Path(sys.executable).with_name("mpremote"))
    cmd = [exe, "connect", port, *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, capture_output=not check, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="serial port of the board, e.g. /dev/ttyUSB0")
    parser.add_argument("--config", type=Path, default=None, help="the device's config.json from provisioning")
    args = parser.parse_args()
    if not Path(args.port).exists():
        print(f"error: serial port {args.port} does not exist (is the board plugged in? try PORT=/dev/ttyACM0)")
        return 1
    if args.config is not None and not args.config.is_file():
        print(f"error: config file {args.config} not found")
        return 1
    probe = mpremote(args.port, "exec", "import umqtt.simple", check=False)
    if probe.returncode != 0:
        mpremote(args.port, "mip", "install", "umqtt.simple")
    mpremote(args.port, "fs", "mkdir", ":lib", check=False)
    for module in sorted((FIRMWARE / "lib").glob("*.py")):
        mpremote(args.port, "fs", "cp", str(module), f":lib/{module.name}")
    if args.config is not None:
        mpremote(args.port, "fs", "cp", str(args.config), ":config.json")
    mpremote(args.port, "fs", "cp", str(FIRMWARE / "main.py"), ":main.py")
    mpremote(args.port, "reset")
    print("flashed; open the console with: make console PORT=" + args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
