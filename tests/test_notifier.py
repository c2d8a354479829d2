"""The notifier (cloud.notifier) on real Kafka with a real HTTP receiver on loopback: alarm events reach the tenant's
webhooks, signed; failures are retried, then dead-lettered with the reason; nothing is committed before it ended;
addresses inside the platform's network are refused."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid

import pytest

from cloud.bus.kafka import KafkaBus
from cloud.db import repo, session_factory
from cloud.notifier import Notifier
from cloud.settings import Topics, load
from cloud.webhooks import BlockedAddress, check_url, resolve
from tests.polling import wait_until
from tests.webhook_receiver import Receiver


class Rig:
    def __init__(self, kafka, engine):
        uid = uuid.uuid4().hex[:8]
        self.topics = Topics(telemetry=f"tel-{uid}", status=f"st-{uid}", acks=f"acks-{uid}", alarms=f"al-{uid}",
                             control=f"ctl-{uid}", command_status=f"cs-{uid}", deadletter=f"dl-{uid}")
        kafka.create_topics([self.topics.alarms, self.topics.deadletter], partitions=3)
        self.settings = load({}, kafka_bootstrap=kafka.bootstrap, topics=self.topics, webhook_allow_private=True)
        self.bus = KafkaBus(kafka.bootstrap)
        self.engine = engine
        self.group = f"notifier-{uid}"
        self.producer = self.bus.producer("test")
        self.receiver = Receiver()
        self.running: list[tuple[threading.Event, threading.Thread, Notifier]] = []
        with session_factory(engine)() as s:
            self.tenant = repo.create_tenant(s, f"notify-{uid}").id
            self.other = repo.create_tenant(s, f"other-{uid}").id
            s.commit()

    def webhook(self, tenant: int, path: str, min_severity: str = "warning") -> tuple[int, str]:
        with session_factory(self.engine)() as s:
            row, secret = repo.create_webhook(s, tenant, path, self.receiver.url + path, min_severity)
            s.commit()
            return row.id, secret

    def start(self, retry_delays: tuple[float, ...] = (0.1, 0.2)) -> Notifier:
        notifier = Notifier(self.settings, self.bus, self.engine, group=self.group, retry_delays=retry_delays,
                            pause_s=1.5, reload_s=0.1)
        stop = threading.Event()
        thread = threading.Thread(target=notifier.run, args=(stop,), daemon=True)
        thread.start()
        assert notifier.started.wait(30)
        self.running.append((stop, thread, notifier))
        return notifier

    def stop_all(self) -> None:
        for stop, thread, _ in self.running:
            stop.set()
            thread.join(60)
            assert not thread.is_alive()
        self.running.clear()

    def alarm(self, tenant: int, severity: str = "major", state: str = "raised") -> dict:
        event = {"v": 1, "alarm_id": str(uuid.uuid4()), "device": "dev-1", "tenant": str(tenant), "rule": "hot",
                 "metric": "t", "value": 31.5, "threshold": 30.0, "severity": severity, "state": state,
                 "ts": int(time.time() * 1000)}
        self.producer.produce(self.topics.alarms, "dev-1", json.dumps(event).encode())
        self.producer.flush(10)
        return event

    def raw(self, value: bytes) -> None:
        self.producer.produce(self.topics.alarms, "dev-1", value)
        self.producer.flush(10)

    def dead_letters(self, want: int, timeout: float = 30) -> list[dict]:
        consumer = self.bus.consumer(f"dl-reader-{uuid.uuid4().hex[:6]}", [self.topics.deadletter])
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < want and time.monotonic() < deadline:
                out += [json.loads(r.value) for r in consumer.poll_batch(100, 0.5)]
        finally:
            consumer.close()
        return out

    def close(self):
        self.stop_all()
        self.receiver.close()


@pytest.fixture
def rig(kafka, make_backend, request):
    _, engine, _ = make_backend(request, "sqlite", "notify")
    r = Rig(kafka, engine)
    yield r
    r.close()
    engine.dispose()


def test_events_reach_the_tenants_webhooks_signed_and_filtered_by_severity(rig):
    _, secret = rig.webhook(rig.tenant, "/all")
    rig.webhook(rig.tenant, "/critical", "critical")
    rig.webhook(rig.other, "/other")
    rig.start()
    major = rig.alarm(rig.tenant, "major")
    critical = rig.alarm(rig.tenant, "critical", "cleared")
    assert wait_until(lambda: len(rig.receiver.bodies("/all")) == 2 and rig.receiver.bodies("/critical"))
    time.sleep(0.5)  # nothing more arrives
    assert sorted(e["alarm_id"] for e in rig.receiver.bodies("/all")) == sorted([major["alarm_id"],
                                                                                 critical["alarm_id"]])
    assert rig.receiver.bodies("/critical") == [critical]  # the event as it was on the topic
    assert rig.receiver.bodies("/other") == []  # another tenant's webhook
    for request in rig.receiver.requests:
        if request["path"] == "/all":
            expected = "sha256=" + hmac.new(secret.encode(), request["body"], hashlib.sha256).hexdigest()
            assert request["headers"]["X-IoT-Signature"] == expected
            event = json.loads(request["body"])
            assert request["headers"]["X-IoT-Delivery"] == f"{event['alarm_id']}.{event['state']}"
            assert request["headers"]["Content-Type"] == "application/json"


def test_a_failing_endpoint_is_retried_then_dead_lettered_and_paused(rig):
    hook_id, _ = rig.webhook(rig.tenant, "/flaky")
    rig.receiver.statuses = [503, 500]  # two failures, then the third attempt succeeds
    notifier = rig.start()
    first = rig.alarm(rig.tenant)
    assert wait_until(lambda: len(rig.receiver.bodies("/flaky")) == 3)
    assert rig.dead_letters(0, timeout=1) == []
    rig.receiver.statuses = [500, 502, 504]  # three failures: the delivery ends without success
    second = rig.alarm(rig.tenant)
    letters = rig.dead_letters(1)
    assert len(letters) == 1 and f"webhook {hook_id}" in letters[0]["reason"] and "HTTP 504" in letters[0]["reason"]
    assert json.loads(letters[0]["payload"]) == second and letters[0]["source"] == rig.topics.alarms
    # paused: the next event is dead-lettered at once, without a request
    sent = len(rig.receiver.requests)
    third = rig.alarm(rig.tenant)
    letters = rig.dead_letters(2)
    assert "paused" in letters[1]["reason"] and json.loads(letters[1]["payload"]) == third
    assert len(rig.receiver.requests) == sent
    assert first in rig.receiver.bodies("/flaky")
    ok, details = notifier.health()
    assert ok and details["webhooks"] == 1


def test_a_refused_delivery_is_not_retried(rig):
    rig.webhook(rig.tenant, "/gone")
    rig.receiver.statuses = [410]
    rig.start()
    rig.alarm(rig.tenant)
    letters = rig.dead_letters(1)
    assert "HTTP 410" in letters[0]["reason"] and len(rig.receiver.bodies("/gone")) == 1


def test_what_is_not_an_alarm_event_is_dead_lettered(rig):
    rig.webhook(rig.tenant, "/all")
    rig.start()
    rig.raw(b"{not json")
    rig.raw(json.dumps({"alarm_id": "x", "state": "exploded", "severity": "major"}).encode())
    letters = rig.dead_letters(2)
    assert all("not an alarm event" in letter["reason"] for letter in letters)
    assert rig.receiver.requests == []


def test_nothing_is_committed_before_it_ended_so_a_restart_sends_again(rig):
    rig.webhook(rig.tenant, "/slow")
    rig.receiver.statuses = [500] * 100  # never delivered while the first notifier runs
    rig.start(retry_delays=(30.0, 30.0))  # still waiting to try again when it is stopped
    event = rig.alarm(rig.tenant)
    assert wait_until(lambda: len(rig.receiver.bodies("/slow")) >= 1)
    rig.stop_all()  # stops between attempts: the batch is not committed
    assert rig.dead_letters(0, timeout=1) == []
    rig.receiver.statuses = []
    rig.start()  # the same group: the event comes again and is delivered
    assert wait_until(lambda: any(r["status"] == 200 and json.loads(r["body"]) == event
                                for r in rig.receiver.requests))
    assert rig.dead_letters(0, timeout=1) == []


def test_a_webhook_added_while_running_is_used(rig):
    rig.start()
    rig.alarm(rig.tenant)
    time.sleep(1.0)
    rig.webhook(rig.tenant, "/late")
    time.sleep(0.3)
    event = rig.alarm(rig.tenant)
    assert wait_until(lambda: rig.receiver.bodies("/late") == [event])


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com/x", "http:// or https://"),
    ("https://", "no host"),
    ("https://user:pw@example.com/", "credentials"),
    ("http://127.0.0.1:8080/hook", "not a public address"),
    ("http://10.1.2.3/hook", "not a public address"),
    ("http://169.254.169.254/latest/meta-data", "not a public address"),
    ("http://[::1]/hook", "not a public address"),
    ("http://localhost:6379/", "this machine"),
    ("https://example.com:99999/", "port"),
    ("https://example.com/" + "x" * 2048, "2048"),
])
def test_urls_that_cannot_be_webhooks(url, message):
    with pytest.raises(ValueError, match=message):
        check_url(url, allow_private=False)


def test_names_are_checked_at_delivery_and_private_addresses_allowed_only_when_asked():
    assert check_url("https://hooks.example.com/alarms", allow_private=False)
    assert check_url("http://127.0.0.1:8080/hook", allow_private=True)
    with pytest.raises(BlockedAddress, match="resolves to 127.0.0.1"):
        resolve("localhost", 80, allow_private=False)
    addresses = resolve("localhost", 80, allow_private=True)
    assert "127.0.0.1" in addresses and set(addresses) <= {"127.0.0.1", "::1"}


def test_the_first_address_that_accepts_a_connection_is_used(rig):
    """A name with an IPv6 and an IPv4 address may answer on one only: the receiver listens on 127.0.0.1 alone."""
    import ssl

    from cloud.webhooks import _connect

    port = rig.receiver.port
    conn = _connect(["::1", "127.0.0.1"], port, None, ssl.create_default_context())
    try:
        assert conn.sock.getpeername()[0] == "127.0.0.1"
    finally:
        conn.close()
    with pytest.raises(OSError):
        _connect(["::1"], port, None, ssl.create_default_context())


def test_a_blocked_address_at_delivery_is_dead_lettered_without_a_request(rig):
    hook_id, _ = rig.webhook(rig.tenant, "/blocked")
    rig.settings = load({}, kafka_bootstrap=rig.settings.kafka_bootstrap, topics=rig.topics,
                        webhook_allow_private=False)  # the URL was allowed when created, no longer
    rig.start()
    rig.alarm(rig.tenant)
    letters = rig.dead_letters(1)
    assert "not a public address" in letters[0]["reason"] and f"webhook {hook_id}" in letters[0]["reason"]
    assert rig.receiver.requests == []


@pytest.fixture
def tls_endpoint(tmp_path):
    """An HTTPS endpoint on 127.0.0.1 whose certificate (from our own CA, cloud.ca) names only ``localhost``."""
    import ssl

    from cloud.ca import make_ca

    files = make_ca(tmp_path / "ca", hosts=("localhost",), ips=())
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(files.server_crt, files.server_key)
    receiver = Receiver(tls=server_tls, status_for=lambda path: 202)
    yield receiver, ssl.create_default_context(cafile=str(files.ca_crt))
    receiver.close()


def test_https_goes_to_the_checked_address_and_verifies_the_url_host(tls_endpoint):
    from cloud.webhooks import post

    receiver, tls = tls_endpoint
    port = receiver.port
    # the name resolves to 127.0.0.1, the connection goes there, and the certificate is checked for "localhost"
    status, detail = post(f"https://localhost:{port}/hook", b"{}", {"Content-Type": "application/json"},
                          allow_private=True, tls=tls)
    assert (status, detail) == (202, "HTTP 202")
    assert [(r["headers"]["Host"], r["body"]) for r in receiver.requests] == [(f"localhost:{port}", b"{}")]
    # the same server under its address: the certificate does not name 127.0.0.1, so TLS refuses it
    status, detail = post(f"https://127.0.0.1:{port}/hook", b"{}", {}, allow_private=True, tls=tls)
    assert status is None and "CERTIFICATE_VERIFY_FAILED" in detail
    # and a certificate from a CA nobody trusts: refused too (the system's roots)
    status, detail = post(f"https://localhost:{port}/hook", b"{}", {}, allow_private=True)
    assert status is None and "CERTIFICATE_VERIFY_FAILED" in detail
    assert len(receiver.requests) == 1
