"""REST API /api/v1 (JSON in, JSON out; errors are {"error": "..."} with a 4xx/5xx status).

Authentication: the session cookie (+ X-CSRF-Token header on writes) or ``Authorization: Bearer <token>``.
Every lookup is scoped to the caller's tenant; another tenant's object is indistinguishable from a missing one
(404).
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from flask import Blueprint, Response, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from cloud import schema
from cloud.web import ctx, data, request_session
from cloud.web import serialize as ser
from cloud.web.auth import ROLES, change_own_password, login_required
from cloud.web.ops import COMMANDS

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_OFFSET = 2**31 - 1  # the databases' integer range; deeper pages do not exist
RANGES = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
DEVICE_SORTS = ("name", "-name", "id", "-id", "last_seen", "-last_seen", "status", "-status")
_produce_lock = threading.Lock()


class BadRequest(ValueError):
    pass


@bp.errorhandler(BadRequest)
def _bad_request(exc):
    return jsonify(error=str(exc)), 400


@bp.errorhandler(schema.Rejected)
def _rejected(exc):
    return jsonify(error=exc.reason), 400


@bp.errorhandler(data.NotFound)
def _not_found(exc):
    return jsonify(error=str(exc.args[0]) if exc.args else "not found"), 404


@bp.errorhandler(HTTPException)
def _http(exc: HTTPException):
    return jsonify(error=exc.description or exc.name), exc.code


# --- helpers ----------------------------------------------------------------------------------------------

def _principal():
    return g.principal


def _tid() -> int:
    return g.principal.tenant_id


def body() -> dict[str, Any]:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise BadRequest("expected a JSON object body (Content-Type: application/json)")
    return payload


def page() -> tuple[int, int]:
    try:
        limit = int(request.args.get("limit", DEFAULT_LIMIT))
        offset = int(request.args.get("offset", 0))
    except ValueError:
        raise BadRequest("limit and offset must be integers") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be 1..{MAX_LIMIT}")
    if not 0 <= offset <= MAX_OFFSET:
        raise BadRequest(f"offset must be 0..{MAX_OFFSET}")
    return limit, offset


def listing(items: list, total: int | None, limit: int, offset: int):
    return json_response({"items": items, "total": total, "limit": limit, "offset": offset})


def _str(payload: dict, key: str, *, max_len: int = 120, required: bool = True, pattern=None) -> str | None:
    value = payload.get(key)
    if value is None or value == "":
        if required:
            raise BadRequest(f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string")
    value = value.strip()
    if not value or len(value) > max_len:
        raise BadRequest(f"field {key!r} must be 1..{max_len} characters")
    if pattern is not None and not pattern.match(value):
        raise BadRequest(f"field {key!r} has an invalid format")
    return value


def _time_arg(name: str) -> datetime | None:
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        if re.fullmatch(r"\d{10,13}", raw):
            value = int(raw)
            return datetime.fromtimestamp(value / 1000 if value > 10**11 else value, timezone.utc)
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise BadRequest(f"{name} must be ISO 8601 or unix seconds/milliseconds") from None


def cached_latest(ids: list[str], fields: tuple[str, ...] | None = None) -> dict[str, dict]:
    """The cache's latest values of these devices, all or only ``fields`` ({} for any it does not know, or when
    it is down)."""
    try:
        return (ctx().cache.get_many(ids, fields) or {}) if ids else {}
    except Exception:  # the cache is an accelerator; the database is the truth
        log.warning("latest-value cache unavailable, reading from the database", exc_info=True)
        return {}


def latest_for(s, tenant_id: int, devices: list) -> dict[str, dict]:
    """Latest reading per device: the cache first, the database for devices the cache does not know.

    Each value is a reading dict (``serialize.reading``); cache entries also carry the writer's fresher
    ``status`` / ``last_seen`` (the database row is updated less often), under the keys ``_status`` and
    ``_last_seen`` for :func:`device_summary`."""
    ids = [d.id for d in devices]
    found: dict[str, dict] = {}
    cached = cached_latest(ids)
    for device_id, value in (cached or {}).items():
        if value and any(value.get(k) is not None for k in ("t", "h", "p")):
            found[device_id] = ser.reading(value)
        if value and (value.get("status") or value.get("last_seen")):
            found.setdefault(device_id, {})
            found[device_id]["_status"] = value.get("status")
            found[device_id]["_last_seen"] = ser.ms(value.get("last_seen"))
    missing = [i for i in ids if i not in found or "t" not in found[i]]
    for device_id, row in data.latest_readings_batch(s, tenant_id, missing).items():
        found[device_id] = {**ser.reading(row), **found.get(device_id, {})}
    return found


def _merge_live(out: dict, latest: dict | None) -> dict | None:
    """Apply the cache's status/last_seen to a serialized device; returns the bare reading (or None)."""
    if not latest:
        return None
    latest = dict(latest)
    status, seen = latest.pop("_status", None), latest.pop("_last_seen", None)
    if status in ("online", "offline"):
        out["status"] = status
    if seen is not None:
        db_seen = ser.ms(out.get("last_seen"))
        if db_seen is None or seen > db_seen:
            out["last_seen"] = ser.iso(datetime.fromtimestamp(seen / 1000, timezone.utc))
    return latest if "t" in latest else None


