"""Tenant-scoped data access: the functions the web tier and the services use.

Conventions
  * Every function takes an open :class:`~sqlalchemy.orm.Session` first and, where the data is a customer's,
    the ``tenant_id`` explicitly; a row of another tenant is indistinguishable from a missing one (``None`` /
    :class:`NotFound`).
  * Write functions ``flush`` (so ids and constraint errors appear at once) but do **not** commit: the caller
    owns the transaction (``session.commit()``, or :func:`cloud.db.session_scope`).
  * List functions with paging return ``(items, total)``.
  * Invalid input raises ``ValueError`` with a message meant for the user (rules, roles, command args).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

from psycopg.pq import TransactionStatus
from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from cloud import schema
from cloud.db.models import (ROLLUPS, Alarm, ApiToken, Command, Device, Rule, Telemetry, Tenant, User, Webhook,
                              utcnow)
from cloud.passwords import (dummy_verify, hash_device_password, hash_password, new_secret, token_digest,
                             verify_password)

ROLES = ("admin", "operator", "viewer")
DEVICE_SORTS = {
    "id": Device.id, "name": Device.name, "status": Device.status, "last_seen": Device.last_seen,
    "created_at": Device.created_at, "firmware": Device.firmware,
}
# history(): the resolution picked for a window (auto): raw up to RAW_MAX, one-minute roll-ups up to MINUTE_MAX
RAW_MAX = timedelta(hours=3)
MINUTE_MAX = timedelta(days=3)
HISTORY_MAX_POINTS = 20_000


class NotFound(LookupError):
    """The row does not exist for this tenant."""


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# --- tenants and users ------------------------------------------------------------------------------------

def create_tenant(session: Session, name: str, retention_days: int = 30) -> Tenant:
    name = (name or "").strip()
    if not name:
        raise ValueError("tenant name must not be empty")
    if not 1 <= int(retention_days) <= 3650:
        raise ValueError("retention_days must be 1..3650")
    tenant = Tenant(name=name, retention_days=int(retention_days))
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(session: Session, tenant_id: int) -> Tenant | None:
    return session.get(Tenant, tenant_id)


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.id)))


def set_retention(session: Session, tenant_id: int, retention_days: int) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} not found")
    if not 1 <= int(retention_days) <= 3650:
        raise ValueError("retention_days must be 1..3650")
    tenant.retention_days = int(retention_days)
    session.flush()
    return tenant


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def create_user(session: Session, tenant_id: int, email: str, password: str, role: str = "viewer") -> User:
    email = (email or "").strip().lower()
    if "@" not in email or len(email) > 254:
        raise ValueError("a valid email address is required")
    if not password or len(password) < 8:
        raise ValueError("the password must have at least 8 characters")
    if session.scalar(select(User.id).where(User.email == email)) is not None:
        raise ValueError(f"a user with email {email} already exists")
    user = User(tenant_id=tenant_id, email=email, password_hash=hash_password(password), role=_check_role(role))
    session.add(user)
    session.flush()
    return user


def set_password(session: Session, tenant_id: int, user_id: int, password: str) -> User:
    user = _tenant_user(session, tenant_id, user_id)
    if not password or len(password) < 8:
        raise ValueError("the password must have at least 8 characters")
    user.password_hash = hash_password(password)
    session.flush()
    return user


class LastAdmin(ValueError):
    """The change would leave a tenant without an admin (nobody could then manage its users or devices)."""


def _tenant_user(session: Session, tenant_id: int, user_id: int) -> User:
    user = session.scalar(select(User).where(User.tenant_id == tenant_id, User.id == user_id))
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def _keep_an_admin(session: Session, user: User) -> None:
    """Raise LastAdmin when ``user`` is the tenant's only admin. Locks the tenant's admin rows first, so two
    admins demoting each other at the same moment cannot both succeed (on SQLite writers are serialised)."""
    if user.role != "admin":
        return
    admins = session.scalars(select(User.id).where(User.tenant_id == user.tenant_id, User.role == "admin")
                             .with_for_update()).all()
    if len(admins) <= 1:
        raise LastAdmin(f"{user.email} is the tenant's last admin; make another user admin first")


def set_role(session: Session, tenant_id: int, user_id: int, role: str) -> User:
    user = _tenant_user(session, tenant_id, user_id)
    if _check_role(role) != "admin":
        _keep_an_admin(session, user)
    user.role = role
    session.flush()
    return user


def delete_user(session: Session, tenant_id: int, user_id: int) -> User:
    """Remove a user: its sessions end with their next request (every request looks the user up)."""
    user = _tenant_user(session, tenant_id, user_id)
    _keep_an_admin(session, user)
    session.delete(user)
    session.flush()
    return user


def change_password(session: Session, user_id: int, current: str, new: str) -> User | None:
    """The user with its new password, or None when ``current`` is wrong."""
    user = session.get(User, user_id)
    if user is None or not verify_password(current, user.password_hash):
        return None
    if not new or len(new) < 8:
        raise ValueError("the password must have at least 8 characters")
    user.password_hash = hash_password(new)
    session.flush()
    return user


def list_users(session: Session, tenant_id: int) -> list[User]:
    return list(session.scalars(select(User).where(User.tenant_id == tenant_id).order_by(User.email)))


def authenticate(session: Session, email: str, password: str) -> User | None:
    """The user if the password is right, else None (same time spent for unknown emails)."""
    user = session.scalar(select(User).where(User.email == (email or "").strip().lower()))
    if user is None:
        dummy_verify()
        return None
    return user if verify_password(password, user.password_hash) else None


# --- API tokens -------------------------------------------------------------------------------------------

def create_api_token(session: Session, tenant_id: int, name: str, role: str = "viewer") -> tuple[ApiToken, str]:
    """A new token; the token itself is returned only here (the database keeps its sha256)."""
    name = (name or "").strip()
    if not name:
        raise ValueError("token name must not be empty")
    token = "iot_" + new_secret(30)
    row = ApiToken(tenant_id=tenant_id, name=name[:120], token_hash=token_digest(token), role=_check_role(role))
    session.add(row)
    session.flush()
    return row, token


def authenticate_token(session: Session, token: str) -> ApiToken | None:
    if not token:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_digest(token)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def list_api_tokens(session: Session, tenant_id: int) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).where(ApiToken.tenant_id == tenant_id).order_by(ApiToken.id)))


def revoke_api_token(session: Session, tenant_id: int, token_id: int) -> ApiToken | None:
    row = session.scalar(select(ApiToken).where(ApiToken.tenant_id == tenant_id, ApiToken.id == token_id))
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


# --- webhooks (alarm notifications, cloud.notifier) -------------------------------------------------------

def create_webhook(session: Session, tenant_id: int, name: str, url: str,
                   min_severity: str = "warning") -> tuple[Webhook, str]:
    """A new webhook and its signing secret (returned here; shown to the admin once). ``url`` must already be
    checked (``cloud.webhooks.check_url``)."""
    name = (name or "").strip()
    if not name:
        raise ValueError("webhook name must not be empty")
    if min_severity not in schema.SEVERITIES:
        raise ValueError(f"min_severity must be one of {', '.join(schema.SEVERITIES)}")
    secret = "whsec_" + new_secret(24)
    row = Webhook(tenant_id=tenant_id, name=name[:120], url=url, secret=secret, min_severity=min_severity)
    session.add(row)
    session.flush()
    return row, secret


def list_webhooks(session: Session, tenant_id: int) -> list[Webhook]:
    return list(session.scalars(select(Webhook).where(Webhook.tenant_id == tenant_id).order_by(Webhook.id)))


def get_webhook(session: Session, tenant_id: int, webhook_id: int) -> Webhook:
    row = session.scalar(select(Webhook).where(Webhook.tenant_id == tenant_id, Webhook.id == webhook_id))
    if row is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return row


def delete_webhook(session: Session, tenant_id: int, webhook_id: int) -> Webhook:
    row = get_webhook(session, tenant_id, webhook_id)
    session.delete(row)
    session.flush()
    return row


# --- devices ----------------------------------------------------------------------------------------------

def create_device(session: Session, tenant_id: int, device_id: str, name: str | None = None) -> tuple[Device, str]:
    """Provision a device. Returns (device, mqtt_password); the password is shown this once and stored hashed
    (Mosquitto's PBKDF2 format). The MQTT username is the device id."""
    if not device_id or not schema.DEVICE_ID.match(device_id):
        raise ValueError("device id must be 1-64 characters of letters, digits, '.', '_', '-' "
                         "and start with a letter or digit")
    if session.get(Device, device_id) is not None:
        raise ValueError(f"device id {device_id} is already taken")
    if session.get(Tenant, tenant_id) is None:
        raise NotFound(f"tenant {tenant_id} not found")
    password = new_secret(24)
    device = Device(id=device_id, tenant_id=tenant_id, name=(name or device_id).strip()[:120] or device_id,
                    mqtt_username=device_id, password_hash=hash_device_password(password))
    session.add(device)
    session.flush()
    return device, password


def get_device(session: Session, tenant_id: int, device_id: str) -> Device | None:
    return session.scalar(select(Device).where(Device.tenant_id == tenant_id, Device.id == device_id))


def _device_or_raise(session: Session, tenant_id: int, device_id: str) -> Device:
    device = get_device(session, tenant_id, device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} not found")
    return device


def rename_device(session: Session, tenant_id: int, device_id: str, name: str) -> Device:
    device = _device_or_raise(session, tenant_id, device_id)
    name = (name or "").strip()
    if not name:
        raise ValueError("device name must not be empty")
    device.name = name[:120]
    session.flush()
    return device


def rotate_device_password(session: Session, tenant_id: int, device_id: str) -> str:
    """A new MQTT password (returned once); the old one stops working. Un-revokes a revoked device."""
    device = _device_or_raise(session, tenant_id, device_id)
    password = new_secret(24)
    device.password_hash = hash_device_password(password)
    device.mqtt_username = device.id
    device.revoked_at = None
    session.flush()
    return password


# the web engineer's and the brief's names for the same thing
rotate_credentials = rotate_device_password


def revoke_device(session: Session, tenant_id: int, device_id: str) -> Device:
    """Revoke the device's MQTT credentials (it can no longer connect); its data stays."""
    device = _device_or_raise(session, tenant_id, device_id)
    device.password_hash = None
    device.revoked_at = utcnow()
    session.flush()
    return device


revoke_credentials = revoke_device


def delete_device(session: Session, tenant_id: int, device_id: str) -> None:
    session.delete(_device_or_raise(session, tenant_id, device_id))
    session.flush()


def list_devices(session: Session, tenant_id: int, search: str | None = None, sort: str = "id",
                 limit: int = 50, offset: int = 0) -> tuple[list[Device], int]:
    """A page of the tenant's devices and the total. ``search`` matches id or name (case-insensitive);
    ``sort`` is one of id, name, status, last_seen, created_at, firmware, with a leading '-' for descending."""
    query = select(Device).where(Device.tenant_id == tenant_id)
    if search:
        pattern = "%" + search.strip().lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(or_(func.lower(Device.id).like(pattern, escape="\\"),
                                func.lower(Device.name).like(pattern, escape="\\")))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    descending = (sort or "").startswith("-")
    column = DEVICE_SORTS.get((sort or "id").lstrip("-"))
    if column is None:
        raise ValueError(f"sort must be one of {', '.join(DEVICE_SORTS)} (prefix '-' for descending)")
    order = column.desc() if descending else column.asc()
    if descending:
        order = order.nulls_last()
    query = query.order_by(order, Device.id).limit(max(0, min(int(limit), 1000))).offset(max(0, int(offset)))
    return list(session.scalars(query)), int(total)


def device_tenant_map(session: Session, include_revoked: bool = True) -> dict[str, int]:
    """device id -> tenant id of every provisioned device (services use it to route and to spot unknown ids)."""
    query = select(Device.id, Device.tenant_id)
    if not include_revoked:
        query = query.where(Device.revoked_at.is_(None))
    return {device_id: tenant_id for device_id, tenant_id in session.execute(query)}


def mosquitto_password_file(session: Session) -> str:
    """The lines of a Mosquitto ``password_file`` (``username:$7$...``) for every device not revoked."""
    rows = session.execute(select(Device.mqtt_username, Device.password_hash)
                           .where(Device.revoked_at.is_(None), Device.password_hash.is_not(None),
                                  Device.mqtt_username.is_not(None)).order_by(Device.id))
    return "".join(f"{user}:{hashed}\n" for user, hashed in rows)


def verify_device_password(session: Session, device_id: str, password: str) -> bool:
    device = session.get(Device, device_id)
    if device is None or device.revoked_at is not None:
        dummy_verify()
        return False
    return verify_password(password, device.password_hash)


# --- telemetry --------------------------------------------------------------------------------------------

class Reading:
    """A stored reading as :func:`latest_readings` returns it: the columns of :class:`Telemetry` as attributes,
    for reading only. (Building and identity-mapping an ORM entity per row cost more than the query itself for
    the 500-row page the dashboard asks for.)"""

    __slots__ = ("device_id", "boot", "seq", "tenant_id", "ts", "received_at", "t", "h", "p", "rssi", "up",
                 "ts_estimated")  # Telemetry's columns (checked below)

    def __init__(self, device_id, boot, seq, tenant_id, ts, received_at, t, h, p, rssi, up, ts_estimated):
        self.device_id = device_id
        self.boot = boot
        self.seq = seq
        self.tenant_id = tenant_id
        self.ts = ts
        self.received_at = received_at
        self.t = t
        self.h = h
        self.p = p
        self.rssi = rssi
        self.up = up
        self.ts_estimated = ts_estimated

    def __repr__(self) -> str:
        return f"Reading({self.device_id!r}, boot={self.boot}, seq={self.seq}, ts={self.ts!s})"


assert set(Reading.__slots__) == {c.name for c in Telemetry.__table__.columns}, "Reading must mirror Telemetry"
_READING_COLUMNS = [Telemetry.__table__.c[name] for name in Reading.__slots__]


def latest_readings(session: Session, tenant_id: int, device_id: str, limit: int = 100) -> list[Reading]:
    """The device's newest readings, newest first (ties in ts: the later boot, then the higher seq first).

    The order is exactly PostgreSQL's primary key (device_id, ts, boot, seq) read backwards, and the daily
    partitions are range partitions on ts, so the plan is an ordered Append of backward key scans that stops at
    ``limit`` rows: usually within the newest partition, without a sort and without opening the older ones.

    On PostgreSQL the newest partitions are asked first (ts from yesterday's midnight UTC on), so the planner
    prunes the older partitions instead of planning a scan of each. Without the bound, planning + execution of
    this statement took 0.5 ms with 12 daily partitions, 1.8 ms with 32 (30 days kept), 10 ms with 92 and 54 ms
    with 367 (a tenant keeping a year); with it, 0.25 ms at each count. Only a device with fewer readings since
    then is read further back, in a second statement. The rows are the same as one query's: every row with ts
    at or after the bound comes before every row below it in this order."""
    limit = max(1, min(int(limit), 10_000))
    if _is_postgres(session):
        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        bound = today - timedelta(days=1)
        rows = _pg_fetch(session, _PG_LATEST_SINCE, (tenant_id, device_id, bound, limit))
        if len(rows) < limit:
            rows += _pg_fetch(session, _PG_LATEST_BEFORE, (tenant_id, device_id, bound, limit - len(rows)))
        return [Reading(*row) for row in rows]
    query = (select(*_READING_COLUMNS).where(Telemetry.tenant_id == tenant_id, Telemetry.device_id == device_id)
             .order_by(Telemetry.ts.desc(), Telemetry.boot.desc(), Telemetry.seq.desc()).limit(limit))
    return [Reading(*row) for row in session.execute(query)]


# PostgreSQL read paths: the statement straight on psycopg's cursor in binary format. SQLAlchemy's per-value
# result processing (type decorators on 500-1,440 rows) was most of these queries' client CPU; psycopg returns
# timestamptz as aware datetimes in the session's time zone (UTC on the platform's servers; converted otherwise).
_PG_LATEST = (f"SELECT {', '.join(Reading.__slots__)} FROM telemetry WHERE tenant_id = %s AND device_id = %s "
              "{} ORDER BY ts DESC, boot DESC, seq DESC LIMIT %s")
_PG_LATEST_SINCE = _PG_LATEST.format("AND ts >= %s")
_PG_LATEST_BEFORE = _PG_LATEST.format("AND ts < %s")
_PG_ROLLUP = {
    name: ("SELECT bucket, n, " + ", ".join(f"CASE WHEN {m}_n > 0 THEN {m}_sum / {m}_n END, {m}_min, {m}_max"
                                           for m in "thp")
           + f" FROM {model.__tablename__} WHERE tenant_id = %s AND device_id = %s AND bucket >= %s "
             "AND bucket < %s ORDER BY bucket LIMIT %s")
    for name, model in ROLLUPS.items()}


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _pg_fetch(session: Session, sql: str, params: tuple) -> list[tuple]:
    """Rows of ``sql`` from the session's own connection, with every datetime in UTC.

    Round trips are what a web request waits for on a busy machine (each one wakes the backend, then this
    thread). When the session has not opened a transaction on the connection yet (a request's first read), the
    statement runs on its own, as SQLAlchemy's pool ping does: one SELECT is atomic and under READ COMMITTED a
    transaction would have given it the same snapshot, but it would have cost a BEGIN and, when the session
    closes, a ROLLBACK round trip (psycopg skips the ROLLBACK of an idle connection). Inside an open transaction
    it runs in that transaction.

    Never a prepared statement (``prepare=False``): psycopg deallocates every prepared statement of a connection
    after each ROLLBACK, and sessions end in one, so preparing would cost a PARSE round trip now and a
    DEALLOCATE ALL round trip at the next rollback, more than the planning it saves (0.1-0.3 ms here)."""
    conn = session.connection().connection.driver_connection
    alone = not conn.autocommit and conn.info.transaction_status == _IDLE
    if alone:
        conn.autocommit = True
    try:
        with conn.cursor(binary=True) as cursor:
            cursor.execute(sql, params, prepare=False)
            rows = cursor.fetchall()
    finally:
        if alone:
            try:
                conn.autocommit = False
            except Exception:  # the connection broke during the statement: never hand it on in autocommit
                conn.close()
    if rows and any(isinstance(v, datetime) and v.utcoffset() != _ZERO for v in rows[0]):
        utc = timezone.utc  # the session's time zone is not UTC (the values are UTC-aware as they come otherwise)
        rows = [tuple(v.astimezone(utc) if isinstance(v, datetime) else v for v in row) for row in rows]
    return rows


_IDLE = TransactionStatus.IDLE
_ZERO = timedelta(0)


def latest_reading_per_device(session: Session, tenant_id: int, device_ids: list[str]) -> dict[str, Reading]:
    """The newest reading of each device (what the cache holds; used when Redis is empty or down)."""
    result: dict[str, Telemetry] = {}
    for device_id in device_ids:
        rows = latest_readings(session, tenant_id, device_id, 1)
        if rows:
            result[device_id] = rows[0]
    return result


def pick_resolution(start: datetime, end: datetime) -> str:
    span = end - start
    if span <= RAW_MAX:
        return "raw"
    if span <= MINUTE_MAX:
        return "1m"
    return "1h"


_ROLLUP_KEYS = ("ts", "n", "t", "t_min", "t_max", "h", "h_min", "h_max", "p", "p_min", "p_max")


def raw_points(rows) -> list[dict[str, Any]]:
    """Raw rows ``(ts, t, h, p, rssi, seq, boot)`` as history points (a dict display per row: about twice as
    fast as ``dict(zip(keys, row))``)."""
    return [{"ts": ts, "t": t, "h": h, "p": p, "rssi": rssi, "seq": seq, "boot": boot}
            for ts, t, h, p, rssi, seq, boot in rows]


def rollup_points(rows) -> list[dict[str, Any]]:
    """Roll-up rows (in _ROLLUP_KEYS order) as point dicts: a dict display per row is about twice as fast as
    ``dict(zip(keys, row))`` (1,440 rows for a day of minutes)."""
    return [{"ts": ts, "n": n, "t": t, "t_min": t_min, "t_max": t_max, "h": h, "h_min": h_min, "h_max": h_max,
             "p": p, "p_min": p_min, "p_max": p_max}
            for ts, n, t, t_min, t_max, h, h_min, h_max, p, p_min, p_max in rows]


def history(session: Session, tenant_id: int, device_id: str, start: datetime, end: datetime,
            resolution: str = "auto") -> dict[str, Any]:
    """Readings of one device in [start, end).

    ``resolution``: "raw", "1m", "1h" or "auto" (raw up to 3 h, one-minute roll-ups up to 3 days, hourly
    beyond). Returns ``{"resolution": r, "bucket_s": None|60|3600, "points": [...]}``; raw points are
    ``{ts, t, h, p, rssi, seq, boot}``, roll-up points ``{ts (bucket start), n, t, h, p (averages),
    t_min, t_max, h_min, h_max, p_min, p_max}``. ``ts`` values are aware UTC datetimes."""
    start, end = _aware(start), _aware(end)
    if start >= end:
        raise ValueError("start must be before end")
    if resolution == "auto":
        resolution = pick_resolution(start, end)
    if resolution == "raw":
        rows = session.execute(
            select(Telemetry.ts, Telemetry.t, Telemetry.h, Telemetry.p, Telemetry.rssi, Telemetry.seq, Telemetry.boot)
            .where(Telemetry.tenant_id == tenant_id, Telemetry.device_id == device_id,
                   Telemetry.ts >= start, Telemetry.ts < end)
            .order_by(Telemetry.ts, Telemetry.boot, Telemetry.seq).limit(HISTORY_MAX_POINTS))
        return {"resolution": "raw", "bucket_s": None, "points": raw_points(rows)}
    model = ROLLUPS.get(resolution)
    if model is None:
        raise ValueError("resolution must be auto, raw, 1m or 1h")
    unit = 60 if resolution == "1m" else 3600
    first_bucket = datetime.fromtimestamp(int(start.timestamp()) // unit * unit, timezone.utc)
    # plain columns, not ORM entities, and the averages computed by the database: a day of one-minute buckets is
    # 1,440 rows, and building (and identity-mapping) an object per row cost more than the query itself. On
    # PostgreSQL the key (device_id, bucket) INCLUDEs every column: an index-only scan in bucket order.
    if _is_postgres(session):
        rows = _pg_fetch(session, _PG_ROLLUP[resolution], (tenant_id, device_id, first_bucket, end,
                                                           HISTORY_MAX_POINTS))
        return {"resolution": resolution, "bucket_s": unit, "points": rollup_points(rows)}
    columns = [model.bucket, model.n]
    for m in "thp":
        count, total = getattr(model, f"{m}_n"), getattr(model, f"{m}_sum")
        columns += [case((count > 0, total / count), else_=None), getattr(model, f"{m}_min"),
                    getattr(model, f"{m}_max")]
    rows = session.execute(
        select(*columns)
        .where(model.tenant_id == tenant_id, model.device_id == device_id,
               model.bucket >= first_bucket, model.bucket < end)
        .order_by(model.bucket).limit(HISTORY_MAX_POINTS))
    return {"resolution": resolution, "bucket_s": unit, "points": rollup_points(rows)}


# --- commands ---------------------------------------------------------------------------------------------

def create_command(session: Session, tenant_id: int, device_id: str, command: schema.Command,
                   created_by: str | None = None) -> Command:
    """Record a command as "queued" (the caller then produces ``command.to_json()`` to the control topic)."""
    _device_or_raise(session, tenant_id, device_id)
    try:
        args = schema.validate_command_args(command.op, command.args)
    except schema.Rejected as exc:
        raise ValueError(exc.reason) from None
    row = Command(cid=command.cid, tenant_id=tenant_id, device_id=device_id, op=command.op, args=args,
                  status="queued", created_by=created_by, created_at=utcnow(),
                  expires_at=(datetime.fromtimestamp(command.exp / 1000, timezone.utc)
                              if command.exp is not None else None))
    session.add(row)
    session.flush()
    return row


def get_command(session: Session, tenant_id: int, cid: str) -> Command | None:
    return session.scalar(select(Command).where(Command.tenant_id == tenant_id, Command.cid == cid))


def list_commands(session: Session, tenant_id: int, device_id: str | None = None, status: str | None = None,
                  limit: int = 50, offset: int = 0) -> tuple[list[Command], int]:
    query = select(Command).where(Command.tenant_id == tenant_id)
    if device_id:
        query = query.where(Command.device_id == device_id)
    if status:
        query = query.where(Command.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    query = query.order_by(Command.created_at.desc(), Command.cid).limit(max(0, min(int(limit), 1000))) \
        .offset(max(0, int(offset)))
    return list(session.scalars(query)), int(total)


def advance_command(row: Command, state: str, at: datetime | None = None, *, ok: bool | None = None,
                    result: dict | None = None, error: str | None = None) -> bool:
    """Move a command to ``state`` if that is a step forward (schema.COMMAND_STATE_RANK); events arrive out
    of order (the device's ack can overtake the bridge's "sent"). Returns whether anything changed.

    A "sent" arriving after "delivered" still records ``sent_at`` but keeps the state."""
    at = at or utcnow()
    changed = False
    if state == "sent" and row.sent_at is None:
        row.sent_at = at
        changed = True
    if schema.COMMAND_STATE_RANK[state] > schema.COMMAND_STATE_RANK.get(row.status, 0):
        row.status = state
        changed = True
        if schema.COMMAND_STATE_RANK[state] >= 2:
            row.finished_at = at
            if ok is not None:
                row.ok = ok
            if result is not None:
                row.result = result
            if error is not None:
                row.error = error
    return changed


# --- alarms -----------------------------------------------------------------------------------------------

def list_alarms(session: Session, tenant_id: int, state: str | None = None, device_id: str | None = None,
                severity: str | None = None, active: bool | None = None, limit: int = 50,
                offset: int = 0) -> tuple[list[Alarm], int]:
    """Alarms newest first. ``state`` one of raised/acknowledged/cleared, or "active" (not cleared)."""
    query = select(Alarm).where(Alarm.tenant_id == tenant_id)
    if state == "active" or active:
        query = query.where(Alarm.state != "cleared")
    elif state:
        if state not in schema.ALARM_STATES:
            raise ValueError(f"state must be one of active, {', '.join(schema.ALARM_STATES)}")
        query = query.where(Alarm.state == state)
    if device_id:
        query = query.where(Alarm.device_id == device_id)
    if severity:
        query = query.where(Alarm.severity == severity)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    query = query.order_by(Alarm.raised_at.desc(), Alarm.id).limit(max(0, min(int(limit), 1000))) \
        .offset(max(0, int(offset)))
    return list(session.scalars(query)), int(total)


def get_alarm(session: Session, tenant_id: int, alarm_id: str) -> Alarm | None:
    return session.scalar(select(Alarm).where(Alarm.tenant_id == tenant_id, Alarm.id == alarm_id))


def _alarm_state(alarm: Alarm) -> str:
    if alarm.cleared_at is not None:
        return "cleared"
    if alarm.acknowledged_at is not None:
        return "acknowledged"
    return "raised"


def ack_alarm(session: Session, tenant_id: int, alarm_id: str, by: str | None = None,
              at: datetime | None = None) -> Alarm | None:
    """Acknowledge (idempotent; a cleared alarm can still be acknowledged, it stays cleared)."""
    alarm = get_alarm(session, tenant_id, alarm_id)
    if alarm is None:
        return None
    if alarm.acknowledged_at is None:
        alarm.acknowledged_at = at or utcnow()
        alarm.acknowledged_by = by
    alarm.state = _alarm_state(alarm)
    session.flush()
    return alarm


def clear_alarm(session: Session, tenant_id: int, alarm_id: str, by: str | None = None,
                at: datetime | None = None) -> Alarm | None:
    alarm = get_alarm(session, tenant_id, alarm_id)
    if alarm is None:
        return None
    if alarm.cleared_at is None:
        alarm.cleared_at = at or utcnow()
    alarm.state = _alarm_state(alarm)
    session.flush()
    return alarm


def apply_alarm_event(session: Session, tenant_id: int, event: schema.AlarmEvent) -> Alarm:
    """Upsert an alarm from an alarm event. Events may arrive out of order or twice: timestamps are only set
    once and the state is derived from them (cleared > acknowledged > raised), so it never moves back."""
    at = datetime.fromtimestamp(event.ts / 1000, timezone.utc)
    alarm = session.get(Alarm, event.alarm_id)
    if alarm is None:
        alarm = Alarm(id=event.alarm_id, tenant_id=tenant_id, device_id=event.device, rule=event.rule,
                      metric=event.metric, severity=event.severity, state="raised", value=event.value,
                      threshold=event.threshold, raised_at=at)
        session.add(alarm)
    elif alarm.tenant_id != tenant_id:
        raise ValueError(f"alarm {event.alarm_id} belongs to another tenant")
    _apply_alarm_event_to(alarm, event, at)
    return alarm


def _apply_alarm_event_to(alarm, event: schema.AlarmEvent, at: datetime) -> None:
    """apply_alarm_event's rules, on an Alarm or anything with its attributes."""
    if event.state == "raised":
        if at < alarm.raised_at:
            alarm.raised_at = at
        if event.value is not None and alarm.acknowledged_at is None and alarm.cleared_at is None:
            alarm.value = event.value
    elif event.state == "acknowledged" and alarm.acknowledged_at is None:
        alarm.acknowledged_at = at
    elif event.state == "cleared" and alarm.cleared_at is None:
        alarm.cleared_at = at
    alarm.state = _alarm_state(alarm)


_NO_RAISE = datetime.max.replace(tzinfo=timezone.utc)  # apply_alarm_events: a blank alarm, later than any raise
_NO_VALUE = object()  # ... and without a value

# apply_alarm_events on PostgreSQL: existing alarms updated by each one's folded events (see there), in one statement.
# Its value condition and state CASE are _apply_alarm_event_to's value rule and _alarm_state, in SQL, applied to the
# stored row merged with the fold (they cannot run in Python without reading every row first); the equivalence test
# (tests/store/test_alarm_events.py) holds the two to the same result.
_PG_ALARM_UPDATE = (
    "UPDATE alarms r SET "
    "raised_at = least(r.raised_at, d.raised_min), "
    "value = CASE WHEN d.value_set AND r.acknowledged_at IS NULL AND r.cleared_at IS NULL THEN d.value "
    "ELSE r.value END, "
    "acknowledged_at = coalesce(r.acknowledged_at, d.ack_first), "
    "cleared_at = coalesce(r.cleared_at, d.cleared_first), "
    "state = CASE WHEN coalesce(r.cleared_at, d.cleared_first) IS NOT NULL THEN 'cleared' "
    "WHEN coalesce(r.acknowledged_at, d.ack_first) IS NOT NULL THEN 'acknowledged' ELSE 'raised' END "
    "FROM unnest(%s::varchar[], %s::int[], %s::timestamptz[], %s::bool[], %s::float8[], %s::timestamptz[], "
    "%s::timestamptz[]) AS d(id, tenant_id, raised_min, value_set, value, ack_first, cleared_first) "
    "WHERE r.id = d.id AND r.tenant_id = d.tenant_id RETURNING r.id")
# ... and new ones inserted with the state their events give a new alarm
_PG_ALARM_INSERT = (
    "INSERT INTO alarms (id, tenant_id, device_id, rule, metric, severity, state, value, threshold, raised_at, "
    "acknowledged_at, cleared_at) "
    "SELECT * FROM unnest(%s::varchar[], %s::int[], %s::varchar[], %s::varchar[], %s::varchar[], %s::varchar[], "
    "%s::varchar[], %s::float8[], %s::float8[], %s::timestamptz[], %s::timestamptz[], %s::timestamptz[]) "
    "ON CONFLICT (id) DO NOTHING RETURNING id")


def apply_alarm_events(session: Session, events: list[tuple[int, schema.AlarmEvent]]) -> None:
    """apply_alarm_event for each (tenant, event) in order, with the same result. On PostgreSQL in two
    statements for the whole list instead of a query and a flush per event (an alarm storm -- every device of a
    fleet crossing a threshold at once -- came to the writer as thousands of ORM round trips).

    Each alarm's events are folded first, with apply_alarm_event's own rules: onto a new alarm (inserted if
    the alarm does not exist), and onto a blank one, which gives what they change in a stored alarm. That
    change depends on the stored row only through least/coalesce and one condition: raised_at takes the
    earliest "raised" time; acknowledged_at and cleared_at keep a stored time, else take the first such
    event's; the folded value (the last "raised" one before any "acknowledged" or "cleared") is taken only if
    the stored alarm is neither acknowledged nor cleared. An alarm neither updated nor inserted (it belongs to
    another tenant, or another writer inserted it meanwhile) goes through apply_alarm_event, event by event,
    which raises for the other tenant as before."""
    if session.get_bind().dialect.name != "postgresql":
        for tenant_id, event in events:
            apply_alarm_event(session, tenant_id, event)
        return
    folded: dict[str, dict] = {}
    for tenant_id, event in events:
        at = datetime.fromtimestamp(event.ts / 1000, timezone.utc)
        fold = folded.get(event.alarm_id)
        if fold is None:
            # the same rules folded twice: onto a new alarm (what to insert), and onto a blank one (what the
            # events change in a stored alarm: no raise time yet, no value, neither acknowledged nor cleared)
            fold = folded[event.alarm_id] = {
                "tenant": tenant_id, "events": [],
                "new": SimpleNamespace(tenant_id=tenant_id, device_id=event.device, rule=event.rule,
                                       metric=event.metric, severity=event.severity, state="raised",
                                       value=event.value, threshold=event.threshold, raised_at=at,
                                       acknowledged_at=None, cleared_at=None),
                "delta": SimpleNamespace(raised_at=_NO_RAISE, value=_NO_VALUE, acknowledged_at=None,
                                         cleared_at=None, state="raised")}
        fold["events"].append((tenant_id, event))
        if tenant_id != fold["tenant"]:
            fold["mixed"] = True  # the same alarm under two tenants: apply_alarm_event raises for the second
        _apply_alarm_event_to(fold["new"], event, at)
        _apply_alarm_event_to(fold["delta"], event, at)
    simple = {alarm_id: f for alarm_id, f in folded.items() if not f.get("mixed")}
    done: set[str] = set()
    if simple:
        cursor = session.connection().connection.driver_connection.cursor()
        deltas = [f["delta"] for f in simple.values()]
        cursor.execute(_PG_ALARM_UPDATE, (
            list(simple), [f["tenant"] for f in simple.values()],
            [None if d.raised_at is _NO_RAISE else d.raised_at for d in deltas],
            [d.value is not _NO_VALUE for d in deltas], [None if d.value is _NO_VALUE else d.value for d in deltas],
            [d.acknowledged_at for d in deltas], [d.cleared_at for d in deltas]))
        done.update(row[0] for row in cursor.fetchall())
        rest = [(alarm_id, f) for alarm_id, f in simple.items() if alarm_id not in done]
        if rest:
            new = [f["new"] for _, f in rest]
            cursor.execute(_PG_ALARM_INSERT, (
                [alarm_id for alarm_id, _ in rest], [n.tenant_id for n in new], [n.device_id for n in new],
                [n.rule for n in new], [n.metric for n in new], [n.severity for n in new], [n.state for n in new],
                [n.value for n in new], [n.threshold for n in new], [n.raised_at for n in new],
                [n.acknowledged_at for n in new], [n.cleared_at for n in new]))
            done.update(row[0] for row in cursor.fetchall())
    for alarm_id, fold in folded.items():
        if alarm_id not in done:
            for tenant_id, event in fold["events"]:
                apply_alarm_event(session, tenant_id, event)


# --- rules ------------------------------------------------------------------------------------------------

RULE_FIELDS = ("device_id", "name", "kind", "metric", "min", "max", "hysteresis", "duration_s", "rate_per_min",
               "nodata_s", "severity", "enabled", "on_raise", "on_clear")


def validate_rule(session: Session, tenant_id: int, data: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise rule fields; raises ValueError naming the first problem.

    What makes a rule valid is decided in one place, :func:`cloud.alarms.rules.validate_rule`, the same check
    the alarm engine applies when it loads rules, so a rule the API accepts is a rule the engine runs. Here
    only what needs the database is added: the device must belong to the tenant, and thresholds must lie in
    the sensor's range (a rule outside it could never fire).
    """
    from cloud.alarms.rules import validate_rule as check_rule

    unknown = set(data) - set(RULE_FIELDS)
    if unknown:
        raise ValueError(f"unknown rule field(s): {', '.join(sorted(unknown))}")
    out = check_rule({k: v for k, v in data.items() if k != "device_id"})
    if out["kind"] == "threshold" and out["metric"] in schema.LIMITS:
        lo, hi = schema.LIMITS[out["metric"]]
        for key in ("min", "max"):
            if out[key] is not None and not lo <= out[key] <= hi:
                raise ValueError(f"{key} {out[key]:g} is outside the sensor range {lo:g}..{hi:g} of {out['metric']}")
    device_id = data.get("device_id") or None
    if device_id is not None and get_device(session, tenant_id, device_id) is None:
        raise ValueError(f"device {device_id!r} not found")
    out["device_id"] = device_id
    return out


def _check_rule_name_free(session: Session, tenant_id: int, device_id: str | None, name: str,
                          rule_id: int | None = None) -> None:
    query = select(Rule.id).where(Rule.tenant_id == tenant_id, Rule.name == name,
                                  Rule.device_id.is_(None) if device_id is None else Rule.device_id == device_id)
    if rule_id is not None:
        query = query.where(Rule.id != rule_id)
    if session.scalar(query) is not None:
        scope = f"device {device_id}" if device_id else "the tenant"
        raise ValueError(f"a rule named {name!r} already exists for {scope}")


def create_rule(session: Session, tenant_id: int, **fields: Any) -> Rule:
    data = validate_rule(session, tenant_id, fields)
    _check_rule_name_free(session, tenant_id, data["device_id"], data["name"])
    rule = Rule(tenant_id=tenant_id, **data)
    session.add(rule)
    session.flush()
    return rule


def get_rule(session: Session, tenant_id: int, rule_id: int) -> Rule | None:
    return session.scalar(select(Rule).where(Rule.tenant_id == tenant_id, Rule.id == rule_id))


def list_rules(session: Session, tenant_id: int, device_id: str | None = None,
               enabled_only: bool = False) -> list[Rule]:
    """The tenant's rules; with ``device_id``, the tenant defaults plus that device's overrides."""
    query = select(Rule).where(Rule.tenant_id == tenant_id)
    if device_id is not None:
        query = query.where(or_(Rule.device_id.is_(None), Rule.device_id == device_id))
    if enabled_only:
        query = query.where(Rule.enabled.is_(True))
    return list(session.scalars(query.order_by(Rule.device_id.is_not(None), Rule.device_id, Rule.name)))


def update_rule(session: Session, tenant_id: int, rule_id: int, **fields: Any) -> Rule:
    rule = get_rule(session, tenant_id, rule_id)
    if rule is None:
        raise NotFound(f"rule {rule_id} not found")
    merged = {f: getattr(rule, f) for f in RULE_FIELDS}
    merged.update(fields)
    data = validate_rule(session, tenant_id, merged)
    _check_rule_name_free(session, tenant_id, data["device_id"], data["name"], rule_id)
    for key, value in data.items():
        setattr(rule, key, value)
    rule.updated_at = utcnow()
    session.flush()
    return rule


def delete_rule(session: Session, tenant_id: int, rule_id: int) -> bool:
    rule = get_rule(session, tenant_id, rule_id)
    if rule is None:
        return False
    session.delete(rule)
    session.flush()
    return True


def all_rules(session: Session, enabled_only: bool = True) -> list[Rule]:
    """Every tenant's rules (for the alarm service, which serves all tenants)."""
    query = select(Rule)
    if enabled_only:
        query = query.where(Rule.enabled.is_(True))
    return list(session.scalars(query.order_by(Rule.tenant_id, Rule.id)))

