"""Authentication and authorisation: session login for pages, bearer API tokens for /api, CSRF, rate limit.

A request is authenticated either by the session cookie (set by the login form; HttpOnly, SameSite=Lax) or by
``Authorization: Bearer <token>``. The result is ``g.principal``. Every state-changing request that rides on
the session cookie must carry the session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``);
bearer requests carry no ambient credentials, so they need none.

Roles: admin > operator > viewer. Viewers read; operators also send commands, acknowledge alarms and edit
rules; admins also provision devices and manage users and API tokens.
"""

from __future__ import annotations

import hashlib
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
    credential: str = ""  # session: the password stamp it began with; token: the token's digest (see still_valid)

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
    from cloud.passwords import token_digest
    from cloud.web.data import token_by_digest
    if not token:
        return None
    digest = token_digest(token)
    tok = token_by_digest(request_session(), digest)
    if tok is None:
        return None
    tenant_id, name, role = tok
    return Principal(tenant_id=tenant_id, email=f"token:{name}", role=role, kind="token", credential=digest)


def password_stamp(password_hash: str) -> str:
    """What a session remembers of the password it was opened with: a new password (changed by the user or reset
    by an admin) ends every session opened before it. A digest, not a piece of the hash itself: Flask's session
    cookie is signed, not encrypted, so its holder can read it."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:20]


def start_session(user_id: int, tenant_id: int, password_hash: str) -> None:
    session["uid"], session["tid"], session["pw"] = user_id, tenant_id, password_stamp(password_hash)


def _session_principal() -> Principal | None:
    uid = session.get("uid")
    if uid is None:
        return None
    from cloud.web.data import session_user
    user = session_user(request_session(), uid)
    if user is None or user[1] != session.get("tid") or password_stamp(user[4]) != session.get("pw"):
        session.clear()  # the user was removed, or the password changed since this session began
        return None
    user_id, tenant_id, email, role, _ = user
    return Principal(tenant_id=tenant_id, email=email, role=role, kind="session", user_id=user_id,
                     credential=session["pw"])


def _too_many(wait: float) -> tuple[str, int]:
    """The answer to an attempt the login limit refused: (message, Retry-After seconds)."""
    retry_after = max(1, math.ceil(wait))
    return f"Too many failed attempts. Try again in {retry_after} s.", retry_after


def change_own_password(p: Principal, current: str, new: str) -> tuple[str, int, int] | None:
    """Change the signed-in user's password. None when done (this session carries on with the new password, the
    user's other sessions end), else (message, HTTP status, Retry-After seconds or 0). A wrong current password
    counts against the login limit of this address and email: a borrowed session must not become a way to
    guess the password."""
    from cloud.web.data import change_own_password as change
    ip = request.remote_addr or "?"
    limiter = ctx().limiter
    ticket, wait = limiter.begin(ip, p.email)
    if ticket is None:
        message, retry_after = _too_many(wait)
        return message, 429, retry_after
    with ctx().session_factory() as s:
        user = change(s, p.user_id, current, new)
        if user is None:  # the slot stays taken: a failed attempt
            return "the current password is wrong", 400, 0
        limiter.succeeded(ip, p.email, ticket)
        start_session(user.id, user.tenant_id, user.password_hash)
    return None


def still_valid(p: Principal, s) -> bool:
    """Whether what authenticated ``p`` still holds: the user exists with the same password, or the token is not
    revoked. For connections that outlive their request (the WebSocket)."""
    from cloud.web.data import session_user, token_by_digest
    if p.kind == "token":
        tok = token_by_digest(s, p.credential)
        return tok is not None and tok[0] == p.tenant_id
    user = session_user(s, p.user_id)
    return user is not None and user[1] == p.tenant_id and password_stamp(user[4]) == p.credential


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
            error, retry_after = _too_many(wait)
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
                uid, tid, pw_hash = user.id, user.tenant_id, user.password_hash
        if user is None:  # the slot stays taken: a failed attempt
            error, status = "Unknown email or wrong password.", 401
        else:
            limiter.succeeded(ip, email, ticket)  # a success does not count
            session.clear()  # no session fixation: a fresh session (and CSRF token) after login
            session.permanent = True
            start_session(uid, tid, pw_hash)
            csrf_token()
            return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", error=error, next=request.args.get("next", "")), status


@bp.post("/logout")
def logout():
    session.clear()
    flash("Signed out.")
    return redirect(url_for("auth.login"))
