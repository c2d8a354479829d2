"""Webhooks: which URLs may be one, how a POST to one is made and signed. The notifier (cloud.notifier) delivers
alarm events with it; the web tier checks new URLs and sends test events with it.

Addresses
    Unless ``IOT_WEBHOOK_ALLOW_PRIVATE``, a URL whose host is or resolves to a loopback, private, link-local or
    otherwise non-public address is refused: at creation (literal addresses and ``localhost``, :func:`check_url`)
    and at every POST (:func:`resolve`), and the connection goes to one of the addresses that were checked (the
    first that accepts it), so a DNS answer that changes in between cannot point it at the platform's own network.
    HTTPS certificates are verified for the URL's host name; redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import uuid
from urllib.parse import urlsplit

from cloud import schema

TIMEOUT_S = 5.0


class BlockedAddress(ValueError):
    """The webhook's host is (or resolves to) an address the notifier must not call."""


def check_url(url: str, allow_private: bool) -> str:
    """``url`` if it can be a webhook, else ValueError saying why: http(s), a host, at most 2048 characters, and
    (unless ``allow_private``) no literal non-public address or ``localhost``. Names are checked at delivery."""
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise ValueError("the URL must be 1..2048 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("the URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.username or parts.password:
        raise ValueError("credentials in the URL are not supported: the signature authenticates the notifier")
    try:
        parts.port
    except ValueError:
        raise ValueError("the URL's port is not a number 0..65535") from None
    if not allow_private:
        host = parts.hostname
        if host == "localhost" or host.endswith(".localhost"):
            raise BlockedAddress(f"{host} is this machine, not a public address")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return url  # a name: resolved and checked at every delivery
        if not address.is_global:
            raise BlockedAddress(f"{host} is not a public address")
    return url


def resolve(host: str, port: int, allow_private: bool) -> list[str]:
    """The addresses to try for ``host``, in the resolver's order, after every one of them was checked."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise OSError(f"{host} has no address")
    if not allow_private:
        for address in addresses:
            if not ipaddress.ip_address(address.split("%", 1)[0]).is_global:
                raise BlockedAddress(f"{host} resolves to {address}, not a public address")
    return addresses


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to an address checked beforehand, with the certificate verified for the URL's host name."""

    def __init__(self, address: str, port: int, hostname: str, timeout: float, context: ssl.SSLContext):
        super().__init__(address, port, timeout=timeout, context=context)
        self._hostname = hostname

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._hostname)  # type: ignore[attr-defined]


def post(url: str, body: bytes, headers: dict[str, str], allow_private: bool,
         tls: ssl.SSLContext | None = None) -> tuple[int | None, str]:
    """One POST of ``body`` to ``url``: (HTTP status, detail), (0, why) for an address that must not be called,
    or (None, what went wrong before an answer). Redirects are not followed."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    try:
        conn = _connect(resolve(parts.hostname, port, allow_private), port, parts.hostname if https else None,
                        tls or ssl.create_default_context())
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.netloc.rsplit("@", 1)[-1]  # the URL's host[:port], as a browser would send it
            conn.request("POST", path, body=body, headers={**headers, "Host": host})
            response = conn.getresponse()
            response.read(65536)
            return response.status, f"HTTP {response.status}"
        finally:
            conn.close()
    except BlockedAddress as exc:
        return 0, str(exc)  # not retried: a status outside 2xx/408/429/5xx
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:200]


def _connect(addresses: list[str], port: int, tls_hostname: str | None,
             tls: ssl.SSLContext) -> http.client.HTTPConnection:
    """A connection to the first of ``addresses`` that accepts one (a name with an IPv6 and an IPv4 address may
    answer on only one of them), TLS verified for ``tls_hostname`` when given."""
    error: OSError | None = None
    for address in addresses:
        if tls_hostname is not None:
            conn: http.client.HTTPConnection = _PinnedHTTPSConnection(address, port, tls_hostname, TIMEOUT_S, tls)
        else:
            conn = http.client.HTTPConnection(address, port, timeout=TIMEOUT_S)
        try:
            conn.connect()
            return conn
        except ssl.SSLError:
            conn.close()
            raise  # the endpoint answered; its certificate is wrong: another address would not change that
        except OSError as exc:
            conn.close()
            error = exc
    raise error or OSError("no address to connect to")


def send_test_event(url: str, secret: str, tenant_id: int, allow_private: bool) -> tuple[bool, int | None, str]:
    """A test event, signed like an alarm event, sent once (the admin page's "Send test"): (delivered, status,
    detail). The body says ``"type": "test"`` and has no ``alarm_id``, so a receiver cannot take it for an alarm."""
    body = json.dumps({"v": 1, "type": "test", "tenant": str(tenant_id), "ts": schema.now_ms()},
                      separators=(",", ":")).encode()
    status, detail = post(url, body, delivery_headers(secret, body, f"test.{uuid.uuid4()}"), allow_private)
    return status is not None and 200 <= status < 300, status, detail


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_headers(secret: str, body: bytes, delivery: str) -> dict[str, str]:
    """The headers of every webhook POST: JSON, the delivery id (the same on a repeat) and the body's signature."""
    return {"Content-Type": "application/json", "User-Agent": "iot-platform-notifier", "X-IoT-Delivery": delivery,
            "X-IoT-Signature": signature(secret, body)}
