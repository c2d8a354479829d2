"""BME280 driver (firmware/lib/bme280.py) run in MicroPython, checked against an independent CPython
implementation of the datasheet's floating-point compensation (BST-BME280-DS002, section 8.1)."""

from __future__ import annotations

import json
import random
import struct

import pytest

from .conftest import run_json

# Calibration sets: (1) a production BME280, (2) the BMP280 datasheet example T/P values with humidity
# values chosen so dig_H4 and dig_H5 are NEGATIVE (exercises the signed 12-bit packing).
CALIBS = [
    dict(T1=28485, T2=26735, T3=50, P1=36738, P2=-10635, P3=3024, P4=6980, P5=-4, P6=-7, P7=9900,
         P8=-10230, P9=4285, H1=75, H2=362, H3=0, H4=313, H5=50, H6=30),
    dict(T1=27504, T2=26435, T3=-1000, P1=36477, P2=-10685, P3=3024, P4=2855, P5=140, P6=-7, P7=15500,
         P8=-14600, P9=6000, H1=100, H2=380, H3=5, H4=-150, H5=-200, H6=-20),
]


def nvm_bytes(c):
    """Pack calibration into the chip's NVM layout (0x88..0xA1, 0xE1..0xE7), per datasheet table 16."""
    a = struct.pack("<HhhHhhhhhhhh", c["T1"], c["T2"], c["T3"], c["P1"], c["P2"], c["P3"], c["P4"], c["P5"],
                    c["P6"], c["P7"], c["P8"], c["P9"]) + b"\x00" + bytes([c["H1"]])
    h4, h5 = c["H4"] & 0xFFF, c["H5"] & 0xFFF
    b = struct.pack("<hB", c["H2"], c["H3"]) + bytes([h4 >> 4, (h4 & 0xF) | ((h5 & 0xF) << 4), h5 >> 4,
                                                      c["H6"] & 0xFF])
    return a.hex(), b.hex()


def ref(c, adc_t, adc_p, adc_h):
    """Datasheet double-precision compensation -> (T degC, P hPa, H %RH)."""
    v1 = (adc_t / 16384.0 - c["T1"] / 1024.0) * c["T2"]
    v2 = (adc_t / 131072.0 - c["T1"] / 8192.0) ** 2 * c["T3"]
    t_fine = v1 + v2
    t = t_fine / 5120.0
    v1 = t_fine / 2.0 - 64000.0
    v2 = v1 * v1 * c["P6"] / 32768.0
    v2 = v2 + v1 * c["P5"] * 2.0
    v2 = v2 / 4.0 + c["P4"] * 65536.0
    v1 = (c["P3"] * v1 * v1 / 524288.0 + c["P2"] * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * c["P1"]
    p = 1048576.0 - adc_p
    p = (p - v2 / 4096.0) * 6250.0 / v1
    v1 = c["P9"] * p * p / 2147483648.0
    v2 = p * c["P8"] / 32768.0
    p = (p + (v1 + v2 + c["P7"]) / 16.0) / 100.0
    h = t_fine - 76800.0
    h = (adc_h - (c["H4"] * 64.0 + c["H5"] / 16384.0 * h)) * (
        c["H2"] / 65536.0 * (1.0 + c["H6"] / 67108864.0 * h * (1.0 + c["H3"] / 67108864.0 * h)))
    h = h * (1.0 - c["H1"] * h / 524288.0)
    return t, p, min(100.0, max(0.0, h))


FAKE_I2C = r"""
import json, bme280
class FakeI2C:
    # register file of a BME280 with given NVM; records writes; can fail on a chosen read
    def __init__(self, chip, nvm_a, nvm_b, data=None, fail_on=None):
        self.r = bytearray(256)
        self.r[0xD0] = chip
        self.r[0x88:0x88 + 26] = bytes.fromhex(nvm_a)
        self.r[0xE1:0xE1 + 7] = bytes.fromhex(nvm_b)
        if data:
            self.r[0xF7:0xFF] = bytes.fromhex(data)
        self.writes = []
        self.fail_on = fail_on
    def readfrom_mem_into(self, addr, reg, buf):
        if addr != 0x76:
            raise OSError(19)
        if self.fail_on == reg:
            raise OSError(5)  # EIO
        for i in range(len(buf)):
            buf[i] = self.r[reg + i]
    def writeto_mem(self, addr, reg, buf):
        self.writes.append((reg, buf[0]))
        if reg == 0xF4:
            self.r[0xF4] = buf[0] & 0xFC  # measurement done at once, back to sleep
inp = json.load(open("in.json"))
"""


def raw_regs(adc_t, adc_p, adc_h):
    return bytes([adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0xF) << 4, adc_t >> 12, (adc_t >> 4) & 0xFF,
                  (adc_t & 0xF) << 4, adc_h >> 8, adc_h & 0xFF]).hex()


