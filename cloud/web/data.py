"""The web tier's only door to the database: thin adapters over ``cloud.db.repo`` (tenant-scoped queries).

Every function takes an open session and the tenant id explicitly, forwards to the repo and commits writes (the
repo flushes, the caller owns the transaction). The one read helper the repo does not offer (active alarm counts
per device) lives at the bottom, tenant-scoped the same way.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ARRAY, String, func, literal, or_, select, true

from cloud import webhooks
from cloud.db import repo
from cloud.db.models import ROLLUPS, Alarm, ApiToken, Device, Telemetry, User


NotFound = repo.NotFound  # one exception for "missing or another tenant's" -> 404
LastAdmin = repo.LastAdmin  # -> 409


def pg_connection(s) -> Any:
    """The psycopg connection under session ``s`` on PostgreSQL (hot read paths run plain SQL on it: no Core
    statement to build, no result processing), None on SQLite."""
    conn = s.connection()
    if conn.dialect.name != "postgresql":
        return None
    return conn.connection.dbapi_connection


def _pair(result: Any) -> tuple[list, int | None]:
    """Repo list functions may return a list or (list, total)."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], list):
        return result[0], result[1]
    return list(result), None


# --- devices ----------------------------------------------------------------------------------------------

def list_devices(s, tenant_id: int, search: str | None, sort: str, limit: int, offset: int):
    return _pair(repo.list_devices(s, tenant_id, search=search, sort=sort, limit=limit, offset=offset))


def get_device(s, tenant_id: int, device_id: str) -> Device:
    d = repo.get_device(s, tenant_id, device_id)
    if d is None:
        raise NotFound(f"device {device_id!r} not found")
    return d


def create_device(s, tenant_id: int, device_id: str, name: str) -> tuple[Device, str]:
    device, password = repo.create_device(s, tenant_id, device_id, name)  # ValueError: taken / invalid
    s.commit()
    return device, password


def rename_device(s, tenant_id: int, device_id: str, name: str) -> Device:
    d = repo.rename_device(s, tenant_id, device_id, name)  # NotFound for another tenant's device
    s.commit()
    return d


def rotate_device(s, tenant_id: int, device_id: str) -> str:
    get_device(s, tenant_id, device_id)
    password = repo.rotate_device_password(s, tenant_id, device_id)
    s.commit()
    return password


def revoke_device(s, tenant_id: int, device_id: str) -> Device:
    get_device(s, tenant_id, device_id)
    device = repo.revoke_device(s, tenant_id, device_id)
    s.commit()
    return device


RAW_FIELDS = ("ts", "t", "h", "p", "rssi", "seq", "boot")  # repo.raw_points' keys, in its order
ROLLUP_FIELDS = ("ts", "n", "t", "t_min", "t_max", "h", "h_min", "h_max", "p", "p_min", "p_max")  # rollup_points'


