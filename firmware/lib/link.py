# MQTT session on umqtt.simple: last will, retained online status, command subscription, keepalive,
# reconnect with backoff.
#
# Client fixes umqtt.simple 1.3.4's known problems:
# - packet ids wrap 65535 -> 1 (upstream packs pid+1 with "!H" and raises after 65535 publishes);
# - every packet goes out in ONE write (upstream writes header, topic, pid and payload separately, so
#   Nagle + delayed ACK add ~40 ms to each QoS1 round trip) and TCP_NODELAY is set where the port has it;
# - reads have a timeout (upstream blocks forever if the broker vanishes during a PUBACK wait);
# - any packet type is consumed whole (PUBACK/SUBACK/PINGRESP tracked), so the stream never desyncs.
import json
import select
import time
import socket
import struct
from micropython import const
from umqtt.simple import MQTTClient, MQTTException
from net import Backoff

_IPPROTO_TCP = const(6)
_TCP_NODELAY = const(1)
_INBOX_MAX = const(8)


class Client(MQTTClient):
    def __init__(self, *args, timeout_s=5, **kw):
        super().__init__(*args, **kw)
        self.timeout = timeout_s
        self.acked = 0
        self.suback = None
        self.last_rx = time.ticks_ms()
        self.last_tx = self.last_rx

    def _pid(self):
        self.pid = self.pid % 65535 + 1
        return self.pid

    def _send(self, buf):
        self.sock.write(buf)
        self.last_tx = time.ticks_ms()

    def _read(self, n):
        b = self.sock.read(n)
        if not b or len(b) != n:
            raise OSError(-1)  # connection closed
        return b

    @staticmethod
    def _varlen(n):
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | 0x80 if n else b)
            if not n:
                return out

    @staticmethod
    def _s(s):
        if isinstance(s, str):
            s = s.encode()
        return struct.pack("!H", len(s)) + s

    def connect(self, clean_session=True, timeout=None):
        # timeout: umqtt.simple >= 1.4's signature; overrides timeout_s for the connect only
        addr = socket.getaddrinfo(self.server, self.port)[0][-1]
        self.sock = socket.socket()
        self.raw = self.sock  # timeouts are set on the TCP socket (a TLS socket has no settimeout)
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            self.sock.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        except (OSError, TypeError):
            pass
        self.sock.connect(addr)
        if self.ssl:
            if hasattr(self.ssl, "wrap_socket"):  # an SSLContext that verifies the broker (tls_context())
                self.sock = self.ssl.wrap_socket(self.sock, server_hostname=self.server)
            else:
                # the port's ssl module has wrap_socket; the stubs only know it on ssl, not on tls
                self.sock = _ssl().wrap_socket(  # pyright: ignore[reportAttributeAccessIssue]
                    self.sock, server_hostname=self.server, **self.ssl_params)
        flags = clean_session << 1
        body = bytearray(b"\x00\x04MQTT\x04\x00\x00\x00")
        body[8] = self.keepalive >> 8
        body[9] = self.keepalive & 0xFF
        body += self._s(self.client_id)
        if self.lw_topic:
            flags |= 0x04 | (self.lw_qos & 3) << 3 | self.lw_retain << 5
            body += self._s(self.lw_topic) + self._s(self.lw_msg)
        if self.user is not None:
            flags |= 0x80
            body += self._s(self.user)
            if self.pswd is not None:
                flags |= 0x40
                body += self._s(self.pswd)
        body[7] = flags
        self._send(b"\x10" + self._varlen(len(body)) + body)
        resp = self._read(4)
        if resp[0] != 0x20 or resp[1] != 0x02:
            raise MQTTException("bad CONNACK")
        if resp[3] != 0:
            raise MQTTException(resp[3])
        self.last_rx = time.ticks_ms()
        return resp[2] & 1

    def publish(self, topic, msg, retain=False, qos=0):
        if isinstance(topic, str):
            topic = topic.encode()
        if isinstance(msg, str):
            msg = msg.encode()
        sz = 2 + len(topic) + len(msg) + (2 if qos else 0)
        hdr = bytes((0x30 | qos << 1 | retain,)) + self._varlen(sz) + self._s(topic)
        pid = 0
        if qos:
            pid = self._pid()
            hdr += struct.pack("!H", pid)
        self._send(hdr + msg)
        if qos == 1:
            t0 = time.ticks_ms()
            while self.acked != pid:
                self.wait_msg()
                if time.ticks_diff(time.ticks_ms(), t0) > self.timeout * 1000:
                    raise OSError(110)  # ETIMEDOUT: no PUBACK
        elif qos == 2:
            raise ValueError("QoS 2 not supported")

    def subscribe(self, topic, qos=0):
        pid = self._pid()
        body = struct.pack("!H", pid) + self._s(topic) + bytes((qos,))
        self._send(b"\x82" + self._varlen(len(body)) + body)
        t0 = time.ticks_ms()
        while self.suback is None or self.suback[0] != pid:
            self.wait_msg()
            if time.ticks_diff(time.ticks_ms(), t0) > self.timeout * 1000:
                raise OSError(110)
        if self.suback[1] == 0x80:
            raise MQTTException("subscription refused")

    def ping(self):
        self._send(b"\xc0\x00")

    def disconnect(self):
        try:
            self._send(b"\xe0\x00")
        finally:
            self.sock.close()

    def wait_msg(self):
        """Read and handle one whole packet. -> its type byte, or None if nothing was waiting."""
        res = self.sock.read(1)
        self.raw.settimeout(self.timeout)
        if res is None:
            return None
        if res == b"":
            raise OSError(-1)  # connection closed by the broker
        op = res[0]
        sz = self._recv_len()
        body = self._read(sz) if sz else b""
        self.last_rx = time.ticks_ms()
        kind = op & 0xF0
        if kind == 0x30:
            tl = body[0] << 8 | body[1]
            topic = body[2:2 + tl]
            i = 2 + tl
            qos = (op >> 1) & 3
            pid = 0
            if qos:
                pid = body[i] << 8 | body[i + 1]
                i += 2
            self.cb(topic, body[i:])
            if qos == 1:
                self._send(b"\x40\x02" + struct.pack("!H", pid))
        elif kind == 0x40:
            self.acked = body[0] << 8 | body[1]
        elif kind == 0x90:
            self.suback = (body[0] << 8 | body[1], body[2])
        return op

    def _recv_len(self):
        n = 0
        sh = 0
        while True:
            b = self._read(1)[0]
            n |= (b & 0x7F) << sh
            if not b & 0x80:
                return n
            sh += 7

    def check_msg(self):
        self.raw.setblocking(False)
        return self.wait_msg()


