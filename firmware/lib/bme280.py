# BME280 driver (Bosch BST-BME280-DS002). MicroPython, I2C.
#
# Defaults: Bosch "weather monitoring" settings (forced mode, x1 oversampling, IIR off).
# Compensation: the datasheet's INTEGER reference formulas (section 4.2.3 / appendix 8.2):
# BME280_compensate_T_int32, BME280_compensate_P_int64 and bme280_compensate_H_int32.
# They give identical results on every port (ESP32 floats are single precision, integers are exact);
# Python integers never overflow, so the int32/int64 intermediate values are exact.
# If the temperature channel is skipped there is no t_fine: temperature, pressure and humidity are None.
import time
from micropython import const

_REG_CALIB00 = const(0x88)  # 0x88..0xA1 (26 bytes; 0xA0 unused, 0xA1 = dig_H1)
_REG_CHIP_ID = const(0xD0)
_REG_RESET = const(0xE0)
_REG_CALIB26 = const(0xE1)  # 0xE1..0xE7
_REG_CTRL_HUM = const(0xF2)
_REG_STATUS = const(0xF3)
_REG_CTRL_MEAS = const(0xF4)
_REG_CONFIG = const(0xF5)
_REG_DATA = const(0xF7)  # 0xF7..0xFE burst

_CHIP_ID_BME280 = const(0x60)
_CHIP_ID_BMP280 = const(0x58)
_RESET_WORD = const(0xB6)
_STATUS_MEASURING = const(0x08)
_STATUS_IM_UPDATE = const(0x01)

MODE_SLEEP = const(0)
MODE_FORCED = const(1)
MODE_NORMAL = const(3)

# oversampling register codes: skip, x1, x2, x4, x8, x16
OSAMPLE = {0: 0, 1: 1, 2: 2, 4: 3, 8: 4, 16: 5}
# IIR filter coefficient -> register code
IIR = {0: 0, 2: 1, 4: 2, 8: 3, 16: 4}
# standby time in ms (normal mode) -> t_sb code
STANDBY_MS = {0.5: 0, 62.5: 1, 125: 2, 250: 3, 500: 4, 1000: 5, 10: 6, 20: 7}

_SKIP_20 = const(0x80000)
_SKIP_16 = const(0x8000)


class BME280Error(OSError):
    pass


def _s16(v):
    return v - 0x10000 if v & 0x8000 else v


def _s12(v):
    return v - 0x1000 if v & 0x800 else v


def _code(table, value, what):
    try:
        return table[value]
    except KeyError:
        raise ValueError("bme280: bad %s %r, expected one of %s" % (what, value, sorted(table)))