def history(s, tenant_id: int, device_id: str, start: datetime, end: datetime) -> dict[str, Any]:
    """``repo.history``'s answer (same resolution choice, same values, same order) as ROWS:
    ``{"resolution", "bucket_s", "fields", "rows"}``, each row a tuple in ``fields`` order (RAW_FIELDS or
    ROLLUP_FIELDS) with ``ts`` as unix ms (int). The API makes them point dicts (:func:`history_points`) or
    columns (:func:`history_columns`); no per-point dict is built unless the caller asks for points.

    PostgreSQL: the web tier's own query returning ready values -- ``ts`` as epoch milliseconds and the
    roll-up averages computed by the database -- read as plain tuples on the driver's binary cursor. The query
    returns rows only while the tenant owns the device (an EXISTS the database evaluates once), so the
    ownership check costs a statement of its own only when there are no points (404 or an empty answer).
    tests/web/test_api.py checks both give the repository's points."""
    dbapi = pg_connection(s)
    if dbapi is None:
        device_exists(s, tenant_id, device_id)
        result = repo.history(s, tenant_id, device_id, start, end)
        fields = RAW_FIELDS if result["resolution"] == "raw" else ROLLUP_FIELDS
        rows = [(_point_ms(p["ts"]), *[p[k] for k in fields[1:]]) for p in result["points"]]
        return {"resolution": result["resolution"], "bucket_s": result["bucket_s"], "fields": fields,
                "rows": rows}
    resolution = repo.pick_resolution(start, end)
    params = {"tenant": tenant_id, "device": device_id, "end": end, "limit": repo.HISTORY_MAX_POINTS}
    # the driver's own cursor in binary mode: numbers arrive as machine values, not text to parse
    if resolution == "raw":
        params["start"] = start
        with dbapi.cursor(binary=True) as cur:
            rows = cur.execute(_RAW_SQL, params).fetchall()
        if not rows:
            device_exists(s, tenant_id, device_id)
        return {"resolution": "raw", "bucket_s": None, "fields": RAW_FIELDS, "rows": rows}
    unit = 60 if resolution == "1m" else 3600
    params["start"] = datetime.fromtimestamp(int(start.timestamp()) // unit * unit, timezone.utc)
    with dbapi.cursor(binary=True) as cur:
        rows = cur.execute(_ROLLUP_SQL[resolution], params).fetchall()
    if not rows:
        device_exists(s, tenant_id, device_id)
    return {"resolution": resolution, "bucket_s": unit, "fields": ROLLUP_FIELDS, "rows": rows}


def history_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`history`'s rows as point dicts (``repo.raw_points`` / ``repo.rollup_points``: a dict display per
    row, the fastest way to build them)."""
    return (repo.raw_points if result["resolution"] == "raw" else repo.rollup_points)(result["rows"])


def history_columns(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`history`'s rows as one array per field, ``{"ts": [...], "t": [...], ...}`` (a transpose in C, no
    per-point object; orjson writes the tuples as arrays): about a third of the points' build-and-encode CPU
    for a day of one-minute roll-ups."""
    rows = result["rows"]
    if not rows:
        return {f: [] for f in result["fields"]}
    return dict(zip(result["fields"], zip(*rows)))


def history_csv(result: dict[str, Any]) -> str:
    """:func:`history`'s rows as CSV for spreadsheets: a header row, then one row per point, oldest first, with
    the point's time in ISO 8601 UTC first, then every field as the API names it (``ts`` in unix ms too). Every
    value is a number or empty, so no cell can start a spreadsheet formula."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180
    writer.writerow(("time", *result["fields"]))
    for row in result["rows"]:
        ms = row[0]
        when = datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds") if ms is not None \
            else ""
        writer.writerow((when.replace("+00:00", "Z"), *row))
    return out.getvalue()


def _point_ms(ts: Any) -> int | None:
    """A repo point's ``ts`` (a datetime; naive on SQLite = UTC) as unix ms."""
    if ts is None or ts.__class__ is int:
        return ts
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return int(ts.timestamp() * 1000)


# rows only while the tenant owns the device (evaluated once per statement: an InitPlan, not per row)
_OWNED = (f"EXISTS (SELECT 1 FROM {Device.__tablename__} WHERE id = %(device)s AND tenant_id = %(tenant)s) AND "
          "tenant_id = %(tenant)s AND device_id = %(device)s")
# raw readings: exact epoch ms (numeric arithmetic: a reading's ts has microseconds, which a double's epoch
# seconds cannot hold exactly); roll-up buckets are whole minutes / hours (date_trunc in the roll-up job), whose
# epoch seconds a double holds exactly, and date_part's double arithmetic costs PostgreSQL a third less CPU
_RAW_SQL = ("SELECT floor(extract(epoch from ts) * 1000)::bigint, t, h, p, rssi, seq, boot "
            f"FROM {Telemetry.__tablename__} WHERE {_OWNED} AND ts >= %(start)s AND ts < %(end)s "
            "ORDER BY ts, boot, seq LIMIT %(limit)s")
_ROLLUP_SQL = {
    res: ("SELECT floor(date_part('epoch', bucket) * 1000)::bigint, n, "
          + ", ".join(f"CASE WHEN {m}_n <> 0 THEN {m}_sum / {m}_n END, {m}_min, {m}_max" for m in "thp")
          + f" FROM {model.__tablename__} WHERE {_OWNED} "
            "AND bucket >= %(start)s AND bucket < %(end)s ORDER BY bucket LIMIT %(limit)s")
    for res, model in ROLLUPS.items()
}