def _ssl():
    try:
        import ssl  # a frozen module on the ESP32 and the unix port...
    except ImportError:
        import tls as ssl  # ...hidden on the unix port when MICROPYPATH leaves out .frozen
    return ssl


def _der(data):
    """PEM -> DER (the port's mbedtls takes DER as cadata); DER passes through."""
    if data[:5] != b"-----":
        return data
    import binascii
    lines = [ln.strip() for ln in data.split(b"\n")]
    body = b"".join(ln for ln in lines if ln and not ln.startswith(b"-----"))
    return binascii.a2b_base64(body)


def tls_context(m):
    """-> what Client's ``ssl`` argument takes: False (plain), True (TLS without verifying the broker: only when
    no CA is configured) or an SSLContext that requires the broker's certificate to chain to mqtt.ca and to
    name mqtt.host."""
    if not m["tls"]:
        return False
    if not m.get("ca"):
        print("link: WARNING mqtt.tls without mqtt.ca: the broker is NOT verified")
        return True
    ssl = _ssl()
    with open(m["ca"], "rb") as f:
        cadata = _der(f.read())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED  # pyright: ignore[reportAttributeAccessIssue]  (stubs: no setter on tls)
    try:
        ctx.load_verify_locations(cadata=cadata)  # ssl.SSLContext
    except TypeError:
        ctx.load_verify_locations(cadata)  # tls.SSLContext takes it positionally
    return ctx


