"""All configuration, read from the environment in one place.

Every service calls :func:`load` once at start-up. A missing or malformed variable raises
:class:`SettingsError` whose message is one line naming the variable and what is wrong; the CLI prints it
and exits with status 2, so a bad deployment fails loudly instead of half-starting.

The embedded profile (``make demo``) needs no variables at all; production sets ``IOT_PROFILE=production``
and must then name its Kafka, PostgreSQL and Redis explicitly, so it can never silently fall back to the
in-process bus or SQLite.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Callable, Mapping
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Topics:
    telemetry: str = "iot-sensordata"
    status: str = "iot-status"
    acks: str = "iot-acks"
    alarms: str = "alarme"
    control: str = "iot-control"
    command_status: str = "iot-command-status"
    deadletter: str = "iot-deadletter"

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class Settings:
    profile: str = "embedded"  # "embedded" | "production"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    kafka_bootstrap: str | None = None  # None: the in-process bus (embedded profile only)
    database_url: str = "sqlite:///var/iot.db"
    redis_url: str | None = None  # None: in-memory latest values (embedded profile only)
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    web_workers: int = 2  # gunicorn processes of `python -m cloud web`
    web_threads: int = 200  # threads per worker; each open WebSocket holds one
    # reverse proxies in front of the web tier (Traefik in the compose file: 1) whose X-Forwarded-For/-Proto/-Host
    # are trusted; 0 = none (the client address is the TCP peer). The login limiter counts per client address:
    # behind a proxy without this, every user would share the proxy's address and its limit.
    web_proxy_hops: int = 0
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in containers, so Prometheus can scrape
    metrics_port: int = 0  # health + metrics HTTP port of non-web services; 0 = pick a free one
    secret_key: str = "dev-only-change-me"
    topics: Topics = field(default_factory=Topics)
    kafka_partitions: int = 6
    kafka_replication: int = 1
    # what producers compress record batches with. None by default: on one host (the compose file, the bench) the
    # bytes never cross a network, and every batch would be compressed by the producer and decompressed by the
    # broker (validation) and by each consumer group. At 13,000 msg/s, lz4 cost bridge, writer and Kafka 4-8 %
    # more CPU than none (bench_e2e, runs interleaved). Across a network, lz4 trades that CPU for bandwidth.
    kafka_compression: str = "none"  # one of KAFKA_COMPRESSIONS
    telemetry_retention_ms: int = 7 * 24 * 3600 * 1000
    bridge_group: str = "bridge"
    # One bridge subscribes plainly. Several bridges split the load through a shared subscription ($share/...),
    # but Mosquitto 2.0 does not restore shared subscriptions after a crash of the broker itself, so readings
    # published until the bridges resubscribe are lost (measured by bench/chaos.py): only scale out knowingly.
    bridge_shared: bool = False
    bridge_max_inflight: int = 10_000
    # while messages wait for the bus, the bridge reads the broker's socket at most every this many ms: what
    # arrives meanwhile waits in the socket buffer and is read in one go, instead of a wake-up per message or two
    bridge_read_interval_ms: int = 5
    max_payload_bytes: int = 4096
    # the most records in one writer batch. Batches are as large as what arrived while the previous one was stored
    # (~1,200 rows at 20,000 msg/s); the cap binds only when the writer is behind, and then larger batches let it
    # catch up: with 2,000, a writer behind at 20,000 msg/s stayed 1.5-4 s behind (batches of 1,991 rows, p50)
    writer_batch_size: int = 10_000
    # the shortest time a writer batch stays open; it then closes once the store stage is free and nothing more
    # is waiting (group commit, cloud.writer.Writer._collect), so batches grow with the load by themselves
    writer_batch_ms: int = 5
    # the newest reading of a device whose tenant nobody watches live goes to the cache (Redis) at most this often,
    # readings of watched tenants with every batch; 0: every batch (why: cloud.writer.Writer._cache_stage)
    cache_flush_ms: int = 1000
    # whether webhook URLs may name loopback, private and link-local addresses. Off by default: a tenant's admin
    # could otherwise make the notifier POST into the platform's own network (Redis, the database, cloud metadata).
    # On for receivers inside a network you trust, the demo and the tests.
    webhook_allow_private: bool = False
    log_level: str = "INFO"

    @property
    def production(self) -> bool:
        return self.profile == "production"


# --- parsers: each returns the value or raises ValueError with what is wrong -------------------------------

def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected {lo}..{hi}, got {value}")
        return value

    return parse


# librdkafka's compression.type values (all built into confluent-kafka's wheels; tests round-trip each through Kafka)
KAFKA_COMPRESSIONS = ("none", "lz4", "zstd", "snappy", "gzip")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {raw!r}")
        return raw

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes:
            raise ValueError(f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}, got {raw!r}")
        if parts.scheme.startswith("sqlite"):
            return raw
        if not parts.hostname:
            raise ValueError(f"URL has no host: {raw!r}")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"URL has an invalid port: {raw!r}") from None
        return raw

    return parse


_HOSTPORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def _bootstrap(raw: str) -> str:
    servers = [s.strip() for s in raw.split(",") if s.strip()]
    if not servers or not all(_HOSTPORT.match(s) for s in servers):
        raise ValueError(f"expected host:port[,host:port...], got {raw!r}")
    return ",".join(servers)


_TOPIC = re.compile(r"^[A-Za-z0-9._\-]{1,249}$")


def _topic(raw: str) -> str:
    if not _TOPIC.match(raw):
        raise ValueError(f"expected a Kafka topic name ([A-Za-z0-9._-], 1..249 chars), got {raw!r}")
    return raw


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _text(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty")
    return raw


# variable name -> (settings field, parser)
_VARIABLES: dict[str, tuple[str, Callable[[str], object]]] = {
    "IOT_PROFILE": ("profile", _choice("embedded", "production")),
    "IOT_MQTT_URL": ("mqtt_url", _url("mqtt", "mqtts")),
    "IOT_KAFKA_BOOTSTRAP": ("kafka_bootstrap", _bootstrap),
    "IOT_DATABASE_URL": ("database_url", _url("postgresql", "postgresql+psycopg", "sqlite")),
    "IOT_REDIS_URL": ("redis_url", _url("redis", "rediss")),
    "IOT_WEB_HOST": ("web_host", _text),
    "IOT_WEB_PORT": ("web_port", _int_range(1, 65535)),
    "IOT_WEB_WORKERS": ("web_workers", _int_range(1, 64)),
    "IOT_WEB_THREADS": ("web_threads", _int_range(1, 10_000)),
    "IOT_WEB_PROXY_HOPS": ("web_proxy_hops", _int_range(0, 8)),
    "IOT_METRICS_HOST": ("metrics_host", _text),
    "IOT_METRICS_PORT": ("metrics_port", _int_range(0, 65535)),
    "IOT_SECRET_KEY": ("secret_key", _text),
    "IOT_KAFKA_PARTITIONS": ("kafka_partitions", _int_range(1, 10_000)),
    "IOT_KAFKA_REPLICATION": ("kafka_replication", _int_range(1, 32)),
    "IOT_KAFKA_COMPRESSION": ("kafka_compression", _choice(*KAFKA_COMPRESSIONS)),
    "IOT_TELEMETRY_RETENTION_MS": ("telemetry_retention_ms", _int_range(60_000, 10**13)),
    "IOT_BRIDGE_GROUP": ("bridge_group", _text),
    "IOT_BRIDGE_SHARED": ("bridge_shared", _bool),
    "IOT_WEBHOOK_ALLOW_PRIVATE": ("webhook_allow_private", _bool),
    "IOT_BRIDGE_MAX_INFLIGHT": ("bridge_max_inflight", _int_range(1, 1_000_000)),
    "IOT_BRIDGE_READ_INTERVAL_MS": ("bridge_read_interval_ms", _int_range(0, 1000)),
    "IOT_MAX_PAYLOAD_BYTES": ("max_payload_bytes", _int_range(64, 1_048_576)),
    "IOT_WRITER_BATCH_SIZE": ("writer_batch_size", _int_range(1, 1_000_000)),
    "IOT_WRITER_BATCH_MS": ("writer_batch_ms", _int_range(0, 60_000)),
    "IOT_CACHE_FLUSH_MS": ("cache_flush_ms", _int_range(0, 60_000)),
    "IOT_LOG_LEVEL": ("log_level", _choice("DEBUG", "INFO", "WARNING", "ERROR")),
}

_TOPIC_VARIABLES = {f"IOT_TOPIC_{f.name.upper()}": f.name for f in fields(Topics)}

# what production must name explicitly (no silent fallback to embedded parts)
_REQUIRED_IN_PRODUCTION = ("IOT_MQTT_URL", "IOT_KAFKA_BOOTSTRAP", "IOT_DATABASE_URL", "IOT_REDIS_URL",
                           "IOT_SECRET_KEY")


def documented_variables() -> list[str]:
    """Every variable :func:`load` reads (the compose file and README are checked against this)."""
    return sorted([*_VARIABLES, *_TOPIC_VARIABLES])


def load(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build the settings from ``environ`` (default ``os.environ``); keyword overrides win (tests, demo)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, (attr, parse) in _VARIABLES.items():
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[attr] = parse(raw.strip())
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}") from None
    topic_values: dict[str, str] = {}
    for name, attr in _TOPIC_VARIABLES.items():
        raw = env.get(name)
        if raw:
            try:
                topic_values[attr] = _topic(raw.strip())
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from None
    if topic_values:
        values["topics"] = Topics(**topic_values)
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.production:
        for name in _REQUIRED_IN_PRODUCTION:
            if not env.get(name) and _VARIABLES[name][0] not in overrides:
                raise SettingsError(f"{name}: required when IOT_PROFILE=production")
        if settings.database_url.startswith("sqlite"):
            raise SettingsError("IOT_DATABASE_URL: production needs PostgreSQL, got a sqlite URL")
    if len(set(settings.topics.all())) != len(settings.topics.all()):
        raise SettingsError("IOT_TOPIC_*: two topics have the same name")
    return settings


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def mqtt_parts(url: str) -> dict[str, object]:
    """Split an MQTT URL into what paho needs: host, port, username, password, tls."""
    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or (8883 if tls else 1883),
        "username": parts.username,
        "password": parts.password,
        "tls": tls,
    }