# --- commands ---------------------------------------------------------------------------------------------

def create_command(s, tenant_id: int, device_id: str, cmd, created_by: str):
    row = repo.create_command(s, tenant_id, device_id, cmd, created_by=created_by)
    s.commit()
    return row


def get_command(s, tenant_id: int, cid: str):
    row = repo.get_command(s, tenant_id, cid)
    if row is None:
        raise NotFound(f"command {cid!r} not found")
    return row


def list_commands(s, tenant_id: int, device_id: str | None, limit: int, offset: int):
    return _pair(repo.list_commands(s, tenant_id, device_id=device_id, limit=limit, offset=offset))


# --- alarms -----------------------------------------------------------------------------------------------

def list_alarms(s, tenant_id: int, *, state: str | None, device_id: str | None, severity: str | None,
                limit: int, offset: int):
    return _pair(repo.list_alarms(s, tenant_id, state=state, device_id=device_id, severity=severity,
                                  limit=limit, offset=offset))


def get_alarm(s, tenant_id: int, alarm_id: str):
    a = repo.get_alarm(s, tenant_id, alarm_id)
    if a is None:
        raise NotFound(f"alarm {alarm_id!r} not found")
    return a


def device_names(s, tenant_id: int, device_ids) -> dict[str, str | None]:
    """Display names of these devices of the tenant (alarm rows show them next to the id)."""
    ids = sorted(set(device_ids))
    if not ids:
        return {}
    rows = s.execute(select(Device.id, Device.name).where(Device.tenant_id == tenant_id, Device.id.in_(ids)))
    return {device_id: name for device_id, name in rows}


def ack_alarm(s, tenant_id: int, alarm_id: str, by: str):
    a = repo.ack_alarm(s, tenant_id, alarm_id, by)
    if a is None:
        raise NotFound(f"alarm {alarm_id!r} not found")
    s.commit()
    return a


def clear_alarm(s, tenant_id: int, alarm_id: str, by: str):
    a = repo.clear_alarm(s, tenant_id, alarm_id, by)
    if a is None:
        raise NotFound(f"alarm {alarm_id!r} not found")
    s.commit()
    return a


# --- rules ------------------------------------------------------------------------------------------------

def list_rules(s, tenant_id: int, device_id: str | None = None):
    return list(repo.list_rules(s, tenant_id, device_id=device_id))


def get_rule(s, tenant_id: int, rule_id: int):
    r = repo.get_rule(s, tenant_id, rule_id)
    if r is None:
        raise NotFound(f"rule {rule_id} not found")
    return r


def create_rule(s, tenant_id: int, data: dict):
    r = repo.create_rule(s, tenant_id, **data)
    s.commit()
    return r


def update_rule(s, tenant_id: int, rule_id: int, data: dict):
    r = repo.update_rule(s, tenant_id, rule_id, **data)
    s.commit()
    return r


def delete_rule(s, tenant_id: int, rule_id: int) -> None:
    if not repo.delete_rule(s, tenant_id, rule_id):
        raise NotFound(f"rule {rule_id} not found")
    s.commit()


# --- tokens and users -------------------------------------------------------------------------------------

def create_token(s, tenant_id: int, name: str, role: str) -> tuple[Any, str]:
    tok, secret = repo.create_api_token(s, tenant_id, name, role)
    s.commit()
    return tok, secret


def authenticate_token(s, token: str):
    return repo.authenticate_token(s, token)


def list_tokens(s, tenant_id: int) -> list[ApiToken]:
    return repo.list_api_tokens(s, tenant_id)


def revoke_token(s, tenant_id: int, token_id: int) -> ApiToken:
    tok = repo.revoke_api_token(s, tenant_id, token_id)
    if tok is None:
        raise NotFound(f"token {token_id} not found")
    s.commit()
    return tok


def list_webhooks(s, tenant_id: int):
    return repo.list_webhooks(s, tenant_id)


