# Host (unix port) stand-in for `network`: a fake station interface.
# If a file `wifi_down` exists in the current directory (the "flash" dir), the link is down:
# isconnected() is False and connect() does not succeed, so the firmware has to back off and retry.
import os
import time

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_WRONG_PASSWORD = 202
STAT_NO_AP_FOUND = 201
STAT_CONNECT_FAIL = 203
STAT_GOT_IP = 1010


def _down():
    try:
        os.stat("wifi_down")
        return True
    except OSError:
        return False


class WLAN:
    _state = {}

    def __init__(self, iface=STA_IF):
        self.iface = iface
        self._s = WLAN._state.setdefault(iface, {"active": False, "ssid": None})

    def active(self, v=None):
        if v is None:
            return self._s["active"]
        self._s["active"] = bool(v)

    def connect(self, ssid=None, key=None, **kw):
        if not self._s["active"]:
            raise OSError("STA must be active")
        self._s["ssid"] = ssid

    def disconnect(self):
        self._s["ssid"] = None

    def isconnected(self):
        return self._s["active"] and self._s["ssid"] is not None and not _down()

    def status(self, param=None):
        if param == "rssi":
            return -50 - (time.ticks_ms() // 1000) % 7
        if param is not None:
            raise ValueError("unknown status param")
        if not self._s["active"]:
            return STAT_IDLE
        if self._s["ssid"] is None:
            return STAT_IDLE
        return STAT_NO_AP_FOUND if _down() else STAT_GOT_IP

    def ifconfig(self, *args):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def config(self, *args, **kw):
        if args and args[0] == "mac":
            import machine
            return (machine.unique_id() + b"\0" * 6)[:6]
        return None
