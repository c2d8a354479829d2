"""The notifier: a tenant's alarm events, POSTed to the tenant's webhooks. ``python -m cloud notifier``.

Consumer group ``notifier`` on the alarms topic. Every alarm event (raised, acknowledged, cleared) goes to each
webhook of the event's tenant whose ``min_severity`` it reaches, as one POST::

    POST <url>
    Content-Type: application/json
    X-IoT-Delivery: <alarm_id>.<state>      the same on a redelivery: a receiver drops what it has seen
    X-IoT-Signature: sha256=<hex>           HMAC-SHA256 of the body with the webhook's secret
    <the alarm event, the bytes as they are on the alarms topic>

At least once, nothing dropped silently
    A 2xx answer delivers. A timeout, a refused connection, 408, 429 or a 5xx is tried again after
    ``RETRY_DELAYS_S``; any other answer (a 4xx, a redirect: redirects are not followed) ends it at once. A
    delivery that ends without success becomes a dead-letter record (``schema.dead_letter``, the reason names the
    webhook and what failed), and the webhook is paused for ``PAUSE_S``: its deliveries meanwhile go straight to
    the dead-letter topic, so one endpoint that is down does not hold up the other tenants' notifications. The
    batch's offsets are committed once every delivery of it has ended (delivered or dead-lettered), so a crash
    sends again, never loses. The deliveries of a batch run in parallel: receivers order events by their ``ts``.

Addresses
    Unless ``IOT_WEBHOOK_ALLOW_PRIVATE``, a URL whose host is or resolves to a loopback, private, link-local or
    otherwise non-public address is refused: at creation (literal addresses and ``localhost``) and at every
    delivery, and the connection goes to one of the addresses that were checked (the first that accepts it), so a
    DNS answer that changes in between cannot point it at the platform's own network.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client import Counter
from sqlalchemy import Engine, select

from cloud import schema
from cloud.bus import BusError
from cloud.settings import Settings

log = logging.getLogger(__name__)

GROUP = "notifier"
TIMEOUT_S = 5.0
RETRY_DELAYS_S = (1.0, 4.0)  # after the first and the second failed attempt; three attempts in all
PAUSE_S = 60.0
RELOAD_S = 5.0
WORKERS = 8
# severity ranks: an event reaches a webhook whose min_severity ranks at or below the event's
SEVERITY_RANK = {s: len(schema.SEVERITIES) - i for i, s in enumerate(schema.SEVERITIES)}

DELIVERED = Counter("iot_notifier_delivered_total", "Alarm events delivered to a webhook (2xx)")
FAILED = Counter("iot_notifier_failed_total", "Webhook deliveries that ended without success (dead-lettered)")
ATTEMPTS = Counter("iot_notifier_attempts_total", "HTTP attempts to deliver alarm events", ["outcome"])


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
    headers = {"Content-Type": "application/json", "User-Agent": "iot-platform-notifier",
               "X-IoT-Delivery": f"test.{uuid.uuid4()}", "X-IoT-Signature": signature(secret, body)}
    status, detail = post(url, body, headers, allow_private)
    return status is not None and 200 <= status < 300, status, detail


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Hook:
    id: int
    tenant_id: int
    url: str
    secret: str
    min_rank: int


class Notifier:
    """``settings.topics.alarms`` -> webhooks of ``engine``'s ``webhooks`` table; failures to the dead-letter topic."""

    name = "notifier"

    def __init__(self, settings: Settings, bus, engine: Engine, *, group: str = GROUP, workers: int = WORKERS,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS_S, pause_s: float = PAUSE_S,
                 reload_s: float = RELOAD_S):
        self.settings = settings
        self.bus = bus
        self.engine = engine
        self.group = group
        self.workers = workers
        self.retry_delays = retry_delays
        self.pause_s = pause_s
        self.reload_s = reload_s
        self._hooks: dict[int, list[Hook]] = {}
        self._loaded_at = float("-inf")
        self._paused: dict[int, tuple[float, str]] = {}  # hook id -> (until, why)
        self._lock = threading.Lock()
        self._tls = ssl.create_default_context()
        self._beat = time.monotonic()
        self.started = threading.Event()
        self.error: str | None = None

    # --- the service ------------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        age = time.monotonic() - self._beat
        ok = self.started.is_set() and self.error is None and age < 30
        return ok, {"started": self.started.is_set(), "loop_age_s": round(age, 1), "error": self.error,
                    "webhooks": sum(len(v) for v in self._hooks.values())}

    def run(self, stop: threading.Event) -> None:
        consumer = self.bus.consumer(self.group, [self.settings.topics.alarms], name="notifier")
        producer = self.bus.producer("notifier")
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="notify")
        self.started.set()
        try:
            while not stop.is_set():
                self._beat = time.monotonic()
                records = consumer.poll_batch(500, timeout=0.5)
                if not records:
                    continue
                failures = self.handle(records, pool, stop)
                if failures is None:  # stopping in the middle of the batch: it is sent again after the restart
                    break
                if not self._dead_letter(producer, failures, stop):
                    break
                try:
                    consumer.commit(records)
                except BusError as exc:  # a rebalance took the partitions: their new owner sends them again
                    log.warning("notifier: commit failed (%s); the batch may be delivered again", exc)
        except Exception as exc:  # noqa: BLE001 (health reports it; the supervisor restarts the service)
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("notifier stopped")
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            producer.flush(5)
            producer.close()
            consumer.close()

    def handle(self, records: list, pool: ThreadPoolExecutor, stop: threading.Event) -> list[tuple] | None:
        """Deliver a batch; returns the failures as (record, reason), or None when ``stop`` cut it short."""
        hooks = self._webhooks()
        failures: list[tuple] = []
        jobs = []
        for record in records:
            try:
                event = schema.parse_alarm_event(record.value)
                tenant_id = int(event.tenant)
            except (schema.Rejected, ValueError) as exc:
                failures.append((record, f"not an alarm event: {getattr(exc, 'reason', exc)}"))
                continue
            rank = SEVERITY_RANK[event.severity]
            delivery = f"{event.alarm_id}.{event.state}"
            for hook in hooks.get(tenant_id, ()):
                if rank >= hook.min_rank:
                    jobs.append((record, hook, pool.submit(self._deliver, hook, record.value, delivery, stop)))
        for record, _hook, job in jobs:
            reason = job.result()
            self._beat = time.monotonic()  # a long batch is progress, not a hang (health)
            if reason is STOPPED:
                return None
            if reason is not None:
                failures.append((record, reason))
        return failures

    # --- one delivery -----------------------------------------------------------------------------------
    def _deliver(self, hook: Hook, body: bytes, delivery: str, stop: threading.Event):
        """None when delivered, else why not (STOPPED when ``stop`` interrupted it)."""
        with self._lock:
            until, why = self._paused.get(hook.id, (0.0, ""))
        if time.monotonic() < until:
            FAILED.inc()
            return f"webhook {hook.id} paused after a failed delivery ({why})"
        headers = {"Content-Type": "application/json", "User-Agent": "iot-platform-notifier",
                   "X-IoT-Delivery": delivery, "X-IoT-Signature": signature(hook.secret, body)}
        detail = ""
        for attempt in range(len(self.retry_delays) + 1):
            if attempt:
                if stop.wait(self.retry_delays[attempt - 1]):
                    return STOPPED
            status, detail = self.post(hook, body, headers)
            if status is not None and 200 <= status < 300:
                ATTEMPTS.labels("delivered").inc()
                DELIVERED.inc()
                return None
            retry = status is None or status in (408, 429) or status >= 500
            ATTEMPTS.labels("retry" if retry else "refused").inc()
            if not retry:
                break
        FAILED.inc()
        with self._lock:
            self._paused[hook.id] = (time.monotonic() + self.pause_s, detail)
        log.warning("notifier: webhook %s (%s) failed: %s", hook.id, urlsplit(hook.url).hostname, detail)
        return f"webhook {hook.id} ({urlsplit(hook.url).hostname}) failed: {detail}"

    def post(self, hook: Hook, body: bytes, headers: dict[str, str]) -> tuple[int | None, str]:
        return post(hook.url, body, headers, self.settings.webhook_allow_private, self._tls)

    # --- webhooks and dead letters ----------------------------------------------------------------------
    def _webhooks(self) -> dict[int, list[Hook]]:
        if time.monotonic() - self._loaded_at < self.reload_s:
            return self._hooks
        from cloud.db.models import Webhook

        try:
            with self.engine.connect() as conn:
                rows = conn.execute(select(Webhook.id, Webhook.tenant_id, Webhook.url, Webhook.secret,
                                           Webhook.min_severity)).all()
        except Exception as exc:  # noqa: BLE001 (the database is away: keep the webhooks known so far)
            log.warning("notifier: cannot load webhooks (%s); using the %d known", exc,
                        sum(len(v) for v in self._hooks.values()))
            return self._hooks
        hooks: dict[int, list[Hook]] = {}
        for hook_id, tenant_id, url, secret, min_severity in rows:
            hooks.setdefault(tenant_id, []).append(
                Hook(hook_id, tenant_id, url, secret, SEVERITY_RANK.get(min_severity, 0)))
        self._hooks, self._loaded_at = hooks, time.monotonic()
        return hooks

    def _dead_letter(self, producer, failures: list[tuple], stop: threading.Event) -> bool:
        """Every failure on the dead-letter topic; False when ``stop`` came first (the batch is not committed)."""
        topic = self.settings.topics.deadletter
        errors: list = []

        def produce_all() -> None:
            for record, reason in failures:
                producer.produce(topic, record.key, schema.dead_letter(record.topic, record.value, reason,
                                                                       key=record.key),
                                 headers={"source": "notifier", "reason": reason[:200]},
                                 on_delivery=lambda err, _r: errors.append(err) if err is not None else None)

        if not failures:
            return True
        produce_all()
        delay = 0.5
        while producer.flush(10) > 0 or errors:
            if stop.is_set():
                return False
            if errors:  # a duplicate dead letter beats a lost one
                log.warning("notifier: dead-letter delivery failed (%s); retrying", errors[0])
                errors.clear()
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
                produce_all()
        return True


STOPPED = object()  # a delivery interrupted by the stop signal
