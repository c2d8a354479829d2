"""Fixtures of the bridge tests. The shared ``kafka`` fixture comes from tests/conftest.py.

``bridge_mosquitto`` is a Mosquitto of the bridge tests' own, configured the way production must be for an
at-least-once bridge: ``max_queued_messages 0`` (the default of 1000 makes Mosquitto DROP QoS 1 messages for
a bridge session that is away or behind, e.g. during a bridge restart or a Kafka outage).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cloud import nativestack  # noqa: E402

BRIDGE_MOSQUITTO_CONF = "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n"


@pytest.fixture(scope="session")
def bridge_mosquitto(request, tmp_path_factory):
    svc = nativestack.Mosquitto(tmp_path_factory.mktemp("bridge-mosquitto"), config_extra=BRIDGE_MOSQUITTO_CONF)
    request.addfinalizer(svc.close)
    svc.start()
    return svc


@pytest.fixture
def own_mosquitto(tmp_path):
    """A Mosquitto for one test (for tests that restart the broker)."""
    svc = nativestack.Mosquitto(tmp_path / "mosquitto", config_extra=BRIDGE_MOSQUITTO_CONF)
    svc.start()
    yield svc
    svc.close()
