"""The web tier: Flask app with pages, REST API (/api/v1), WebSocket (/ws) and ops endpoints.

``create_app(settings, engine=..., bus=..., cache=...)`` builds one app; every collaborator can be injected so
the demo (SQLite, in-process bus, in-memory cache) and production (PostgreSQL, Kafka, Redis) run the same code,
and tests can hand in a MemoryBus and read back what the app produced.

Serve it in production with a threaded WSGI server that supports flask-sock, e.g.::

    gunicorn --worker-class gthread --workers 1 --threads 64 -b 0.0.0.0:8000 'cloud.web.wsgi:app'

(each WebSocket holds one thread for its lifetime; scale out with more processes behind a proxy).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, abort, current_app, request
from flask.sessions import SecureCookieSessionInterface

from cloud import schema
from cloud.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class WebContext:
    """Everything a request handler needs, stored in ``app.extensions["iot"]``."""
    settings: Settings
    engine: Any
    session_factory: Any
    bus: Any
    cache: Any
    hub: Any = None
    read_session_factory: Any = None
    limiter: Any = None  # login rate limit (cloud/web/ratelimit.py)
    _producer: Any = None
    _producer_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def producer(self):
        with self._producer_lock:
            if self._producer is None:
                self._producer = self.bus.producer("web")
            return self._producer


SESSION_REFRESH_S = 60


class _SessionInterface(SecureCookieSessionInterface):
    """The session cookie gets the Secure flag whenever the request came over HTTPS.

    A permanent session still slides (each request moves its expiry to now + PERMANENT_SESSION_LIFETIME), but the
    cookie is signed and sent again only when it is more than SESSION_REFRESH_S old, not on every response
    (re-signing it was a noticeable part of every page's CPU); a modified session is always sent."""

    def get_cookie_secure(self, app) -> bool:
        return bool(app.config.get("SESSION_COOKIE_SECURE")) or request.is_secure

    def open_session(self, app, request):
        from itsdangerous import BadSignature

        serializer = self.get_signing_serializer(app)
        if serializer is None:
            return None
        value = request.cookies.get(self.get_cookie_name(app))
        if not value:
            return self.session_class()
        try:
            data, signed_at = serializer.loads(value, max_age=int(app.permanent_session_lifetime.total_seconds()),
                                               return_timestamp=True)
        except BadSignature:
            return self.session_class()
        session = self.session_class(data)
        session.signed_at = signed_at.timestamp()
        return session

    def should_set_cookie(self, app, session) -> bool:
        import time

        if session.modified:
            return True
        if not (session.permanent and app.config["SESSION_REFRESH_EACH_REQUEST"]):
            return False
        signed_at = getattr(session, "signed_at", None)
        return signed_at is None or time.time() - signed_at >= SESSION_REFRESH_S


IDLE_PING_S = 10.0
# connections kept open per web process. Each request holds one while it runs; a pool smaller than the requests
# in flight opened and closed a connection for every request beyond it (a PostgreSQL backend started and a
# password exchange each time): at 16 concurrent requests a quarter of them paid for a new connection
POOL_SIZE, POOL_OVERFLOW = 16, 4


def web_engine(url: str):
    """The web tier's engine. PostgreSQL: instead of the pool's pre-ping on EVERY checkout (a round trip per
    request), a connection is pinged only when it sat idle in the pool for more than IDLE_PING_S seconds; one
    broken by a database restart within that window fails one request and SQLAlchemy then discards the pool.
    POOL_SIZE connections stay open (no connect per request under concurrency), POOL_OVERFLOW more for bursts;
    requests beyond that wait for a connection."""
    import time

    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import DisconnectionError

    from cloud import db as dbmod

    if dbmod.is_sqlite(url):
        return dbmod.make_engine(url)
    engine = create_engine(dbmod.normalize_url(url), pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW,
                           pool_pre_ping=False,
                           pool_recycle=1800,
                           # in UTC whatever the server's default, as every engine of cloud.db.make_engine: psycopg
                           # reads timestamps fastest in "UTC", and any date_trunc / ::date the web tier's queries
                           # or the repo functions they call use means UTC days, hours and minutes
                           connect_args={"connect_timeout": 5, "application_name": "iot-web",
                                         "options": "-c TimeZone=UTC"})

    @event.listens_for(engine, "connect")
    def _fresh(_dbapi_connection, record):
        record.info["iot_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _idle(_dbapi_connection, record):
        record.info["iot_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection, record, _proxy):
        since = record.info.get("iot_idle_since")
        if since is not None and time.monotonic() - since < IDLE_PING_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool replaces the connection and retries the checkout
            raise DisconnectionError(str(exc)) from exc

    return engine


def ctx() -> WebContext:
    return current_app.extensions["iot"]


class ReadSession:
    """A request's read handle: ONE pooled Core connection in autocommit, checked out on first use and given
    back by ``close()``. Reads take ``connection()``, ``get_bind()``, ``execute()`` / ``scalar()`` (Core
    statements and plain columns; no ORM objects): an ORM Session around the connection (its state machine,
    transaction object and identity map) cost more per request than the principal lookup it served."""

    __slots__ = ("bind", "_conn")

    def __init__(self, bind):
        self.bind = bind
        self._conn = None

    def connection(self):
        conn = self._conn
        if conn is None:
            conn = self._conn = self.bind.connect()
        return conn

    def get_bind(self):
        return self.bind

    def execute(self, statement, *args, **kwargs):
        return self.connection().execute(statement, *args, **kwargs)

    def scalar(self, statement, *args, **kwargs):
        return self.connection().scalar(statement, *args, **kwargs)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> "ReadSession":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def request_session():
    """The request's READ session (a :class:`ReadSession`, autocommit: each statement stands alone; write with
    a session of your own from ``ctx().session_factory``): opened on first use (the principal lookup), shared
    by the handler, closed when the request ends. One connection checkout per request instead of one per
    lookup saves the pool's pre-ping and the reset-on-return rollback, two database round trips on every
    request."""
    from flask import g

    s = g.get("_db_session")
    if s is None:
        s = g._db_session = current_app.extensions["iot"].read_session_factory()
    return s


def release_request_session() -> None:
    """Give the request's connection back now (a WebSocket lives for hours and must not hold one)."""
    from flask import g

    s = g.pop("_db_session", None)
    if s is not None:
        s.close()


def _unstorable_request_text() -> str | None:
    """Why the request carries text no store can keep (NUL, lone surrogates: ``schema.unstorable_text``) in its
    path, query, form or JSON body, or None. Every route answers that with a 400 naming the problem instead of a
    database error (500) deep inside the request."""
    parts: list = [request.path, list(request.args.keys()), list(request.args.values())]
    if request.form:
        parts += [list(request.form.keys()), list(request.form.values())]
    if request.is_json:
        parts.append(request.get_json(silent=True))
    return schema.unstorable_text(parts)


def create_app(settings: Settings, *, engine: Any = None, bus: Any = None, cache: Any = None) -> Flask:
    """Build the web app. Missing collaborators are created from ``settings``."""
    from cloud import db as dbmod

    if engine is None:
        engine = web_engine(settings.database_url)
    session_factory = dbmod.session_factory(engine)
    # reads of a request (principal, lists, history) need no transaction: in autocommit there is no BEGIN
    # before the first query and no ROLLBACK when the connection goes back to the pool (2 round trips)
    read_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    read_session_factory = lambda: ReadSession(read_engine)  # noqa: E731
    if bus is None:
        from cloud.bus import from_settings

        bus = from_settings(settings)
    if cache is None:
        from cloud.cache import cache_from_settings

        cache = cache_from_settings(settings)

    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.session_interface = _SessionInterface()
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="iot_session",
        PERMANENT_SESSION_LIFETIME=12 * 3600,
        MAX_CONTENT_LENGTH=256 * 1024,
        JSON_SORT_KEYS=False,
        # no pings from simple_websocket's reader thread: the hub's feed thread sends them (cloud/web/ws.py),
        # so frames written to a socket never interleave
        SOCK_SERVER_OPTIONS={"ping_interval": None},
    )
    from cloud.web.ws import Hub

    context = WebContext(settings=settings, engine=engine, session_factory=session_factory, bus=bus,
                         cache=cache, read_session_factory=read_session_factory)
    context.hub = Hub(cache)
    from cloud.web.ratelimit import limiter_from

    context.limiter = limiter_from(settings, cache)
    app.extensions["iot"] = context

    from cloud.web import api, auth, ops, pages, ws

    @app.before_request
    def _refuse_unstorable_text():
        # first, before anything reads the request's text: a login form's email, a token's name, an API body
        problem = _unstorable_request_text()
        if problem:
            abort(400, description=f"bad text in the request: {problem}")

    auth.init_app(app)
    ops.init_app(app)
    app.teardown_appcontext(lambda _exc: release_request_session())
    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(ws.bp)
    app.register_blueprint(ops.bp)
    _install_common(app)
    if settings.web_proxy_hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # only as many forwarded hops as proxies we run: a client cannot spoof its address past them
        hops = settings.web_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
    return app


VENDOR_FILE = "vendor/uPlot.iife.min.js"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")


def _install_common(app: Flask) -> None:
    import os
    import time

    from flask import jsonify, render_template, request
    from werkzeug.exceptions import HTTPException

    vendor_path = os.path.join(app.static_folder or "", VENDOR_FILE)

    # templates build the same dozen links (navigation, static files) on every page: each url_for is a route
    # build (~25 us); the argument-free ones and static files are built once per script root and kept
    built: dict[tuple, str] = {}
    url_for = app.url_for

    def _template_url_for(endpoint: str, **values) -> str:
        if values and endpoint != "static":
            return url_for(endpoint, **values)
        key = (request.script_root, endpoint, *sorted(values.items()))
        url = built.get(key)
        if url is None:
            url = url_for(endpoint, **values)
            if len(built) < 1000:
                built[key] = url
        return url

    app.jinja_env.globals["url_for"] = _template_url_for

    vendor_seen = [False, 0.0]  # found?, when last looked

    @app.context_processor
    def _vendor():
        # looked up again every few seconds until found, so running the fetch step needs no restart (not on
        # every render: a stat per page showed up in the fleet page's profile)
        now = time.monotonic()
        if not vendor_seen[0] and now - vendor_seen[1] > 5.0:
            vendor_seen[0], vendor_seen[1] = os.path.exists(vendor_path), now
        return {"vendor_ok": vendor_seen[0]}

    @app.after_request
    def _headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", CSP)
            response.headers.setdefault("X-Frame-Options", "DENY")
        if request.path.startswith("/api/") or request.path.startswith("/admin"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if request.path.startswith("/api/") or request.path in ("/ws", "/healthz"):
            return jsonify(error=exc.description or exc.name), exc.code
        try:
            return render_template("error.html", code=exc.code, message=exc.description or exc.name), exc.code
        except Exception:
            return exc
