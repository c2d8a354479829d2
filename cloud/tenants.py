"""``python -m cloud tenant``: the platform operator's tool to create customers (tenants) and list them.

    python -m cloud tenant create "Acme Ltd" --admin ops@acme.example [--retention-days 90]
    python -m cloud tenant list [--json]
    python -m cloud tenant reset-password ops@acme.example

``create`` makes the tenant and its first admin user in one transaction and prints the admin's generated
password once (only its hash is stored); the admin then logs in to the dashboard and creates the other users,
devices and API tokens. ``reset-password`` gives a user who cannot sign in (the tenant's only admin forgot the
password) a new generated password, printed once; the user's sessions end. The database comes from
IOT_DATABASE_URL (cloud.settings) and must be migrated (``python -m cloud db upgrade``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence

ADMIN_PASSWORD_BYTES = 15  # 20 URL-safe characters


def build_parser(prog: str = "python -m cloud tenant") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="create and list tenants (customers)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{create,list,reset-password}")
    create = sub.add_parser("create", help="create a tenant and its first admin user (prints the password once)")
    create.add_argument("name", help="the tenant's name (unique)")
    create.add_argument("--admin", required=True, metavar="EMAIL", help="email address of the tenant's first admin")
    create.add_argument("--retention-days", type=int, default=30,
                        help="days of raw telemetry kept for this tenant (1..3650, default 30)")
    listing = sub.add_parser("list", help="list tenants with their device and user counts")
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    reset = sub.add_parser("reset-password", help="give a user a new generated password (printed once)")
    reset.add_argument("email", help="the user's email address")
    return parser


def create_tenant(engine, name: str, admin_email: str, retention_days: int = 30) -> tuple[int, str, str]:
    """Create the tenant and its admin in one transaction; returns (tenant id, admin email, admin password).

    Raises ValueError with a message for the operator (empty or taken name, bad email, retention out of range)."""
    from sqlalchemy import select

    from cloud.db import repo, session_factory
    from cloud.db.models import Tenant
    from cloud.passwords import new_secret

    password = new_secret(ADMIN_PASSWORD_BYTES)
    with session_factory(engine)() as session:
        clean = (name or "").strip()
        if clean and session.scalar(select(Tenant.id).where(Tenant.name == clean)) is not None:
            raise ValueError(f"a tenant named {clean!r} already exists")
        tenant = repo.create_tenant(session, clean, retention_days)
        user = repo.create_user(session, tenant.id, admin_email, password, role="admin")
        session.commit()
        return tenant.id, user.email, password


def reset_password(engine, email: str) -> tuple[int, str, str]:
    """A new generated password for the user ``email``; returns (tenant id, email, password). ValueError when
    there is no such user."""
    from sqlalchemy import select

    from cloud.db import repo, session_factory
    from cloud.db.models import User
    from cloud.passwords import new_secret

    clean = (email or "").strip().lower()
    password = new_secret(ADMIN_PASSWORD_BYTES)
    with session_factory(engine)() as session:
        user = session.scalar(select(User).where(User.email == clean))
        if user is None:
            raise ValueError(f"no user with email {clean!r}")
        repo.set_password(session, user.tenant_id, user.id, password)
        session.commit()
        return user.tenant_id, user.email, password


def list_tenants(engine) -> list[dict]:
    from sqlalchemy import func, select

    from cloud.db import session_factory
    from cloud.db.models import Device, Tenant, User

    with session_factory(engine)() as session:
        devices = dict(session.execute(select(Device.tenant_id, func.count()).where(Device.revoked_at.is_(None))
                                       .group_by(Device.tenant_id)).all())
        users = dict(session.execute(select(User.tenant_id, func.count()).group_by(User.tenant_id)).all())
        admins: dict[int, list[str]] = {}
        for tenant_id, email in session.execute(select(User.tenant_id, User.email).where(User.role == "admin")
                                                .order_by(User.email)):
            admins.setdefault(tenant_id, []).append(email)
        return [{"id": t.id, "name": t.name, "retention_days": t.retention_days,
                 "devices": devices.get(t.id, 0), "users": users.get(t.id, 0), "admins": admins.get(t.id, []),
                 "created_at": t.created_at.isoformat(timespec="seconds") if t.created_at else None}
                for t in session.scalars(select(Tenant).order_by(Tenant.id))]


def _table(rows: list[dict]) -> str:
    header = ("id", "name", "retention_days", "devices", "users", "admins", "created_at")
    cells = [[str(r[h]) if h != "admins" else ", ".join(r[h]) for h in header] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sqlalchemy.exc import SQLAlchemyError

    from cloud import settings as settings_mod
    from cloud.db import make_engine

    try:
        settings = settings_mod.load(environ)
    except settings_mod.SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(settings.database_url)
    try:
        if args.action == "create":
            tenant_id, email, password = create_tenant(engine, args.name, args.admin, args.retention_days)
            print(f"tenant {tenant_id} {args.name.strip()!r} created (retention {args.retention_days} days)")
            print(f"admin: {email}")
            print(f"password: {password}")
            print("The password is shown only this once (only its hash is stored): hand it over securely.")
            return 0
        if args.action == "reset-password":
            tenant_id, email, password = reset_password(engine, args.email)
            print(f"user {email} (tenant {tenant_id}): new password {password}")
            print("Shown only this once; the user's sessions have ended. Hand it over securely.")
            return 0
        rows = list_tenants(engine)
        print(json.dumps(rows) if args.json else (_table(rows) if rows else "no tenants"))
        return 0
    except ValueError as exc:
        print(f"tenant: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"tenant: database error ({str(exc).splitlines()[0][:200]}); "
              "is IOT_DATABASE_URL right and the schema migrated (python -m cloud db upgrade)?", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
