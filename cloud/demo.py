"""``make demo``: the embedded profile in one process tree.

    firmware processes (MicroPython unix port, emulated BME280)
        -> embedded MQTT broker (amqtt, thread)
        -> bridge (thread) -> in-process bus -> writer (thread) -> SQLite + in-memory latest values
                                             -> alarms (thread) -> notifier (thread) -> the tenant's webhooks
        <- commands: web (thread) -> bus -> bridge -> broker -> firmware

Every part is the production code; only the broker, the bus, the database and the cache are the embedded
stand-ins. Ctrl-C (or SIGTERM) stops every thread and every firmware process, then exits 0.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import replace
from pathlib import Path

from cloud.nativestack import free_port, port_is_free
from cloud.settings import Settings

log = logging.getLogger("cloud.demo")

DEMO_TENANT = "demo"
DEMO_ADMIN = "admin@demo.local"
DEMO_RULE = "too-hot"  # t above 30 degC, the whole demo tenant


def provision_demo(engine, device_ids: list[str]) -> tuple[int, str]:
    """Tenant, admin user (fresh password each start, printed once), the simulated devices, and a first alarm rule
    when the tenant has none."""
    from sqlalchemy import select

    from cloud.db import repo, session_factory
    from cloud.db.models import Rule, Tenant, User
    from cloud.passwords import hash_password

    password = secrets.token_urlsafe(9)
    Session = session_factory(engine)
    with Session() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == DEMO_TENANT))
        tenant_id = tenant.id if tenant else repo.create_tenant(session, DEMO_TENANT).id
        user = session.scalar(select(User).where(User.email == DEMO_ADMIN))
        if user is None:
            repo.create_user(session, tenant_id, DEMO_ADMIN, password, "admin")
        else:
            user.password_hash = hash_password(password)
        for device_id in device_ids:
            if repo.get_device(session, tenant_id, device_id) is None:
                repo.create_device(session, tenant_id, device_id, f"Demo sensor {device_id.rsplit('-', 1)[-1]}")
        if session.scalar(select(Rule.id).where(Rule.tenant_id == tenant_id).limit(1)) is None:
            # one tenant-wide rule to start with, so an alarm is one warm sensor away (README; editable per device)
            repo.create_rule(session, tenant_id, name=DEMO_RULE, kind="threshold", metric="t", max=30.0,
                             severity="major")
        session.commit()
    return tenant_id, password


def run_demo(settings: Settings, *, devices: int = 3, web_port: int | None = None, mqtt_port: int = 1883,
             data_dir: str = "var/demo", interval: int = 2) -> int:
    from cloud import bus as bus_mod
    from cloud import db
    from cloud.bridge import Bridge
    from cloud.broker import EmbeddedBroker
    from cloud.cache import cache_from_settings
    from cloud.notifier import Notifier
    from cloud.service import OpsServer, install_stop_signals
    from cloud.sim import FirmwareFleet
    from cloud.webserver import WebServer
    from cloud.writer import Writer

    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1"
    if not port_is_free(mqtt_port, host):
        fallback = free_port(host)
        log.warning("port %d is taken (a Mosquitto running?); the embedded broker uses %d", mqtt_port, fallback)
        mqtt_port = fallback
    settings = replace(
        settings,
        database_url=settings.database_url if settings.database_url != Settings.database_url
        else f"sqlite:///{data / 'iot.db'}",
        web_port=web_port or settings.web_port,
        mqtt_url=f"mqtt://{host}:{mqtt_port}",
        kafka_bootstrap=None,
        redis_url=None,
        webhook_allow_private=True,  # the demo runs on this machine for its user: a receiver here is the usual test
    )
    if not port_is_free(settings.web_port, settings.web_host):
        print(f"error: dashboard port {settings.web_port} is in use; pick another with IOT_WEB_PORT or --port")
        return 1

    stop = threading.Event()
    install_stop_signals(stop)

    logging.getLogger("alembic").setLevel(logging.WARNING)  # migration chatter would bury the banner
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    device_ids = [f"demo-{n}" for n in range(1, devices + 1)]
    _tenant_id, password = provision_demo(engine, device_ids)

    broker = EmbeddedBroker(host, mqtt_port).start()
    bus = bus_mod.from_settings(settings)
    bus.ensure_topics(settings)
    cache = cache_from_settings(settings)

    services = [
        Bridge(settings, bus, shared=False, mqtt_version=4),  # amqtt: MQTT 3.1.1, no $share
        Writer(settings, bus, engine, cache),
    ]
    try:
        from cloud.alarms import AlarmService
    except ImportError:  # the alarm service lands with its own issue
        AlarmService = None
    if AlarmService is not None:
        services.append(AlarmService(settings, bus, engine))
    services.append(Notifier(settings, bus, engine))
    threads = [threading.Thread(target=s.run, args=(stop,), name=s.name, daemon=True) for s in services]
    for thread in threads:
        thread.start()
    web = WebServer(settings, engine=engine, bus=bus, cache=cache).start()
    ops = OpsServer([broker, *services], host, 0).start()
    fleet = FirmwareFleet(settings.mqtt_url, device_ids, data / "devices", interval=interval).start()

    url = f"http://{settings.web_host}:{settings.web_port}/"
    print(
        f"\n  IoT platform demo is running ({devices} simulated devices on the real firmware).\n"
        f"  Dashboard:  {url}\n"
        f"  Log in as:  {DEMO_ADMIN}  password: {password}\n"
        f"  MQTT:       {settings.mqtt_url}   service health: http://{host}:{ops.port}/healthz\n"
        f"  Make a device hot: echo '{{\"t\": 31.5}}' > {data / 'devices' / device_ids[0] / 'sensor_env.json'}\n"
        f"  Press Ctrl-C to stop.\n",
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            for thread in threads:
                if not thread.is_alive():
                    log.error("service thread %s died; stopping the demo", thread.name)
                    stop.set()
    finally:
        log.info("stopping: devices, services, broker")
        fleet.stop()
        for thread in threads:
            thread.join(timeout=15)
        web.stop()
        ops.stop()
        broker.stop()
        engine.dispose()
    print("demo stopped", flush=True)
    return 0
