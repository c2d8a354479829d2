"""Alarm service: per-device rules on the telemetry stream, alarm lifecycle, durable state, scales with partitions.

Layout
------
* :mod:`cloud.alarms.rules` -- pure rule logic: :func:`validate_rule`, the per-device state and the state machines
  (threshold with hysteresis and minimum duration, rate of change, no data, offline). No I/O.
* :mod:`cloud.alarms.engine` -- per-partition processing with a changelog-backed state store.
* :mod:`cloud.alarms.io` -- partition-aware stream I/O for Kafka and for the in-process bus.
* :mod:`cloud.alarms.catalog` -- rules and the device -> tenant map from the database, reloaded every 2 s.
* :mod:`cloud.alarms.service` -- :class:`AlarmService` (``run(stop)``, ``health()``, ``name = "alarms"``).

Why not Quix Streams
--------------------
Quix Streams was the first candidate (it is the closest Python counterpart of Kafka Streams: consumer groups,
RocksDB state stores backed by changelog topics, exactly-once via Kafka transactions). We did not take it because:

1. It only runs on Kafka. The embedded profile must run the *same* rule logic on the in-process bus; with Quix
   the demo would need a second implementation (or a Kafka broker in the demo).
2. Its dependency pins conflict with ours: quixstreams 3.28.1 requires ``confluent-kafka<2.13`` (we pin
   2.16.1, shared by every service), plus ``rocksdict`` (a native RocksDB build), pydantic and more.
3. The state we need is small (a few hundred bytes per device) and keyed exactly like the input (device id), so
   the hard parts Quix solves (windowed aggregations over large state, RocksDB spill) are not needed, while the
   parts we do need (co-partitioning of telemetry/status/alarm topics, a wall-clock timer for "no data",
   idempotent replay by (boot, seq)) we would have to build on top of it anyway.

Instead: pure rule logic (:mod:`rules`) and a small processor (:mod:`engine`) on the bus interface, with the same
state-store design as Kafka Streams: a compacted changelog topic ``alarms-state`` (key = device id, one JSON
snapshot per device, written to the same partition number as the device's input partition). On assignment the
engine reads those changelog partitions to their end before processing; on revocation it checkpoints first.
Checkpoint = snapshots of the devices changed since the last one -> wait until the backbone confirmed every
record produced up to them (events, commands, snapshots) -> commit input offsets; in the running service this is
pipelined (snapshots a chunk at a time, delivery reports collected while processing goes on), on revoke and stop
it is a flush. After a crash
the uncommitted input is replayed against a restored state at least as new as the committed offsets: readings
are recognised by (boot, seq) and skipped, an active alarm is not raised again. A crash can repeat at most the
events of one commit interval whose snapshot was not yet written; they carry the same deterministic
``alarm_id`` (uuid5 of device, rule and raise time), so stores that upsert by id see no duplicate.
(Kafka transactions would close that last window, but they hold every alarm event back until the transaction
commits -- the commit interval would become the alarm latency -- and need the in-process bus to emulate them.)

The consumer uses the *range* assignor so that partition N of the telemetry, status and alarms topics always
belongs to the same instance (they are co-partitioned: same key, same partition count), i.e. a device's state
never splits between two instances. Two or more instances split the partitions; each event is produced once.

Acknowledgements
----------------
The web tier acknowledges an alarm by updating its row in the database (state, acknowledged_at/_by) and
publishing an ``AlarmEvent`` with ``state="acknowledged"`` and the same ``alarm_id`` on the alarms topic, keyed by
device id (:func:`ack_event` builds it; do not set the ``src`` header). The engine reads the alarms topic too
(co-partitioned), marks the active alarm acknowledged, and later emits its "cleared" as usual. A manual clear
works the same way with ``state="cleared"``: the engine forgets the alarm and raises a *new* one if the
condition is still (or again) met. Events for an alarm id that is no longer active are ignored.

Events the engine produces carry the header ``src: alarms``. Commands from ``rule.on_raise`` / ``rule.on_clear``
(``{"op": "led", "args": {"state": "on"}}``) go to the control topic keyed by device id, with a cid derived from
the alarm id and transition (a replay produces the same command id).
"""

from cloud.alarms.engine import AlarmEngine, ack_event
from cloud.alarms.rules import KINDS, METRICS, RuleSpec, validate_rule
from cloud.alarms.service import AlarmService

__all__ = ["AlarmService", "AlarmEngine", "RuleSpec", "validate_rule", "ack_event", "KINDS", "METRICS"]
