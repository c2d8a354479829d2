# Command dispatch and acks.
# command: {"v":1,"cid":"..","op":"..","args":{..},"exp":<unix ms>}
# ack:     {"v":1,"id":"..","cid":"..","ok":true|false,"err":null|"..","result":{..}}
# A cid seen recently is not executed again: the stored ack is sent again.
import json
from micropython import const

_RECENT = const(16)
OPS = ("set_interval", "set_thresholds", "led", "ping", "reboot", "get_config")


class Led:
    """on / off / blink, plus 'alarm' blinking while a local threshold is exceeded (when not forced)."""

    def __init__(self, pin):
        self.pin = pin
        self.state = "off"
        self.forced = False
        self.alarm = False
        self._phase = 0
        pin.value(0)

    def set(self, state):
        self.state = state
        self.forced = True
        self.tick(0)

    def tick(self, ms_phase):
        blink = self.state == "blink" if self.forced else self.alarm
        if blink:
            v = (ms_phase // 500) & 1
        else:
            v = 1 if (self.forced and self.state == "on") else 0
        if v != self._phase:
            self._phase = v
            self.pin.value(v)


def exceeded(thresholds, t, h, p):
    """-> True if a reading is outside a local threshold."""
    for k, v in (("t", t), ("h", h), ("p", p)):
        lim = thresholds.get(k)
        if v is None or not lim:
            continue
        lo, hi = lim.get("min"), lim.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return True
    return False


class Commands:
    def __init__(self, device_id, cfg, led, uptime_s, now_ms):
        self.id = device_id
        self.cfg = cfg
        self.led = led
        self.uptime_s = uptime_s  # callable
        self.now_ms = now_ms  # callable -> unix ms or None when unsynced
        self._cids = [None] * _RECENT  # type: list
        self._acks = [None] * _RECENT  # type: list
        self._i = 0
        self.executed = 0

    def _ack(self, cid, ok, err=None, result=None):
        d = {"v": 1, "id": self.id, "cid": cid, "ok": ok, "err": err}
        if result is not None:
            d["result"] = result
        return json.dumps(d)

    def handle(self, payload):
        """-> (ack_json or None, action) where action is "reboot" or None."""
        try:
            cmd = json.loads(payload)
        except ValueError:
            print("commands: not JSON, ignored:", payload[:80])
            return None, None
        if not isinstance(cmd, dict) or not isinstance(cmd.get("cid"), str) or not cmd["cid"]:
            print("commands: no cid, ignored:", payload[:80])
            return None, None
        cid = cmd["cid"][:64]
        for i in range(_RECENT):
            if self._cids[i] == cid:
                print("commands: repeated cid %s, sending the same ack" % cid)
                return self._acks[i], None
        ack, action = self._run(cid, cmd)
        self._cids[self._i] = cid
        self._acks[self._i] = ack
        self._i = (self._i + 1) % _RECENT
        return ack, action

    def _run(self, cid, cmd):
        if cmd.get("v", 1) != 1:
            return self._ack(cid, False, "unsupported version %r" % (cmd.get("v"),)), None
        op = cmd.get("op")
        args = cmd.get("args")
        if args is None:
            args = {}
        exp = cmd.get("exp")
        if exp is not None:
            if not isinstance(exp, (int, float)) or isinstance(exp, bool):
                return self._ack(cid, False, "exp must be unix milliseconds"), None
            now = self.now_ms()
            if now is not None and exp < now:
                return self._ack(cid, False, "expired"), None
        if op not in OPS:
            return self._ack(cid, False, "unknown op %r" % (op,)), None
        if not isinstance(args, dict):
            return self._ack(cid, False, "args must be an object"), None
        try:
            result = getattr(self, "op_" + op)(args)
        except ValueError as e:
            return self._ack(cid, False, str(e)), None
        except OSError as e:
            return self._ack(cid, False, "flash write failed: %s" % e), None
        self.executed += 1
        return self._ack(cid, True, None, result), ("reboot" if op == "reboot" else None)

    # -- ops: return the ack's result, raise ValueError for bad args
    def op_set_interval(self, args):
        s = args.get("s")
        self.cfg.set("interval_s", s)  # validates, raises ValueError naming the key
        self.cfg.save()
        return {"interval_s": s}

    def op_set_thresholds(self, args):
        import config
        new = dict(self.cfg["thresholds"])
        err = config.check_thresholds(args)
        if err:
            raise ValueError("thresholds " + err)
        for k in args:
            new[k] = args[k]
        self.cfg.set("thresholds", new)
        self.cfg.save()
        return {"thresholds": new}

    def op_led(self, args):
        state = args.get("state")
        if state not in ("on", "off", "blink"):
            raise ValueError("led state must be on, off or blink")
        self.led.set(state)
        return {"led": state}

    def op_ping(self, args):
        return {"pong": True, "up": self.uptime_s()}

    def op_get_config(self, args):
        return self.cfg.public()

    def op_reboot(self, args):
        return {"rebooting": True}
