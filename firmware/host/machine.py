# Host (unix port) stand-in for the `machine` module: I2C with an emulated BME280, Pin, WDT, reset.
#
# Environment variables:
#   MPY_UNIQUE_ID   unique_id() bytes as hex ("a1b2c3d4e5f6") or any text; default: hash of hostname + cwd
#   MPY_BME280      "bme280" (default), "bmp280" (chip id 0x58) or "none" (nothing on the bus)
#   MPY_BME280_ADDR sensor I2C address, default 0x76
# Files in the current directory (the "flash"): sensor_env.json (see bme280_emu), led (written with the
# LED state "on"/"off" whenever it changes).
# reset() exits with RESET_EXIT_CODE (a supervisor restarts the process); a starved WDT prints a message
# and kills the process (exit status 137, like a hard reset).
import os
import sys
import time

RESET_EXIT_CODE = 75
WDT_EXIT_CODE = 137

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

_pins = {}


def _env(name, default=None):
    v = os.getenv(name)
    return default if v is None or v == "" else v


def unique_id():
    v = _env("MPY_UNIQUE_ID")
    if v:
        try:
            import binascii
            if len(v) % 2 == 0:
                return binascii.unhexlify(v)
        except ValueError:
            pass
        return v.encode()
    import hashlib
    host = "host"
    try:
        with open("/etc/hostname") as f:
            host = f.read().strip() or host
    except OSError:
        pass
    return hashlib.sha256((host + ":" + os.getcwd()).encode()).digest()[:6]


def freq(*args):
    return 240000000


def reset():
    print("machine.reset(): restarting (exit %d)" % RESET_EXIT_CODE)
    sys.exit(RESET_EXIT_CODE)


def soft_reset():
    reset()


def reset_cause():
    return PWRON_RESET


def idle():
    time.sleep_ms(1)


def disable_irq():
    return 0


def enable_irq(state=0):
    pass


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        if value is not None:
            self.value(value)

    def init(self, mode=-1, pull=-1, value=None):
        if value is not None:
            self.value(value)

    def value(self, v=None):
        if v is None:
            return _pins.get(self.id, 0)
        v = 1 if v else 0
        if _pins.get(self.id) != v:
            _pins[self.id] = v
            self._changed(v)

    def _changed(self, v):
        if self.id == LED_PIN:
            try:
                with open("led", "w") as f:
                    f.write("on" if v else "off")
            except OSError:
                pass

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def __call__(self, v=None):
        return self.value(v)


LED_PIN = int(_env("MPY_LED_PIN", "2"))


class I2C:
    def __init__(self, id=0, scl=None, sda=None, freq=400000, timeout=50000):
        self.id = id
        self.freq = freq
        self._devs = {}
        kind = _env("MPY_BME280", "bme280")
        if kind != "none":
            from bme280_emu import BME280Emu
            addr = int(_env("MPY_BME280_ADDR", "0x76"), 0)
            self._devs[addr] = BME280Emu(chip_id=0x58 if kind == "bmp280" else 0x60)

    def _dev(self, addr):
        d = self._devs.get(addr)
        if d is None:
            raise OSError(19)  # ENODEV, as the ESP32 port raises for a NACK
        return d

    def scan(self):
        return sorted(self._devs)

    def readfrom_mem(self, addr, memaddr, nbytes, addrsize=8):
        return bytes(self._dev(addr).read(memaddr, nbytes))

    def readfrom_mem_into(self, addr, memaddr, buf, addrsize=8):
        data = self._dev(addr).read(memaddr, len(buf))
        for i in range(len(buf)):
            buf[i] = data[i]

    def writeto_mem(self, addr, memaddr, buf, addrsize=8):
        self._dev(addr).write(memaddr, bytes(buf))


SoftI2C = I2C


class WDT:
    """Watchdog: if feed() is not called within `timeout` ms the process is killed (like a reset)."""

    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self._last = time.ticks_ms()
        self._msg = "WDT: not fed for %d ms, resetting" % timeout
        try:
            import _thread
            _thread.start_new_thread(self._watch, ())
        except (ImportError, OSError, RuntimeError):
            pass  # no threads: only the check in feed() works

    def feed(self):
        if time.ticks_diff(time.ticks_ms(), self._last) > self.timeout:
            self._fire()
        self._last = time.ticks_ms()

    def _fire(self):
        print(self._msg)
        try:
            sys.stdout.flush()
        except AttributeError:
            pass
        os.system("kill -9 $PPID")
        sys.exit(WDT_EXIT_CODE)

    def _watch(self):
        while True:
            time.sleep(0.2)  # one select(); the port's sleep_ms wakes every millisecond (~4 % of a core)
            if time.ticks_diff(time.ticks_ms(), self._last) > self.timeout:
                self._fire()
