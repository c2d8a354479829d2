"""Wokwi files: wiring agrees with the firmware's config defaults, the scenario names real parts/controls,
and the custom BME280 chip (C) compiled natively against a stub wokwi-api.h answers like the real part."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib

import pytest

from .conftest import REPO, run_json

CHIP = REPO / "wokwi" / "chips"


@pytest.fixture(scope="module")
def defaults(run_mpy, tmp_path_factory):
    return run_json(run_mpy, "import json, config\nprint(json.dumps(config.Config({}).data))\n",
                    tmp_path_factory.mktemp("cfg"))


def test_diagram_wiring_matches_config_defaults(defaults):
    d = json.loads((REPO / "diagram.json").read_text())
    parts = {p["id"]: p["type"] for p in d["parts"]}
    assert parts["esp"] == "board-esp32-devkit-c-v4" and parts["bme1"] == "chip-bme280"
    conns = {(a, b) for a, b, *_ in d["connections"]} | {(b, a) for a, b, *_ in d["connections"]}
    assert (f"esp:{defaults['i2c']['sda']}", "bme1:SDA") in conns
    assert (f"esp:{defaults['i2c']['scl']}", "bme1:SCL") in conns
    assert ("esp:3V3", "bme1:VCC") in conns and ("esp:GND.1", "bme1:GND") in conns
    chip = json.loads((CHIP / "bme280.chip.json").read_text())
    for a, b in conns:
        if a.startswith("bme1:"):
            assert a.split(":")[1] in chip["pins"], a
    src = (CHIP / "bme280.chip.c").read_text()
    assert f".address = 0x{defaults['sensor']['address']:02x}" in src


def test_toml_and_scenario_refer_to_existing_things():
    toml = tomllib.loads((REPO / "wokwi.toml").read_text())
    assert toml["wokwi"]["version"] == 1 and toml["wokwi"]["firmware"].startswith("build/")
    chips = {c["name"]: c["binary"] for c in toml["chip"]}
    assert chips == {"bme280": "wokwi/chips/bme280.chip.wasm"}
    controls = {c["id"] for c in json.loads((CHIP / "bme280.chip.json").read_text())["controls"]}
    assert controls == {"temperature", "humidity", "pressure"}
    part_ids = {p["id"] for p in json.loads((REPO / "diagram.json").read_text())["parts"]}
    text = (REPO / "wokwi" / "scenario.yaml").read_text()
    import yaml
    steps = yaml.safe_load(text)["steps"]
    for s in steps:
        if "set-control" in s:
            assert s["set-control"]["part-id"] in part_ids
            assert s["set-control"]["control"] in controls
    main = (REPO / "firmware" / "main.py").read_text()
    assert "free heap after start-up" in main and '"reading %d t=%s' in main


def test_chip_registers_natively(tmp_path):
    exe = tmp_path / "harness"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                    "-I", str(REPO / "wokwi" / "test"), "-o", str(exe), str(REPO / "wokwi" / "test" / "harness.c"),
                    str(CHIP / "bme280.chip.c"), "-lm"], check=True)
    out = json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
    assert out["address"] == 0x76 and out["chip_id"] == 0x60
    assert out["im_update_after_reset"] == 1 and out["im_update_later"] == 0
    # same NVM as the Python emulator (production calibration)
    assert out["calib"][:2] == [28485 & 0xFF, 28485 >> 8] and out["calib"][25] == 75
    for label, (t, h, p) in (("default", (21.5, 45.0, 1013.25)), ("changed", (30.0, 80.0, 950.0))):
        r = out[label]
        assert r["busy"] == 1 and r["done"] == 1 and r["mode_after"] == 0  # forced: measure, then sleep
        assert r["t"] == pytest.approx(t, abs=0.01) and r["h"] == pytest.approx(h, abs=0.02)
        assert r["p"] == pytest.approx(p, abs=0.01)
