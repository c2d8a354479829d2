# Register-level BME280 emulator for the unix port (used by the host machine.I2C).
#
# Register map, chip id, soft reset (0xE0 = 0xB6, NVM copy -> status.im_update), calibration NVM,
# ctrl_hum latched on the ctrl_meas write, config (IIR, standby), forced and normal mode with the
# measuring status bit, skipped channels (0x80000 / 0x8000) and the IIR filter on T and P.
# Raw ADC values come from INVERTING the datasheet's floating-point compensation (section 8.1) by
# bisection, so a driver reads back the environment it was given to within rounding.
#
# Environment: sensor_env.json in the current directory ({"t":21.5,"h":45.0,"p":1013.25}, any subset)
# is re-read when its mtime changes (checked at most once per measurement); without it the values drift
# slowly around 21.5 degC / 45 %RH / 1013.25 hPa so they look alive.
import math
import os
import time
import json

# Calibration NVM of a real BME280 (values as read from a production part).
CALIB = {
    "T1": 28485, "T2": 26735, "T3": 50,
    "P1": 36738, "P2": -10635, "P3": 3024, "P4": 6980, "P5": -4, "P6": -7, "P7": 9900, "P8": -10230,
    "P9": 4285,
    "H1": 75, "H2": 362, "H3": 0, "H4": 313, "H5": 50, "H6": 30,
}
ENV_FILE = "sensor_env.json"
DEFAULT_ENV = {"t": 21.5, "h": 45.0, "p": 1013.25}
_OS_N = (0, 1, 2, 4, 8, 16, 16, 16)
_IIR_C = (1, 2, 4, 8, 16, 16, 16, 16)
_TSB_MS = (0.5, 62.5, 125, 250, 500, 1000, 10, 20)


def calib_bytes(c):
    """-> (26 bytes for 0x88..0xA1, 7 bytes for 0xE1..0xE7)"""
    a = bytearray(26)

    def put16(i, v):
        v &= 0xFFFF
        a[i] = v & 0xFF
        a[i + 1] = v >> 8

    for i, k in enumerate(("T1", "T2", "T3", "P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9")):
        put16(2 * i, c[k])
    a[25] = c["H1"]
    b = bytearray(7)
    h2 = c["H2"] & 0xFFFF
    b[0] = h2 & 0xFF
    b[1] = h2 >> 8
    b[2] = c["H3"]
    h4 = c["H4"] & 0xFFF
    h5 = c["H5"] & 0xFFF
    b[3] = h4 >> 4
    b[4] = (h4 & 0x0F) | ((h5 & 0x0F) << 4)
    b[5] = h5 >> 4
    b[6] = c["H6"] & 0xFF
    return a, b


# -- datasheet floating-point compensation (section 8.1)
def comp_t(c, adc_t):
    v1 = (adc_t / 16384.0 - c["T1"] / 1024.0) * c["T2"]
    v2 = (adc_t / 131072.0 - c["T1"] / 8192.0)
    v2 = v2 * v2 * c["T3"]
    t_fine = v1 + v2
    return t_fine / 5120.0, t_fine


