"""cloud.service: the per-process garbage-collection pause metric."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from cloud import service


def _count(generation: str) -> float:
    return REGISTRY.get_sample_value("iot_gc_pause_seconds_count", {"generation": generation}) or 0.0


def test_gc_pauses_are_timed_once_per_process():
    service.observe_gc_pauses()
    service.observe_gc_pauses()  # a second call must not time each collection twice
    before = _count("2")
    gc.collect()
    assert _count("2") == before + 1
    assert REGISTRY.get_sample_value("iot_gc_pause_seconds_sum", {"generation": "2"}) > 0