@pytest.mark.parametrize("ci", range(len(CALIBS)))
def test_compensation_matches_datasheet_over_range(run_mpy, tmp_path, ci):
    c = CALIBS[ci]
    rnd = random.Random(ci)
    raws = [(rnd.randrange(0x40000, 0xA0000), rnd.randrange(0x30000, 0xC0000), rnd.randrange(0, 0x10000))
            for _ in range(3000)]
    cases = []
    for r in raws:
        t, p, h = ref(c, *r)
        if -40 <= t <= 85 and 300 <= p <= 1100:  # the BME280's operating range
            cases.append(r)
    assert len(cases) > 300
    a, b = nvm_bytes(c)
    (tmp_path / "in.json").write_text(json.dumps({"a": a, "b": b, "raws": cases}))
    script = FAKE_I2C + r"""
s = bme280.BME280(FakeI2C(0x60, inp["a"], inp["b"]))
print(json.dumps({"cal": [s.dig_H4, s.dig_H5, s.dig_H6, s.dig_T3], "out": [s.compensate(*r) for r in inp["raws"]]}))
"""
    got = run_json(run_mpy, script, tmp_path)
    assert got["cal"] == [c["H4"], c["H5"], c["H6"], c["T3"]]
    worst = [0.0, 0.0, 0.0]
    for r, (t, p, h) in zip(cases, got["out"]):
        rt, rp, rh = ref(c, *r)
        worst = [max(worst[0], abs(t - rt)), max(worst[1], abs(p - rp)), max(worst[2], abs(h - rh))]
    # integer formulas: T resolution 0.01 degC, P 1/256 Pa, H 1/1024 %RH
    assert worst[0] <= 0.011, worst
    assert worst[1] <= 0.02, worst
    assert worst[2] <= 0.05, worst


def test_read_path_registers_and_skipped_channels(run_mpy, tmp_path):
    c = CALIBS[0]
    a, b = nvm_bytes(c)
    adc = (519888, 415148, 26000)
    (tmp_path / "in.json").write_text(json.dumps({"a": a, "b": b, "data": raw_regs(*adc)}))
    script = FAKE_I2C + r"""
i2c = FakeI2C(0x60, inp["a"], inp["b"], inp["data"])
s = bme280.BME280(i2c, t_os=2, p_os=16, h_os=4, iir=4)
out = {"raw": s.read_raw(), "val": s.read(), "writes": i2c.writes}
i2c.r[0xF7:0xFA] = b"\x80\x00\x00"   # pressure skipped
i2c.r[0xFD:0xFF] = b"\x80\x00"       # humidity skipped
out["skip_ph"] = s.read()
i2c.r[0xFA:0xFD] = b"\x80\x00\x00"   # temperature skipped: no t_fine
out["skip_t"] = s.read()
print(json.dumps(out))
"""
    got = run_json(run_mpy, script, tmp_path)
    assert got["raw"] == list(adc)
    t, p, h = ref(c, *adc)
    assert got["val"][0] == pytest.approx(t, abs=0.011)
    assert got["val"][1] == pytest.approx(p, abs=0.02)
    assert got["val"][2] == pytest.approx(h, abs=0.05)
    writes = [tuple(w) for w in got["writes"]]
    assert writes[0] == (0xE0, 0xB6)  # soft reset first
    assert (0xF5, 2 << 2 | 5 << 5) in writes  # IIR 4, standby 1000 ms
    i_hum = writes.index((0xF2, 3))  # humidity x4
    i_meas = writes.index((0xF4, 2 << 5 | 5 << 2 | 1))  # T x2, P x16, forced
    assert i_hum < i_meas  # ctrl_hum only takes effect after a ctrl_meas write
    assert got["skip_ph"][0] == pytest.approx(t, abs=0.011)
    assert got["skip_ph"][1] is None and got["skip_ph"][2] is None
    assert got["skip_t"] == [None, None, None]


def test_bmp280_is_refused_with_clear_error(run_mpy, tmp_path):
    a, b = nvm_bytes(CALIBS[0])
    (tmp_path / "in.json").write_text(json.dumps({"a": a, "b": b}))
    script = FAKE_I2C + r"""
try:
    bme280.BME280(FakeI2C(0x58, inp["a"], inp["b"]))
    print(json.dumps("no error"))
except bme280.BME280Error as e:
    print(json.dumps(str(e)))
"""
    msg = run_json(run_mpy, script, tmp_path)
    assert "BMP280" in msg and "no humidity" in msg


def test_i2c_error_mid_read_raises_not_a_value(run_mpy, tmp_path):
    a, b = nvm_bytes(CALIBS[0])
    (tmp_path / "in.json").write_text(json.dumps({"a": a, "b": b, "data": raw_regs(519888, 415148, 26000)}))
    script = FAKE_I2C + r"""
i2c = FakeI2C(0x60, inp["a"], inp["b"], inp["data"])
s = bme280.BME280(i2c)
first = s.read()
out = {"first": first}
for reg in (0xF7, 0xF3):   # data burst, status poll
    i2c.fail_on = reg
    try:
        out[str(reg)] = ["value", s.read()]
    except OSError as e:
        out[str(reg)] = [type(e).__name__, str(e)]
i2c.fail_on = None
out["again"] = s.read()
print(json.dumps(out))
"""
    got = run_json(run_mpy, script, tmp_path)
    for reg in ("247", "243"):
        kind, text = got[reg]
        assert kind == "BME280Error", got
        assert "I2C read" in text and "failed" in text
    assert got["again"] == got["first"]


def test_bad_options_are_rejected(run_mpy, tmp_path):
    a, b = nvm_bytes(CALIBS[0])
    (tmp_path / "in.json").write_text(json.dumps({"a": a, "b": b}))
    script = FAKE_I2C + r"""
out = []
for kw in ({"t_os": 3}, {"iir": 5}, {"standby_ms": 7}):
    try:
        bme280.BME280(FakeI2C(0x60, inp["a"], inp["b"]), **kw)
        out.append("accepted")
    except ValueError as e:
        out.append(str(e))
print(json.dumps(out))
"""
    out = run_json(run_mpy, script, tmp_path)
    assert all(o.startswith("bme280: bad") for o in out), out
