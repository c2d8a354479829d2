"""The stream I/O the alarm engine needs beyond the generic bus interface, for Kafka and for the in-process bus.

The engine keeps per-device state that lives with the input partition, so it must know *when* partitions come
and go (to restore state before the first record and to checkpoint before giving a partition away) and it must
read one partition of its changelog from the beginning. ``cloud.bus`` has neither (no rebalance callbacks, no
partition reads), so this module provides them:

* :class:`KafkaIO` -- its own confluent-kafka consumer (same defaults as :mod:`cloud.bus.kafka`, but the *range*
  assignor, so partition N of the telemetry, status and alarm topics always goes to the same member: a device's
  state is never split between two instances) with on_assign/on_revoke/on_lost callbacks; its own producer that
  can write to an explicit partition (the changelog partition = the input partition, whatever partitioner wrote
  the input); a restore reader that assigns changelog partitions and reads them to the high watermark.
* :class:`MemoryIO` -- the bus's own consumer and producer; assignment changes are detected by comparing the
  consumer's assignment before and after each poll (the in-process bus rebalances synchronously); restore reads
  the changelog partition straight from the bus.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Iterator

from cloud.bus import Record

log = logging.getLogger(__name__)

PartitionsCallback = Callable[[set[int]], None]


# what poll() returns per record: (topic, partition, offset, key, value, timestamp_ms, raw) -- a plain tuple
# because building a Record (or decoding headers) for each of ~50,000 readings a second is a measurable share of
# the service's CPU; ``raw`` is the backbone's own message, read through ``headers(raw)`` only when needed
InputRecord = tuple


class StreamIO:
    """What the engine calls. ``on_assign``/``on_revoke``/``on_lost`` are set by the engine."""
    on_assign: PartitionsCallback
    on_revoke: PartitionsCallback
    on_lost: PartitionsCallback

    def poll(self, max_records: int, timeout: float) -> list[InputRecord]: ...

    def headers(self, raw) -> dict[str, str]: ...

    # the topics whose records need ``raw`` (for their headers); the others get None, so the backbone's message
    # object dies at the end of poll() instead of living through the batch (garbage-collector work). None = all.
    raw_topics: set[str] | None = None

    def commit(self, offsets: dict[tuple[str, int], int], asynchronous: bool = False) -> None: ...

    def produce(self, topic: str, key: str, value: bytes, headers: dict[str, str] | None = None,
                partition: int | None = None, on_delivery: Callable | None = None) -> None:
        """``on_delivery(err, msg)`` is called from ``serve()``/``flush()`` when the backbone has the record."""

    def serve(self) -> None: ...

    def flush(self, timeout: float = 30.0) -> int: ...

    @staticmethod
    def _watermarks(reader, tp, patience: float = 60.0) -> tuple[int, int]:
        """Low/high offsets; retried while the partition has no leader yet (a topic just created, a broker
        restarting). Without them the state cannot be restored, and processing without it would raise alarms
        twice, so after ``patience`` seconds the error propagates and the service stops."""
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + patience
        while True:
            try:
                return reader.get_watermark_offsets(tp, timeout=10, cached=False)
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("changelog %s[%d] not readable yet (%s); retrying", tp.topic, tp.partition, exc)
                time.sleep(0.2)

    def restore(self, topic: str, partitions: set[int]) -> Iterator[tuple[int, str | None, bytes | None]]: ...

    def ensure_changelog(self, topic: str, input_topic: str, partitions: int, replication: int) -> None: ...

    def close(self) -> None: ...


# --- Kafka ----------------------------------------------------------------------------------------------------

class KafkaIO(StreamIO):
    def __init__(self, bootstrap: str, group: str, topics: list[str], name: str = "alarms",
                 extra: dict | None = None):
        from confluent_kafka import Consumer, Producer

        from cloud.bus.kafka import CONSUMER_DEFAULTS, PRODUCER_DEFAULTS

        self.bootstrap = bootstrap
        self.group = group
        self.topics = topics
        self.extra = dict(extra or {})
        self.producer_errors = 0
        conf = {"bootstrap.servers": bootstrap, "group.id": group, "client.id": name, **CONSUMER_DEFAULTS,
                # co-partitioning: partition N of every input topic to the same member (see module docstring)
                "partition.assignment.strategy": "range", **self.extra}
        self._consumer = Consumer(conf)
        self._producer = Producer({"bootstrap.servers": bootstrap, "client.id": name, **PRODUCER_DEFAULTS,
                                   "linger.ms": 2, **self.extra})
        self._subscribed = False

    def _subscribe(self) -> None:
        def assign(_consumer, tps):
            self.on_assign({tp.partition for tp in tps})

        def revoke(_consumer, tps):
            self.on_revoke({tp.partition for tp in tps})

        def lost(_consumer, tps):
            self.on_lost({tp.partition for tp in tps})

        self._consumer.subscribe(self.topics, on_assign=assign, on_revoke=revoke, on_lost=lost)
        self._subscribed = True

    def poll(self, max_records: int, timeout: float) -> list[InputRecord]:
        if not self._subscribed:
            self._subscribe()
        # consume() waits until it has max_records OR the timeout passed: take what is there now, and block only
        # when there is nothing (else a quiet stream would wait the whole timeout for a full batch)
        consumer = self._consumer
        msgs = consumer.consume(max_records, 0)
        if not msgs:
            msgs = consumer.consume(1, timeout)
            if msgs:
                msgs += consumer.consume(max_records - 1, 0)
        out = []
        append = out.append
        raw_topics = self.raw_topics
        for msg in msgs:
            if msg.error() is not None:
                self._error(msg.error())
                continue
            key = msg.key()
            topic = msg.topic()
            append((topic, msg.partition(), msg.offset(),
                    key.decode("utf-8", "replace") if key is not None else None, msg.value() or b"",
                    msg.timestamp()[1], msg if raw_topics is None or topic in raw_topics else None))
        return out

    @staticmethod
    def _error(err) -> None:
        from confluent_kafka import KafkaError

        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", err)

    def headers(self, raw) -> dict[str, str]:
        items = raw.headers()
        return {k: (v.decode("utf-8", "replace") if v is not None else "") for k, v in items} if items else {}

    def commit(self, offsets: dict[tuple[str, int], int], asynchronous: bool = False) -> None:
        from confluent_kafka import TopicPartition

        if offsets:  # an asynchronous commit that fails is covered by the next one (offsets only grow)
            self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                  asynchronous=asynchronous)

    def _on_delivery(self, err, _msg) -> None:
        if err is not None:
            self.producer_errors += 1
            log.error("alarm service: a record was not delivered: %s", err)

    def produce(self, topic: str, key: str, value: bytes, headers: dict[str, str] | None = None,
                partition: int | None = None, on_delivery: Callable | None = None) -> None:
        kwargs: dict = {"on_delivery": on_delivery or self._on_delivery}
        if headers:
            kwargs["headers"] = list(headers.items())
        if partition is not None:
            kwargs["partition"] = partition
        produce = self._producer.produce
        while True:
            try:
                produce(topic, value, key, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.05)

    def serve(self) -> None:
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        return self._producer.flush(timeout)

    def admin(self):
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap, **self.extra})

    def partition_count(self, topic: str, timeout: float = 10.0) -> int | None:
        md = self._producer.list_topics(topic, timeout=timeout)
        info = md.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            return None
        return len(info.partitions)

    def ensure_changelog(self, topic: str, input_topic: str, partitions: int, replication: int) -> None:
        """Create the compacted changelog with as many partitions as the input (idempotent); refuse one with
        fewer partitions, because then some input partitions would have nowhere to keep their state."""
        from confluent_kafka import KafkaError
        from confluent_kafka.admin import NewTopic

        wanted = self.partition_count(input_topic) or partitions
        have = self.partition_count(topic, timeout=5)
        if have is None:
            config = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000", "segment.ms": "3600000"}
            admin = self.admin()  # keep the handle alive until the futures resolve
            futures = admin.create_topics([NewTopic(topic, num_partitions=wanted,
                                                           replication_factor=replication, config=config)])
            for fut in futures.values():
                try:
                    fut.result(30)
                except Exception as exc:  # noqa: BLE001
                    err = exc.args[0] if exc.args else None
                    if getattr(err, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
            for _ in range(300):  # wait until every partition has a leader
                md = self._producer.list_topics(topic, timeout=5).topics.get(topic)
                if md is not None and md.error is None and md.partitions and \
                        all(pm.leader >= 0 for pm in md.partitions.values()):
                    break
                time.sleep(0.1)
            have = self.partition_count(topic) or wanted
        if have < wanted:
            raise RuntimeError(f"changelog topic {topic} has {have} partitions but {input_topic} has {wanted}; "
                               f"delete it (it is rebuilt from scratch only at the cost of the alarm state) or "
                               f"add partitions")

    def restore(self, topic: str, partitions: set[int]) -> Iterator[tuple[int, str | None, bytes | None]]:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        if not partitions:
            return
        reader = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{self.group}-restore",
                           "enable.auto.commit": False, "enable.partition.eof": False,
                           "fetch.max.bytes": 52_428_800, **self.extra})
        try:
            ends: dict[int, int] = {}
            for p in partitions:
                low, high = self._watermarks(reader, TopicPartition(topic, p))
                if high > low:
                    ends[p] = high
            if not ends:
                return
            reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
            deadline = time.monotonic() + 300
            while ends and time.monotonic() < deadline:
                for msg in reader.consume(num_messages=10_000, timeout=1.0):
                    if msg.error() is not None:
                        continue
                    p = msg.partition()
                    key = msg.key()
                    yield p, (key.decode() if key is not None else None), msg.value()
                    if p in ends and msg.offset() >= ends[p] - 1:
                        del ends[p]
            if ends:
                raise RuntimeError(f"changelog {topic} partitions {sorted(ends)} could not be read to the end")
        finally:
            reader.close()

    def close(self) -> None:
        try:
            self._producer.flush(30)
        finally:
            self._consumer.close()  # revokes: the engine checkpoints in on_revoke


# --- the in-process bus -------------------------------------------------------------------------------------

class MemoryIO(StreamIO):
    def __init__(self, bus, group: str, topics: list[str]):
        self.bus = bus
        self.topics = topics
        self._consumer = bus.consumer(group, topics, name="alarms")
        self._producer = bus.producer("alarms")
        self._held: set[int] = set()
        self.producer_errors = 0

    def _assigned(self) -> set[int]:
        with self.bus._cond:
            return {p for (_t, p) in self._consumer._assigned}

    def _sync(self) -> None:
        current = self._assigned()
        gone, new = self._held - current, current - self._held
        if gone:
            self.on_lost(gone)  # already given away: nothing can be committed for them any more
        if new:
            self.on_assign(new)
        self._held = current

    def poll(self, max_records: int, timeout: float) -> list[InputRecord]:
        self._sync()
        records = self._consumer.poll_batch(max_records, timeout)
        unseen = {r.partition for r in records} - self._held
        if unseen:  # a rebalance between the check and the poll: restore before processing
            self.on_assign(unseen)
            self._held |= unseen
        return [(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp_ms, r) for r in records]

    def headers(self, raw) -> dict[str, str]:
        return raw.headers

    def commit(self, offsets: dict[tuple[str, int], int], asynchronous: bool = False) -> None:
        from cloud.bus import BusError

        if not offsets:
            return
        try:
            self._consumer.commit([Record(t, p, o - 1, None, b"") for (t, p), o in offsets.items()])
        except BusError as exc:
            log.info("alarm service: %s", exc)

    def produce(self, topic: str, key: str, value: bytes, headers: dict[str, str] | None = None,
                partition: int | None = None, on_delivery: Callable | None = None) -> None:
        # the in-process bus places by key with the same function for every producer, so the changelog record of
        # a device lands in the partition number of its input records
        self._producer.produce(topic, key, value, headers, on_delivery)

    def serve(self) -> None:
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        return self._producer.flush(timeout)

    def ensure_changelog(self, topic: str, input_topic: str, partitions: int, replication: int) -> None:
        with self.bus._cond:
            self.bus._topic(topic)

    def restore(self, topic: str, partitions: set[int]) -> Iterator[tuple[int, str | None, bytes | None]]:
        with self.bus._cond:
            parts = self.bus._topic(topic)
            records: Iterable[Record] = [r for p in sorted(partitions) if p < len(parts) for r in parts[p].records]
        for r in records:
            yield r.partition, r.key, r.value

    def close(self) -> None:
        self._producer.flush()
        self._consumer.close()
