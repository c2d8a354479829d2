"""One settings object from the environment; a bad value names its variable in one line."""

import subprocess
import sys

import pytest

from cloud import settings
from cloud.settings import SettingsError


def test_embedded_defaults_need_no_environment():
    s = settings.load({})
    assert s.profile == "embedded" and s.kafka_bootstrap is None and s.database_url.startswith("sqlite")
    assert s.topics.telemetry == "iot-sensordata" and s.topics.alarms == "alarme"


def test_production_values():
    s = settings.load({"IOT_PROFILE": "production", "IOT_MQTT_URL": "mqtts://bridge:pw@broker:8883",
                       "IOT_KAFKA_BOOTSTRAP": "k1:9092, k2:9092", "IOT_DATABASE_URL": "postgresql+psycopg://u@db/iot",
                       "IOT_REDIS_URL": "redis://cache:6379/0", "IOT_SECRET_KEY": "s3cret",
                       "IOT_TOPIC_TELEMETRY": "fleet.telemetry"})
    assert s.kafka_bootstrap == "k1:9092,k2:9092" and s.topics.telemetry == "fleet.telemetry"
    assert settings.mqtt_parts(s.mqtt_url) == {"host": "broker", "port": 8883, "username": "bridge",
                                                "password": "pw", "tls": True}


@pytest.mark.parametrize("env, message", [
    ({"IOT_WEB_PORT": "eighty"}, "IOT_WEB_PORT: expected an integer, got 'eighty'"),
    ({"IOT_WEB_PORT": "70000"}, "IOT_WEB_PORT: expected 1..65535, got 70000"),
    ({"IOT_MQTT_URL": "http://x"}, "IOT_MQTT_URL: expected a URL starting with mqtt:// or mqtts://"),
    ({"IOT_KAFKA_BOOTSTRAP": "kafka"}, "IOT_KAFKA_BOOTSTRAP: expected host:port"),
    ({"IOT_PROFILE": "prod"}, "IOT_PROFILE: expected one of embedded, production"),
    ({"IOT_KAFKA_COMPRESSION": "lz5"}, "IOT_KAFKA_COMPRESSION: expected one of none, lz4, zstd, snappy, gzip"),
    ({"IOT_TOPIC_ALARMS": "bad topic!"}, "IOT_TOPIC_ALARMS: expected a Kafka topic name"),
    ({"IOT_PROFILE": "production"}, "IOT_MQTT_URL: required when IOT_PROFILE=production"),
    ({"IOT_TOPIC_ALARMS": "iot-sensordata"}, "two topics have the same name"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(SettingsError) as caught:
        settings.load(env)
    assert message in str(caught.value)


def test_cli_stops_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cloud", "bridge"], capture_output=True, text=True,
                            env={"IOT_REDIS_URL": "redis://", "PATH": "/usr/bin:/bin"}, cwd=tmp_path.parent,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["configuration error: IOT_REDIS_URL: URL has no host: 'redis://'"]


def test_help_lists_the_services():
    out = subprocess.run([sys.executable, "-m", "cloud", "--help"], capture_output=True, text=True, timeout=60).stdout
    for service in ("demo", "bridge", "writer", "web", "kafka-init", "sim", "alarms", "notifier", "db"):
        assert f"    {service}" in out