def create_webhook(s, tenant_id: int, name: str, url: Any, min_severity: Any, settings):
    """A new webhook and its secret; ValueError saying what is wrong with the name, the URL or the severity."""
    try:
        webhooks.check_url(url, settings.webhook_allow_private)
    except ValueError as exc:
        raise ValueError(f"field 'url': {exc}") from None
    row, secret = repo.create_webhook(s, tenant_id, name, url, min_severity)
    s.commit()
    return row, secret


def test_webhook(s, tenant_id: int, webhook_id: int, allow_private: bool) -> dict[str, Any]:
    """Send the webhook a signed test event now: ``{"delivered", "status", "detail"}``."""
    row = repo.get_webhook(s, tenant_id, webhook_id)
    url, secret = row.url, row.secret
    s.rollback()  # no transaction held open while the request goes out (up to the webhook timeout)
    delivered, status, detail = webhooks.send_test_event(url, secret, tenant_id, allow_private)
    return {"delivered": delivered, "status": status, "detail": detail}


def delete_webhook(s, tenant_id: int, webhook_id: int):
    row = repo.delete_webhook(s, tenant_id, webhook_id)
    s.commit()
    return row


def list_users(s, tenant_id: int) -> list[User]:
    return repo.list_users(s, tenant_id)


def create_user(s, tenant_id: int, email: str, password: str, role: str):
    u = repo.create_user(s, tenant_id, email, password, role)
    s.commit()
    return u


def update_user(s, tenant_id: int, user_id: int, role: str | None, password: str | None) -> User:
    """Both changes or neither (one transaction)."""
    u = repo.set_role(s, tenant_id, user_id, role) if role is not None else None
    if password is not None:
        u = repo.set_password(s, tenant_id, user_id, password)
    s.commit()
    return u


def delete_user(s, tenant_id: int, user_id: int) -> User:
    u = repo.delete_user(s, tenant_id, user_id)
    s.commit()
    return u


def change_own_password(s, user_id: int, current: str, new: str) -> User | None:
    u = repo.change_password(s, user_id, current, new)
    if u is not None:
        s.commit()
    return u


# --- web-local read helpers (tenant-scoped) ---------------------------------------------------------------

def active_alarm_counts(s, tenant_id: int, device_ids: list[str] | None = None) -> dict[str, int]:
    q = (select(Alarm.device_id, func.count()).where(Alarm.tenant_id == tenant_id, Alarm.state != "cleared")
         .group_by(Alarm.device_id))
    if device_ids is not None:
        q = q.where(Alarm.device_id.in_(device_ids))
    return {d: n for d, n in s.execute(q)}


def latest_from_db(s, tenant_id: int, device_ids: list[str]) -> dict[str, Telemetry]:
    return repo.latest_reading_per_device(s, tenant_id, device_ids) if device_ids else {}


def recent_readings(s, tenant_id: int, device_id: str, limit: int = 20) -> list[Telemetry]:
    return repo.latest_readings(s, tenant_id, device_id, limit)


# --- hot read paths (Core selects of plain columns on the session's connection: no ORM objects or
# ORM compile step, one round trip each) -------------------

DEVICE_COLUMNS = (Device.id, Device.name, Device.status, Device.last_seen, Device.firmware, Device.boot,
                  Device.mqtt_username, Device.created_at, Device.revoked_at)
FLEET_SORTS = {"id": Device.id, "name": Device.name, "status": Device.status, "last_seen": Device.last_seen,
               "created_at": Device.created_at, "firmware": Device.firmware}


def _like(search: str) -> str:
    return "%" + search.strip().lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


FLEET_COLUMNS = (Device.id, Device.name, Device.status, Device.last_seen)  # what the fleet page shows