def comp_p(c, adc_p, t_fine):
    v1 = t_fine / 2.0 - 64000.0
    v2 = v1 * v1 * c["P6"] / 32768.0
    v2 = v2 + v1 * c["P5"] * 2.0
    v2 = v2 / 4.0 + c["P4"] * 65536.0
    v1 = (c["P3"] * v1 * v1 / 524288.0 + c["P2"] * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * c["P1"]
    if v1 == 0:
        return 0.0
    p = 1048576.0 - adc_p
    p = (p - v2 / 4096.0) * 6250.0 / v1
    v1 = c["P9"] * p * p / 2147483648.0
    v2 = p * c["P8"] / 32768.0
    return (p + (v1 + v2 + c["P7"]) / 16.0) / 100.0  # hPa


def comp_h(c, adc_h, t_fine):
    h = t_fine - 76800.0
    h = (adc_h - (c["H4"] * 64.0 + c["H5"] / 16384.0 * h)) * \
        (c["H2"] / 65536.0 * (1.0 + c["H6"] / 67108864.0 * h * (1.0 + c["H3"] / 67108864.0 * h)))
    h = h * (1.0 - c["H1"] * h / 524288.0)
    return min(100.0, max(0.0, h))


def _bisect(f, target, lo, hi, increasing):
    # smallest/largest integer whose f() is closest to target; f monotonic on [lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        v = f(mid)
        if (v < target) == increasing:
            lo = mid
        else:
            hi = mid
    return lo if abs(f(lo) - target) <= abs(f(hi) - target) else hi


def invert(c, t, p, h):
    """environment -> (adc_T, adc_P, adc_H)"""
    adc_t = _bisect(lambda a: comp_t(c, a)[0], t, 0, 0xFFFFF, True)
    t_fine = comp_t(c, adc_t)[1]
    adc_p = _bisect(lambda a: comp_p(c, a, t_fine), p, 0, 0xFFFFF, False)
    adc_h = _bisect(lambda a: comp_h(c, a, t_fine), h, 0, 0xFFFF, True)
    return adc_t, adc_p, adc_h


class Environment:
    """What the sensor 'feels': sensor_env.json in cwd if present, else a slow drift."""

    def __init__(self, path=ENV_FILE):
        self.path = path
        self._mtime = None
        self._fixed = None
        self._t0 = time.time()
        # Each simulated device (its own flash dir) drifts around its own climate, so a fleet looks like
        # several rooms rather than one sensor copied N times.
        seed = 0
        for ch in os.getcwd():
            seed = (seed * 31 + ord(ch)) & 0xFFFFFF
        self._offset = ((seed % 41) / 10.0 - 2.0, (seed // 41 % 21) / 2.0 - 5.0, (seed // 861 % 61) / 10.0 - 3.0)
        self._phase = (seed % 628) / 100.0

    def _check_file(self):
        try:
            st = os.stat(self.path)
        except OSError:
            self._mtime = None
            self._fixed = None
            return
        mt = (st[8], st[6])
        if mt == self._mtime:
            return
        self._mtime = mt
        try:
            with open(self.path) as f:
                d = json.load(f)
            env = dict(DEFAULT_ENV)
            for k in ("t", "h", "p"):
                if k in d:
                    env[k] = float(d[k])
            self._fixed = env
        except (ValueError, TypeError, OSError) as e:
            print("bme280_emu: cannot use %s: %s" % (self.path, e))

    def sample(self):
        self._check_file()
        if self._fixed is not None:
            return self._fixed["t"], self._fixed["h"], self._fixed["p"]
        s = time.time() - self._t0
        w = 2 * math.pi * s / 300.0 + self._phase
        dt, dh, dp = self._offset
        return (DEFAULT_ENV["t"] + dt + 0.8 * math.sin(w), DEFAULT_ENV["h"] + dh + 3.0 * math.sin(w + 1.0),
                DEFAULT_ENV["p"] + dp + 0.6 * math.sin(w / 3.0))


class BME280Emu:
    def __init__(self, chip_id=0x60, calib=CALIB, env=None):
        self.chip_id = chip_id
        self.calib = calib
        self.env = env or Environment()
        self.regs = bytearray(256)
        self._nvm = calib_bytes(calib)
        self.measurements = 0
        self.power_on()

    # -- state
    def power_on(self):
        r = self.regs
        for i in range(256):
            r[i] = 0
        r[0xD0] = self.chip_id
        a, b = self._nvm
        r[0x88:0x88 + 26] = a
        r[0xE1:0xE1 + 7] = b
        r[0xF7:0xFF] = b"\x80\x00\x00\x80\x00\x00\x80\x00"
        self._osr_h_latched = 0
        self._meas_start = self._meas_end = None
        self._nvm_end = time.ticks_add(time.ticks_ms(), 2)
        self._filt = None

    def _t_meas_ms(self):
        ctrl = self.regs[0xF4]
        n_t, n_p, n_h = _OS_N[ctrl >> 5], _OS_N[(ctrl >> 2) & 7], _OS_N[self._osr_h_latched]
        t = 1.0 + 2.0 * n_t
        if n_p:
            t += 2.0 * n_p + 0.5
        if n_h:
            t += 2.0 * n_h + 0.5
        return t

    def _measure(self):
        t, h, p = self.env.sample()
        adc_t, adc_p, adc_h = invert(self.calib, t, p, h)
        ctrl = self.regs[0xF4]
        coef = _IIR_C[(self.regs[0xF5] >> 2) & 7]
        if self._filt is None or coef == 1:
            self._filt = [float(adc_t), float(adc_p)]
        else:
            self._filt[0] = (self._filt[0] * (coef - 1) + adc_t) / coef
            self._filt[1] = (self._filt[1] * (coef - 1) + adc_p) / coef
        ft, fp = int(self._filt[0] + 0.5), int(self._filt[1] + 0.5)
        if not ctrl >> 5:
            ft = 0x80000
        if not (ctrl >> 2) & 7:
            fp = 0x80000
        if not self._osr_h_latched:
            adc_h = 0x8000
        r = self.regs
        r[0xF7] = fp >> 12
        r[0xF8] = (fp >> 4) & 0xFF
        r[0xF9] = (fp & 0xF) << 4
        r[0xFA] = ft >> 12
        r[0xFB] = (ft >> 4) & 0xFF
        r[0xFC] = (ft & 0xF) << 4
        r[0xFD] = adc_h >> 8
        r[0xFE] = adc_h & 0xFF
        self.measurements += 1

    def _tick(self):
        now = time.ticks_ms()
        if self._meas_end is None or time.ticks_diff(now, self._meas_end) < 0:
            return
        self._measure()
        mode = self.regs[0xF4] & 3
        if mode == 3:  # normal mode: standby, then the next measurement
            t_meas = int(self._t_meas_ms() + 0.5)
            start = time.ticks_add(self._meas_end, int(_TSB_MS[self.regs[0xF5] >> 5] + 0.5))
            if time.ticks_diff(now, start) > 0:  # missed cycles: restart the schedule now
                start = now
            self._meas_start = start
            self._meas_end = time.ticks_add(start, t_meas)
        else:  # forced mode: back to sleep
            self.regs[0xF4] &= 0xFC
            self._meas_end = None

    def _status(self):
        s = 0
        now = time.ticks_ms()
        if self._meas_end is not None and time.ticks_diff(now, self._meas_start) >= 0:
            s |= 0x08
        if self._nvm_end is not None:
            if time.ticks_diff(now, self._nvm_end) < 0:
                s |= 0x01
            else:
                self._nvm_end = None
        return s

    # -- bus
    def read(self, reg, n):
        self._tick()
        out = bytearray(n)
        for i in range(n):
            a = (reg + i) & 0xFF
            out[i] = self._status() if a == 0xF3 else self.regs[a]
        return out

    def write(self, reg, data):
        # BME280 I2C writes are (register, value) pairs: auto-increment is not supported for writes
        self._tick()
        pairs = [(reg, data[0])] if len(data) else []
        for i in range(1, len(data) - 1, 2):
            pairs.append((data[i], data[i + 1]))
        for a, v in pairs:
            self._write1(a, v)

    def _write1(self, a, v):
        if a == 0xE0:
            if v == 0xB6:
                self.power_on()
        elif a == 0xF2:
            self.regs[0xF2] = v & 0x07
        elif a == 0xF5:
            self.regs[0xF5] = v & 0xFD
        elif a == 0xF4:
            self.regs[0xF4] = v
            self._osr_h_latched = self.regs[0xF2] & 7  # ctrl_hum takes effect here
            if v & 3:  # forced (01/10) or normal (11): a measurement starts now
                self._meas_start = time.ticks_ms()
                self._meas_end = time.ticks_add(self._meas_start, int(self._t_meas_ms() + 0.5))
            else:
                self._meas_end = None