class Link:
    """One MQTT session for the device: call poll() from the main loop."""

    def __init__(self, cfg, device_id, boot, fw):
        self.cfg = cfg
        self.id = device_id
        self.boot = boot
        self.fw = fw
        base = "devices/" + device_id + "/"
        self.t_telemetry = base + "telemetry"
        self.t_status = base + "status"
        self.t_acks = base + "acks"
        self.t_commands = base + "commands"
        self.client = None
        self.up = False
        self.backoff = Backoff(500, 15000)
        self.inbox = []
        self.dropped_cmds = 0
        self.connects = 0
        self._ping_sent = None
        self._poller = None

    def _on_msg(self, topic, msg):
        # called from inside umqtt (possibly during a PUBACK wait): only queue, never publish here
        if len(self.inbox) < _INBOX_MAX:
            self.inbox.append(bytes(msg))
        else:
            self.dropped_cmds += 1

    def status_payload(self, state, **extra):
        d = {"v": 1, "state": state, "id": self.id}
        if state == "online":
            d["boot"] = self.boot
            d["fw"] = self.fw
        d.update(extra)
        return json.dumps(d)

    def connect(self):
        """One connection attempt if the backoff allows it. -> True when the session is up."""
        if self.up:
            return True
        if not self.backoff.ready():
            return False
        m = self.cfg["mqtt"]
        ka = m["keepalive"]
        try:
            tls = tls_context(m)
        except (OSError, ValueError, ImportError) as e:
            d = self.backoff.fail()
            print("link: cannot use CA file %r (%r), retry in %d ms" % (m.get("ca"), e, d))
            return False
        c = Client(self.id, m["host"], m["port"], user=m["user"], password=m["password"], keepalive=ka,
                   ssl=tls, timeout_s=5)
        c.set_callback(self._on_msg)
        c.set_last_will(self.t_status, self.status_payload("offline"), retain=True, qos=1)
        try:
            c.connect(clean_session=False)
            self.client = c
            c.publish(self.t_status, self.status_payload("online"), retain=True, qos=1)
            c.subscribe(self.t_commands, qos=1)
        except (OSError, MQTTException, IndexError, ValueError) as e:
            self._close()
            d = self.backoff.fail()
            print("link: MQTT connect to %s:%d failed (%r), retry in %d ms" % (m["host"], m["port"], e, d))
            return False
        self.up = True
        self.connects += 1
        self._ping_sent = None
        self._poller = select.poll()  # once per session: wait() then allocates nothing
        self._poller.register(c.sock, select.POLLIN)
        self.backoff.ok()
        print("link: MQTT up (%s:%d)" % (m["host"], m["port"]))
        return True

    def _close(self):
        if self.client is not None and self.client.sock is not None:
            try:
                self.client.sock.close()
            except OSError:
                pass
        self.client = None
        self.up = False
        self._poller = None

    # Idle for up to ms, back as soon as the broker sends something (a command is handled at once, not at
    # the next tick). One blocking poll; ipoll allocates nothing. (The unix port's sleep_ms wakes every ms:
    # ~4 % of a PC core per idle device.)
    def wait(self, ms):
        p = self._poller
        if self.up and p is not None:
            for _ in p.ipoll(ms):
                break
        else:
            time.sleep_ms(ms)

    def drop(self, why):
        if self.up:
            print("link: MQTT down:", why)
            self.backoff.fail()
        self._close()

    def publish(self, topic, payload, retain=False):
        """QoS1 publish; -> True once the broker acknowledged it, False (and link down) on failure."""
        c = self.client
        if not self.up or c is None:
            return False
        try:
            c.publish(topic, payload, retain=retain, qos=1)
            return True
        except (OSError, MQTTException, IndexError) as e:
            self.drop("publish failed: %r" % (e,))
            return False

    def poll(self):
        """Receive pending packets (commands are queued in self.inbox) and keep the session alive."""
        c = self.client
        if not self.up or c is None:
            return
        try:
            for _ in range(8):
                if c.check_msg() is None:
                    break
            ka = self.cfg["mqtt"]["keepalive"] * 1000
            now = time.ticks_ms()
            if time.ticks_diff(now, c.last_rx) > ka + ka // 2:
                self.drop("no answer from broker for %d ms" % time.ticks_diff(now, c.last_rx))
                return
            if time.ticks_diff(now, c.last_tx) > ka // 2:  # the broker's keepalive counts our packets
                c.ping()
        except (OSError, MQTTException, IndexError) as e:
            self.drop("receive failed: %r" % (e,))

    def goodbye(self, reason):
        """Clean shutdown before a reboot: retained offline status, then DISCONNECT."""
        c = self.client
        if self.up and c is not None:
            try:
                c.publish(self.t_status, self.status_payload("offline", reason=reason), retain=True, qos=1)
                c.disconnect()
            except (OSError, MQTTException, IndexError):
                pass
        self._close()