def device_summary(device, latest: dict | None, alarms: int = 0) -> dict:
    out = ser.device(device)
    out["latest"] = _merge_live(out, latest)
    out["active_alarms"] = alarms
    return out


# --- who am I ---------------------------------------------------------------------------------------------

@bp.get("/me")
@login_required()
def me():
    p = _principal()
    return jsonify(tenant_id=p.tenant_id, email=p.email, role=p.role, auth=p.kind)


# --- devices ----------------------------------------------------------------------------------------------

@bp.get("/devices")
@login_required()
def devices():
    limit, offset = page()
    search = (request.args.get("search") or "").strip()[:120] or None
    sort = request.args.get("sort", "name")
    if sort not in DEVICE_SORTS:
        raise BadRequest(f"sort must be one of {', '.join(DEVICE_SORTS)}")
    s = request_session()
    rows, total = data.device_page(s, _tid(), search, sort, limit, offset)
    latest = latest_for(s, _tid(), rows)
    out = [device_summary(d, latest.get(d.id), d.alarms) for d in rows]
    return listing(out, total, limit, offset)


@bp.post("/devices")
@login_required("admin")
def create_device():
    payload = body()
    device_id = _str(payload, "id", max_len=64, pattern=schema.DEVICE_ID)
    name = _str(payload, "name", required=False) or device_id
    with ctx().session_factory() as s:
        try:
            device, password = data.create_device(s, _tid(), device_id, name)
        except (ValueError, LookupError) as exc:  # repo: duplicate id / invalid
            s.rollback()
            return jsonify(error=str(exc)), 409
        except Exception as exc:
            s.rollback()
            if type(exc).__name__ == "IntegrityError":
                return jsonify(error=f"device id {device_id!r} is already taken"), 409
            raise
        out = ser.device(device)
    return jsonify(device=out, credentials=credentials(out, password), config=device_config(out, password)), 201


def credentials(device: dict, password: str) -> dict:
    from cloud.settings import mqtt_parts
    mqtt = mqtt_parts(ctx().settings.mqtt_url)
    return {"mqtt_host": mqtt["host"], "mqtt_port": mqtt["port"], "tls": mqtt["tls"],
            "username": device["mqtt_username"] or device["id"], "password": password,
            "client_id": device["id"], "note": "the password is shown once; store it now"}


def device_config(device: dict, password: str) -> dict:
    """The firmware's config.json for this device (Wi-Fi fields left for the installer)."""
    c = credentials(device, password)
    return {"device_id": device["id"], "wifi_ssid": "", "wifi_password": "",
            "mqtt_host": c["mqtt_host"], "mqtt_port": c["mqtt_port"], "mqtt_tls": c["tls"],
            "mqtt_user": c["username"], "mqtt_password": password, "interval_s": 10}


@bp.get("/devices/<device_id>")
@login_required()
def device(device_id: str):
    with ctx().session_factory() as s:
        d = data.get_device(s, _tid(), device_id)
        latest = latest_for(s, _tid(), [d]).get(d.id)
        counts = data.active_alarm_counts(s, _tid(), [d.id])
        return jsonify(device_summary(d, latest, counts.get(d.id, 0)))


