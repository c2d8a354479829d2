"""The Grafana dashboards in deploy/grafana/ against the real code.

* Every SQL query of every dashboard (PostgreSQL panel targets and templating variables) is run, with the Grafana
  macros and template variables replaced by concrete SQL the way Grafana's PostgreSQL data source expands them,
  on a real PostgreSQL database migrated with ``cloud.db.upgrade`` and holding some telemetry, roll-ups, devices
  and alarms. Each query must execute and return the columns its panel expects; time series must return rows for
  every resolution (raw / 1-minute / 1-hour roll-ups) the query switches between.
* Every Prometheus expression must name only metrics the code exports (parsed from its prometheus_client
  declarations), and must parse (promtool, when installed).
* The provisioning declares the PostgreSQL and Prometheus data sources the dashboards use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
PG_TYPES = {"grafana-postgresql-datasource", "postgres"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_panels(dashboard: dict):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def ds_type(obj: dict, default: dict | None = None) -> str:
    ds = obj.get("datasource") or default or {}
    return ds.get("type", "") if isinstance(ds, dict) else ""


def sql_queries(dashboard: dict):
    """(where, sql, format) for every SQL query of a dashboard."""
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query" and ds_type(var) in PG_TYPES:
            query = var["query"] if isinstance(var["query"], str) else var["query"]["rawSql"]
            yield f"variable ${var['name']}", query, "variable"
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if ds_type(target, panel.get("datasource")) in PG_TYPES:
                yield f"panel {panel['title']!r}/{target['refId']}", target["rawSql"], target.get("format", "time_series")


def prom_exprs(dashboard: dict):
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if ds_type(target, panel.get("datasource")) == "prometheus":
                yield f"panel {panel['title']!r}/{target['refId']}", target["expr"]


# --- static checks --------------------------------------------------------------------------------------

def test_provisioning_declares_both_data_sources_the_dashboards_use():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "datasources.yaml").read_text())
    by_uid = {d["uid"]: d for d in datasources["datasources"]}
    assert {d["type"] for d in by_uid.values()} >= {"prometheus", "grafana-postgresql-datasource"}
    titles = set()
    for path in DASHBOARDS:
        dashboard = load(path)
        titles.add(dashboard["title"])
        assert dashboard["uid"] and dashboard["panels"], path
        objects = [*dashboard.get("templating", {}).get("list", []), *all_panels(dashboard)]
        objects += [t for p in all_panels(dashboard) for t in p.get("targets", [])]
        for obj in objects:
            ds = obj.get("datasource")
            if isinstance(ds, dict) and ds.get("uid"):
                assert ds["uid"] in by_uid, f"{path.name}: unknown data source {ds}"
                assert by_uid[ds["uid"]]["type"] == ds["type"], f"{path.name}: {ds} type mismatch"
    assert {"Fleet telemetry", "Pipeline health"} <= titles
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


_DECL = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']")


def exported_series() -> dict[str, str]:
    """Series name -> declaring file, for every prometheus_client metric the code under cloud/ declares."""
    series: dict[str, str] = {}
    for path in (ROOT / "cloud").rglob("*.py"):
        for kind, name in _DECL.findall(path.read_text()):
            where = str(path.relative_to(ROOT))
            if kind == "Counter":
                base = name[:-6] if name.endswith("_total") else name
                names = [base + "_total", base + "_created"]
            elif kind in ("Histogram", "Summary"):
                names = [name + s for s in ("_bucket", "_sum", "_count", "_created")] if kind == "Histogram" else \
                        [name, name + "_sum", name + "_count", name + "_created"]
            elif kind == "Info":
                names = [name + "_info"]
            else:
                names = [name]
            series.update(dict.fromkeys(names, where))
    return series


_PROMQL_WORDS = {"sum", "rate", "irate", "increase", "by", "without", "max", "min", "avg", "count", "le",
                 "histogram_quantile", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                 "offset", "bool", "topk", "bottomk", "delta", "deriv", "abs", "clamp_min", "clamp_max"}


def test_prometheus_expressions_name_metrics_the_code_exports():
    series = exported_series()
    assert "iot_web_requests_total" in series and "iot_writer_batch_seconds_bucket" in series, series
    checked = 0
    for path in DASHBOARDS:
        for where, expr in prom_exprs(load(path)):
            # drop label matchers, label lists in by()/without(), strings and ranges before picking names
            bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
            bare = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", bare)
            names = [n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
                     if n not in _PROMQL_WORDS and not re.fullmatch(r"\d.*", n)]
            metrics = [n for n in names if n == "up" or n.startswith("iot_")]
            assert metrics, f"{path.name} {where}: no metric in {expr!r}"
            unknown = [n for n in names if n != "up" and n not in series]
            assert not unknown, f"{path.name} {where}: {unknown} not exported by the code ({expr!r})"
            checked += 1
    assert checked >= 10


def test_prometheus_expressions_parse(tmp_path):
    rules = []
    for path in DASHBOARDS:
        for i, (where, expr) in enumerate(prom_exprs(load(path))):
            rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:{i}",
                          "expr": expr.replace("$__rate_interval", "2m").replace("$__interval", "1m")})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the SQL, on a real PostgreSQL ----------------------------------------------------------------------

def _interval_seconds(value: str) -> int:
    m = re.fullmatch(r"\s*'?(\d+)(ms|s|m|h|d)?'?\s*", value)
    assert m, f"cannot read interval {value!r}"
    return int(m.group(1)) * {"ms": 0, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)] or 1


def _args(text: str, start: int) -> tuple[list[str], int]:
    """The comma-separated arguments of the call whose '(' is at text[start]; returns (args, index after ')')."""
    depth, args, current = 0, [], ""
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "(":
            depth += 1
            if depth == 1:
                continue
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append(current.strip())
                return args, i + 1
        elif ch == "," and depth == 1:
            args.append(current.strip())
            current = ""
            continue
        current += ch
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def expand(sql: str, start: datetime, end: datetime, interval: str, variables: dict[str, list[str]]) -> str:
    """Grafana's PostgreSQL macro expansion (the macros the dashboards use), then template variables.

    Multi-value variables are expanded the way Grafana does for SQL data sources: each value single-quoted,
    joined with commas."""
    iso = lambda d: d.strftime("'%Y-%m-%dT%H:%M:%SZ'")  # noqa: E731
    sql = sql.replace("$__interval_ms", str(_interval_seconds(interval) * 1000)).replace("$__interval", interval)
    out, i = "", 0
    pattern = re.compile(r"\$__(timeFilter|timeGroupAlias|timeGroup|timeFrom|timeTo|unixEpochFrom|unixEpochTo)\(")
    while True:
        m = pattern.search(sql, i)
        if not m:
            out += sql[i:]
            break
        out += sql[i:m.start()]
        args, i = _args(sql, m.end() - 1)
        name = m.group(1)
        if name == "timeFilter":
            out += f"{args[0]} BETWEEN {iso(start)} AND {iso(end)}"
        elif name in ("timeGroup", "timeGroupAlias"):
            seconds = _interval_seconds(args[1])
            out += f"floor(extract(epoch from {args[0]})/{seconds})*{seconds}"
            out += ' AS "time"' if name == "timeGroupAlias" else ""
        elif name == "timeFrom":
            out += iso(start)
        elif name == "timeTo":
            out += iso(end)
        elif name == "unixEpochFrom":
            out += str(int(start.timestamp()))
        else:
            out += str(int(end.timestamp()))
    for var, values in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        quoted = ",".join("'" + v.replace("'", "''") + "'" for v in values)
        out = re.sub(r"\$\{" + var + r"(:[a-z]+)?\}|\$" + var + r"\b", lambda _m: quoted, out)
    assert "$" not in out, f"unexpanded macro or variable left in {out}"
    return out


def _expected_columns(sql: str, fmt: str) -> list[str]:
    """Time series queries: time, metric, value. Tables / variables: the aliases of the outer SELECT list."""
    if fmt == "time_series":
        return ["time", "metric", "value"]
    if fmt == "variable":
        return ["__value", "__text"]
    depth, cut = 0, len(sql)
    for m in re.finditer(r"[()]|\bFROM\b", sql, flags=re.I):  # the outer FROM: the first one outside parentheses
        token = m.group(0)
        depth += 1 if token == "(" else -1 if token == ")" else 0
        if token.upper() == "FROM" and depth == 0:
            cut = m.start()
            break
    head = sql[:cut]
    cols = []
    for item in _args("(" + re.sub(r"^\s*SELECT\s", "", head, flags=re.I) + ")", 0)[0]:
        alias = re.search(r"\bAS\s+\"?(\w+)\"?\s*$", item, flags=re.I)
        cols.append(alias.group(1) if alias else item.split(".")[-1].strip())
    return cols


@pytest.fixture(scope="module")
def grafana_db(postgres):
    """A database of its own, migrated, with two tenants: devices, a week of readings, roll-ups and alarms."""
    import psycopg

    from cloud import db
    from cloud.db import maintenance, repo
    from cloud.db.models import Alarm, Telemetry

    name = f"grafana_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(postgres.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" OWNER iot')
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    db.upgrade(url)
    engine = db.make_engine(url)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    maintenance.ensure_partitions(engine, days_ahead=1, days_back=9, now=now)
    with db.session_factory(engine)() as s:
        tenant = repo.create_tenant(s, "Acme")
        other = repo.create_tenant(s, "Other")
        devices = ["acme-1", "acme-2", "acme-3"]
        for i, dev in enumerate(devices):
            d, _ = repo.create_device(s, tenant.id, dev, f"sensor {i} <b>'quoted'</b>")
            d.status = ("online", "offline", "unknown")[i]
            d.last_seen = now - timedelta(minutes=i) if i < 2 else None
        repo.create_device(s, other.id, "other-1", "not theirs")
        rows = []
        for dev_i, dev in enumerate(devices[:2] + ["other-1"]):
            tenant_id = other.id if dev == "other-1" else tenant.id
            times = [now - timedelta(minutes=10 * k) for k in range(1, 8 * 144)]  # eight days, every 10 min
            times += [now - timedelta(seconds=30 * k) for k in range(1, 360)]      # the last three hours
            for seq, ts in enumerate(sorted(set(times))):
                rows.append(Telemetry(device_id=dev, boot=1, seq=seq, tenant_id=tenant_id, ts=ts, received_at=ts,
                                      t=20 + dev_i + (seq % 7) / 10, h=40.0 + seq % 5,
                                      p=None if seq % 3 == 0 else 1000.0 + dev_i, rssi=-60, up=seq))
        s.add_all(rows)
        for k, (severity, state) in enumerate([("critical", "raised"), ("major", "acknowledged"),
                                              ("minor", "raised"), ("major", "cleared")]):
            s.add(Alarm(id=f"al-{k}", tenant_id=tenant.id, device_id=devices[k % 2], rule=f"r{k}", metric="t",
                        severity=severity, state=state, value=30.0, threshold=25.0,
                        raised_at=now - timedelta(hours=k * 20, minutes=30),
                        cleared_at=now if state == "cleared" else None))
        s.add(Alarm(id="al-other", tenant_id=other.id, device_id="other-1", rule="r", metric="t",
                    severity="critical", state="raised", raised_at=now - timedelta(hours=1)))
        s.commit()
        ids = {"tenant": str(tenant.id), "other": str(other.id), "devices": devices}
    maintenance.refresh_rollups(engine, now - timedelta(days=9), now + timedelta(minutes=1))
    engine.dispose()
    yield {"url": url, "now": now, **ids}
    with psycopg.connect(postgres.admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


# (range, Grafana's $__interval for a ~1,000 px panel) -- one per resolution the metric queries switch between
RANGES = {"1h": (timedelta(hours=1), "5s"), "24h": (timedelta(hours=24), "1m"), "7d": (timedelta(days=7), "10m")}


SQL_DASHBOARDS = [p for p in DASHBOARDS if any(sql_queries(load(p)))]


def test_the_fleet_dashboard_has_sql():
    assert [load(p)["title"] for p in SQL_DASHBOARDS] == ["Fleet telemetry"]


@pytest.mark.parametrize("path", SQL_DASHBOARDS, ids=[p.stem for p in SQL_DASHBOARDS])
def test_every_sql_query_runs_on_the_real_schema(grafana_db, path):
    import psycopg

    dashboard = load(path)
    queries = list(sql_queries(dashboard))
    variables = {"tenant": [grafana_db["tenant"]], "device": grafana_db["devices"][:2]}
    dsn = grafana_db["url"].replace("postgresql+psycopg://", "postgresql://")
    failures = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for where, raw, fmt in queries:
            expected = _expected_columns(raw, fmt)
            for label, (span, interval) in RANGES.items():
                end = grafana_db["now"] + timedelta(seconds=1)
                sql = expand(raw, end - span, end, interval, variables)
                try:
                    cur = conn.execute(sql)
                except psycopg.Error as exc:
                    failures.append(f"{where} [{label}]: {exc}\n{sql}")
                    continue
                columns = [c.name for c in cur.description]
                rows = cur.fetchall()
                if columns != expected:
                    failures.append(f"{where} [{label}]: columns {columns}, expected {expected}")
                if fmt == "time_series":
                    if not rows:
                        failures.append(f"{where} [{label}]: no rows")
                    times = [r[0] for r in rows]
                    assert times == sorted(times), f"{where}: time series not ordered by time"
                    assert {r[1] for r in rows} <= set(variables["device"]) or "alarm" in where.lower(), \
                        f"{where}: series of devices outside $device: {sorted({r[1] for r in rows})}"
                    lo, hi = (end - span).timestamp() - 86400, end.timestamp()
                    assert all(lo <= float(r[0]) <= hi for r in rows), f"{where}: time outside the range"
                elif fmt == "variable":
                    assert rows, f"{where}: no values"
                if fmt != "variable" and "other-1" in repr(rows):
                    failures.append(f"{where} [{label}]: a row of another tenant: {rows}")
    assert not failures, "\n\n".join(failures)


def test_fleet_queries_return_the_provisioned_facts(grafana_db):
    """Spot checks of the fleet dashboard's values against what the fixture provisioned."""
    import psycopg

    dashboard = next(load(p) for p in DASHBOARDS if load(p)["title"] == "Fleet telemetry")
    queries = {where: raw for where, raw, _ in sql_queries(dashboard)}
    dsn = grafana_db["url"].replace("postgresql+psycopg://", "postgresql://")
    end = grafana_db["now"] + timedelta(seconds=1)
    run_vars = {"tenant": [grafana_db["tenant"]], "device": grafana_db["devices"][:2]}

    def run(where: str, span=timedelta(hours=1), interval="1m"):
        key = next(k for k in queries if k.startswith(where))
        with psycopg.connect(dsn) as conn:
            return conn.execute(expand(queries[key], end - span, end, interval, run_vars)).fetchall()

    assert run("panel 'Online'") == [(1,)]
    assert run("panel 'Offline'") == [(1,)]
    assert run("panel 'Never seen") == [(1,)]
    assert run("panel 'Active alarms by severity'") == [("critical", 1), ("major", 1), ("minor", 1)]
    tenants = run("variable $tenant")
    assert {text for _, text in tenants} == {"Acme", "Other"}
    assert sorted(v for v, _ in run("variable $device")) == grafana_db["devices"]
    last_seen = run("panel 'Devices: last seen'")
    assert [r[0] for r in last_seen] == ["acme-1", "acme-2", "acme-3"]
    assert last_seen[0][6] is not None and last_seen[2][6] is None  # latest temperature; none for a silent device
    # the three resolutions give consistent temperatures (each device's readings lie in [20 + i, 20.6 + i])
    for span, interval in RANGES.values():
        rows = run("panel 'Temperature'", span, interval)
        for _, device, value in rows:
            base = 20 + grafana_db["devices"].index(device)
            assert base - 1e-9 <= value <= base + 0.6 + 1e-9, (span, device, value)
