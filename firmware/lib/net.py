# Wi-Fi station with exponential backoff + jitter (non-blocking: call poll() from the main loop),
# NTP time sync, and a unix-ms clock that is right on every port.
import os
import time
import network
from micropython import const

# time.time() counts from 2000-01-01 on ESP32 (and most bare-metal ports), from 1970 on unix.
EPOCH_OFFSET_S = 946684800 if time.gmtime(0)[0] == 2000 else 0
_CONNECT_TIMEOUT_MS = const(15000)
_RESYNC_MS = const(6 * 3600 * 1000)


def jitter(ms):
    """ms scaled by a random factor in [0.5, 1.0)."""
    r = os.urandom(1)[0]
    return ms // 2 + (ms * r) // 512


class Backoff:
    def __init__(self, base_ms=500, max_ms=30000):
        self.base = base_ms
        self.max = max_ms
        self.n = 0
        self.due = time.ticks_ms()

    def ready(self):
        return time.ticks_diff(time.ticks_ms(), self.due) >= 0

    def fail(self):
        d = min(self.max, self.base << min(self.n, 16))
        self.n += 1
        d = jitter(d)
        self.due = time.ticks_add(time.ticks_ms(), d)
        return d

    def ok(self):
        self.n = 0
        self.due = time.ticks_ms()


def unix_ms():
    """Wall clock as unix milliseconds (only meaningful once the clock was synced)."""
    try:
        return time.time_ns() // 1000000 + EPOCH_OFFSET_S * 1000
    except AttributeError:
        return int(time.time() + EPOCH_OFFSET_S) * 1000


class Net:
    def __init__(self, ssid, password):
        self.ssid = ssid
        self.password = password
        self.wlan = network.WLAN(network.STA_IF)
        self.wlan.active(True)
        self.backoff = Backoff(1000, 60000)
        self._connecting = None  # ticks when connect() was issued
        self._was_up = False
        self.synced = False
        self._sync_backoff = Backoff(2000, 300000)
        self._synced_at = 0

    def isconnected(self):
        return self.wlan.isconnected()

    def rssi(self):
        try:
            return self.wlan.status("rssi")
        except Exception:
            return None

    def poll(self):
        """Keep the station connected without blocking. -> True when connected."""
        if self.wlan.isconnected():
            if not self._was_up:
                self._was_up = True
                self._connecting = None
                self.backoff.ok()
                print("net: Wi-Fi up", self.wlan.ifconfig()[0])
            self._maybe_sync()
            return True
        if self._was_up:
            self._was_up = False
            print("net: Wi-Fi lost")
        now = time.ticks_ms()
        if self._connecting is not None:
            if time.ticks_diff(now, self._connecting) < _CONNECT_TIMEOUT_MS:
                return False
            self._connecting = None
            d = self.backoff.fail()
            print("net: Wi-Fi connect timed out, retry in %d ms" % d)
            try:
                self.wlan.disconnect()
            except OSError:
                pass
            return False
        if not self.backoff.ready():
            return False
        try:
            self.wlan.connect(self.ssid, self.password)
            self._connecting = now
        except OSError as e:
            d = self.backoff.fail()
            print("net: Wi-Fi connect failed (%s), retry in %d ms" % (e, d))
        return False

    def _maybe_sync(self):
        if self.synced and time.ticks_diff(time.ticks_ms(), self._synced_at) < _RESYNC_MS:
            return
        if not self._sync_backoff.ready():
            return
        try:
            import ntptime
            ntptime.settime()
        except Exception as e:  # OSError, or ImportError on a port without ntptime
            d = self._sync_backoff.fail()
            if not self.synced:
                print("net: NTP sync failed (%s), retry in %d ms" % (e, d))
            return
        self._sync_backoff.ok()
        self.synced = True
        self._synced_at = time.ticks_ms()

    def now_ms(self):
        """unix ms, or None while the clock has never been synced."""
        return unix_ms() if self.synced else None
