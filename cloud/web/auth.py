"""Authentication and authorisation: session login for pages, bearer API tokens for /api, CSRF, rate limit.

A request is authenticated either by the session cookie (set by the login form; HttpOnly, SameSite=Lax) or by
``Authorization: Bearer <token>``. The result is ``g.principal``. Every state-changing request that rides on
the session cookie must carry the session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``);
bearer requests carry no ambient credentials, so they need none.

Roles: admin > operator > viewer. Viewers read; operators also send commands, acknowledge alarms and edit
rules; admins also provision devices and manage users and API tokens.
"""

from __future__ import annotations

import hmac
import math
import secrets
from dataclasses import dataclass
from functools import wraps
from typing import Callable

from flask import (Blueprint, abort, flash, g, jsonify, make_response, redirect, render_template, request, session,
                   url_for)

from cloud.db import repo
from cloud.web import ctx, release_request_session, request_session

bp = Blueprint("auth", __name__)

ROLES = ("viewer", "operator", "admin")
ROLE_RANK = {r: i for i, r in enumerate(ROLES)}
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Principal:
    tenant_id: int
    email: str  # the user's email, or "token:<name>" for an API token
    role: str
    kind: str  # "session" | "token"
    user_id: int | None = None

    def can(self, role: str) -> bool:
        return ROLE_RANK.get(self.role, -1) >= ROLE_RANK[role]


# --- login rate limit -------------------------------------------------------------------------------------
# cloud/web/ratelimit.py: in Redis (shared by every worker and host) in production, in memory in the demo; the
# app's limiter is ctx().limiter

# --- helpers ----------------------------------------------------------------------------------------------

def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/ws"


def _error(status: int, message: str):
    if _wants_json():
        return jsonify(error=message), status
    abort(status, description=message)


def _token_principal(token: str) -> Principal | None:
    from cloud.web.data import token_principal
    tok = token_principal(request_session(), token)
    if tok is None:
        return None
    tenant_id, name, role = tok
    return Principal(tenant_id=tenant_id, email=f"token:{name}", role=role, kind="token")


def _session_principal() -> Principal | None:
    uid = session.get("uid")
    if uid is None:
        return None
    from cloud.web.data import session_user
    user = session_user(request_session(), uid)
    if user is None or user[1] != session.get("tid"):
        session.clear()
        return None
    user_id, tenant_id, email, role = user
    return Principal(tenant_id=tenant_id, email=email, role=role, kind="session", user_id=user_id)


def load_principal() -> None:
    g.principal = None
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        g.principal = _token_principal(header[7:].strip())
        g.bearer = True
        return
    g.bearer = False
    token = request.args.get("access_token") if request.path == "/ws" else None
    if token:  # browsers cannot set headers on a WebSocket; API clients may pass the token in the query
        g.principal = _token_principal(token)
        g.bearer = True
        return
    g.principal = _session_principal()


def check_csrf():
    if request.method not in UNSAFE or g.get("bearer"):
        return None
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token", "")
    expected = session.get("csrf", "")
    if not expected or not sent or not hmac.compare_digest(sent, expected):
        return _error(403, "missing or invalid CSRF token")
    return None


def init_app(app) -> None:
    @app.before_request
    def _before():
        if request.endpoint in ("static",) or request.path.startswith("/static/"):
            return None
        if request.path in ("/healthz", "/metrics"):
            return None
        load_principal()
        if request.path == "/ws":
            release_request_session()
        return check_csrf()

    @app.context_processor
    def _inject():
        return {"csrf_token": csrf_token, "principal": g.get("principal")}


def login_required(role: str = "viewer") -> Callable:
    """Pages: redirect to the login form; API: 401 JSON. Then 403 if the role is too low."""

    def decorator(f):
        @wraps(f)
        def wrapper(*args, **kwargs):
            p: Principal | None = g.get("principal")
            if p is None:
                if _wants_json():
                    if request.headers.get("Authorization"):
                        return jsonify(error="invalid or revoked API token"), 401
                    return jsonify(error="authentication required (session or Bearer token)"), 401
                return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))
            if not p.can(role):
                return _error(403, f"this needs the {role} role; you are {p.role}")
            return f(*args, **kwargs)

        return wrapper

    return decorator


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target.rstrip("?")
    return url_for("pages.fleet")


# --- routes -----------------------------------------------------------------------------------------------

@bp.route("/login", methods=["GET", "POST"])
def login():
    error, status = None, 200
    if request.method == "POST":
        email = (request.form.get("email") or "").strip().lower()
        password = request.form.get("password") or ""
        ip = request.remote_addr or "?"
        limiter = ctx().limiter
        ticket, wait = limiter.begin(ip, email)  # takes the attempt's slot; refused: nothing is checked
        if ticket is None:
            retry_after = max(1, math.ceil(wait))
            error = f"Too many failed attempts. Try again in {retry_after} s."
            if request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json":
                response = make_response(jsonify(error=error, retry_after=retry_after), 429)
            else:
                response = make_response(render_template("login.html", error=error,
                                                         next=request.args.get("next", "")), 429)
            response.headers["Retry-After"] = str(retry_after)
            return response
        with ctx().session_factory() as s:
            user = repo.authenticate(s, email, password) if email and password else None
            if user is not None:
                uid, tid = user.id, user.tenant_id
        if user is None:  # the slot stays taken: a failed attempt
            error, status = "Unknown email or wrong password.", 401
        else:
            limiter.succeeded(ip, email, ticket)  # a success does not count
            session.clear()  # no session fixation: a fresh session (and CSRF token) after login
            session.permanent = True
            session["uid"], session["tid"] = uid, tid
            csrf_token()
            return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", error=error, next=request.args.get("next", "")), status


@bp.post("/logout")
def logout():
    session.clear()
    flash("Signed out.")
    return redirect(url_for("auth.login"))