@bp.patch("/devices/<device_id>")
@login_required("admin")
def rename_device(device_id: str):
    name = _str(body(), "name")
    with ctx().session_factory() as s:
        d = data.rename_device(s, _tid(), device_id, name)
        return jsonify(ser.device(d))


@bp.post("/devices/<device_id>/rotate")
@login_required("admin")
def rotate_device(device_id: str):
    with ctx().session_factory() as s:
        password = data.rotate_device(s, _tid(), device_id)
        out = ser.device(data.get_device(s, _tid(), device_id))
    return jsonify(device=out, credentials=credentials(out, password), config=device_config(out, password))


@bp.post("/devices/<device_id>/revoke")
@login_required("admin")
def revoke_device(device_id: str):
    with ctx().session_factory() as s:
        return jsonify(device=ser.device(data.revoke_device(s, _tid(), device_id)))


@bp.get("/devices/<device_id>/latest")
@login_required()
def latest(device_id: str):
    with ctx().session_factory() as s:
        d = data.get_device(s, _tid(), device_id)
        summary = device_summary(d, latest_for(s, _tid(), [d]).get(d.id))
    reading = summary["latest"] or {k: None for k in ("t", "h", "p", "rssi", "ts", "seq", "boot")}
    return jsonify(device=summary["id"], **reading, status=summary["status"], last_seen=summary["last_seen"])


HISTORY_FORMATS = ("points", "columns", "csv")


@bp.get("/devices/<device_id>/history")
@login_required()
def history(device_id: str):
    """``format=points`` (default): ``points`` is a list of objects; ``format=columns``: ``columns`` is one array
    per field (``{"ts": [...], "t": [...], ...}``, what the dashboard's charts take), the same values without a
    key per value: about half the bytes and a third of the CPU for a day of one-minute roll-ups;
    ``format=csv``: the same points as a file to download (``data.history_csv``)."""
    rng = request.args.get("range")
    fmt = request.args.get("format", "points")
    if fmt not in HISTORY_FORMATS:
        raise BadRequest(f"format must be one of {', '.join(HISTORY_FORMATS)}")
    end = _time_arg("end") or datetime.now(timezone.utc)
    start = _time_arg("start")
    if rng is not None:
        if rng not in RANGES:
            raise BadRequest(f"range must be one of {', '.join(RANGES)}")
        start = end - RANGES[rng]
    if start is None:
        start = end - RANGES["1h"]
    if start >= end:
        raise BadRequest("start must be before end")
    if end - start > timedelta(days=400):
        raise BadRequest("a history window is at most 400 days")
    result = data.history(request_session(), _tid(), device_id, start, end)
    if fmt == "csv":
        utc = [moment.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ") for moment in (start, end)]
        name = f"{device_id}_{utc[0]}_{utc[1]}.csv"  # device ids are [A-Za-z0-9._-]
        return Response(data.history_csv(result), mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})
    payload = {"device": device_id, "start": ser.iso(start), "end": ser.iso(end), "bucket_s": result["bucket_s"]}
    if fmt == "columns":
        payload["columns"] = data.history_columns(result)
    else:
        payload["points"] = data.history_points(result)
    return json_response(payload)


def json_response(payload: Any, status: int = 200) -> Response:
    """orjson for the big answers (history, device lists): several times faster than the stdlib encoder.
    The payloads hold only JSON types (datetimes are converted by ``serialize``); NaN becomes null."""
    return Response(orjson.dumps(payload, default=str), status=status, mimetype="application/json")


@bp.get("/devices/<device_id>/readings")
@login_required()
def readings(device_id: str):
    try:
        limit = min(max(int(request.args.get("limit", 20)), 1), MAX_LIMIT)
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    with ctx().session_factory() as s:
        data.get_device(s, _tid(), device_id)
        rows = data.recent_readings(s, _tid(), device_id, limit)
        return jsonify(items=[ser.reading(r) for r in rows])


# --- commands ---------------------------------------------------------------------------------------------