def device_page(s, tenant_id: int, search: str | None, sort: str, limit: int, offset: int,
                columns: tuple = DEVICE_COLUMNS) -> tuple[list[Any], int]:
    """One page of the tenant's devices with each one's active alarm count and the total, in ONE query:
    plain column rows (attribute access like a Device: ``row.id``, ``row.name``, ... plus ``row.alarms``).

    Same filter and order as ``repo.list_devices`` (search in id or name, case-insensitive; ``sort`` one of
    FLEET_SORTS, '-' for descending, ties by id). The total comes from ``count(*) OVER ()`` (computed before
    LIMIT); only a page past the end needs a second query for it."""
    alarms = (select(Alarm.device_id.label("device_id"), func.count().label("n"))
              .where(Alarm.tenant_id == tenant_id, Alarm.state != "cleared")
              .group_by(Alarm.device_id).subquery())
    where = [Device.tenant_id == tenant_id]
    if search:
        pattern = _like(search)
        where.append(or_(func.lower(Device.id).like(pattern, escape="\\"),
                         func.lower(Device.name).like(pattern, escape="\\")))
    descending = (sort or "").startswith("-")
    column = FLEET_SORTS.get((sort or "id").lstrip("-"))
    if column is None:
        raise ValueError(f"sort must be one of {', '.join(FLEET_SORTS)} (prefix '-' for descending)")
    order = column.desc().nulls_last() if descending else column.asc()
    query = (select(*columns, func.coalesce(alarms.c.n, 0).label("alarms"),
                    func.count().over().label("total"))
             .outerjoin(alarms, alarms.c.device_id == Device.id)
             .where(*where).order_by(order, Device.id)
             .limit(max(0, min(int(limit), 1000))).offset(max(0, int(offset))))
    rows = s.connection().execute(query).all()
    if rows:
        return rows, int(rows[0].total)
    total = s.connection().scalar(select(func.count()).select_from(Device).where(*where)) or 0
    return rows, int(total)


