"""HTML pages: fleet overview, device page, alarms, provisioning/admin, API docs.

Pages are rendered on the server (Jinja autoescape on) so they work without JavaScript; the scripts in
/static then keep the values live over /ws and call the REST API for commands and history. Every form POST
carries the session's CSRF token (checked in auth.check_csrf).
"""

from __future__ import annotations

import html
import json
import time
from urllib.parse import quote

from flask import (Blueprint, abort, flash, g, redirect, render_template, request, url_for)
from markupsafe import Markup

from cloud import schema
from cloud.web import api, ctx, data, request_session
from cloud.web import serialize as ser
from cloud.web.auth import ROLES, change_own_password, login_required

bp = Blueprint("pages", __name__)

FLEET_PAGE = 200


def _tid() -> int:
    return g.principal.tenant_id


@bp.errorhandler(data.NotFound)
def _not_found(exc):
    return render_template("error.html", code=404, message=str(exc.args[0])), 404



@bp.get("/")
@login_required()
def index():
    return redirect(url_for("pages.fleet"))


FLEET_CACHE_FIELDS = ("t", "h", "p", "status", "last_seen")  # what fleet_rows reads of a device's cached values


@bp.get("/fleet")
@login_required()
def fleet():
    search = (request.args.get("search") or "").strip()[:120]
    sort = request.args.get("sort", "name")
    if sort not in api.DEVICE_SORTS:
        sort = "name"
    try:
        offset = max(int(request.args.get("offset", 0)), 0)
    except ValueError:
        offset = 0
    s = request_session()
    rows, total = data.fleet_page(s, _tid(), search or None, sort, FLEET_PAGE, offset)
    ids = [r[0] for r in rows]
    cached = api.cached_latest(ids, FLEET_CACHE_FIELDS)
    missing = []  # devices without a reading in the cache: their newest stored one
    for device_id in ids:
        value = cached.get(device_id)
        if not value or (value.get("t") is None and value.get("h") is None and value.get("p") is None):
            missing.append(device_id)
    stored = data.latest_readings_batch(s, _tid(), missing) if missing else {}
    return render_template("fleet.html", rows=fleet_rows(rows, cached, stored), empty=not rows, search=search,
                           sort=sort, offset=offset, total=total, page_size=FLEET_PAGE, sorts=api.DEVICE_SORTS)


_ISO_SECONDS: dict[int, str] = {}


def _iso_second(second: int) -> str:
    """Unix seconds -> ISO 8601 UTC without the fraction (fleet_rows appends ".mmmZ"). Formatting a time costs
    ~10 us and a fleet page has 200; devices reporting every few seconds share their seconds, so those are
    formatted once (kept in _ISO_SECONDS, emptied when it holds 4,096)."""
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    if len(_ISO_SECONDS) >= 4096:
        _ISO_SECONDS.clear()
    _ISO_SECONDS[second] = text
    return text


_ROW_HEADS: dict[str, dict[str, tuple[str, str]]] = {}  # link -> device id -> (name, head)
_ROW_HEADS_MAX = 20_000  # ~300 bytes each
_STATUS_CELLS: dict[str, str] = {}
_NUMBER = (float, int)


def _row_head(heads: dict, link: str, device_id: str, name: str) -> str:
    """The part of a device's row that only its id and name decide, escaped once and then kept (a fleet page
    shows the same devices request after request; a renamed device gets a new one)."""
    did = html.escape(device_id)
    head = (f'<tr data-device="{did}">\n'
            f'<td class="name"><a href="{link}{html.escape(quote(device_id, safe=""))}">{html.escape(name)}</a>'
            f'<div class="muted small">{did}</div></td>\n')
    if len(heads) >= _ROW_HEADS_MAX:
        heads.clear()
    heads[device_id] = (name, head)
    return head


def _status_cell(status: str) -> str:
    e = html.escape(status)
    cell = f'<td class="status"><span class="badge {e}">{e}</span></td>\n'
    if len(_STATUS_CELLS) < 64:  # online / offline / "" in practice
        _STATUS_CELLS[status] = cell
    return cell