@bp.post("/devices/<device_id>/commands")
@login_required("operator")
def send_command(device_id: str):
    payload = body()
    op = payload.get("op")
    if not isinstance(op, str):
        raise BadRequest("field 'op' must be a string, one of " + ", ".join(schema.COMMAND_OPS))
    args = payload.get("args", {})
    ttl = payload.get("ttl_s", 300)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= 86_400:
        raise BadRequest("field 'ttl_s' must be an integer 1..86400")
    cmd = schema.new_command(op, args, ttl)  # raises Rejected -> 400 with the reason
    c = ctx()
    with c.session_factory() as s:
        device = data.get_device(s, _tid(), device_id)
        if device.revoked_at is not None:
            return jsonify(error=f"device {device_id!r} is revoked"), 409
        data.create_command(s, _tid(), device_id, cmd, created_by=g.principal.email)
    errors: list = []
    with _produce_lock:
        producer = c.producer
        producer.produce(c.settings.topics.control, device_id, cmd.to_json(),
                         on_delivery=lambda err, _rec: errors.append(err) if err else None)
        remaining = producer.flush(10.0)
    if remaining or errors:
        log.error("command %s not delivered to the bus: %s", cmd.cid, errors or f"{remaining} pending")
        return jsonify(error="the command was stored but the message bus did not confirm it; retry",
                       cid=cmd.cid), 503
    COMMANDS.labels(cmd.op).inc()
    return jsonify(cid=cmd.cid, status="queued", device=device_id, op=cmd.op, exp=cmd.exp), 202


@bp.get("/devices/<device_id>/commands")
@login_required()
def device_commands(device_id: str):
    limit, offset = page()
    with ctx().session_factory() as s:
        data.get_device(s, _tid(), device_id)
        items, total = data.list_commands(s, _tid(), device_id, limit, offset)
        return listing([ser.command(c) for c in items], total, limit, offset)


@bp.get("/commands")
@login_required()
def commands():
    limit, offset = page()
    with ctx().session_factory() as s:
        items, total = data.list_commands(s, _tid(), request.args.get("device") or None, limit, offset)
        return listing([ser.command(c) for c in items], total, limit, offset)


@bp.get("/commands/<cid>")
@login_required()
def command(cid: str):
    with ctx().session_factory() as s:
        return jsonify(ser.command(data.get_command(s, _tid(), cid)))


# --- alarms -----------------------------------------------------------------------------------------------

@bp.get("/alarms")
@login_required()
def alarms():
    limit, offset = page()
    state = request.args.get("state") or None
    if state not in (None, "active", *schema.ALARM_STATES):
        raise BadRequest("state must be active, raised, acknowledged or cleared")
    severity = request.args.get("severity") or None
    if severity not in (None, *schema.SEVERITIES):
        raise BadRequest("severity must be one of " + ", ".join(schema.SEVERITIES))
    with ctx().session_factory() as s:
        items, total = data.list_alarms(s, _tid(), state=state, device_id=request.args.get("device") or None,
                                        severity=severity, limit=limit, offset=offset)
        names = data.device_names(s, _tid(), (a.device_id for a in items))
        return listing([ser.alarm(a, names.get(a.device_id)) for a in items], total, limit, offset)


def _alarm_out(s, a) -> dict:
    """One alarm as the API shows it, with its device's name."""
    return ser.alarm(a, data.device_names(s, _tid(), [a.device_id]).get(a.device_id))


@bp.get("/alarms/<alarm_id>")
@login_required()
def alarm(alarm_id: str):
    with ctx().session_factory() as s:
        return jsonify(_alarm_out(s, data.get_alarm(s, _tid(), alarm_id)))


def _alarm_transition(alarm_id: str, action: str):
    with ctx().session_factory() as s:
        fn = data.ack_alarm if action == "ack" else data.clear_alarm
        try:
            a = fn(s, _tid(), alarm_id, g.principal.email)
        except ValueError as exc:  # e.g. clearing an already cleared alarm
            return jsonify(error=str(exc)), 409
        out = _alarm_out(s, a)
    publish_alarm_event(out)
    return jsonify(out)


def publish_alarm_event(alarm: dict) -> None:
    """Tell the rest of the platform (the alarms topic) that a person acknowledged/cleared an alarm."""
    c = ctx()
    event = schema.AlarmEvent(alarm_id=alarm["id"], device=alarm["device"], tenant=str(g.principal.tenant_id),
                              rule=alarm["rule"], metric=alarm["metric"], value=alarm["value"],
                              threshold=alarm["threshold"], severity=alarm["severity"], state=alarm["state"],
                              ts=schema.now_ms())
    try:
        with _produce_lock:
            c.producer.produce(c.settings.topics.alarms, alarm["device"], event.to_json())
            c.producer.flush(5.0)
    except Exception:
        log.warning("could not publish alarm event for %s", alarm["id"], exc_info=True)