def _unix_ms(value: datetime | None) -> float | None:
    """``datetime.timestamp() * 1000``; a naive value (SQLite) is UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp() * 1000


def fleet_page(s, tenant_id: int, search: str | None, sort: str, limit: int, offset: int) -> tuple[list, int]:
    """The fleet page's rows as plain tuples ``(id, name, status, last_seen, active alarms, last_seen as unix
    ms (float) or None)`` and the total;
    the same filter, order and counts as ``device_page``. PostgreSQL: one statement on the driver's binary
    cursor (no per-row processing in Python beyond the driver's); SQLite: ``device_page``."""
    dbapi = pg_connection(s)
    if dbapi is None:
        rows, total = device_page(s, tenant_id, search, sort, limit, offset, columns=FLEET_COLUMNS)
        return [(*r[:5], _unix_ms(r[3])) for r in rows], total
    descending = (sort or "").startswith("-")
    name = (sort or "id").lstrip("-")
    if name not in FLEET_SORTS:
        raise ValueError(f"sort must be one of {', '.join(FLEET_SORTS)} (prefix '-' for descending)")
    params: dict[str, Any] = {"tenant": tenant_id, "limit": max(0, min(int(limit), 1000)),
                              "offset": max(0, int(offset))}
    where = "d.tenant_id = %(tenant)s"
    if search:
        params["pattern"] = _like(search)
        where += " AND (lower(d.id) LIKE %(pattern)s ESCAPE '\\' OR lower(d.name) LIKE %(pattern)s ESCAPE '\\')"
    direction = "DESC NULLS LAST" if descending else "ASC"
    # the page first (sorted, limited), then the alarm counts of its rows only and the total by an index-only
    # count: a count(*) OVER () and the alarms join over every device of the tenant cost the database more
    sql = ("SELECT p.id, p.name, p.status, p.last_seen, coalesce(a.n, 0), date_part('epoch', p.last_seen) * 1000, "
           f"(SELECT count(*) FROM devices d WHERE {where}) "
           f"FROM (SELECT d.id, d.name, d.status, d.last_seen, d.{name} AS k FROM devices d WHERE {where} "
           f"ORDER BY d.{name} {direction}, d.id LIMIT %(limit)s OFFSET %(offset)s) p "
           "LEFT JOIN (SELECT device_id, count(*) AS n FROM alarms WHERE tenant_id = %(tenant)s "
           "AND state <> 'cleared' GROUP BY device_id) a ON a.device_id = p.id "
           f"ORDER BY p.k {direction}, p.id")
    with dbapi.cursor(binary=True) as cur:
        rows = cur.execute(sql, params).fetchall()
    if rows:
        return [r[:6] for r in rows], int(rows[0][6])
    _, total = device_page(s, tenant_id, search, sort, 0, 0, columns=FLEET_COLUMNS)
    return [], total


_EXISTS_SQL = f"SELECT 1 FROM {Device.__tablename__} WHERE id = %s AND tenant_id = %s"


def device_exists(s, tenant_id: int, device_id: str) -> None:
    """NotFound unless the tenant owns the device (a primary-key probe, no ORM object)."""
    dbapi = pg_connection(s)
    if dbapi is not None:
        with dbapi.cursor() as cur:
            found = cur.execute(_EXISTS_SQL, (device_id, tenant_id)).fetchone()
    else:
        found = s.connection().execute(select(Device.id).where(Device.id == device_id,
                                                               Device.tenant_id == tenant_id)).first()
    if found is None:
        raise NotFound(f"device {device_id!r} not found")


READING_KEYS = ("t", "h", "p", "rssi", "ts", "seq", "boot")


def latest_readings_batch(s, tenant_id: int, device_ids: list[str]) -> dict[str, dict]:
    """The newest reading of each of ``device_ids`` as ``{t, h, p, rssi, ts, seq, boot}`` dicts, for the devices
    the cache does not know. PostgreSQL: one query (a LATERAL index probe per device); SQLite (demo): one small
    query per device."""
    if not device_ids:
        return {}
    cols = (Telemetry.t, Telemetry.h, Telemetry.p, Telemetry.rssi, Telemetry.ts, Telemetry.seq, Telemetry.boot)
    out: dict[str, dict] = {}
    if s.get_bind().dialect.name == "postgresql":
        ids = func.unnest(literal(list(device_ids), ARRAY(String))).table_valued("id").render_derived(name="ids")
        newest = (select(*cols).where(Telemetry.tenant_id == tenant_id, Telemetry.device_id == ids.c.id)
                  .order_by(Telemetry.ts.desc(), Telemetry.boot.desc(), Telemetry.seq.desc()).limit(1).lateral("newest"))
        rows = s.connection().execute(select(ids.c.id, *newest.c).select_from(ids).join(newest, true()))
        for device_id, *values in rows:  # unpacked: Row.t is SQLAlchemy's deprecated typed-tuple accessor
            out[device_id] = dict(zip(READING_KEYS, values))
        return out
    for device_id in device_ids:
        row = s.execute(select(*cols).where(Telemetry.tenant_id == tenant_id, Telemetry.device_id == device_id)
                        .order_by(Telemetry.ts.desc(), Telemetry.boot.desc(), Telemetry.seq.desc()).limit(1)).first()
        if row is not None:
            out[device_id] = dict(zip(READING_KEYS, row))
    return out


# --- authentication (every request): plain columns by primary key / unique digest ------------------------

_SESSION_USER_SQL = f"SELECT id, tenant_id, email, role, password_hash FROM {User.__tablename__} WHERE id = %s"
_TOKEN_SQL = (f"SELECT tenant_id, name, role FROM {ApiToken.__tablename__} "
              "WHERE token_hash = %s AND revoked_at IS NULL")


def session_user(s, user_id: int) -> tuple | None:
    """(id, tenant_id, email, role, password_hash) of a user, or None. PostgreSQL: one statement on the driver's
    cursor (building and executing a Core select per request cost more client CPU than the lookup itself)."""
    dbapi = pg_connection(s)
    if dbapi is not None:
        with dbapi.cursor() as cur:
            return cur.execute(_SESSION_USER_SQL, (user_id,)).fetchone()
    row = s.connection().execute(select(User.id, User.tenant_id, User.email, User.role, User.password_hash)
                                 .where(User.id == user_id)).first()
    return tuple(row) if row is not None else None


def token_by_digest(s, digest: str) -> tuple | None:
    """(tenant_id, name, role) of the live API token with this sha256 digest (``passwords.token_digest``; an
    index probe: tokens are long random strings, so a fast digest is enough, no per-request KDF), or None."""
    dbapi = pg_connection(s)
    if dbapi is not None:
        with dbapi.cursor() as cur:
            return cur.execute(_TOKEN_SQL, (digest,)).fetchone()
    row = s.connection().execute(select(ApiToken.tenant_id, ApiToken.name, ApiToken.role)
                                 .where(ApiToken.token_hash == digest, ApiToken.revoked_at.is_(None))).first()
    return tuple(row) if row is not None else None
