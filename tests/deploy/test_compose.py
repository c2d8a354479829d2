"""deploy/compose.yaml without a container engine: parse it and check it against the code.

* every command of our image is a real CLI entry (``python -m cloud <service>`` parsed by cloud.__main__'s
  parser, ``python -m cloud.<module> ...`` by that module's ``build_parser()``, scripts exist);
* every ``IOT_*`` variable is a setting (cloud.settings.documented_variables()) and every variable taken from
  ``.env`` is documented in deploy/.env.example;
* published host ports do not clash; depends_on only names services that exist, one-shot jobs are awaited with
  ``service_completed_successfully`` and long-running services with ``service_healthy`` (so they need a
  health check); no dependency cycles;
* Prometheus scrapes every long-running service of ours; the files compose mounts exist;
* deploy/mosquitto/mosquitto.conf is accepted by the real Mosquitto 2 and matches cloud.mqtt_auth's layout.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

import yaml

from cloud import settings as settings_mod  # noqa: E402
from cloud.__main__ import build_parser  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
OUR_IMAGE = "${PLATFORM_IMAGE:-iot-platform:latest}"
ONE_SHOT = {"kafka-init", "migrate", "mqtt-auth-init", "connect-init"}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name.strip()] = value
    return values


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif node is not None:
        yield str(node)


def _command(svc: dict) -> list[str]:
    cmd = svc.get("command")
    if cmd is None:
        return []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _ours(svc: dict) -> bool:
    return svc.get("image") == OUR_IMAGE


# --- structure ----------------------------------------------------------------------------------------------

def test_topology_has_every_part(services):
    expected = {"kafka", "kafka-init", "postgres", "migrate", "redis", "mosquitto", "mqtt-auth-init", "mqtt-auth",
                "bridge", "writer", "alarms", "notifier", "web", "prometheus", "grafana", "console", "traefik",
                "connect", "connect-init"}
    assert expected <= set(services), expected - set(services)
    assert "apache/kafka" in services["kafka"]["image"]
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert "eclipse-mosquitto:" in services["mosquitto"]["image"]


def test_every_command_of_our_image_exists_in_our_cli(services):
    parser = build_parser()
    checked = 0
    for name, svc in services.items():
        if not _ours(svc):
            continue
        cmd = _command(svc)
        assert cmd[:2] == ["python", "-m"] or cmd[:1] == ["python"], f"{name}: {cmd}"
        if cmd[:3] == ["python", "-m", "cloud"]:
            args = parser.parse_args(cmd[3:])  # SystemExit on an unknown command or bad arguments
            assert args.command, name
        elif cmd[:2] == ["python", "-m"]:
            module = importlib.import_module(cmd[2])
            assert hasattr(module, "build_parser"), f"{name}: {cmd[2]} has no build_parser()"
            module.build_parser().parse_args([re.sub(r"\$\{[^}]+\}", "2", a) for a in cmd[3:]])
        else:
            assert (REPO / cmd[1]).is_file(), f"{name}: {cmd[1]} does not exist"
        checked += 1
    assert checked >= 9


def test_iot_variables_are_settings_and_env_variables_are_documented(compose):
    documented = set(settings_mod.documented_variables())
    example = _env_example()
    text = COMPOSE.read_text()
    # IOT_* keys set in an environment: block, and IOT_* variables interpolated from .env
    keys = set()
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        keys |= {k for k in (env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env])}
    for anchor in ("x-iot-env",):
        keys |= set(compose.get(anchor, {}))
    iot_keys = {k for k in keys if k.startswith("IOT_")}
    interpolated = {m.group(1) for m in _VAR.finditer(text)}
    unknown = sorted((iot_keys | {v for v in interpolated if v.startswith("IOT_")}) - documented)
    assert not unknown, f"IOT_* variables used by compose.yaml but not in cloud.settings: {unknown}"
    # every variable taken from .env is in .env.example (secrets, IOT_* settings, ports, versions)
    missing = sorted(interpolated - set(example))
    assert not missing, f"variables compose.yaml takes from .env but .env.example does not document: {missing}"
    # and the defaults written in compose.yaml agree with .env.example
    for m in _VAR.finditer(text):
        name, op, default = m.groups()
        if op == ":-" and default and name in example and example[name]:
            assert example[name] == default, f"{name}: compose default {default!r}, .env.example {example[name]!r}"


def test_every_iot_setting_in_env_example_is_real():
    documented = set(settings_mod.documented_variables())
    bogus = sorted(k for k in _env_example() if k.startswith("IOT_") and k not in documented
                  )
    assert not bogus, bogus


def test_required_secrets_have_no_defaults():
    text = COMPOSE.read_text()
    for secret in ("IOT_SECRET_KEY", "POSTGRES_PASSWORD", "MQTT_BRIDGE_PASSWORD", "MQTT_MONITOR_PASSWORD",
                   "GRAFANA_ADMIN_PASSWORD", "CONSOLE_BASIC_AUTH"):
        uses = [m for m in _VAR.finditer(text) if m.group(1) == secret]
        assert uses, secret
        assert any(m.group(2) == ":?" for m in uses), f"{secret} must be required (${{{secret}:?...}})"
        assert not any(m.group(2) == ":-" and m.group(3) for m in uses), f"{secret} has a default"


def _host_ports(svc: dict) -> list[tuple[str, str]]:
    out = []
    for entry in svc.get("ports") or []:
        text = str(entry)
        resolved = _VAR.sub(lambda m: m.group(3) or "", text)
        parts = resolved.split(":")
        if len(parts) == 3:
            out.append((parts[0], parts[1]))
        elif len(parts) == 2:
            out.append(("0.0.0.0", parts[0]))
        else:
            pytest.fail(f"publish the port explicitly (host:container): {entry}")
    return out


def test_host_ports_do_not_clash(services):
    seen: dict[str, str] = {}
    for name, svc in services.items():
        for _bind, port in _host_ports(svc):
            assert port not in seen, f"host port {port} used by {seen[port]} and {name}"
            seen[port] = name
    # only the entry points are published: Traefik (HTTP) and Mosquitto's device listeners
    assert set(seen.values()) == {"traefik", "mosquitto"}, seen
    assert "1883" not in seen, "the service listener must stay on the internal network"


def test_depends_on_and_health_checks_are_sane(services):
    graph = {}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: use the long depends_on form with conditions"
        graph[name] = set(deps)
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            cond = spec.get("condition")
            if dep in ONE_SHOT:
                assert cond == "service_completed_successfully", f"{name} -> {dep}: {cond}"
            else:
                assert cond == "service_healthy", f"{name} -> {dep}: {cond}"
                assert services[dep].get("healthcheck"), f"{dep} is awaited as healthy but has no healthcheck"
            if "profiles" in services[dep]:
                assert set(services[dep]["profiles"]) <= set(services[name].get("profiles", [])), \
                    f"{name} depends on {dep}, which only runs with a profile"
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", f"one-shot {name} must not restart"
        else:
            assert svc.get("healthcheck"), f"long-running {name} has no healthcheck"
            assert svc.get("restart") == "unless-stopped", name

    # no cycles
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 1:
            pytest.fail(f"dependency cycle: {' -> '.join(path + [n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in graph[n]:
            visit(d, path + [n])
        state[n] = 2

    for n in graph:
        visit(n, [])
    # the start-up order the platform needs
    assert "kafka-init" in graph["bridge"] and "mosquitto" in graph["bridge"]
    assert {"migrate", "kafka-init"} <= graph["writer"] and {"migrate", "kafka-init"} <= graph["alarms"]
    assert "migrate" in graph["mqtt-auth-init"] and "mqtt-auth-init" in graph["mosquitto"]
    assert services["mqtt-auth"]["pid"] == "service:mosquitto"


def test_prometheus_scrapes_every_long_running_service_of_ours(services):
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t.split(":")[0] for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    ours = {n for n, s in services.items() if _ours(s) and n not in ONE_SHOT and "profiles" not in s}
    assert ours <= targets, ours - targets


def test_mounted_files_exist(services):
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            src = str(vol).split(":")[0]
            if src.startswith("./") and "certs/" not in src:  # certs come from `python -m cloud ca`
                assert (DEPLOY / src).exists(), f"{name}: {src} missing"
    assert (DEPLOY / "Dockerfile").is_file()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "\nUSER iot" in dockerfile


def test_grafana_provisioning_parses():
    for path in (DEPLOY / "grafana" / "provisioning").rglob("*.yaml"):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1
    import json

    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        assert json.loads(path.read_text())["panels"]


def test_traefik_routes_point_at_compose_services(services):
    dynamic = yaml.safe_load((DEPLOY / "traefik" / "dynamic.yml").read_text())
    for name, svc in dynamic["http"]["services"].items():
        for server in svc["loadBalancer"]["servers"]:
            host = server["url"].split("//")[1].split(":")[0]
            assert host in services, f"traefik service {name} -> unknown host {host}"
    assert "/var/run/docker.sock" not in COMPOSE.read_text(), "no container gets the Docker API"


def test_connect_configs_render():
    import json
    import sys

    sys.path.insert(0, str(DEPLOY / "connect"))
    try:
        post = importlib.import_module("post_connectors")
    finally:
        sys.path.pop(0)
    specs = post.load(DEPLOY / "connect", {})
    names = {s["name"] for s in specs}
    assert names == {"iot-mqtt-source", "iot-mqtt-sink"}
    by = {s["name"]: s["config"] for s in specs}
    assert by["iot-mqtt-source"]["topics"] == "iot-sensordata"
    assert by["iot-mqtt-sink"]["topics"] == "iot-control"
    assert "devices/+/telemetry" in json.dumps(by["iot-mqtt-source"])
    assert all("${env:MQTT_CONNECT_PASSWORD}" in json.dumps(c) for c in by.values())


# --- Mosquitto configuration on the real broker ----------------------------------------------------------------

def test_mosquitto_conf_matches_mqtt_auth_layout():
    from cloud import mqtt_auth

    shipped = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    rendered = mqtt_auth.mosquitto_conf("/mosquitto/auth", service_port=1883, device_port=1884, tls_port=8883,
                                        certfile="/mosquitto/certs/server.crt",
                                        keyfile="/mosquitto/certs/server.key")

    def listeners(text: str) -> list[list[str]]:
        blocks, cur = [], None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("listener "):
                cur = [line]
                blocks.append(cur)
            elif cur is not None and not line.startswith(("log_", "connection_messages", "persistence")):
                cur.append(line)
        return blocks

    assert listeners(shipped) == listeners(rendered)
    assert "per_listener_settings true" in shipped


def test_mosquitto_accepts_the_shipped_config(tmp_path):
    from cloud import ca, mqtt_auth
    from cloud.nativestack import free_port, mqtt_connack

    ports = {1883: free_port(), 1884: free_port(), 8883: free_port()}
    certs = ca.make_ca(tmp_path / "certs", ["localhost"], ["127.0.0.1"])
    mqtt_auth.sync(None, tmp_path / "auth", [mqtt_auth.ServiceAccount("_monitor", "pw")], device_text="")
    text = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    text = text.replace("/mosquitto/auth", str(tmp_path / "auth")).replace("/mosquitto/data", str(tmp_path))
    text = text.replace("/mosquitto/certs", str(certs.dir)).replace("log_dest stdout", "log_dest stderr")
    for inside, port in ports.items():
        text = text.replace(f"listener {inside}\n", f"listener {port} 127.0.0.1\n")
    import getpass

    (tmp_path / "m.conf").write_text(text + f"user {getpass.getuser()}\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    log = tmp_path / "mosquitto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-c", str(tmp_path / "m.conf")], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        ok = False
        while time.monotonic() < deadline and proc.poll() is None and not ok:
            try:
                ok = (mqtt_connack(ports[1883], username="_monitor", password="pw") and mqtt_connack(ports[1884])
                      and socket.create_connection(("127.0.0.1", ports[8883]), timeout=2).close() is None)
            except OSError:
                ok = False
            if not ok:
                time.sleep(0.2)
        assert ok and proc.poll() is None, log.read_text(errors="replace")
    finally:
        proc.terminate()
        proc.wait(10)


def test_database_is_created_with_the_c_collation(services):
    """Like the tests' and benchmarks' PostgreSQL (cloud.nativestack runs initdb --locale=C): the writer's insert cost
    depends on it (cloud.db.maintenance.collation_advice)."""
    args = shlex.split(services["postgres"]["environment"]["POSTGRES_INITDB_ARGS"])
    assert "--locale=C" in args and "--encoding=UTF8" in args
