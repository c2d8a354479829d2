"""Shared MQTT client helpers (paho-mqtt 2): one place that turns ``settings.mqtt_url`` into a configured client.

* :func:`new_client` builds a paho client (callback API v2) from an ``mqtt://`` / ``mqtts://`` URL: credentials,
  TLS (system CAs, or ``ca_file``), MQTT v5 or v3.1.1, persistent or clean session, receive-maximum, and paho's
  own reconnect backoff (used by ``loop_start``/``loop_forever``).
* :class:`FastClient` is a paho client for code that runs its own network loop. Stock paho issues one ``recv``
  per byte of the fixed header plus one for the body (3+ system calls per message), one ``select`` per packet,
  and builds an MQTTMessage (with a Condition) and a v5 Properties object per PUBLISH; under load that is most of
  the bridge's CPU. FastClient parses packets out of a user-space buffer filled by large reads
  (:meth:`FastClient.read_packets`), decodes QoS 0/1 PUBLISH itself and hands them over a batch per read
  when ``fast_on_batch`` is set, and writes many PUBACKs as one ``send`` (:meth:`FastClient.ack_many`).
  Everything else (CONNACK, SUBACK, PINGRESP, QoS 2, DISCONNECT) is handled by paho. Written against paho-mqtt 2.2.0 (pinned): it overrides private methods.
* :class:`Backoff` is exponential backoff with jitter for hand-written reconnect loops.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import struct
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.client import time_func
from paho.mqtt.exception import MalformedPacket
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


_DEFAULT_IN_PACKET = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                      "remaining_length": 0, "packet": b"", "to_process": 0, "pos": 0}


class FastClient(paho.Client):
    """paho Client with a buffered packet reader, a batched PUBLISH path and batched PUBACK writes.

    For the owner of the network loop (``read_packets``/``loop_write``/``loop_misc``). When ``fast_on_batch``
    is set, PUBLISH packets with QoS 0/1 are decoded here (MQTT v5 properties are skipped, no
    MQTTMessage/MQTTMessageInfo objects, no per-topic callback matching) and handed over in arrival order as
    one list of ``(mid, qos, topic_bytes, payload_bytes)`` per read: ``fast_on_batch(client, userdata, batch)``
    (the list is reused afterwards: do not keep it). The batch is
    handed over before any other packet is dispatched, so the order of packets is kept. Every other packet goes
    through paho's own handlers. ``ack_many(mids)`` queues the PUBACKs of many messages as one write."""

    fast_on_batch: Callable[[Any, Any, list[tuple[int, int, bytes, bytes]]], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

    # --- reading ----------------------------------------------------------------------------------------
    def _sock_recv(self, bufsize: int) -> bytes:
        # used by paho's own reader (loop_read); shares the buffer with read_packets
        avail = len(self._rbuf) - self._rpos
        if avail <= 0:
            data = super()._sock_recv(_READ_CHUNK)  # BlockingIOError when nothing is there
            if not data:
                return data  # EOF: paho treats it as connection lost
            self._rbuf, self._rpos, avail = data, 0, len(data)
        out = self._rbuf[self._rpos:self._rpos + bufsize]
        self._rpos += len(out)
        return out

    def buffered(self) -> int:
        """Bytes already read from the socket and not yet parsed."""
        return len(self._rbuf) - self._rpos

    def read_packets(self, limit: int = 1000) -> MQTTErrorCode:
        """Handle up to ``limit`` complete packets, reading the socket whenever the buffer runs dry, until it
        would block. Returns paho's error code (non-zero: the connection is gone, on_disconnect was called)."""
        if self._in_packet["command"] != 0:  # paho's reader is mid-packet: let it finish first
            return self.loop_read()
        on_batch = self.fast_on_batch
        batch: list[tuple[int, int, bytes, bytes]] = []
        try:
            return self._read_packets(limit, on_batch, batch)
        finally:
            if batch:
                self._hand_over(on_batch, batch)

    def _hand_over(self, on_batch, batch: list) -> None:
        try:
            on_batch(self, self._userdata, batch)
        except Exception:  # noqa: BLE001 (a callback bug must not kill the connection)
            log.exception("error in MQTT message callback")
        if not self._manual_ack:
            self.ack_many([mid for mid, qos, _, _ in batch if qos == 1])
        batch.clear()

    def _read_packets(self, limit: int, on_batch, batch: list) -> MQTTErrorCode:
        v5 = self._protocol == MQTTv5
        handled = 0
        received = False
        append = batch.append
        try:
            while handled < limit:
                buf, pos = self._rbuf, self._rpos
                n = len(buf)
                if n - pos >= 2:
                    header = buf[pos]
                    length, mult, i = 0, 1, pos + 1
                    complete = False
                    while i < n:
                        byte = buf[i]
                        i += 1
                        length += (byte & 127) * mult
                        mult <<= 7
                        if not byte & 128:
                            complete = True
                            break
                        if i - pos > 4:
                            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
                    end = i + length
                    if complete and n >= end:
                        self._rpos = end
                        handled += 1
                        received = True
                        if on_batch is not None and header & 0xF0 == 0x30 and header & 0x06 != 0x04:
                            # PUBLISH, QoS 0 or 1: topic length, topic, [packet id], [v5 properties], payload
                            p = i + 2
                            if p > end:
                                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
                            t = p + ((buf[i] << 8) | buf[i + 1])
                            p = t
                            mid = 0
                            if header & 0x06:
                                p += 2
                                if p > end:
                                    return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
                                mid = (buf[t] << 8) | buf[t + 1]
                            if v5:
                                plen, mult = 0, 1
                                while True:
                                    if p >= end:
                                        return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
                                    byte = buf[p]
                                    p += 1
                                    plen += (byte & 127) * mult
                                    mult <<= 7
                                    if not byte & 128:
                                        break
                                p += plen
                            if p > end:
                                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
                            append((mid, (header >> 1) & 3, buf[i + 2:t], buf[p:end]))
                            continue
                        if batch:  # keep the order: the messages before this packet are handled first
                            self._hand_over(on_batch, batch)
                        rc = self._dispatch(header, buf[i:end])
                        if rc:
                            return self._loop_rc_handle(rc)
                        if self._sock is None:
                            return MQTTErrorCode.MQTT_ERR_NO_CONN
                        continue
                sock = self._sock
                if sock is None:
                    return MQTTErrorCode.MQTT_ERR_NO_CONN
                try:
                    data = sock.recv(_READ_CHUNK)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError):
                    break
                except OSError as exc:
                    log.debug("MQTT socket read failed: %s", exc)
                    return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
                if not data:
                    return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
                self._rbuf = buf[pos:] + data if pos < n else data
                self._rpos = 0
                self._last_bytes_received = time_func()
        finally:
            if received:
                # paho's keepalive looks at the time of the last whole packet read
                self._last_msg_in = time_func()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _dispatch(self, header: int, body: bytes) -> MQTTErrorCode:
        self._in_packet = {**_DEFAULT_IN_PACKET, "command": header, "have_remaining": 1,
                           "remaining_length": len(body), "packet": bytearray(body), "remaining_count": []}
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            log.debug("malformed MQTT packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        finally:
            self._in_packet = {**_DEFAULT_IN_PACKET, "packet": bytearray(b""), "remaining_count": []}
        return rc

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()

    # --- writing ----------------------------------------------------------------------------------------
    def ack_many(self, mids: list[int]) -> None:
        """Queue the PUBACKs of ``mids`` (in this order) as one packet write. A PUBACK is 0x40 0x02 + the
        packet id; with MQTT v5 the reason code "success" may be left out (MQTT 5, 3.4.2.1)."""
        if not mids or self._sock is None:
            return
        data = struct.pack(f">{len(mids)}I", *[0x40020000 | mid for mid in mids])
        self._out_packet.append({"command": _PUBACK, "mid": 0, "qos": 0, "pos": 0, "to_process": len(data),
                                 "packet": data, "info": None})

    def _packet_write(self) -> MQTTErrorCode:
        out = self._out_packet
        # Coalesce a run of whole PUBACKs at the head of the queue into one send; anything else (PUBLISH with
        # its callbacks, DISCONNECT) goes through paho's own writer.
        if len(out) > 1 and out[0]["command"] & 0xF0 == _PUBACK and out[0]["pos"] == 0:
            chunks = []
            while out and out[0]["command"] & 0xF0 == _PUBACK and out[0]["pos"] == 0 and len(chunks) < 4096:
                chunks.append(out.popleft()["packet"])
            data = b"".join(chunks)
            out.appendleft({"command": _PUBACK, "mid": 0, "qos": 0, "pos": 0, "to_process": len(data),
                            "packet": data, "info": None})
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