class BME280:
    def __init__(self, i2c, address=0x76, t_os=1, p_os=1, h_os=1, iir=0, mode=MODE_FORCED,
                 standby_ms=1000, timeout_ms=200):
        self._i2c = i2c
        self._addr = address
        self._osr_t = _code(OSAMPLE, t_os, "temperature oversampling")
        self._osr_p = _code(OSAMPLE, p_os, "pressure oversampling")
        self._osr_h = _code(OSAMPLE, h_os, "humidity oversampling")
        self._iir = _code(IIR, iir, "IIR coefficient")
        self._tsb = _code(STANDBY_MS, standby_ms, "standby time")
        if mode not in (MODE_FORCED, MODE_NORMAL):
            raise ValueError("bme280: mode must be MODE_FORCED or MODE_NORMAL")
        self._mode = mode
        self._timeout = timeout_ms
        self._b1 = bytearray(1)
        self._data = bytearray(8)
        self._mv1 = memoryview(self._b1)
        self.t_fine = 0
        chip = self._read8(_REG_CHIP_ID)
        if chip == _CHIP_ID_BMP280:
            raise BME280Error("bme280: chip id 0x58 at 0x%02x is a BMP280 (no humidity), need a BME280" % address)
        if chip != _CHIP_ID_BME280:
            raise BME280Error("bme280: unexpected chip id 0x%02x at 0x%02x (want 0x60)" % (chip, address))
        self.reset()
        self._read_calibration()
        self.configure()

    # -- bus helpers: every I2C failure becomes a BME280Error, never a wrong value
    def _read8(self, reg):
        try:
            self._i2c.readfrom_mem_into(self._addr, reg, self._b1)
        except OSError as e:
            raise BME280Error("bme280: I2C read of 0x%02x failed: %s" % (reg, e))
        return self._b1[0]

    def _read_into(self, reg, buf):
        try:
            self._i2c.readfrom_mem_into(self._addr, reg, buf)
        except OSError as e:
            raise BME280Error("bme280: I2C read of 0x%02x failed: %s" % (reg, e))

    def _write8(self, reg, value):
        self._b1[0] = value
        try:
            self._i2c.writeto_mem(self._addr, reg, self._b1)
        except OSError as e:
            raise BME280Error("bme280: I2C write of 0x%02x failed: %s" % (reg, e))

    def reset(self):
        self._write8(_REG_RESET, _RESET_WORD)
        time.sleep_ms(2)  # start-up time 2 ms
        t0 = time.ticks_ms()
        while self._read8(_REG_STATUS) & _STATUS_IM_UPDATE:  # NVM data being copied to image registers
            if time.ticks_diff(time.ticks_ms(), t0) > self._timeout:
                raise BME280Error("bme280: NVM copy after reset did not finish")
            time.sleep_ms(1)

    def _read_calibration(self):
        c = bytearray(26)
        self._read_into(_REG_CALIB00, c)
        self.dig_T1 = c[0] | c[1] << 8
        self.dig_T2 = _s16(c[2] | c[3] << 8)
        self.dig_T3 = _s16(c[4] | c[5] << 8)
        self.dig_P1 = c[6] | c[7] << 8
        self.dig_P2 = _s16(c[8] | c[9] << 8)
        self.dig_P3 = _s16(c[10] | c[11] << 8)
        self.dig_P4 = _s16(c[12] | c[13] << 8)
        self.dig_P5 = _s16(c[14] | c[15] << 8)
        self.dig_P6 = _s16(c[16] | c[17] << 8)
        self.dig_P7 = _s16(c[18] | c[19] << 8)
        self.dig_P8 = _s16(c[20] | c[21] << 8)
        self.dig_P9 = _s16(c[22] | c[23] << 8)
        self.dig_H1 = c[25]
        h = bytearray(7)
        self._read_into(_REG_CALIB26, h)
        self.dig_H2 = _s16(h[0] | h[1] << 8)
        self.dig_H3 = h[2]
        self.dig_H4 = _s12(h[3] << 4 | (h[4] & 0x0F))  # 0xE4[11:4], 0xE5[3:0]
        self.dig_H5 = _s12(h[5] << 4 | h[4] >> 4)  # 0xE6[11:4], 0xE5[7:4]
        h6 = h[6]
        self.dig_H6 = h6 - 256 if h6 & 0x80 else h6
        if self.dig_T1 == 0 or self.dig_P1 == 0:
            raise BME280Error("bme280: calibration data is blank (dig_T1/dig_P1 = 0)")

    def configure(self):
        # sleep mode first: config (0xF5) writes are only guaranteed in sleep mode
        self._write8(_REG_CTRL_MEAS, 0)
        self._write8(_REG_CONFIG, self._tsb << 5 | self._iir << 2)
        # ctrl_hum only takes effect after a write to ctrl_meas
        self._write8(_REG_CTRL_HUM, self._osr_h)
        if self._mode == MODE_NORMAL:
            self._write8(_REG_CTRL_MEAS, self._osr_t << 5 | self._osr_p << 2 | MODE_NORMAL)

    def measure_time_ms(self):
        # datasheet 9.1, maximum measurement time
        n = (0, 1, 2, 4, 8, 16)
        t = 1.25 + 2.3 * n[self._osr_t]
        if self._osr_p:
            t += 2.3 * n[self._osr_p] + 0.575
        if self._osr_h:
            t += 2.3 * n[self._osr_h] + 0.575
        return t

    def _forced(self):
        self._write8(_REG_CTRL_MEAS, self._osr_t << 5 | self._osr_p << 2 | MODE_FORCED)
        time.sleep_ms(int(self.measure_time_ms()) + 1)
        t0 = time.ticks_ms()
        while self._read8(_REG_STATUS) & _STATUS_MEASURING:
            if time.ticks_diff(time.ticks_ms(), t0) > self._timeout:
                raise BME280Error("bme280: measurement did not finish within %d ms" % self._timeout)
            time.sleep_ms(1)

    def read_raw(self):
        """Start a measurement (forced mode) and return (adc_T, adc_P, adc_H) as 20/20/16-bit integers."""
        if self._mode == MODE_FORCED:
            self._forced()
        d = self._data
        self._read_into(_REG_DATA, d)  # one burst so all channels belong to the same measurement
        adc_p = d[0] << 12 | d[1] << 4 | d[2] >> 4
        adc_t = d[3] << 12 | d[4] << 4 | d[5] >> 4
        adc_h = d[6] << 8 | d[7]
        return adc_t, adc_p, adc_h

    # -- datasheet integer compensation
    def compensate_t(self, adc_t):
        """-> temperature in 0.01 degC; sets t_fine."""
        var1 = (((adc_t >> 3) - (self.dig_T1 << 1)) * self.dig_T2) >> 11
        var2 = (((((adc_t >> 4) - self.dig_T1) * ((adc_t >> 4) - self.dig_T1)) >> 12) * self.dig_T3) >> 14
        self.t_fine = var1 + var2
        return (self.t_fine * 5 + 128) >> 8

    def compensate_p(self, adc_p):
        """-> pressure in Pa as Q24.8 (divide by 256), or None when it cannot be computed (var1 == 0)."""
        var1 = self.t_fine - 128000
        var2 = var1 * var1 * self.dig_P6
        var2 = var2 + ((var1 * self.dig_P5) << 17)
        var2 = var2 + (self.dig_P4 << 35)
        var1 = ((var1 * var1 * self.dig_P3) >> 8) + ((var1 * self.dig_P2) << 12)
        var1 = (((1 << 47) + var1) * self.dig_P1) >> 33
        if var1 == 0:
            return None  # avoid division by zero
        p = 1048576 - adc_p
        p = (((p << 31) - var2) * 3125)
        # C integer division truncates toward zero
        q = abs(p) // abs(var1)
        p = -q if (p < 0) != (var1 < 0) else q
        var1 = (self.dig_P9 * (p >> 13) * (p >> 13)) >> 25
        var2 = (self.dig_P8 * p) >> 19
        return ((p + var1 + var2) >> 8) + (self.dig_P7 << 4)

    def compensate_h(self, adc_h):
        """-> relative humidity in %RH as Q22.10 (divide by 1024), clamped to 0..100 %."""
        v = self.t_fine - 76800
        v = ((((adc_h << 14) - (self.dig_H4 << 20) - (self.dig_H5 * v)) + 16384) >> 15) * \
            (((((((v * self.dig_H6) >> 10) * (((v * self.dig_H3) >> 11) + 32768)) >> 10) + 2097152) *
              self.dig_H2 + 8192) >> 14)
        v = v - (((((v >> 15) * (v >> 15)) >> 7) * self.dig_H1) >> 4)
        if v < 0:
            v = 0
        if v > 419430400:
            v = 419430400
        return v >> 12

    def compensate(self, adc_t, adc_p, adc_h):
        """raw -> (temp_C, pressure_hPa, humidity_pct); a skipped channel gives None."""
        if adc_t == _SKIP_20:
            return None, None, None  # no t_fine: nothing can be compensated
        t = self.compensate_t(adc_t) / 100
        p = None
        if adc_p != _SKIP_20:
            q = self.compensate_p(adc_p)
            if q is not None:
                p = q / 25600  # Pa*256 -> hPa
        h = None
        if adc_h != _SKIP_16:
            h = self.compensate_h(adc_h) / 1024
        return t, p, h

    def read(self):
        """-> (temp_C, pressure_hPa, humidity_pct); None for a skipped channel."""
        return self.compensate(*self.read_raw())
