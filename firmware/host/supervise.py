#!/usr/bin/env python3
"""Run one firmware instance on the MicroPython unix port like a board: restart it after machine.reset()
(exit 75), a watchdog reset (killed, 137) or a crash. CPython.

    python firmware/host/supervise.py FLASH_DIR [--heapsize 120000] [--micropython PATH]
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("flash", type=Path)
    ap.add_argument("--heapsize", type=int, default=0)
    ap.add_argument("--micropython", default=str(REPO / ".venv" / "bin" / "micropython"))
    a = ap.parse_args()
    env = dict(os.environ, MICROPYPATH=os.pathsep.join(
        str(p) for p in (REPO / "firmware" / "lib", REPO / "firmware" / "host", REPO / "build" / "mpy-lib")))
    args = [a.micropython] + (["-X", f"heapsize={a.heapsize}"] if a.heapsize else []) + \
        [str(REPO / "firmware" / "main.py")]
    while True:
        try:
            rc = subprocess.call(args, cwd=a.flash, env=env)
        except KeyboardInterrupt:
            return 0
        if rc in (0, 130, -2):
            return rc
        print(f"supervise: firmware exited with {rc}, restarting", file=sys.stderr)
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