@bp.post("/alarms/<alarm_id>/ack")
@login_required("operator")
def ack_alarm(alarm_id: str):
    return _alarm_transition(alarm_id, "ack")


@bp.post("/alarms/<alarm_id>/clear")
@login_required("operator")
def clear_alarm(alarm_id: str):
    return _alarm_transition(alarm_id, "clear")


# --- rules ------------------------------------------------------------------------------------------------

def _rule_fields(payload: dict, *, partial: bool) -> dict:
    out = {k: payload[k] for k in ser.RULE_FIELDS if k in payload}
    unknown = set(payload) - set(ser.RULE_FIELDS) - {"device", "id", "updated_at"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    if not partial and "name" not in out:
        raise BadRequest("missing field 'name'")
    return out


@bp.get("/rules")
@login_required()
def rules():
    device_id = request.args.get("device") or None
    with ctx().session_factory() as s:
        if device_id:
            data.get_device(s, _tid(), device_id)
        return jsonify(items=[ser.rule(r) for r in data.list_rules(s, _tid(), device_id)])


@bp.post("/rules")
@login_required("operator")
def create_rule():
    payload = body()
    fields = _rule_fields(payload, partial=False)
    device_id = payload.get("device")
    with ctx().session_factory() as s:
        if device_id is not None:
            if not isinstance(device_id, str):
                raise BadRequest("field 'device' must be a device id or null")
            data.get_device(s, _tid(), device_id)
        try:
            r = data.create_rule(s, _tid(), {**fields, "device_id": device_id})
        except ValueError as exc:
            s.rollback()
            raise BadRequest(str(exc)) from None
        return jsonify(ser.rule(r)), 201


@bp.get("/rules/<int(max=2147483647):rule_id>")
@login_required()
def rule(rule_id: int):
    with ctx().session_factory() as s:
        return jsonify(ser.rule(data.get_rule(s, _tid(), rule_id)))


@bp.route("/rules/<int(max=2147483647):rule_id>", methods=["PUT", "PATCH"])
@login_required("operator")
def update_rule(rule_id: int):
    fields = _rule_fields(body(), partial=True)
    with ctx().session_factory() as s:
        try:
            r = data.update_rule(s, _tid(), rule_id, fields)
        except ValueError as exc:
            s.rollback()
            raise BadRequest(str(exc)) from None
        return jsonify(ser.rule(r))


@bp.delete("/rules/<int(max=2147483647):rule_id>")
@login_required("operator")
def delete_rule(rule_id: int):
    with ctx().session_factory() as s:
        data.delete_rule(s, _tid(), rule_id)
    return "", 204


# --- API tokens and users (admin) -------------------------------------------------------------------------

def _role(payload: dict, default: str) -> str:
    role = payload.get("role", default)
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}")
    if not g.principal.can(role):
        raise BadRequest("you cannot grant a role above your own")
    return role


@bp.get("/tokens")
@login_required("admin")
def tokens():
    with ctx().session_factory() as s:
        return jsonify(items=[ser.token(t) for t in data.list_tokens(s, _tid())])


@bp.post("/tokens")
@login_required("admin")
def create_token():
    payload = body()
    name = _str(payload, "name")
    role = _role(payload, "viewer")
    with ctx().session_factory() as s:
        tok, secret = data.create_token(s, _tid(), name, role)
        out = ser.token(tok)
    return jsonify(**out, token=secret, note="the token is shown once; store it now"), 201


@bp.delete("/tokens/<int(max=2147483647):token_id>")
@login_required("admin")
def revoke_token(token_id: int):
    with ctx().session_factory() as s:
        return jsonify(ser.token(data.revoke_token(s, _tid(), token_id)))


@bp.get("/users")
@login_required("admin")
def users():
    with ctx().session_factory() as s:
        return jsonify(items=[ser.user(u) for u in data.list_users(s, _tid())])


EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}$")


@bp.post("/users")
@login_required("admin")
def create_user():
    payload = body()
    email = _str(payload, "email", max_len=254, pattern=EMAIL).lower()
    password = payload.get("password")
    if not isinstance(password, str) or len(password) < 10:
        raise BadRequest("field 'password' must be a string of at least 10 characters")
    role = _role(payload, "viewer")
    with ctx().session_factory() as s:
        try:
            u = data.create_user(s, _tid(), email, password, role)
        except Exception as exc:
            s.rollback()
            if isinstance(exc, ValueError) or type(exc).__name__ == "IntegrityError":
                return jsonify(error=f"a user {email!r} already exists"), 409
            raise
        return jsonify(ser.user(u)), 201


def _new_password(payload: dict, key: str) -> str:
    password = payload.get(key)
    if not isinstance(password, str) or len(password) < 10:
        raise BadRequest(f"field {key!r} must be a string of at least 10 characters")
    return password


@bp.patch("/users/<int(max=2147483647):user_id>")
@login_required("admin")
def update_user(user_id: int):
    """Change a user's role, or set a new password (the user's sessions end: see auth.password_stamp)."""
    payload = body()
    if "role" not in payload and "password" not in payload:
        raise BadRequest("give 'role' and/or 'password'")
    role = _role(payload, "viewer") if "role" in payload else None
    password = _new_password(payload, "password") if "password" in payload else None
    with ctx().session_factory() as s:
        try:
            u = data.update_user(s, _tid(), user_id, role, password)
        except data.LastAdmin as exc:
            s.rollback()
            return jsonify(error=str(exc)), 409
        return jsonify(ser.user(u))


@bp.delete("/users/<int(max=2147483647):user_id>")
@login_required("admin")
def delete_user(user_id: int):
    with ctx().session_factory() as s:
        try:
            data.delete_user(s, _tid(), user_id)
        except data.LastAdmin as exc:
            s.rollback()
            return jsonify(error=str(exc)), 409
    return "", 204


@bp.post("/me/password")
@login_required()
def change_password():
    """The signed-in user's own password; the other sessions of that user end, this one goes on."""
    p = _principal()
    if p.kind != "session":
        raise BadRequest("an API token has no password; sign in as the user to change it")
    payload = body()
    current = payload.get("current_password")
    if not isinstance(current, str) or not current:
        raise BadRequest("missing field 'current_password'")
    new = _new_password(payload, "new_password")
    refused = change_own_password(p, current, new)
    if refused is not None:
        message, status, retry_after = refused
        response = jsonify(error=message)
        if retry_after:
            response.headers["Retry-After"] = str(retry_after)
        return response, status
    return "", 204


# --- webhooks (admin): alarm notifications, sent by cloud.notifier ----------------------------------------

@bp.get("/webhooks")
@login_required("admin")
def webhooks():
    with ctx().session_factory() as s:
        return jsonify(items=[ser.webhook(w) for w in data.list_webhooks(s, _tid())])


@bp.post("/webhooks")
@login_required("admin")
def create_webhook():
    """The signing secret is in this answer only."""
    payload = body()
    name = _str(payload, "name")
    with ctx().session_factory() as s:
        try:
            row, secret = data.create_webhook(s, _tid(), name, payload.get("url"),
                                              payload.get("min_severity", "warning"), ctx().settings)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return jsonify({**ser.webhook(row), "secret": secret}), 201


@bp.post("/webhooks/<int(max=2147483647):webhook_id>/test")
@login_required("admin")
def test_webhook(webhook_id: int):
    """Send a signed test event to the webhook now and say how it went (the answer is 200 either way)."""
    with ctx().session_factory() as s:
        return jsonify(data.test_webhook(s, _tid(), webhook_id, ctx().settings.webhook_allow_private))


@bp.delete("/webhooks/<int(max=2147483647):webhook_id>")
@login_required("admin")
def delete_webhook(webhook_id: int):
    with ctx().session_factory() as s:
        data.delete_webhook(s, _tid(), webhook_id)
    return "", 204


# --- OpenAPI ----------------------------------------------------------------------------------------------

@bp.get("/openapi.json")
def openapi():
    from cloud.web.openapi import spec
    return jsonify(spec())
