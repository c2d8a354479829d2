"""The OpenAPI 3 document of /api/v1 (served at /api/v1/openapi.json and rendered at /docs).

Written by hand, kept honest by a test that compares it with the app's URL map.
"""

from __future__ import annotations

from typing import Any

from cloud import __version__
from cloud.schema import ALARM_STATES, COMMAND_OPS, COMMAND_STATES, SEVERITIES

ERR = {"$ref": "#/components/schemas/Error"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _list(item: str) -> dict:
    return {"type": "object", "properties": {"items": {"type": "array", "items": _ref(item)},
                                             "total": {"type": "integer", "nullable": True},
                                             "limit": {"type": "integer"}, "offset": {"type": "integer"}}}


def _path(name: str, description: str, type_: str = "string") -> dict:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": type_}}


def _query(name: str, description: str, type_: str = "string", enum: tuple | None = None) -> dict:
    schema: dict[str, Any] = {"type": type_}
    if enum:
        schema["enum"] = list(enum)
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


PAGE = [_query("limit", "page size, 1..500 (default 50)", "integer"), _query("offset", "rows to skip (default 0)",
                                                                              "integer")]
DEVICE = _path("device_id", "device id")
ERRORS = {"400": _json(ERR, "bad input (the message says what)"), "401": _json(ERR, "not authenticated"),
          "403": _json(ERR, "role too low or CSRF token missing"),
          "404": _json(ERR, "not found (or another tenant's)")}


def _op(summary: str, response: dict, *, code: str = "200", role: str = "viewer", params: list | None = None,
        body: dict | None = None, description: str = "") -> dict:
    op: dict[str, Any] = {"summary": summary, "description": (description + f" Role: {role}.").strip(),
                          "parameters": params or [], "responses": {code: response, **ERRORS}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _also(op: dict, code: str, description: str) -> dict:
    """``op`` with one more documented error response."""
    return {**op, "responses": {**op["responses"], code: _json(ERR, description)}}


LAST_ADMIN = "it would leave the tenant without an admin"


def spec() -> dict:
    rule_body = {"type": "object", "properties": {
        "name": {"type": "string"}, "device": {"type": "string", "nullable": True},
        "kind": {"type": "string", "enum": ["threshold", "rate", "nodata", "offline"]},
        "metric": {"type": "string", "enum": ["t", "h", "p"]}, "min": {"type": "number", "nullable": True},
        "max": {"type": "number", "nullable": True}, "hysteresis": {"type": "number"},
        "duration_s": {"type": "integer"}, "rate_per_min": {"type": "number", "nullable": True},
        "nodata_s": {"type": "integer", "nullable": True}, "severity": {"type": "string", "enum": list(SEVERITIES)},
        "enabled": {"type": "boolean"}, "on_raise": {"type": "object", "nullable": True},
        "on_clear": {"type": "object", "nullable": True}}}
    paths = {
        "/api/v1/me": {"get": _op("Who am I", _json(_ref("Me")))},
        "/api/v1/me/password": {"post": {**_also(_op(
            "Change your own password", {"description": "Changed"}, code="204",
            description="Session only (an API token has no password); needs the current password. Your other "
                        "sessions end, this one goes on. Wrong current passwords count against the login limit "
                        "(429 with Retry-After).",
            body={"type": "object", "required": ["current_password", "new_password"], "properties": {
                "current_password": {"type": "string"}, "new_password": {"type": "string", "minLength": 10}}}),
            "429", "too many wrong passwords (Retry-After)"), "security": [{"session": []}]}},
        "/api/v1/devices": {
            "get": _op("List the tenant's devices with latest values and active alarm counts", _json(_list("Device")),
                       params=[_query("search", "substring of id or name"),
                               _query("sort", "sort key", enum=("name", "-name", "id", "-id", "last_seen",
                                                                "-last_seen", "status", "-status")), *PAGE]),
            "post": _op("Provision a device; the MQTT password is returned once", _json(_ref("Provisioned"), "Created"),
                        code="201", role="admin",
                        body={"type": "object", "required": ["id"], "properties": {
                            "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}$"},
                            "name": {"type": "string"}}}),
        },
        "/api/v1/devices/{device_id}": {
            "get": _op("One device", _json(_ref("Device")), params=[DEVICE]),
            "patch": _op("Rename a device", _json(_ref("Device")), role="admin", params=[DEVICE],
                         body={"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}),
        },
        "/api/v1/devices/{device_id}/rotate": {
            "post": _op("New MQTT password (shown once); the old one stops working", _json(_ref("Provisioned")),
                        role="admin", params=[DEVICE])},
        "/api/v1/devices/{device_id}/revoke": {
            "post": _op("Revoke a device: it can no longer connect", _json({"type": "object"}), role="admin",
                        params=[DEVICE])},
        "/api/v1/devices/{device_id}/latest": {
            "get": _op("Latest reading (cache, falling back to the database)", _json(_ref("Latest")),
                       params=[DEVICE])},
        "/api/v1/devices/{device_id}/history": {
            "get": _op("Readings in a window; long windows are rolled up (averages per bucket)",
                       {**_json({"oneOf": [_ref("History"), _ref("HistoryColumns")]}),
                        "content": {"application/json": {"schema": {"oneOf": [_ref("History"),
                                                                              _ref("HistoryColumns")]}},
                                    "text/csv": {"schema": {"type": "string"}}}},
                       description="Up to 3 h: raw readings (bucket_s null); up to 3 days: one-minute roll-ups "
                                   "(bucket_s 60); longer: hourly (bucket_s 3600). Oldest first.",
                       params=[DEVICE, _query("range", "shortcut window ending now", enum=("1h", "24h", "7d")),
                               _query("start", "ISO 8601 or unix s/ms"), _query("end", "ISO 8601 or unix s/ms"),
                               _query("format", "points (default): a list of objects; columns: one array per "
                                                "field (half the bytes; what the dashboard's charts use); csv: a "
                                                "file to download, a header row, then one row per point with its "
                                                "time in ISO 8601 UTC first", enum=("points", "columns", "csv"))])},
        "/api/v1/devices/{device_id}/readings": {
            "get": _op("Most recent raw readings", _json({"type": "object", "properties": {
                "items": {"type": "array", "items": _ref("Reading")}}}),
                params=[DEVICE, _query("limit", "1..500 (default 20)", "integer")])},
        "/api/v1/devices/{device_id}/commands": {
            "get": _op("The device's commands, newest first", _json(_list("Command")), params=[DEVICE, *PAGE]),
            "post": _op("Queue a command for the device", _json({"type": "object", "properties": {
                "cid": {"type": "string"}, "status": {"type": "string", "enum": ["queued"]},
                "device": {"type": "string"}, "op": {"type": "string"}, "exp": {"type": "integer"}}}, "Accepted"),
                code="202", role="operator", params=[DEVICE],
                description="States then move queued -> sent -> delivered | failed | expired (see /ws).",
                body={"type": "object", "required": ["op"], "properties": {
                    "op": {"type": "string", "enum": list(COMMAND_OPS)},
                    "args": {"type": "object", "description": "set_interval: {s: 1..86400}; led: {state: on|off|blink}; "
                                                               "set_thresholds: {t|h|p: {min, max}}"},
                    "ttl_s": {"type": "integer", "minimum": 1, "maximum": 86400, "default": 300}}}),
        },
        "/api/v1/commands": {"get": _op("The tenant's commands, newest first", _json(_list("Command")),
                                        params=[_query("device", "only this device"), *PAGE])},
        "/api/v1/commands/{cid}": {"get": _op("One command and its delivery status", _json(_ref("Command")),
                                              params=[_path("cid", "command id")])},
        "/api/v1/alarms": {"get": _op("Alarms, newest first", _json(_list("Alarm")), params=[
            _query("state", "active = raised or acknowledged", enum=("active", *ALARM_STATES)),
            _query("severity", "severity", enum=SEVERITIES), _query("device", "device id"), *PAGE])},
        "/api/v1/alarms/{alarm_id}": {"get": _op("One alarm", _json(_ref("Alarm")),
                                                 params=[_path("alarm_id", "alarm id")])},
        "/api/v1/alarms/{alarm_id}/ack": {"post": _op("Acknowledge an alarm", _json(_ref("Alarm")), role="operator",
                                                      params=[_path("alarm_id", "alarm id")])},
        "/api/v1/alarms/{alarm_id}/clear": {"post": _op("Clear an alarm", _json(_ref("Alarm")), role="operator",
                                                        params=[_path("alarm_id", "alarm id")])},
        "/api/v1/rules": {
            "get": _op("Alarm rules (tenant defaults and device overrides)", _json({"type": "object", "properties": {
                "items": {"type": "array", "items": _ref("Rule")}}}), params=[_query("device", "only this device")]),
            "post": _op("Create a rule", _json(_ref("Rule"), "Created"), code="201", role="operator", body=rule_body),
        },
        "/api/v1/rules/{rule_id}": {
            "get": _op("One rule", _json(_ref("Rule")), params=[_path("rule_id", "rule id", "integer")]),
            "put": _op("Update a rule (fields given are changed)", _json(_ref("Rule")), role="operator",
                       params=[_path("rule_id", "rule id", "integer")], body=rule_body),
            "patch": _op("Update a rule (fields given are changed)", _json(_ref("Rule")), role="operator",
                         params=[_path("rule_id", "rule id", "integer")], body=rule_body),
            "delete": _op("Delete a rule", {"description": "Deleted"}, code="204", role="operator",
                          params=[_path("rule_id", "rule id", "integer")]),
        },
        "/api/v1/tokens": {
            "get": _op("API tokens of the tenant", _json({"type": "object", "properties": {
                "items": {"type": "array", "items": _ref("Token")}}}), role="admin"),
            "post": _op("Create an API token (returned once)", _json(_ref("NewToken"), "Created"), code="201",
                        role="admin", body={"type": "object", "required": ["name"], "properties": {
                            "name": {"type": "string"}, "role": {"type": "string", "enum": ["viewer", "operator",
                                                                                            "admin"]}}}),
        },
        "/api/v1/tokens/{token_id}": {"delete": _op("Revoke an API token", _json(_ref("Token")), role="admin",
                                                    params=[_path("token_id", "token id", "integer")])},
        "/api/v1/users": {
            "get": _op("Users of the tenant", _json({"type": "object", "properties": {
                "items": {"type": "array", "items": _ref("User")}}}), role="admin"),
            "post": _op("Create a user", _json(_ref("User"), "Created"), code="201", role="admin",
                        body={"type": "object", "required": ["email", "password"], "properties": {
                            "email": {"type": "string"}, "password": {"type": "string", "minLength": 10},
                            "role": {"type": "string", "enum": ["viewer", "operator", "admin"]}}}),
        },
        "/api/v1/users/{user_id}": {
            "patch": _also(_op("Change a user's role and/or set a new password (their sessions end)",
                               _json(_ref("User")), role="admin", params=[_path("user_id", "user id", "integer")],
                               body={"type": "object", "properties": {
                                   "role": {"type": "string", "enum": ["viewer", "operator", "admin"]},
                                   "password": {"type": "string", "minLength": 10}}}), "409", LAST_ADMIN),
            "delete": _also(_op("Remove a user (their sessions end)", {"description": "Removed"}, code="204",
                                role="admin", params=[_path("user_id", "user id", "integer")]), "409", LAST_ADMIN),
        },
        "/api/v1/webhooks": {
            "get": _op("Alarm webhooks of the tenant (cloud.notifier POSTs every alarm event to them)",
                       _json({"type": "object", "properties": {"items": {"type": "array", "items": _ref("Webhook")}}}),
                       role="admin"),
            "post": _op("Create an alarm webhook (its signing secret is returned once)",
                        _json({"allOf": [_ref("Webhook"), {"type": "object", "properties": {
                            "secret": {"type": "string"}}}]}, "Created"), code="201", role="admin",
                        description="Each delivery carries X-IoT-Signature: sha256=<hex HMAC-SHA256 of the body "
                                    "with the secret> and X-IoT-Delivery: <alarm_id>.<state> (the same on a "
                                    "redelivery).",
                        body={"type": "object", "required": ["name", "url"], "properties": {
                            "name": {"type": "string"}, "url": {"type": "string", "format": "uri"},
                            "min_severity": {"type": "string", "enum": list(SEVERITIES)}}}),
        },
        "/api/v1/webhooks/{webhook_id}/test": {"post": _op(
            "Send the webhook a signed test event now", _json({"type": "object", "properties": {
                "delivered": {"type": "boolean"}, "status": {"type": "integer", "nullable": True,
                                                             "description": "the endpoint's HTTP status"},
                "detail": {"type": "string"}}}), role="admin", params=[_path("webhook_id", "webhook id", "integer")],
            description="The body is {\"v\":1,\"type\":\"test\",\"tenant\",\"ts\"}, signed like alarm events; "
                        "200 whether or not the endpoint took it.")},
        "/api/v1/webhooks/{webhook_id}": {"delete": _op("Delete an alarm webhook", {"description": "Deleted"},
                                                        code="204", role="admin",
                                                        params=[_path("webhook_id", "webhook id", "integer")])},
        "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [], "parameters": [],
                                         "responses": {"200": {"description": "OpenAPI 3 JSON"}}}},
    }
    reading = {"type": "object", "properties": {k: {"type": "number", "nullable": True} for k in ("t", "h", "p")}
               | {"rssi": {"type": "integer", "nullable": True}, "ts": {"type": "integer", "nullable": True,
                                                                        "description": "unix ms"},
                  "seq": {"type": "integer", "nullable": True}, "boot": {"type": "integer", "nullable": True}}}
    history_head = {"device": {"type": "string"}, "start": {"type": "string"}, "end": {"type": "string"},
                    "bucket_s": {"type": "integer", "nullable": True,
                                 "description": "null: raw readings; 60 or 3600: roll-ups of that bucket"}}
    number = {"type": "number", "nullable": True}
    history_point = {"type": "object", "description": "raw: ts, t, h, p, rssi, seq, boot; roll-ups: ts (bucket "
                                                      "start), n (readings), t, h, p (averages) and their _min, _max",
                     "properties": reading["properties"] | {"n": {"type": "integer"}} | {
                         f"{m}_{x}": number for m in "thp" for x in ("min", "max")}}
    schemas = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Me": {"type": "object", "properties": {"tenant_id": {"type": "integer"}, "email": {"type": "string"},
                                                "role": {"type": "string"}, "auth": {"type": "string"}}},
        "Reading": reading,
        "Latest": {"allOf": [reading, {"type": "object", "properties": {
            "device": {"type": "string"}, "status": {"type": "string"}, "last_seen": {"type": "string",
                                                                                     "nullable": True}}}]},
        "Device": {"type": "object", "properties": {
            "id": {"type": "string"}, "name": {"type": "string"},
            "status": {"type": "string", "enum": ["online", "offline", "unknown"]},
            "last_seen": {"type": "string", "format": "date-time", "nullable": True},
            "firmware": {"type": "string", "nullable": True}, "boot": {"type": "integer", "nullable": True},
            "mqtt_username": {"type": "string", "nullable": True}, "created_at": {"type": "string"},
            "revoked": {"type": "boolean"}, "latest": {"allOf": [reading], "nullable": True},
            "active_alarms": {"type": "integer"}}},
        "Provisioned": {"type": "object", "properties": {
            "device": _ref("Device"), "credentials": {"type": "object"},
            "config": {"type": "object", "description": "the firmware's config.json"}}},
        "History": {"type": "object", "required": [*history_head, "points"], "properties": {
            **history_head, "points": {"type": "array", "items": history_point}}},
        "HistoryColumns": {"type": "object", "required": [*history_head, "columns"], "properties": {
            **history_head, "columns": {
                "type": "object", "description": "one array per field of the points, all of the same length, "
                                                 "oldest first: ts, t, h, p, rssi, seq, boot (raw) or ts, n, "
                                                 "t, t_min, t_max, h, h_min, h_max, p, p_min, p_max (roll-ups)",
                "additionalProperties": {"type": "array", "items": {"type": "number", "nullable": True}}}}},
        "Command": {"type": "object", "properties": {
            "cid": {"type": "string"}, "device": {"type": "string"}, "op": {"type": "string", "enum": list(COMMAND_OPS)},
            "args": {"type": "object"}, "status": {"type": "string", "enum": list(COMMAND_STATES)},
            "ok": {"type": "boolean", "nullable": True}, "result": {"type": "object", "nullable": True},
            "error": {"type": "string", "nullable": True}, "created_by": {"type": "string"},
            "created_at": {"type": "string"}, "expires_at": {"type": "string", "nullable": True},
            "sent_at": {"type": "string", "nullable": True}, "finished_at": {"type": "string", "nullable": True}}},
        "Alarm": {"type": "object", "properties": {
            "id": {"type": "string"}, "device": {"type": "string"},
            "device_name": {"type": "string", "nullable": True}, "rule": {"type": "string"},
            "metric": {"type": "string"}, "severity": {"type": "string", "enum": list(SEVERITIES)},
            "state": {"type": "string", "enum": list(ALARM_STATES)}, "value": {"type": "number", "nullable": True},
            "threshold": {"type": "number", "nullable": True}, "raised_at": {"type": "string"},
            "acknowledged_at": {"type": "string", "nullable": True},
            "acknowledged_by": {"type": "string", "nullable": True}, "cleared_at": {"type": "string",
                                                                                    "nullable": True}}},
        "Rule": {"allOf": [rule_body, {"type": "object", "properties": {"id": {"type": "integer"},
                                                                        "updated_at": {"type": "string"}}}]},
        "Token": {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                                                   "role": {"type": "string"}, "created_at": {"type": "string"},
                                                   "revoked": {"type": "boolean"}}},
        "NewToken": {"allOf": [_ref("Token"), {"type": "object", "properties": {"token": {"type": "string"}}}]},
        "Webhook": {"type": "object", "properties": {
            "id": {"type": "integer"}, "name": {"type": "string"}, "url": {"type": "string"},
            "min_severity": {"type": "string", "enum": list(SEVERITIES)}, "created_at": {"type": "string"}}},
        "User": {"type": "object", "properties": {"id": {"type": "integer"}, "email": {"type": "string"},
                                                  "role": {"type": "string"}, "created_at": {"type": "string"}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "IoT platform API", "version": __version__,
                 "description": "Tenant-scoped REST API. Authenticate with Authorization: Bearer <token> "
                                "(create tokens as an admin: POST /api/v1/tokens or the admin page) or with the "
                                "dashboard session (then send X-CSRF-Token on writes). Errors are "
                                "{\"error\": \"message\"}. Live events: WebSocket /ws (session cookie, or "
                                "?access_token=<token>)."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "session": {"type": "apiKey", "in": "cookie", "name": "iot_session"}},
            "schemas": schemas,
        },
    }
