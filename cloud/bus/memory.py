"""The in-process bus of the embedded profile: Kafka's semantics (keys, partitions, consumer groups, explicit
commits, delivery reports) for services that run as threads of one process. Not durable: the demo's
durability lives in SQLite, and a restarted demo starts from an empty bus."""

from __future__ import annotations

import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

from cloud.bus import BusError, DeliveryCallback, Record, Report
from cloud.settings import Settings

# Records nobody has consumed yet are kept; records every group has committed are trimmed. A topic that no
# group reads (e.g. the dead-letter topic in a demo) keeps at most this many records per partition.
UNREAD_CAP = 1_000_000


def partition_for(key: str | None, partitions: int, counter: int) -> int:
    if key is None:
        return counter % partitions
    return zlib.crc32(key.encode()) % partitions


@dataclass
class _Partition:
    base: int = 0  # offset of records[0]
    records: deque[Record] = field(default_factory=deque)

    @property
    def end(self) -> int:
        return self.base + len(self.records)


@dataclass
class _Group:
    topics: set[str] = field(default_factory=set)
    members: list["MemoryConsumer"] = field(default_factory=list)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)


class MemoryBus:
    _shared: "MemoryBus | None" = None
    _shared_lock = threading.Lock()

    def __init__(self, partitions: int = 6):
        self.partitions = partitions
        self._cond = threading.Condition()
        self._topics: dict[str, list[_Partition]] = {}
        self._groups: dict[str, _Group] = {}
        self._counter = 0

    @classmethod
    def shared(cls, partitions: int = 6) -> "MemoryBus":
        """One bus per process, so every service thread of the demo meets on it."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls(partitions)
            return cls._shared

    # --- Bus interface --------------------------------------------------------------------------------------
    def producer(self, name: str = "") -> "MemoryProducer":
        return MemoryProducer(self)

    def consumer(self, group: str, topics: list[str], name: str = "") -> "MemoryConsumer":
        return MemoryConsumer(self, group, topics)

    def ensure_topics(self, settings: Settings) -> None:
        with self._cond:
            for topic in settings.topics.all():
                self._topic(topic)

    # --- internals (all under self._cond) -------------------------------------------------------------------
    def _topic(self, name: str) -> list[_Partition]:
        parts = self._topics.get(name)
        if parts is None:
            parts = self._topics[name] = [_Partition() for _ in range(self.partitions)]
        return parts

    def _append(self, topic: str, key: str | None, value: bytes, headers: dict[str, str] | None) -> Record:
        with self._cond:
            parts = self._topic(topic)
            self._counter += 1
            index = partition_for(key, len(parts), self._counter)
            part = parts[index]
            record = Record(topic, index, part.end, key, value, dict(headers or {}), int(time.time() * 1000))
            part.records.append(record)
            if len(part.records) > UNREAD_CAP and not self._readers(topic):
                part.records.popleft()
                part.base += 1
            self._cond.notify_all()
            return record

    def _readers(self, topic: str) -> list[_Group]:
        return [g for g in self._groups.values() if topic in g.topics]

    def _rebalance(self, group: _Group) -> None:
        pairs = [(t, p) for t in sorted(group.topics) for p in range(len(self._topic(t)))]
        for member in group.members:
            member._assigned = {}
        for i, pair in enumerate(pairs):
            if group.members:
                member = group.members[i % len(group.members)]
                member._assigned[pair] = group.committed.get(pair, self._topic(pair[0])[pair[1]].base)

    def _trim(self, topic: str, partition: int) -> None:
        readers = self._readers(topic)
        if not readers:
            return
        low = min(g.committed.get((topic, partition), 0) for g in readers)
        part = self._topic(topic)[partition]
        while part.records and part.base < low:
            part.records.popleft()
            part.base += 1


class _Written:
    """What ``MemoryProducer.send``'s report gets on success: ``offset()`` like a confluent-kafka Message."""

    __slots__ = ("record",)

    def __init__(self, record: Record):
        self.record = record

    def offset(self) -> int:
        return self.record.offset


class MemoryProducer:
    def __init__(self, bus: MemoryBus):
        self._bus = bus
        self._pending: deque[tuple[DeliveryCallback | Report, Record]] = deque()
        self._closed = False

    def produce(self, topic: str, key: str | None, value: bytes, headers: dict[str, str] | None = None,
                on_delivery: DeliveryCallback | None = None) -> None:
        if self._closed:
            raise BusError("producer is closed")
        record = self._bus._append(topic, key, value, headers)
        if on_delivery is not None:
            self._pending.append((on_delivery, record))

    def send(self, topic: str, key: str | None, value: bytes, headers: list[tuple[str, bytes]] | None,
             report: Report) -> None:
        if self._closed:
            raise BusError("producer is closed")
        decoded = {k: (v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v))
                   for k, v in headers or ()}
        self._pending.append((report, _Written(self._bus._append(topic, key, value, decoded))))

    def poll(self, timeout: float = 0.0) -> int:
        served = 0
        while self._pending:
            callback, record = self._pending.popleft()
            callback(None, record)
            served += 1
        if not served and timeout:
            time.sleep(min(timeout, 0.01))
        return served

    def flush(self, timeout: float | None = None) -> int:
        self.poll()
        if self._pending and timeout != 0:  # reports a subclass holds back (tests): wait a little, like Kafka
            time.sleep(0.01 if timeout is None else min(timeout, 0.01))
            self.poll()
        return len(self._pending)

    def close(self) -> None:
        self.flush()
        self._closed = True


class MemoryConsumer:
    def __init__(self, bus: MemoryBus, group: str, topics: list[str]):
        self._bus = bus
        self._group_name = group
        self._assigned: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset to read
        self._closed = False
        with bus._cond:
            g = bus._groups.setdefault(group, _Group())
            g.topics.update(topics)
            g.members.append(self)
            bus._rebalance(g)
            self._group = g

    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        deadline = time.monotonic() + timeout
        bus = self._bus
        with bus._cond:
            while True:
                if self._closed:
                    return []
                batch: list[Record] = []
                for pair, position in list(self._assigned.items()):
                    part = bus._topic(pair[0])[pair[1]]
                    position = max(position, part.base)
                    while position < part.end and len(batch) < max_records:
                        batch.append(part.records[position - part.base])
                        position += 1
                    self._assigned[pair] = position
                    if len(batch) >= max_records:
                        break
                if batch:
                    return batch
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                bus._cond.wait(remaining)

    def commit(self, records: list[Record], wait: bool = True) -> None:  # noqa: ARG002 - always at once here
        if not records:
            return
        upto: dict[tuple[str, int], int] = {}
        for record in records:
            pair = (record.topic, record.partition)
            upto[pair] = max(upto.get(pair, 0), record.offset + 1)
        with self._bus._cond:
            for pair, offset in upto.items():
                if pair not in self._assigned:
                    raise BusError(f"partition {pair} was revoked from this consumer; its records will be redelivered")
                if offset > self._group.committed.get(pair, 0):
                    self._group.committed[pair] = offset
                self._bus._trim(*pair)

    def close(self) -> None:
        with self._bus._cond:
            if self._closed:
                return
            self._closed = True
            self._group.members.remove(self)
            self._bus._rebalance(self._group)
            self._bus._cond.notify_all()
