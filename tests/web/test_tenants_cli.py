"""``python -m cloud tenant`` (cloud.tenants): create customers and list them, on SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cloud import db, tenants
from cloud.db import repo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path):
    url = f"sqlite:///{tmp_path}/tenants.db"
    db.upgrade(url)
    return {"IOT_DATABASE_URL": url}


def run(env, *argv):
    return tenants.main(list(argv), environ=env)


def password_of(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("password: ")]
    assert len(lines) == 1, out
    return lines[0].split(": ", 1)[1]


def test_create_prints_a_working_admin_password_once_and_list_shows_the_tenant(env, capsys):
    assert run(env, "create", "Acme Ltd", "--admin", "Ops@Acme.example", "--retention-days", "90") == 0
    out = capsys.readouterr().out
    password = password_of(out)
    assert len(password) >= 16 and "Acme Ltd" in out and "ops@acme.example" in out
    engine = db.make_engine(env["IOT_DATABASE_URL"])
    with db.session_factory(engine)() as s:
        user = repo.authenticate(s, "ops@acme.example", password)
        assert user is not None and user.role == "admin"
        tenant = repo.get_tenant(s, user.tenant_id)
        assert tenant.name == "Acme Ltd" and tenant.retention_days == 90
        assert password not in user.password_hash
        repo.create_device(s, tenant.id, "acme-1")
        s.commit()
    engine.dispose()

    assert run(env, "create", "Globex", "--admin", "admin@globex.example") == 0
    second = password_of(capsys.readouterr().out)
    assert second != password

    assert run(env, "list") == 0
    table = capsys.readouterr().out
    assert "Acme Ltd" in table and "Globex" in table and password not in table and second not in table
    assert run(env, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["retention_days"], r["devices"], r["users"], r["admins"]) for r in rows] == [
        ("Acme Ltd", 90, 1, 1, ["ops@acme.example"]), ("Globex", 30, 0, 1, ["admin@globex.example"])]


@pytest.mark.parametrize("argv, message", [
    (["create", "Acme", "--admin", "not-an-email"], "valid email"),
    (["create", "  ", "--admin", "a@b.example"], "must not be empty"),
    (["create", "Acme", "--admin", "a@b.example", "--retention-days", "0"], "retention_days"),
])
def test_bad_input_is_refused_with_a_message_and_nothing_is_left_behind(env, capsys, argv, message):
    assert run(env, *argv) == 2
    assert message in capsys.readouterr().err
    assert run(env, "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_duplicate_tenant_name_or_admin_email_is_refused(env, capsys):
    assert run(env, "create", "Acme", "--admin", "a@acme.example") == 0
    capsys.readouterr()
    assert run(env, "create", "Acme", "--admin", "b@acme.example") == 2
    assert "already exists" in capsys.readouterr().err
    assert run(env, "create", "Other", "--admin", "A@acme.example") == 2  # emails are case-insensitive
    assert "already exists" in capsys.readouterr().err
    assert run(env, "list", "--json") == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["Acme"]  # no orphan tenant "Other"


def test_list_on_an_empty_database_and_unmigrated_database(env, tmp_path, capsys):
    assert run(env, "list") == 0
    assert "no tenants" in capsys.readouterr().out
    assert run({"IOT_DATABASE_URL": f"sqlite:///{tmp_path}/empty.db"}, "list") == 1
    assert "db upgrade" in capsys.readouterr().err


def test_bad_settings_and_usage(capsys):
    assert run({"IOT_DATABASE_URL": "mysql://x/y"}, "list") == 2
    assert "IOT_DATABASE_URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        tenants.main(["create", "Acme"])  # --admin is required
    assert exc.value.code == 2
    parser = tenants.build_parser("python -m cloud tenant")
    assert parser.prog == "python -m cloud tenant"
    assert parser.parse_args(["list"]).action == "list"


def test_runs_as_a_module(env):
    result = subprocess.run([sys.executable, "-m", "cloud.tenants", "create", "Mod", "--admin", "m@mod.example"],
                            env={"PATH": "/usr/bin:/bin", **env}, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert password_of(result.stdout)


def test_reset_password_gives_a_new_working_password_once(env, capsys):
    assert run(env, "create", "Acme", "--admin", "ops@acme.example") == 0
    old = password_of(capsys.readouterr().out)
    assert run(env, "reset-password", " Ops@Acme.example ") == 0
    out = capsys.readouterr().out
    new = out.split("new password ", 1)[1].split()[0]
    assert new != old and len(new) >= 16 and "ops@acme.example" in out
    engine = db.make_engine(env["IOT_DATABASE_URL"])
    with db.session_factory(engine)() as s:
        assert repo.authenticate(s, "ops@acme.example", old) is None
        assert repo.authenticate(s, "ops@acme.example", new) is not None
    engine.dispose()
    assert run(env, "reset-password", "nobody@acme.example") == 2
    assert "no user with email 'nobody@acme.example'" in capsys.readouterr().err
