"""Shared MQTT client helpers (paho-mqtt 2): one place that turns ``settings.mqtt_url`` into a configured client.

* :func:`new_client` builds a paho client (callback API v2) from an ``mqtt://`` / ``mqtts://`` URL: credentials,
  TLS (system CAs, or ``ca_file``), MQTT v5 or v3.1.1, persistent or clean session, receive-maximum, and paho's
  own reconnect backoff (used by ``loop_start``/``loop_forever``).
* :class:`FastClient` is a paho client that reads the socket in large chunks. Stock paho issues one ``recv``
  per byte of the fixed header plus one for the body (3+ system calls per message) and one ``select`` per packet;
  under load that is most of the bridge's CPU. FastClient keeps a user-space read buffer and lets the owner of the
  network loop drain every complete packet at once (:meth:`FastClient.read_packets`), and coalesces queued
  PUBACKs into one ``send``. Behaviour is otherwise paho's.
* :class:`Backoff` is exponential backoff with jitter for hand-written reconnect loops.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud.settings import mqtt_parts

log = logging.getLogger(__name__)

MQTTv5 = paho.MQTTv5
MQTTv311 = paho.MQTTv311
_PUBACK = 0x40
_READ_CHUNK = 256 * 1024


class Backoff:
    """Exponential backoff with full jitter: ``next()`` returns the next delay in seconds; ``reset()`` after
    a success."""

    def __init__(self, initial: float = 0.2, maximum: float = 10.0, factor: float = 2.0):
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self._current = initial

    def next(self) -> float:
        delay = self._current
        self._current = min(self.maximum, self._current * self.factor)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._current = self.initial


class FastClient(paho.Client):
    """paho Client with a buffered reader and coalesced PUBACK writes (see module docstring).

    Only the code that runs the network loop itself (``loop_read``/``loop_write``) benefits; with
    ``loop_start``/``loop_forever`` it behaves like a stock client (the buffer is still used)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

    # --- reading ----------------------------------------------------------------------------------------
    def _sock_recv(self, bufsize: int) -> bytes:
        avail = len(self._rbuf) - self._rpos
        if avail <= 0:
            data = super()._sock_recv(_READ_CHUNK)  # BlockingIOError when nothing is there
            if not data:
                return data  # EOF: paho treats it as connection lost
            self._rbuf, self._rpos, avail = data, 0, len(data)
        if bufsize >= avail and self._rpos == 0:
            out = self._rbuf
        else:
            out = self._rbuf[self._rpos:self._rpos + bufsize]
        self._rpos += len(out)
        return out

    def buffered(self) -> int:
        """Bytes already read from the socket and not yet parsed."""
        return len(self._rbuf) - self._rpos

    def read_packets(self, limit: int = 10_000) -> MQTTErrorCode:
        """Parse every complete packet that is available (at most ``limit``), reading the socket once more
        when the buffer runs dry. Returns paho's error code (non-zero: the connection is gone)."""
        for _ in range(limit):
            rc = self.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._sock is None:
                return rc
            if self.buffered() == 0:
                # one more packet may be half-parsed or the kernel may hold more; select() will tell
                if self._in_packet["command"] == 0:
                    break
                if not self._readable_now():
                    break
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _readable_now(self) -> bool:
        sock = self._sock
        if sock is None:
            return False
        if hasattr(sock, "pending") and sock.pending() > 0:
            return True
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))  # type: ignore[call-arg]
        except (BlockingIOError, ssl.SSLError, OSError, TypeError, ValueError):
            return False

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()

    # --- writing ----------------------------------------------------------------------------------------
    def _packet_write(self) -> MQTTErrorCode:
        out = self._out_packet
        # Coalesce a run of whole PUBACKs at the head of the queue into one send; anything else (PUBLISH with
        # its callbacks, DISCONNECT) goes through paho's own writer.
        if len(out) > 1 and out[0]["command"] & 0xF0 == _PUBACK and out[0]["pos"] == 0:
            chunks = []
            while out and out[0]["command"] & 0xF0 == _PUBACK and out[0]["pos"] == 0 and len(chunks) < 4096:
                chunks.append(out.popleft()["packet"])
            if len(chunks) > 1:
                data = b"".join(chunks)
                out.appendleft({"command": _PUBACK, "mid": 0, "qos": 0, "pos": 0, "to_process": len(data),
                                "packet": data, "info": None})
            else:
                out.appendleft({"command": _PUBACK, "mid": 0, "qos": 0, "pos": 0,
                                "to_process": len(chunks[0]), "packet": chunks[0], "info": None})
        return super()._packet_write()


def new_client(url: str, client_id: str, *, protocol: int = MQTTv5, clean_start: bool = True,
               session_expiry_s: int = 0, receive_maximum: int | None = None, ca_file: str | None = None,
               insecure_tls: bool = False, fast: bool = False, keepalive: int = 30,
               reconnect_min_s: float = 0.2, reconnect_max_s: float = 10.0) -> paho.Client:
    """A configured, not yet connected paho client for ``url`` (``mqtt://[user:pass@]host[:port]`` or
    ``mqtts://``). Connect with :func:`connect`, which applies the session options stored here."""
    parts = mqtt_parts(url)
    cls = FastClient if fast else paho.Client
    kwargs: dict[str, Any] = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": client_id,
                              "protocol": protocol}
    if protocol != MQTTv5:
        kwargs["clean_session"] = clean_start
    client = cls(**kwargs)
    if parts["username"] is not None:
        client.username_pw_set(str(parts["username"]), parts["password"])  # type: ignore[arg-type]
    if parts["tls"]:
        context = ssl.create_default_context(cafile=ca_file)
        if insecure_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        client.tls_set_context(context)
    client.reconnect_delay_set(min_delay=max(1, int(reconnect_min_s)), max_delay=max(1, int(reconnect_max_s)))
    client._iot_connect_opts = {  # type: ignore[attr-defined]
        "host": parts["host"], "port": parts["port"], "keepalive": keepalive, "protocol": protocol,
        "clean_start": clean_start, "session_expiry_s": session_expiry_s, "receive_maximum": receive_maximum,
    }
    return client


def connect_properties(client: paho.Client) -> Properties | None:
    opts = client._iot_connect_opts  # type: ignore[attr-defined]
    if opts["protocol"] != MQTTv5:
        return None
    props = Properties(PacketTypes.CONNECT)
    if opts["session_expiry_s"]:
        props.SessionExpiryInterval = int(opts["session_expiry_s"])
    if opts["receive_maximum"]:
        props.ReceiveMaximum = max(1, min(65535, int(opts["receive_maximum"])))
    return props


def connect(client: paho.Client, *, asynchronous: bool = False) -> None:
    """Open the TCP/TLS connection and send CONNECT (the CONNACK arrives through the network loop).
    ``asynchronous=True`` uses ``connect_async`` (for ``loop_start``, which then retries with paho's backoff).
    Raises OSError when the broker is unreachable (synchronous mode)."""
    opts = client._iot_connect_opts  # type: ignore[attr-defined]
    kwargs: dict[str, Any] = {"keepalive": opts["keepalive"]}
    if opts["protocol"] == MQTTv5:
        kwargs["clean_start"] = opts["clean_start"]
        kwargs["properties"] = connect_properties(client)
    if asynchronous:
        client.connect_async(opts["host"], opts["port"], **kwargs)
    else:
        client.connect(opts["host"], opts["port"], **kwargs)
