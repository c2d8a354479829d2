"""The firmware (main.py, lib/*.py; not host/) type-checks against the MicroPython ESP32 stubs with zero errors.

The checker and the stubs are pinned and installed on first use into build/typecheck/ (a venv for basedpyright,
whose wheel brings its own Node.js, and a --target dir for the stubs), apart from the main venv so the stubs'
machine/network never shadow anything there. Configuration: firmware/pyrightconfig.json."""

import json
import os
import subprocess
import sys

import pytest

from tests.firmware.conftest import FIRMWARE, REPO

BASEDPYRIGHT = "basedpyright==1.40.2"  # pyright 1.1.414
STUBS = "micropython-esp32-stubs==1.29.0.post1"
TC = REPO / "build" / "typecheck"
VENV = TC / "venv"
STUB_DIR = TC / "stubs"
CHECKER = VENV / "bin" / "basedpyright"


def _pip(*args):
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *args], check=True, capture_output=True, timeout=600)


def ensure_tools():
    """Install the pinned checker and stubs when missing or at another version (idempotent)."""
    stamp = TC / ".pins"
    want = f"{BASEDPYRIGHT}\n{STUBS}\n"
    if stamp.exists() and stamp.read_text() == want and CHECKER.exists() and (STUB_DIR / "machine.pyi").exists():
        return
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
    try:
        _pip(BASEDPYRIGHT)
        _pip("--upgrade", "--target", str(STUB_DIR), STUBS)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"cannot install {BASEDPYRIGHT} / {STUBS}: {e.stderr.decode(errors='replace')[-300:]}")
    stamp.write_text(want)


def test_firmware_typechecks_against_esp32_stubs():
    ensure_tools()
    cp = subprocess.run([str(CHECKER), "-p", "pyrightconfig.json", "--outputjson"], cwd=FIRMWARE,
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_COLOR="1"))
    out = json.loads(cp.stdout)
    errors = [f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}"
              for d in out["generalDiagnostics"] if d["severity"] == "error"]
    assert out["summary"]["filesAnalyzed"] >= 7, out["summary"]  # main.py + lib/*.py
    assert not errors, "\n".join(errors)
    assert cp.returncode == 0, cp.stderr


def test_checker_really_uses_the_esp32_stubs(tmp_path):
    """Guard against a silently vacuous check: with the same settings, ESP32-only API resolves and a misuse of
    machine.Pin is reported (with CPython's typeshed `machine` would be a missing import instead)."""
    ensure_tools()
    (tmp_path / "probe.py").write_text(
        "import machine, esp32, network\n"
        "machine.WDT(timeout=1000).feed()\n"
        "esp32.raw_temperature()\n"
        "network.WLAN(network.STA_IF).active(True)\n"
        "machine.Pin(2, machine.Pin.OUT).no_such_method()\n")
    cfg = json.loads("\n".join(ln for ln in (FIRMWARE / "pyrightconfig.json").read_text().splitlines()
                               if not ln.lstrip().startswith("//")))
    cfg = {k: v for k, v in cfg.items() if k not in ("include", "exclude", "executionEnvironments")}
    cfg["typeshedPath"] = cfg["stubPath"] = str(STUB_DIR)
    cfg["extraPaths"] = []
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(cfg))
    cp = subprocess.run([str(CHECKER), "-p", "pyrightconfig.json", "--outputjson"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
    diags = [d for d in json.loads(cp.stdout)["generalDiagnostics"] if d["severity"] == "error"]
    assert len(diags) == 1 and "no_such_method" in diags[0]["message"], diags
