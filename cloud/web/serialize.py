"""Model rows -> JSON-ready dicts (one place, so the API, pages and WebSocket agree on field names).

Reading times (``ts``) are unix milliseconds like the message contract; other datetimes are ISO 8601 (UTC).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes; everything is stored in UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def ms(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return int(value.timestamp() * 1000)
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        try:
            return ms(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def device(d: Any) -> dict[str, Any]:
    return {
        "id": d.id,
        "name": d.name,
        "status": d.status,
        "last_seen": iso(d.last_seen),
        "firmware": d.firmware,
        "boot": d.boot,
        "mqtt_username": d.mqtt_username,
        "created_at": iso(d.created_at),
        "revoked": d.revoked_at is not None,
    }


def reading(r: Any) -> dict[str, Any]:
    """A Telemetry row or a cache dict -> {t, h, p, rssi, ts, seq, boot}."""
    return {
        "t": _get(r, "t"), "h": _get(r, "h"), "p": _get(r, "p"), "rssi": _get(r, "rssi"),
        "ts": ms(_get(r, "ts")), "seq": _get(r, "seq"), "boot": _get(r, "boot"),
    }


def command(c: Any) -> dict[str, Any]:
    return {
        "cid": c.cid, "device": c.device_id, "op": c.op, "args": c.args, "status": c.status, "ok": c.ok,
        "result": c.result, "error": c.error, "created_by": c.created_by, "created_at": iso(c.created_at),
        "expires_at": iso(c.expires_at), "sent_at": iso(c.sent_at), "finished_at": iso(c.finished_at),
    }


def alarm(a: Any, device_name: str | None = None) -> dict[str, Any]:
    return {
        "id": a.id, "device": a.device_id, "device_name": device_name, "rule": a.rule, "metric": a.metric, "severity": a.severity,
        "state": a.state, "value": a.value, "threshold": a.threshold, "raised_at": iso(a.raised_at),
        "acknowledged_at": iso(a.acknowledged_at), "acknowledged_by": a.acknowledged_by,
        "cleared_at": iso(a.cleared_at),
    }


RULE_FIELDS = ("name", "kind", "metric", "min", "max", "hysteresis", "duration_s", "rate_per_min", "nodata_s",
               "severity", "enabled", "on_raise", "on_clear")


def rule(r: Any) -> dict[str, Any]:
    data = {"id": r.id, "device": r.device_id}
    data.update({f: getattr(r, f) for f in RULE_FIELDS})
    data["updated_at"] = iso(r.updated_at)
    return data


def token(t: Any) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "role": t.role, "created_at": iso(t.created_at),
            "revoked": t.revoked_at is not None}


def webhook(w: Any) -> dict[str, Any]:
    return {"id": w.id, "name": w.name, "url": w.url, "min_severity": w.min_severity, "created_at": iso(w.created_at)}


def user(u: Any) -> dict[str, Any]:
    return {"id": u.id, "email": u.email, "role": u.role, "created_at": iso(u.created_at)}