def fleet_rows(rows: list[tuple], cached: dict[str, dict], stored: dict[str, dict]) -> Markup:
    """The fleet table's rows, built here rather than in a Jinja loop: a page has up to 200 rows of 7 cells,
    and the loop (attribute lookups, filters, url_for per row) was most of the page's time. Same merge as
    ``api.device_summary``: the cache's status and newer last_seen win over the database row; the reading is
    the cache's, else the newest stored one. ``rows``: (id, name, status, last_seen, alarms, last_seen as
    unix ms). Every value a device or user can name is escaped (``html.escape`` with quotes: the same five
    characters as Jinja's autoescape); the id/name part of each row and the status cell are escaped once and
    kept (``_row_head``, ``_status_cell``); times and numbers are formatted here and contain nothing to
    escape."""
    link = html.escape(url_for("pages.device", device_id="x")[:-1])
    heads = _ROW_HEADS.get(link)
    if heads is None:
        heads = _ROW_HEADS.setdefault(link, {})
    cells = _STATUS_CELLS
    iso_second, iso_seconds = _iso_second, _ISO_SECONDS
    out = []
    append = out.append
    number = _NUMBER
    for device_id, name, db_status, seen, alarms, seen_ms in rows:
        entry = heads.get(device_id)
        head = entry[1] if entry is not None and entry[0] == name else _row_head(heads, link, device_id, name)
        live = cached.get(device_id) or _EMPTY
        t, h, p = live.get("t"), live.get("h"), live.get("p")
        if t is None and h is None and p is None:  # no reading in the cache: the newest stored one, if any
            reading = stored.get(device_id) or _EMPTY
            t, h, p = reading.get("t"), reading.get("h"), reading.get("p")
        status = live.get("status")
        if status != "online" and status != "offline":
            status = db_status or ""
        live_seen = live.get("last_seen")
        if live_seen.__class__ in number and (seen_ms is None or live_seen > seen_ms):
            second, milli = divmod(int(live_seen), 1000)  # ISO 8601 with milliseconds
            seen_iso = f"{iso_seconds.get(second) or iso_second(second)}.{milli:03d}Z"
        else:
            seen_iso = ser.iso(seen) if seen is not None else ""  # ISO 8601: digits, '-', ':', 'T', '.', 'Z'
        append(f'{head}{cells.get(status) or _status_cell(status)}'
               f'<td class="last-seen" data-iso="{seen_iso}">{seen_iso or "—"}</td>\n'
               f'<td class="num t">{"%.2f" % t if t.__class__ in number else "—"}</td>\n'
               f'<td class="num h">{"%.1f" % h if h.__class__ in number else "—"}</td>\n'
               f'<td class="num p">{"%.1f" % p if p.__class__ in number else "—"}</td>\n'
               f'<td class="num alarms">{int(alarms)}</td>\n</tr>\n')
    return Markup("".join(out))


_EMPTY: dict = {}


@bp.get("/devices/<device_id>")
@login_required()
def device(device_id: str):
    with ctx().session_factory() as s:
        d = data.get_device(s, _tid(), device_id)
        latest = api.latest_for(s, _tid(), [d]).get(d.id)
        counts = data.active_alarm_counts(s, _tid(), [d.id])
        summary = api.device_summary(d, latest, counts.get(d.id, 0))
        rules = [ser.rule(r) for r in data.list_rules(s, _tid(), d.id)]
        commands, _ = data.list_commands(s, _tid(), d.id, 20, 0)
        commands = [ser.command(c) for c in commands]
        readings = [ser.reading(r) for r in data.recent_readings(s, _tid(), d.id, 20)]
        alarms, _ = data.list_alarms(s, _tid(), state="active", device_id=d.id, severity=None, limit=50, offset=0)
        alarms = [ser.alarm(a) for a in alarms]
    return render_template("device.html", device=summary, rules=rules, commands=commands, readings=readings,
                           alarms=alarms, ops=schema.COMMAND_OPS, severities=schema.SEVERITIES)


def _float_or_none(raw: str | None) -> float | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise api.BadRequest(f"{raw!r} is not a number") from None


def _rule_from_form() -> dict:
    form = request.form
    out = {
        "name": (form.get("name") or "").strip()[:64],
        "kind": form.get("kind") or "threshold",
        "metric": form.get("metric") or "t",
        "min": _float_or_none(form.get("min")),
        "max": _float_or_none(form.get("max")),
        "hysteresis": _float_or_none(form.get("hysteresis")) or 0.0,
        "duration_s": int(_float_or_none(form.get("duration_s")) or 0),
        "severity": form.get("severity") or "major",
        "enabled": form.get("enabled") == "on",
    }
    if out["kind"] == "rate":
        out["rate_per_min"] = _float_or_none(form.get("rate_per_min"))
    if out["kind"] == "nodata":
        nd = _float_or_none(form.get("nodata_s"))
        out["nodata_s"] = int(nd) if nd is not None else None
    return out


