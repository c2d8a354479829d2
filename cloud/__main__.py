"""``python -m cloud <service>``: one entry point per long-running service, plus the one-shot jobs.

Settings come from the environment (cloud.settings); a bad value stops here with one line naming it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cloud import settings as settings_mod
from cloud.service import serve, setup_logging

log = logging.getLogger("cloud")

SERVICES = {
    "demo": "embedded profile in one process tree: MQTT broker, bus, SQLite, simulated devices, bridge, writer, "
            "alarms, dashboard",
    "bridge": "MQTT -> Kafka (telemetry, status, acks, dead letters) and Kafka -> MQTT (commands)",
    "writer": "Kafka -> PostgreSQL (idempotent batches) and the latest values in Redis",
    "alarms": "per-device alarm rules on the telemetry stream; alarm events to the alarms topic",
    "notifier": "alarm events to the tenants' webhooks (signed POSTs, retried, failures to the dead-letter topic)",
    "web": "dashboard, REST API /api/v1, WebSocket /ws, /healthz, /metrics",
    "sim": "a fleet of simulated devices running the real firmware on the MicroPython unix port",
    "kafka-init": "create the Kafka topics idempotently, then exit",
    "ca": "create a private CA and the MQTT broker's TLS certificate (default deploy/certs)",
    "mqtt-auth": "Mosquitto accounts + ACLs from the database: mqtt-auth sync|watch|conf",
    "tenant": "customers: tenant create <name> --admin <email> [--retention-days N] | tenant list | "
              "tenant reset-password <email>",
    "db": "database: db upgrade | db downgrade <rev> | db maintain (partitions ahead, retention)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cloud",
        description="IoT platform services. Configuration comes from IOT_* environment variables "
                    "(see README.md); without any, the embedded profile is used.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<service>")
    demo = sub.add_parser("demo", help=SERVICES["demo"])
    demo.add_argument("--devices", type=int, default=3, help="simulated firmware devices (default 3)")
    demo.add_argument("--port", type=int, default=None, help="dashboard port (default IOT_WEB_PORT or 8000)")
    demo.add_argument("--mqtt-port", type=int, default=1883, help="embedded MQTT broker port (default 1883)")
    demo.add_argument("--data-dir", default="var/demo", help="SQLite file and device flash folders")
    demo.add_argument("--interval", type=int, default=2, help="seconds between readings per device")
    for name in ("bridge", "writer", "alarms", "notifier", "web"):
        sub.add_parser(name, help=SERVICES[name])
    sim = sub.add_parser("sim", help=SERVICES["sim"])
    sim.add_argument("--devices", type=int, default=3)
    sim.add_argument("--prefix", default="sim", help="device ids are <prefix>-<n>")
    sim.add_argument("--interval", type=int, default=5, help="seconds between readings")
    sim.add_argument("--data-dir", default="var/sim", help="one flash folder per device")
    sim.add_argument("--synthetic", action="store_true",
                     help="raw MQTT clients (cloud.loadgen) instead of firmware processes: one connection per "
                          "device, a total rate, loopback only")
    sim.add_argument("--rate", type=float, default=1000.0, help="--synthetic: total readings per second")
    sim.add_argument("--duration", type=float, default=60.0, help="--synthetic: seconds of publishing")
    sim.add_argument("--credentials", help="--synthetic: file of device_id:password lines (default: the URL's)")
    sub.add_parser("kafka-init", help=SERVICES["kafka-init"])
    from cloud import ca as ca_mod
    from cloud import mqtt_auth as auth_mod

    sub.add_parser("ca", parents=[ca_mod.build_parser()], add_help=False, help=SERVICES["ca"])
    sub.add_parser("mqtt-auth", parents=[auth_mod.build_parser()], add_help=False, help=SERVICES["mqtt-auth"])
    from cloud import tenants as tenants_mod

    sub.add_parser("tenant", parents=[tenants_mod.build_parser()], add_help=False, help=SERVICES["tenant"])
    db = sub.add_parser("db", help=SERVICES["db"])
    db.add_argument("action", choices=["upgrade", "downgrade", "maintain"])
    db.add_argument("revision", nargs="?", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if args.command in ("ca", "mqtt-auth", "tenant"):  # one-shot tools with their own argument parsers
        rest = (sys.argv[1:] if argv is None else list(argv))[1:]
        if args.command == "tenant":
            from cloud.tenants import main as tenant_main

            return tenant_main(rest)
        if args.command == "ca":
            from cloud.ca import main as ca_main

            return ca_main(rest)
        from cloud.mqtt_auth import main as auth_main

        return auth_main(rest)
    try:
        settings = settings_mod.load()
    except settings_mod.SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        return _dispatch(args, settings)
    except settings_mod.SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, settings: settings_mod.Settings) -> int:
    command = args.command
    if command == "demo":
        from cloud.demo import run_demo

        return run_demo(settings, devices=args.devices, web_port=args.port, mqtt_port=args.mqtt_port,
                        data_dir=args.data_dir, interval=args.interval)
    if command == "sim":
        if args.synthetic:
            from cloud.loadgen import run_synthetic

            return run_synthetic(settings, devices=args.devices, prefix=args.prefix, rate=args.rate,
                                 duration=args.duration, credentials_file=args.credentials)
        from cloud.sim import run_fleet

        return run_fleet(settings, devices=args.devices, prefix=args.prefix, interval=args.interval,
                         data_dir=args.data_dir)
    if command == "kafka-init":
        if not settings.kafka_bootstrap:
            raise settings_mod.SettingsError("IOT_KAFKA_BOOTSTRAP: required for kafka-init")
        from cloud.kafka_init import main as kafka_init_main

        return kafka_init_main(settings)
    if command == "db":
        from cloud import db

        if args.action == "upgrade":
            db.upgrade(settings.database_url, args.revision or "head")
        elif args.action == "downgrade":
            db.downgrade(settings.database_url, args.revision or "-1")
        else:
            from cloud.db.maintenance import maintain

            engine = db.make_engine(settings.database_url)
            log.info("maintenance: %s", maintain(engine))
            engine.dispose()
        return 0
    if command == "web":
        from cloud.webserver import run_web

        return run_web(settings)
    return serve(build_service(command, settings), host=settings.metrics_host, ops_port=settings.metrics_port)


def build_service(command: str, settings: settings_mod.Settings):
    """The long-running services outside the demo need the real backbone: they run in separate processes."""
    if not settings.kafka_bootstrap:
        raise settings_mod.SettingsError(f"IOT_KAFKA_BOOTSTRAP: required for `{command}` as its own process "
                                         "(the in-process bus only exists inside `demo`)")
    from cloud import bus as bus_mod

    bus = bus_mod.from_settings(settings)
    if command == "bridge":
        from cloud.bridge import Bridge

        return Bridge(settings, bus, shared=settings.bridge_shared)
    if command == "writer":
        from cloud.cache import cache_from_settings
        from cloud.db import make_engine
        from cloud.writer import ENGINE_OPTIONS, Writer

        return Writer(settings, bus, make_engine(settings.database_url, **ENGINE_OPTIONS),
                      cache_from_settings(settings))
    if command == "alarms":
        from cloud.alarms import AlarmService
        from cloud.db import make_engine

        return AlarmService(settings, bus, make_engine(settings.database_url))
    if command == "notifier":
        from cloud.db import make_engine
        from cloud.notifier import Notifier

        return Notifier(settings, bus, make_engine(settings.database_url))
    raise SystemExit(f"unknown service {command}")


if __name__ == "__main__":
    sys.exit(main())
