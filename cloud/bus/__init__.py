"""The streaming backbone behind one small interface: Apache Kafka in production, an in-process bus in the demo.

Services only use :class:`Producer` and :class:`Consumer` below, so the bridge, writer and alarm service are the
same code in both profiles. The semantics are Kafka's: records have a key that picks the partition (so each
device's records stay in order), consumers join a group that splits the partitions, offsets are committed
explicitly after the work is done, and produce is asynchronous with a delivery report served by ``poll``/``flush``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from cloud.settings import Settings

log = logging.getLogger(__name__)


class Record:
    """A record on the bus: ``topic``, ``partition``, ``offset``, ``key`` (str or None), ``value`` (bytes),
    ``headers`` (dict of str), ``timestamp_ms``.

    ``headers`` may be handed over undecoded (Kafka's list of ``(name, bytes | None)`` pairs, or None) and is
    decoded to a dict on first access: most readers never look at them, and a consumer batch is thousands of
    records."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "_headers", "timestamp_ms")

    def __init__(self, topic: str, partition: int, offset: int, key: str | None, value: bytes,
                 headers: dict[str, str] | list | None = None, timestamp_ms: int = 0):
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self._headers = headers
        self.timestamp_ms = timestamp_ms

    @property
    def headers(self) -> dict[str, str]:
        headers = self._headers
        if not isinstance(headers, dict):
            headers = self._headers = {k: (v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray))
                                           else "" if v is None else str(v)) for k, v in (headers or ())}
        return headers

    @headers.setter
    def headers(self, value: dict[str, str]) -> None:
        self._headers = value

    def _fields(self) -> tuple:
        return (self.topic, self.partition, self.offset, self.key, self.value, self.headers, self.timestamp_ms)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  (mutable, like the dataclass it replaces)

    def __repr__(self) -> str:
        return (f"Record(topic={self.topic!r}, partition={self.partition!r}, offset={self.offset!r}, "
                f"key={self.key!r}, value={self.value!r}, headers={self.headers!r}, "
                f"timestamp_ms={self.timestamp_ms!r})")


# A delivery report without an offset is not a confirmation. librdkafka's idempotent producer turns some broker
# errors for a retried batch into "delivered" (DUPLICATE_SEQUENCE_NUMBER, or an out-of-order answer for
# sequences it believes already written); the broker answers an error with base offset -1, so such reports have
# no offset, while a batch the broker really appended (also a recognised duplicate) always has one. The belief
# can be wrong: a broker with no state for a producer on a partition accepts any sequence, so when the first
# batch of a fresh partition fails (e.g. leader not ready) and the next one is accepted, the first one's retry
# looks old and is reported delivered although it was never written. Seen in the bridge's Kafka-outage test:
# the partition log begins at baseSequence 3 (producer 0, epoch 0) and the records with sequences 0-2, reported
# delivered and acknowledged to MQTT, are missing.
UNCONFIRMED = "delivery reported without an offset (not confirmed by the broker)"


DeliveryCallback = Callable[[Exception | None, Record | None], None]
# Lean delivery report for hot paths (see Producer.send): report(error_or_None, backend_specific_ignored)
Report = Callable[[Any, Any], None]


class BusError(RuntimeError):
    """The backbone refused or lost a request (delivery failure, commit failure)."""


class Producer(Protocol):
    def produce(self, topic: str, key: str | None, value: bytes, headers: dict[str, str] | None = None,
                on_delivery: DeliveryCallback | None = None) -> None:
        """Queue a record. ``on_delivery(err, record)`` runs later, inside ``poll`` or ``flush``."""

    def send(self, topic: str, key: str | None, value: bytes, headers: list[tuple[str, bytes]] | None,
             report: Report) -> None:
        """The lean form of ``produce`` for hot paths (the bridge): headers as a list of ``(name, bytes)``, and
        ``report(err, msg)`` runs later inside ``poll``/``flush``: ``err`` is an error object (``str()`` says
        what failed) or None when the bus reports the record written; then ``msg.offset()`` is where it was
        written, and an offset that is None (confluent-kafka's value for "no valid offset") or negative means the
        report is NOT a confirmation (librdkafka's idempotent producer
        can report a batch it never wrote as delivered, see ``UNCONFIRMED``): treat it as a
        failure. No Record is built for the report."""

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks; returns how many were served."""

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every queued record is delivered or failed; returns how many are still queued."""

    def close(self) -> None: ...


class Consumer(Protocol):
    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records from the assigned partitions, waiting at most ``timeout`` seconds."""

    def commit(self, records: list[Record], wait: bool = True) -> None:
        """Commit the offsets after ``records``. Only call it once their work is durable. ``wait=False`` sends
        the commit without waiting for the broker's answer: for consumers whose work is idempotent, since a
        commit lost with a crash only means the records are delivered (and skipped) again."""

    def close(self) -> None:
        """Leave the group (its partitions go to the other members)."""


class Bus(Protocol):
    def producer(self, name: str = "") -> Producer: ...

    def consumer(self, group: str, topics: list[str], name: str = "") -> Consumer: ...

    def ensure_topics(self, settings: Settings) -> None: ...


def produce_until_confirmed(producer: Producer, records: list[tuple[str, str | None, bytes, dict[str, str] | None]],
                            stop, who: str, backoff: tuple[float, float] = (0.2, 10.0)) -> bool:
    """Produce ``records`` ((topic, key, value, headers) each) and wait until the bus confirmed every one; a failed
    delivery produces them all again (a duplicate beats a loss: dead letters, for which this is used, are read by
    people), with a backoff from ``backoff[0]`` doubling to ``backoff[1]`` seconds. False when ``stop`` (a
    threading.Event) is set first: the caller must then not commit the input they came from."""
    if not records:
        return True
    errors: list = []

    def delivered(err, _record) -> None:
        if err is not None:
            errors.append(err)

    def produce_all() -> None:
        for topic, key, value, headers in records:
            producer.produce(topic, key, value, headers=headers, on_delivery=delivered)

    produce_all()
    delay = backoff[0]
    while producer.flush(10) > 0 or errors:
        if stop.is_set():
            return False
        if errors:
            log.warning("%s: delivery to the bus failed (%s); producing %d records again", who, errors[0],
                        len(records))
            errors.clear()
            stop.wait(delay)
            delay = min(delay * 2, backoff[1])
            produce_all()
    return True


def from_settings(settings: Settings) -> Bus:
    """Kafka when ``IOT_KAFKA_BOOTSTRAP`` is set, else the in-process bus (embedded profile)."""
    if settings.kafka_bootstrap:
        from cloud.bus.kafka import KafkaBus

        return KafkaBus(settings.kafka_bootstrap, compression=settings.kafka_compression)
    if settings.production:
        raise BusError("production profile needs IOT_KAFKA_BOOTSTRAP")
    from cloud.bus.memory import MemoryBus

    return MemoryBus.shared(settings.kafka_partitions)
