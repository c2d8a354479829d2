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

Addresses: see cloud.webhooks (public addresses only, checked again after DNS at every POST).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client import Counter
from sqlalchemy import Engine, select

from cloud import schema
from cloud.bus import BusError, produce_until_confirmed
from cloud.settings import Settings
from cloud.webhooks import delivery_headers, post

log = logging.getLogger(__name__)

GROUP = "notifier"
RETRY_DELAYS_S = (1.0, 4.0)  # after the first and the second failed attempt; three attempts in all
PAUSE_S = 60.0
RELOAD_S = 5.0
WORKERS = 8

DELIVERED = Counter("iot_notifier_delivered_total", "Alarm events delivered to a webhook (2xx)")
FAILED = Counter("iot_notifier_failed_total", "Webhook deliveries that ended without success (dead-lettered)")
ATTEMPTS = Counter("iot_notifier_attempts_total", "HTTP attempts to deliver alarm events", ["outcome"])


@dataclass(frozen=True)
class Hook:
    id: int
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
            rank = schema.SEVERITY_RANK[event.severity]  # reaches webhooks of this rank and below
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
        headers = delivery_headers(hook.secret, body, delivery)
        detail = ""
        for attempt in range(len(self.retry_delays) + 1):
            if attempt:
                if stop.wait(self.retry_delays[attempt - 1]):
                    return STOPPED
            status, detail = post(hook.url, body, headers, self.settings.webhook_allow_private, self._tls)
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
                Hook(hook_id, url, secret, schema.SEVERITY_RANK.get(min_severity, 0)))
        self._hooks, self._loaded_at = hooks, time.monotonic()
        return hooks

    def _dead_letter(self, producer, failures: list[tuple], stop: threading.Event) -> bool:
        """Every failure on the dead-letter topic; False when ``stop`` came first (the batch is not committed)."""
        topic = self.settings.topics.deadletter
        return produce_until_confirmed(producer, [
            (topic, record.key, schema.dead_letter(record.topic, record.value, reason, key=record.key),
             {"source": "notifier", "reason": reason[:200]}) for record, reason in failures], stop, "notifier")


STOPPED = object()  # a delivery interrupted by the stop signal
