"""Create the platform's Kafka topics, idempotently. ``python -m cloud kafka-init``.

Every topic in ``settings.topics`` gets ``settings.kafka_partitions`` partitions and
``settings.kafka_replication`` replicas. Per-topic configuration:

* telemetry: ``retention.ms = settings.telemetry_retention_ms``
* status: ``cleanup.policy = compact`` (the latest status per device is kept forever)
* dead-letter: long retention (90 days) so rejected messages can be inspected and replayed
* with 3+ replicas: ``min.insync.replicas = 2`` (the producers use acks=all)

Existing topics are left alone (their partition count and configuration are never changed, because
re-partitioning would move device keys between partitions and break per-device order); a topic with fewer
partitions than configured is reported with a warning. Running it twice changes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from cloud.settings import Settings

log = logging.getLogger(__name__)

DEADLETTER_RETENTION_MS = 90 * 24 * 3600 * 1000


class KafkaInitError(RuntimeError):
    """Kafka unreachable or a topic could not be created; the message is one line."""


@dataclass
class InitReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """The configuration each platform topic is created with."""
    topics = settings.topics
    configs: dict[str, dict[str, str]] = {name: {} for name in topics.all()}
    configs[topics.telemetry]["retention.ms"] = str(settings.telemetry_retention_ms)
    configs[topics.status]["cleanup.policy"] = "compact"
    configs[topics.deadletter]["retention.ms"] = str(DEADLETTER_RETENTION_MS)
    if settings.kafka_replication >= 3:
        for config in configs.values():
            config["min.insync.replicas"] = "2"
    return configs


def _wait_for_kafka(admin: AdminClient, bootstrap: str, timeout: float):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f": {last}" if last else ""
            raise KafkaInitError(f"Kafka at {bootstrap} not reachable within {timeout:g}s{detail}")
        try:
            metadata = admin.list_topics(timeout=min(5.0, max(0.5, remaining)))
            if metadata.brokers:
                return metadata
        except KafkaException as exc:
            last = exc
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def ensure_topics(settings: Settings, bootstrap: str | None = None, timeout: float = 60) -> InitReport:
    """Wait for Kafka (up to ``timeout`` s) and create the missing topics; returns what was done.
    Raises :class:`KafkaInitError` with a one-line message on failure."""
    bootstrap = bootstrap or settings.kafka_bootstrap
    if not bootstrap:
        raise KafkaInitError("IOT_KAFKA_BOOTSTRAP is not set: there is no Kafka to initialise "
                             "(the embedded profile's in-process bus needs no topics)")
    # keep librdkafka's own connection errors out of the log while we wait for the broker
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": logging.getLogger("cloud.kafka_init.rdkafka"),
                         "log_level": 0})
    metadata = _wait_for_kafka(admin, bootstrap, timeout)
    report = InitReport()
    wanted = topic_configs(settings)
    brokers = len(metadata.brokers)
    if settings.kafka_replication > brokers:
        raise KafkaInitError(f"IOT_KAFKA_REPLICATION={settings.kafka_replication} but the cluster has only "
                             f"{brokers} broker(s)")

    missing = []
    for name in wanted:
        existing = metadata.topics.get(name)
        if existing is not None and existing.error is None:
            report.existing.append(name)
            _check_partitions(name, len(existing.partitions), settings, report)
        else:
            missing.append(name)

    raced: list[str] = []
    if missing:
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=settings.kafka_partitions,
                      replication_factor=settings.kafka_replication, config=wanted[name]) for name in missing],
            operation_timeout=max(5.0, timeout / 2), request_timeout=max(10.0, timeout))
        for name, future in futures.items():
            try:
                future.result()
                report.created.append(name)
                log.info("created topic %s (%d partitions, replication %d%s)", name, settings.kafka_partitions,
                         settings.kafka_replication,
                         "".join(f", {k}={v}" for k, v in wanted[name].items()))
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    # created concurrently, or so recently that the metadata we read did not show it yet
                    report.existing.append(name)
                    raced.append(name)
                    continue
                raise KafkaInitError(f"cannot create topic {name}: {err.str() if isinstance(err, KafkaError) else exc}"
                                     ) from None
        _wait_visible(admin, report.created + raced, deadline=time.monotonic() + max(10.0, timeout / 2))
    if raced:
        try:
            topics = admin.list_topics(timeout=10).topics
        except KafkaException:
            topics = {}
        for name in raced:
            if name in topics and topics[name].error is None:
                _check_partitions(name, len(topics[name].partitions), settings, report)
    return report


def _check_partitions(name: str, have: int, settings: Settings, report: InitReport) -> None:
    if have < settings.kafka_partitions:
        msg = (f"topic {name} has {have} partitions, fewer than IOT_KAFKA_PARTITIONS="
               f"{settings.kafka_partitions}; left unchanged (adding partitions would move device keys)")
        log.warning(msg)
        report.warnings.append(msg)


def _wait_visible(admin: AdminClient, names: list[str], deadline: float) -> None:
    """Block until new topics show up with their leaders in the metadata (so producers do not race them)."""
    pending = set(names)
    while pending and time.monotonic() < deadline:
        try:
            metadata = admin.list_topics(timeout=5)
        except KafkaException:
            time.sleep(0.2)
            continue
        for name in list(pending):
            topic = metadata.topics.get(name)
            if topic is not None and topic.error is None and topic.partitions and all(
                    p.leader >= 0 for p in topic.partitions.values()):
                pending.discard(name)
        if pending:
            time.sleep(0.2)


def main(settings: Settings, timeout: float = 60) -> int:
    """CLI entry: 0 on success, 1 with a one-line error on stderr/log on failure."""
    try:
        report = ensure_topics(settings, settings.kafka_bootstrap, timeout=timeout)
    except KafkaInitError as exc:
        log.error("kafka-init failed: %s", exc)
        print(f"error: {exc}")
        return 1
    except KafkaException as exc:
        msg = str(exc).replace("\n", " ")
        log.error("kafka-init failed: %s", msg)
        print(f"error: {msg}")
        return 1
    log.info("kafka-init: %d topic(s) created, %d already present%s", len(report.created), len(report.existing),
             f", {len(report.warnings)} warning(s)" if report.warnings else "")
    return 0
