"""`make soak` in small: firmware/tools/soak.py with 3,000 QoS 1 cycles (no packet-id wrap; the wrap itself is
tested in test_fw_device.py) against a real Mosquitto; its last stdout line is a JSON summary."""

import json
import subprocess
import sys

from tests.firmware.conftest import FIRMWARE, REPO


def test_soak_smoke(mpy_lib):
    cp = subprocess.run([sys.executable, str(FIRMWARE / "tools" / "soak.py"), "--cycles", "3000",
                         "--sample-every", "500"], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = cp.stdout.strip().splitlines()
    assert lines, f"no output:\n{cp.stderr}"
    r = json.loads(lines[-1])
    assert r["errors"] == 0, r["error_messages"]
    assert r["cycles"] == 3000
    assert r["lost"] == 0 and r["received"] == 3000, r["first_missing"]
    assert r["heap_samples"] == 7 and r["heap_min"] > 0
    assert r["cycles_per_s"] > 0 and r["cpu_count"]
    assert r["ok"] and cp.returncode == 0, cp.stdout + cp.stderr
    assert "cycles/s" in cp.stdout and "heap slope" in cp.stdout  # the human-readable table
