"""kafka-init against a real Kafka: creates every topic with its configuration, is idempotent, warns about
topics with fewer partitions, fails with a one-line error when Kafka is unreachable."""

from __future__ import annotations

import logging

import pytest
from bridgekit import unique_settings
from confluent_kafka.admin import ConfigResource, NewTopic

from cloud import kafka_init
from cloud.nativestack import free_port

pytestmark = pytest.mark.timeout(120)


def describe(admin, topic: str) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    result = admin.describe_configs([resource])[resource].result(timeout=10)
    return {k: v.value for k, v in result.items()}


def test_creates_all_topics_then_changes_nothing(kafka):
    settings = unique_settings("mqtt://127.0.0.1:1883", kafka.bootstrap, kafka_partitions=3)
    first = kafka_init.ensure_topics(settings, kafka.bootstrap)
    assert sorted(first.created) == sorted(settings.topics.all()) and not first.existing
    admin = kafka.admin()
    metadata = admin.list_topics(timeout=10)
    for name in settings.topics.all():
        assert len(metadata.topics[name].partitions) == 3
    assert describe(admin, settings.topics.status)["cleanup.policy"] == "compact"
    assert describe(admin, settings.topics.telemetry)["retention.ms"] == str(settings.telemetry_retention_ms)
    assert describe(admin, settings.topics.deadletter)["retention.ms"] == str(kafka_init.DEADLETTER_RETENTION_MS)
    assert describe(admin, settings.topics.telemetry)["cleanup.policy"] == "delete"

    before = {n: describe(admin, n) for n in settings.topics.all()}
    second = kafka_init.ensure_topics(settings, kafka.bootstrap)
    assert not second.created and sorted(second.existing) == sorted(settings.topics.all())
    assert not second.warnings
    assert {n: describe(admin, n) for n in settings.topics.all()} == before
    assert kafka_init.main(settings) == 0


def test_warns_when_an_existing_topic_has_fewer_partitions(kafka, caplog):
    settings = unique_settings("mqtt://127.0.0.1:1883", kafka.bootstrap, kafka_partitions=6)
    admin = kafka.admin()
    admin.create_topics([NewTopic(settings.topics.telemetry, num_partitions=2, replication_factor=1)]
                        )[settings.topics.telemetry].result(timeout=30)
    with caplog.at_level(logging.WARNING, logger="cloud.kafka_init"):
        report = kafka_init.ensure_topics(settings, kafka.bootstrap)
    assert settings.topics.telemetry in report.existing
    assert len(report.warnings) == 1 and "has 2 partitions, fewer than IOT_KAFKA_PARTITIONS=6" in report.warnings[0]
    assert "fewer than" in caplog.text
    assert len(admin.list_topics(timeout=10).topics[settings.topics.telemetry].partitions) == 2  # left alone


def test_unreachable_kafka_is_a_one_line_error(capsys):
    settings = unique_settings("mqtt://127.0.0.1:1883", f"127.0.0.1:{free_port()}")
    with pytest.raises(kafka_init.KafkaInitError, match="not reachable within 2s"):
        kafka_init.ensure_topics(settings, timeout=2)
    assert kafka_init.main(settings, timeout=2) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("error: Kafka at") and "\n" not in out


def test_replication_above_broker_count_is_refused(kafka):
    settings = unique_settings("mqtt://127.0.0.1:1883", kafka.bootstrap, kafka_replication=3)
    with pytest.raises(kafka_init.KafkaInitError, match="only 1 broker"):
        kafka_init.ensure_topics(settings, kafka.bootstrap, timeout=10)