@bp.post("/devices/<device_id>/rules")
@login_required("operator")
def save_rule(device_id: str):
    rule_id = request.form.get("rule_id")
    with ctx().session_factory() as s:
        data.get_device(s, _tid(), device_id)
        try:
            if request.form.get("delete") and rule_id:
                data.delete_rule(s, _tid(), int(rule_id))
                flash("Rule deleted.")
            elif rule_id:
                data.update_rule(s, _tid(), int(rule_id), _rule_from_form())
                flash("Rule saved.")
            else:
                data.create_rule(s, _tid(), {**_rule_from_form(), "device_id": device_id})
                flash("Rule added.")
        except (ValueError, api.BadRequest) as exc:
            s.rollback()
            flash(f"Rule not saved: {exc}", "error")
    return redirect(url_for("pages.device", device_id=device_id) + "#rules")


@bp.get("/alarms")
@login_required()
def alarms():
    state = request.args.get("state", "active")
    if state not in ("active", "all", *schema.ALARM_STATES):
        state = "active"
    severity = request.args.get("severity") or None
    if severity not in schema.SEVERITIES:
        severity = None
    device_id = (request.args.get("device") or "").strip() or None
    with ctx().session_factory() as s:
        items, total = data.list_alarms(s, _tid(), state=None if state == "all" else state, device_id=device_id,
                                        severity=severity, limit=200, offset=0)
        names = data.device_names(s, _tid(), (a.device_id for a in items))
        items = [ser.alarm(a, names.get(a.device_id)) for a in items]
    return render_template("alarms.html", alarms=items, state=state, severity=severity or "",
                           device=device_id or "", severities=schema.SEVERITIES, total=total)


@bp.post("/alarms/<alarm_id>/<action>")
@login_required("operator")
def alarm_action(alarm_id: str, action: str):
    if action not in ("ack", "clear"):
        abort(404)
    with ctx().session_factory() as s:
        fn = data.ack_alarm if action == "ack" else data.clear_alarm
        try:
            a = ser.alarm(fn(s, _tid(), alarm_id, g.principal.email))
        except ValueError as exc:
            flash(str(exc), "error")
            return redirect(request.referrer or url_for("pages.alarms"))
    api.publish_alarm_event(a)
    flash("Alarm acknowledged." if action == "ack" else "Alarm cleared.")
    return redirect(url_for("pages.alarms"))


# --- provisioning and administration (admin) --------------------------------------------------------------

def _admin_page(**extra):
    with ctx().session_factory() as s:
        items, _ = data.list_devices(s, _tid(), None, "id", 500, 0)
        devices = [ser.device(d) for d in items]
        users = [ser.user(u) for u in data.list_users(s, _tid())]
        tokens = [ser.token(t) for t in data.list_tokens(s, _tid())]
        webhooks = [ser.webhook(w) for w in data.list_webhooks(s, _tid())]
    return render_template("admin.html", devices=devices, users=users, tokens=tokens, webhooks=webhooks, roles=ROLES,
                           severities=schema.SEVERITIES, **extra)


def _issued(device: dict, password: str) -> dict:
    config = api.device_config(device, password)
    text = json.dumps(config, indent=2)
    return {"device": device, "credentials": api.credentials(device, password), "config_text": text,
            "config_href": "data:application/json;charset=utf-8," + quote(text)}


@bp.get("/admin")
@login_required("admin")
def admin():
    return _admin_page()


@bp.post("/admin/devices")
@login_required("admin")
def provision():
    device_id = (request.form.get("id") or "").strip()
    name = (request.form.get("name") or "").strip()[:120] or device_id
    if not schema.DEVICE_ID.match(device_id):
        flash("Device id: letters, digits, '.', '_', '-' (1..64, starting with a letter or digit).", "error")
        return _admin_page(), 400
    with ctx().session_factory() as s:
        try:
            device, password = data.create_device(s, _tid(), device_id, name)
        except Exception as exc:
            s.rollback()
            if isinstance(exc, (ValueError, LookupError)) or type(exc).__name__ == "IntegrityError":
                flash(f"Device id {device_id!r} is already taken.", "error")
                return _admin_page(), 409
            raise
        issued = _issued(ser.device(device), password)
    return _admin_page(issued=issued)


@bp.post("/admin/devices/<device_id>/<action>")
@login_required("admin")
def device_action(device_id: str, action: str):
    with ctx().session_factory() as s:
        if action == "rotate":
            password = data.rotate_device(s, _tid(), device_id)
            issued = _issued(ser.device(data.get_device(s, _tid(), device_id)), password)
            return _admin_page(issued=issued)
        if action == "revoke":
            data.revoke_device(s, _tid(), device_id)
            flash(f"Device {device_id} revoked: it can no longer connect.")
            return redirect(url_for("pages.admin"))
    abort(404)


