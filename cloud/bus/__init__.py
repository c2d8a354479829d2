"""The streaming backbone behind one small interface: Apache Kafka in production, an in-process bus in the demo.

Services only use :class:`Producer` and :class:`Consumer` below, so the bridge, writer and alarm service are the
same code in both profiles. The semantics are Kafka's: records have a key that picks the partition (so each
device's records stay in order), consumers join a group that splits the partitions, offsets are committed
explicitly after the work is done, and produce is asynchronous with a delivery report served by ``poll``/``flush``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from cloud.settings import Settings


@dataclass(slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, str] = field(default_factory=dict)
    timestamp_ms: int = 0


DeliveryCallback = Callable[[Exception | None, Record | None], None]


class BusError(RuntimeError):
    """The backbone refused or lost a request (delivery failure, commit failure)."""


class Producer(Protocol):
    def produce(self, topic: str, key: str | None, value: bytes, headers: dict[str, str] | None = None,
                on_delivery: DeliveryCallback | None = None) -> None:
        """Queue a record. ``on_delivery(err, record)`` runs later, inside ``poll`` or ``flush``."""

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks; returns how many were served."""

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every queued record is delivered or failed; returns how many are still queued."""

    def close(self) -> None: ...


class Consumer(Protocol):
    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records from the assigned partitions, waiting at most ``timeout`` seconds."""

    def commit(self, records: list[Record]) -> None:
        """Commit the offsets after ``records`` (synchronously). Only call it once their work is durable."""

    def close(self) -> None:
        """Leave the group (its partitions go to the other members)."""


class Bus(Protocol):
    def producer(self, name: str = "") -> Producer: ...

    def consumer(self, group: str, topics: list[str], name: str = "") -> Consumer: ...

    def ensure_topics(self, settings: Settings) -> None: ...


def from_settings(settings: Settings) -> Bus:
    """Kafka when ``IOT_KAFKA_BOOTSTRAP`` is set, else the in-process bus (embedded profile)."""
    if settings.kafka_bootstrap:
        from cloud.bus.kafka import KafkaBus

        return KafkaBus(settings.kafka_bootstrap)
    if settings.production:
        raise BusError("production profile needs IOT_KAFKA_BOOTSTRAP")
    from cloud.bus.memory import MemoryBus

    return MemoryBus.shared(settings.kafka_partitions)
