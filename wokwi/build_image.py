#!/usr/bin/env python3
"""Build build/wokwi/flash.bin: MicroPython ESP32 image at 0x1000 + a LittleFS partition at 0x200000 holding
main.py, lib/*.py, lib/umqtt/simple.py and wokwi/config.json (as config.json).

    python wokwi/build_image.py MICROPYTHON_ESP32.bin [MQTT_HOST]
Needs: littlefs-python, esptool; build/mpy-lib from tools/fetch_umqtt.py.
"""
import json
import subprocess
import sys
from pathlib import Path

from littlefs import LittleFS

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "wokwi"
FS_OFFSET = 0x200000  # vfs partition of the generic 4 MB ESP32 MicroPython build
FS_SIZE = 0x200000
BLOCK = 4096


def build_filesystem(mqtt_host=None) -> bytes:
    """The LittleFS partition image: the firmware as a board's flash holds it."""
    fs = LittleFS(block_size=BLOCK, block_count=FS_SIZE // BLOCK)
    fs.makedirs("lib/umqtt", exist_ok=True)
    files = {"main.py": REPO / "firmware" / "main.py",
             "lib/umqtt/__init__.py": None,
             "lib/umqtt/simple.py": REPO / "build" / "mpy-lib" / "umqtt" / "simple.py"}
    for src in sorted((REPO / "firmware" / "lib").glob("*.py")):
        files["lib/" + src.name] = src
    cfg = json.loads((REPO / "wokwi" / "config.json").read_text())
    if mqtt_host:
        cfg["mqtt"]["host"] = mqtt_host
    for name, src in files.items():
        with fs.open(name, "wb") as f:
            f.write(src.read_bytes() if src else b"")
    with fs.open("config.json", "w") as f:
        f.write(json.dumps(cfg))
    return bytes(fs.context.buffer)


def merge(micropython_bin: Path, littlefs_bin: Path, out: Path) -> None:
    """One flash image: MicroPython at 0x1000, the filesystem at FS_OFFSET (what wokwi.toml points at)."""
    subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32", "merge-bin", "-o", str(out),
                    "--flash-mode", "dio", "--flash-size", "4MB",
                    "0x1000", str(micropython_bin), hex(FS_OFFSET), str(littlefs_bin)], check=True)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "littlefs.bin").write_bytes(build_filesystem(argv[2] if len(argv) > 2 else None))
    merge(Path(argv[1]), OUT / "littlefs.bin", OUT / "flash.bin")
    print("wrote", OUT / "flash.bin")


if __name__ == "__main__":
    main(sys.argv)
