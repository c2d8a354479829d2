# Device firmware entry point: start-up, watchdog, main loop. Same code on ESP32 and the unix port.
#
# Loop: keep Wi-Fi and MQTT up (with backoff), read the BME280 every `interval_s`, queue the telemetry in
# the backlog and publish it (QoS1) oldest first, handle commands, feed the watchdog.
import gc
import os
import sys
import time
import json
import machine
from micropython import const

import config
import net
from backlog import Backlog
from commands import Commands, Led, exceeded

FW = "1.0.0"
_TICK_MS = const(50)  # longest idle wait: LED blink resolution (a command wakes the loop at once)
_DRAIN_MAX = const(20)  # publishes per loop pass, so the WDT is fed while a long backlog drains


class Uptime:
    """Milliseconds since boot, immune to ticks_ms wrap-around."""

    def __init__(self):
        self.ms = 0
        self._last = time.ticks_ms()

    def update(self):
        now = time.ticks_ms()
        self.ms += time.ticks_diff(now, self._last)
        self._last = now
        return self.ms

    def s(self):
        return self.update() // 1000


def boot_id():
    b = os.urandom(4)
    return (b[0] << 24 | b[1] << 16 | b[2] << 8 | b[3]) & 0x7FFFFFFF


def r2(x):
    return None if x is None else round(x, 2)


def telemetry(dev_id, boot, seq, ts, reading, rssi, up, drop):
    t, p, h = reading
    d = {"v": 1, "id": dev_id, "boot": boot, "seq": seq, "ts": ts, "t": r2(t), "h": r2(h), "p": r2(p),
         "rssi": rssi, "up": up, "fw": FW}
    if drop:
        d["drop"] = drop
    return json.dumps(d)


class Sensor:
    """The BME280, (re)initialised on demand so a missing/broken sensor never stops the device."""

    def __init__(self, cfg):
        self.cfg = cfg
        i2c_cfg = cfg["i2c"]
        self.i2c = machine.I2C(i2c_cfg["id"], scl=machine.Pin(i2c_cfg["scl"]), sda=machine.Pin(i2c_cfg["sda"]),
                               freq=i2c_cfg["freq"])
        self.dev = None
        self.errors = 0

    def read(self):
        """-> (t, p, h) or None."""
        from bme280 import BME280
        try:
            if self.dev is None:
                self.dev = BME280(self.i2c, address=self.cfg["sensor"]["address"])
            return self.dev.read()
        except OSError as e:  # BME280Error is an OSError
            self.errors += 1
            self.dev = None
            print("sensor:", e)
            return None


class Device:
    def __init__(self, cfg=None):
        self.cfg = cfg or config.Config.load()
        c = self.cfg
        self.id = c["device_id"]
        self.boot = boot_id()
        self.up = Uptime()
        self.seq = 0
        self.led = Led(machine.Pin(c["led"]["pin"], machine.Pin.OUT))
        self.sensor = Sensor(c)
        self.net = net.Net(c["wifi"]["ssid"], c["wifi"]["password"])
        gc.collect()  # link.py is the largest module: compile it in a defragmented heap
        from link import Link
        self.link = Link(c, self.id, self.boot, FW)
        self.backlog = Backlog(c["backlog"]["ram"], c["backlog"]["file"])
        self.commands = Commands(self.id, c, self.led, self.up.s, self.net.now_ms)
        self.wdt = None
        self._next = time.ticks_ms()

    def start(self):
        print("fw %s device %s boot %d" % (FW, self.id, self.boot))
        self.wdt = machine.WDT(timeout=self.cfg["wdt_s"] * 1000)
        gc.collect()
        print("free heap after start-up: %d bytes" % gc.mem_free())

    def sample(self):
        r = self.sensor.read()
        if r is None:
            return
        self.seq += 1
        print("reading %d t=%s h=%s p=%s" % (self.seq, r2(r[0]), r2(r[2]), r2(r[1])))
        self.led.alarm = exceeded(self.cfg["thresholds"], r[0], r[2], r[1])
        rssi = self.net.rssi() if self.net.isconnected() else None
        self.backlog.push(telemetry(self.id, self.boot, self.seq, self.net.now_ms(), r, rssi, self.up.s(),
                                    self.backlog.take_drops()))

    def drain(self):
        link = self.link
        for _ in range(_DRAIN_MAX):
            item = self.backlog.peek()
            if item is None or not link.publish(link.t_telemetry, item):
                return
            self.backlog.pop()

    def service_commands(self):
        link = self.link
        while link.inbox and link.up:
            ack, action = self.commands.handle(link.inbox.pop(0))
            if ack is not None:
                link.publish(link.t_acks, ack)
            if action == "reboot":
                print("reboot requested")
                link.goodbye("reboot")
                time.sleep_ms(100)
                machine.reset()

    def step(self):
        """One pass of the main loop."""
        wdt = self.wdt
        if wdt is not None:  # created in start(): creating a WDT starts its countdown
            wdt.feed()
        now = time.ticks_ms()
        if self.net.poll():
            if not self.link.up:
                self.link.connect()
        elif self.link.up:
            self.link.drop("Wi-Fi down")
        if time.ticks_diff(now, self._next) >= 0:
            interval = int(self.cfg["interval_s"] * 1000)
            self._next = time.ticks_add(self._next, interval)
            if time.ticks_diff(self._next, now) <= 0:  # fell behind: don't burst
                self._next = time.ticks_add(now, interval)
            self.sample()
        if self.link.up:
            self.link.poll()
            self.service_commands()
            self.drain()
        self.led.tick(self.up.update())

    def run(self):
        self.start()
        while True:
            self.step()
            wait = time.ticks_diff(self._next, time.ticks_ms())
            self.link.wait(max(1, min(_TICK_MS, wait)))


def main():
    try:
        Device().run()
    except KeyboardInterrupt:
        print("stopped")
    except Exception as e:
        sys.print_exception(e)
        print("fatal error, resetting in 5 s")
        time.sleep(5)
        machine.reset()


if __name__ == "__main__":
    main()
