# config.json on flash: load, validate key by key (a bad key prints a message naming it and falls back to
# a safe default), and write back atomically (tmp file + rename) when a command changes a setting.
import json
import os

FILE = "config.json"
_METRICS = ("t", "h", "p")


def _default_id():
    try:
        import machine
        import binascii
        return "esp32-" + binascii.hexlify(machine.unique_id()).decode()
    except Exception:
        return "esp32-unknown"


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return (isinstance(v, (int, float))) and not isinstance(v, bool) and v == v and v not in (
        float("inf"), float("-inf"))


def _int_range(lo, hi):
    def check(v):
        if not _is_int(v) or not lo <= v <= hi:
            return "must be an integer %d..%d" % (lo, hi)
    return check


def _str(maxlen, empty=True):
    def check(v):
        if not isinstance(v, str) or len(v) > maxlen or (not empty and not v):
            return "must be a %sstring of at most %d characters" % ("" if empty else "non-empty ", maxlen)
    return check


def _opt_str(maxlen):
    def check(v):
        if v is not None and (not isinstance(v, str) or len(v) > maxlen):
            return "must be null or a string of at most %d characters" % maxlen
    return check


def _bool(v):
    if not isinstance(v, bool):
        return "must be true or false"


def _interval(v):
    if not _is_num(v) or not 0.1 <= v <= 86400:
        return "must be a number of seconds 0.1..86400"


def _device_id(v):
    ok = isinstance(v, str) and 0 < len(v) <= 64 and v[0] not in "_.-"
    if ok:
        for ch in v:
            if not ("a" <= ch <= "z" or "A" <= ch <= "Z" or "0" <= ch <= "9" or ch in "_.-"):
                ok = False
                break
    if not ok:
        return "must be 1..64 characters A-Z a-z 0-9 _ . - (starting with a letter or digit)"


def _address(v):
    if not _is_int(v) or not 0x08 <= v <= 0x77:
        return "must be a 7-bit I2C address (0x76 or 0x77 for a BME280)"


def check_thresholds(v):
    """-> error text or None; v = {"t": {"min": x|null, "max": y|null}, ...}"""
    if not isinstance(v, dict):
        return "must be an object like {\"t\": {\"min\": 0, \"max\": 30}}"
    for k in v:
        if k not in _METRICS:
            return "unknown metric %r (expected t, h or p)" % k
        lim = v[k]
        if not isinstance(lim, dict):
            return "%s must be an object with min/max" % k
        for b in lim:
            if b not in ("min", "max"):
                return "%s.%s: expected min or max" % (k, b)
            if lim[b] is not None and not _is_num(lim[b]):
                return "%s.%s must be a number or null" % (k, b)
        lo, hi = lim.get("min"), lim.get("max")
        if lo is not None and hi is not None and lo > hi:
            return "%s.min %s is above %s.max %s" % (k, lo, k, hi)


# (dotted key, default, check)
SCHEMA = (
    ("wifi.ssid", "", _str(32)),
    ("wifi.password", "", _str(64)),
    ("mqtt.host", "127.0.0.1", _str(253, False)),
    ("mqtt.port", 1883, _int_range(1, 65535)),
    ("mqtt.tls", False, _bool),
    ("mqtt.ca", None, _opt_str(64)),  # CA file on flash (PEM or DER) that must have signed the broker's cert
    ("mqtt.user", None, _opt_str(128)),
    ("mqtt.password", None, _opt_str(128)),
    ("mqtt.keepalive", 30, _int_range(5, 3600)),
    ("device_id", None, _device_id),
    ("interval_s", 10, _interval),
    ("i2c.id", 0, _int_range(0, 1)),
    ("i2c.sda", 21, _int_range(0, 39)),
    ("i2c.scl", 22, _int_range(0, 39)),
    ("i2c.freq", 100000, _int_range(10000, 1000000)),
    ("sensor.address", 0x76, _address),
    ("led.pin", 2, _int_range(0, 39)),
    ("thresholds", {}, check_thresholds),
    ("wdt_s", 30, _int_range(5, 600)),
    ("backlog.ram", 16, _int_range(1, 256)),
    ("backlog.file", 500, _int_range(0, 100000)),
)
_SECRETS = ("wifi.password", "mqtt.password")


def _get(d, key):
    # the value always comes out of an index operation: a type checker would otherwise infer "dict | Unknown"
    # (the un-indexed argument) for every setting
    parts = key.split(".")
    try:
        for part in parts[:-1]:
            d = d[part]
        return d[parts[-1]]
    except (KeyError, TypeError, IndexError):  # missing, or indexing a leaf (number, string, list)
        raise KeyError(key)


def _put(d, key, value):
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[parts[-1]] = value


def _copy(v):
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    return v


def warn(msg):
    print("config: " + msg)


class Config:
    def __init__(self, raw=None, path=FILE):
        self.path = path
        self.data = {}
        self.errors = []
        raw = raw if isinstance(raw, dict) else {}
        known = set()
        for key, default, check in SCHEMA:
            known.add(key.split(".")[0])
            if key == "device_id" and default is None:
                default = _default_id()
            try:
                v = _get(raw, key)
            except KeyError:
                v = _copy(default)
            else:
                if key == "sensor.address" and isinstance(v, str):
                    try:
                        v = int(v, 0)
                    except ValueError:
                        pass
                err = check(v)
                if err:
                    self.errors.append(key)
                    warn("bad value for '%s' (%s): %s; using default %s" % (key, json.dumps(v), err,
                                                                          json.dumps(default)))
                    v = _copy(default)
            _put(self.data, key, v)
        for k in raw:
            if k not in known:
                warn("unknown key '%s' ignored" % k)

    @classmethod
    def load(cls, path=FILE):
        try:
            with open(path) as f:
                raw = json.load(f)
        except OSError:
            warn("%s not found, using defaults" % path)
            raw = {}
        except ValueError as e:
            warn("%s is not valid JSON (%s), using defaults" % (path, e))
            raw = {}
        if not isinstance(raw, dict):
            warn("%s must hold a JSON object, using defaults" % path)
            raw = {}
        cfg = cls(raw, path)
        import gc
        gc.collect()  # free the parse garbage before main.py imports (compiles) the next modules
        return cfg

    def get(self, key):
        return _get(self.data, key)

    def __getitem__(self, key):
        return _get(self.data, key)

    def set(self, key, value):
        """Validate and change one setting (in RAM); raises ValueError naming the key."""
        for k, _, check in SCHEMA:
            if k == key:
                err = check(value)
                if err:
                    raise ValueError("%s %s" % (key, err))
                _put(self.data, key, _copy(value))
                return
        raise ValueError("unknown setting %r" % key)

    def save(self):
        """Atomic write-back: write config.json.tmp, then rename over config.json."""
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        try:
            os.rename(tmp, self.path)
        except OSError:  # FAT cannot rename over an existing file
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.rename(tmp, self.path)

    def public(self):
        """The configuration without secrets (for get_config)."""
        d = _copy(self.data)
        for key in _SECRETS:
            sect, name = key.split(".")
            d.get(sect, {}).pop(name, None)
        return d