@bp.post("/admin/users")
@login_required("admin")
def add_user():
    email = (request.form.get("email") or "").strip().lower()
    password = request.form.get("password") or ""
    role = request.form.get("role") or "viewer"
    if not api.EMAIL.match(email) or len(password) < 10 or role not in ROLES:
        flash("Need a valid email, a password of at least 10 characters and a role.", "error")
        return _admin_page(), 400
    with ctx().session_factory() as s:
        try:
            data.create_user(s, _tid(), email, password, role)
        except Exception as exc:
            s.rollback()
            if isinstance(exc, ValueError) or type(exc).__name__ == "IntegrityError":
                flash(f"A user {email} already exists.", "error")
                return _admin_page(), 409
            raise
    flash(f"User {email} created.")
    return redirect(url_for("pages.admin"))


@bp.post("/admin/users/<int(max=2147483647):user_id>/<action>")
@login_required("admin")
def user_action(user_id: int, action: str):
    """``role`` (form field ``role``) or ``delete``."""
    if action not in ("role", "delete"):
        abort(404)
    role = request.form.get("role") or ""
    if action == "role" and role not in ROLES:
        flash(f"Role must be one of {', '.join(ROLES)}.", "error")
        return _admin_page(), 400
    with ctx().session_factory() as s:
        try:
            if action == "role":
                user = data.update_user(s, _tid(), user_id, role, None)
                message = f"{user.email} is now {role}."
            else:
                user = data.delete_user(s, _tid(), user_id)
                message = f"User {user.email} removed."
        except data.LastAdmin as exc:
            s.rollback()
            flash(f"{exc}.", "error")
            return _admin_page(), 409
    flash(message)
    return redirect(url_for("pages.admin"))


@bp.get("/account")
@login_required()
def account():
    return render_template("account.html")


@bp.post("/account/password")
@login_required()
def account_password():
    p = g.principal
    current = request.form.get("current_password") or ""
    new = request.form.get("new_password") or ""
    if p.kind != "session":
        abort(400, description="An API token has no password.")
    if not current or len(new) < 10 or new != request.form.get("confirm_password"):
        flash("Give your current password and the new one twice (at least 10 characters).", "error")
        return render_template("account.html"), 400
    refused = change_own_password(p, current, new)
    if refused is not None:
        message, status, _ = refused
        flash(message[:1].upper() + message[1:] + ("" if message.endswith(".") else "."), "error")
        return render_template("account.html"), status
    flash("Password changed. Your other sessions have been signed out.")
    return redirect(url_for("pages.account"))


@bp.post("/admin/webhooks")
@login_required("admin")
def add_webhook():
    with ctx().session_factory() as s:
        try:
            row, secret = data.create_webhook(s, _tid(), request.form.get("name") or "",
                                              (request.form.get("url") or "").strip(),
                                              request.form.get("min_severity") or "warning", ctx().settings)
        except ValueError as exc:
            flash(f"Webhook not added: {exc}.", "error")
            return _admin_page(), 400
        issued_webhook = {"name": row.name, "url": row.url, "secret": secret}
    return _admin_page(issued_webhook=issued_webhook)


@bp.post("/admin/webhooks/<int(max=2147483647):webhook_id>/test")
@login_required("admin")
def test_webhook(webhook_id: int):
    with ctx().session_factory() as s:
        result = data.test_webhook(s, _tid(), webhook_id, ctx().settings.webhook_allow_private)
    if result["delivered"]:
        flash(f"Test event delivered ({result['detail']}).")
    else:
        flash(f"Test event not delivered: {result['detail']}.", "error")
    return redirect(url_for("pages.admin"))


@bp.post("/admin/webhooks/<int(max=2147483647):webhook_id>/delete")
@login_required("admin")
def delete_webhook(webhook_id: int):
    with ctx().session_factory() as s:
        row = data.delete_webhook(s, _tid(), webhook_id)
        flash(f"Webhook {row.name} deleted.")
    return redirect(url_for("pages.admin"))


@bp.post("/admin/tokens")
@login_required("admin")
def add_token():
    name = (request.form.get("name") or "").strip()[:120]
    role = request.form.get("role") or "viewer"
    if not name or role not in ROLES:
        flash("A token needs a name and a role.", "error")
        return _admin_page(), 400
    with ctx().session_factory() as s:
        tok, secret = data.create_token(s, _tid(), name, role)
        issued_token = {"name": tok.name, "role": tok.role, "token": secret}
    return _admin_page(issued_token=issued_token)


@bp.post("/admin/tokens/<int(max=2147483647):token_id>/revoke")
@login_required("admin")
def revoke_token(token_id: int):
    with ctx().session_factory() as s:
        data.revoke_token(s, _tid(), token_id)
    flash("Token revoked.")
    return redirect(url_for("pages.admin"))


@bp.get("/docs")
def docs():
    from cloud.web.openapi import spec
    return render_template("docs.html", spec=spec())
