"""The dashboard in a real browser (Playwright + the system Chromium, headless; no browser download).

Logs in, watches values change live (events pushed through the cache), checks that a device named
``<script>alert(1)</script>`` is shown as text, sends a command and sees its status move, checks the page still
works without the charting library, and saves screenshots of the main pages to test-artifacts/.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

CHROMIUM = os.environ.get("IOT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"



@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                     "--disable-component-update", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def page(browser, world, live):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


def sign_in(page, live, email):
    from tests.web.conftest import PASSWORD

    page.goto(live.url + "/fleet")
    assert "/login" in page.url
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/fleet")
    expect(page.locator("body")).to_have_attribute("data-live", "live")


def shot(page, backend, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web-{name}-{backend}.png"), full_page=True)


def reading(device, t, seq=1):
    return {"type": "reading", "device": device, "t": t, "h": 41.5, "p": 1003.2, "rssi": -61, "seq": seq, "boot": 1,
            "ts": int(time.time() * 1000)}


def test_fleet_live_and_escaping(page, world, live):
    sign_in(page, live, world.a.users["operator"])
    evil = world.a.devices[1]
    # the device named <script>alert(1)</script> is text, not markup
    assert page.locator(f'tr[data-device="{evil}"] td.name a').inner_text() == "<script>alert(1)</script>"
    assert page.dialogs == []
    # only tenant A's devices
    assert page.locator("tr[data-device]").count() == 2
    assert world.b.devices[0] not in page.content()

    dev = world.a.devices[0]
    world.cache.publish(world.a.id, reading(dev, 12.34))
    expect(page.locator(f'tr[data-device="{dev}"] .t')).to_have_text("12.34")
    assert page.locator(f'tr[data-device="{dev}"] .status .badge').inner_text() == "online"
    world.cache.publish(world.a.id, reading(dev, 13.5, seq=2))
    expect(page.locator(f'tr[data-device="{dev}"] .t')).to_have_text("13.50")
    # another tenant's event changes nothing
    world.cache.publish(world.b.id, reading(dev, 99.0, seq=3))
    time.sleep(0.5)
    assert page.locator(f'tr[data-device="{dev}"] .t').inner_text() == "13.50"
    # search
    page.fill("input[name=search]", "cold")
    page.click("form.toolbar button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("tr[data-device]").count() == 1
    shot(page, world.backend.name, "fleet")
    assert page.dialogs == [] and page.errors == []


def test_device_page_live_chart_and_command(page, world, live):
    sign_in(page, live, world.a.users["operator"])
    dev = world.a.devices[0]
    page.goto(f"{live.url}/devices/{dev}")
    expect(page.locator("body")).to_have_attribute("data-live", "live")
    vendor = Path(world.app.static_folder, "vendor", "uPlot.iife.min.js").exists()
    if vendor:
        assert page.locator("#charts canvas").count() >= 3
        assert page.locator("#vendor-hint").is_hidden()
    for i, t in enumerate((20.5, 21.0, 21.75)):
        world.cache.publish(world.a.id, reading(dev, t, seq=10 + i))
    expect(page.locator("#cur-t")).to_have_text("21.75")
    assert page.locator("#readings tr").first.locator("td").nth(1).inner_text() == "21.75"
    if vendor:
        assert page.locator(".uplot").count() >= 3

    page.click(".cmd-panel button[data-op=ping]")
    row = page.locator("#cmd-rows tr").first
    row.locator(".cmd-status .badge", has_text="queued").wait_for()
    cid = row.get_attribute("data-cid")
    assert cid
    world.cache.publish(world.a.id, {"type": "command", "cid": cid, "device": dev, "status": "sent"})
    row.locator(".cmd-status .badge", has_text="sent").wait_for()
    world.cache.publish(world.a.id, {"type": "command", "cid": cid, "device": dev, "status": "delivered",
                                     "result": {"pong": True}})
    row.locator(".cmd-status .badge", has_text="delivered").wait_for()
    # a late "sent" never moves it back
    world.cache.publish(world.a.id, {"type": "command", "cid": cid, "device": dev, "status": "sent"})
    time.sleep(0.3)
    assert row.locator(".cmd-status .badge").inner_text() == "delivered"
    shot(page, world.backend.name, "device")
    assert page.errors == []


def test_device_history_ranges(page, world, live):
    """1 h (raw), 24 h (one-minute roll-ups), 7 d (hourly) and a custom window from the database, drawn from the
    API's columns."""
    import uuid
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import insert

    from cloud import db
    from cloud.db import repo
    from cloud.db.models import Telemetry, Telemetry1m

    dev = f"hist-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    with db.session_factory(world.backend.engine)() as s:
        repo.create_device(s, world.a.id, dev, "history ranges")
        s.execute(insert(Telemetry), [
            {"device_id": dev, "boot": 1, "seq": i, "tenant_id": world.a.id, "ts": now - timedelta(minutes=m),
             "received_at": now, "t": 20.0 + i, "h": 40.0, "p": 1000.0, "rssi": -60, "up": i, "ts_estimated": False}
            for i, m in enumerate((50, 30, 10))])
        minute = datetime.fromtimestamp(int(now.timestamp()) // 60 * 60, timezone.utc)
        s.execute(insert(Telemetry1m), [
            {"device_id": dev, "bucket": minute - timedelta(hours=2 + i), "tenant_id": world.a.id, "n": 2,
             "t_n": 2, "t_sum": 42.0, "t_min": 20.5, "t_max": 21.5, "h_n": 2, "h_sum": 80.0, "h_min": 40.0,
             "h_max": 40.0, "p_n": 2, "p_sum": 2000.0, "p_min": 1000.0, "p_max": 1000.0} for i in range(5)])
        s.commit()
    sign_in(page, live, world.a.users["viewer"])
    page.goto(f"{live.url}/devices/{dev}")
    info = page.locator("#range-info")
    expect(info).to_have_text("3 points")  # the last hour, raw
    page.click("#ranges button[data-range='24h']")
    expect(info).to_have_text("5 points (averaged per 60 s)")
    # the link downloads the window shown as CSV: a header and the same five points
    with page.expect_download() as download:
        page.click("#history-csv")
    assert download.value.suggested_filename.startswith(dev) and download.value.suggested_filename.endswith(".csv")
    lines = Path(download.value.path()).read_text().splitlines()
    assert lines[0].startswith("time,ts,n,t,t_min,t_max") and len(lines) == 6
    page.click("#ranges button[data-range='7d']")
    expect(info).to_have_text("0 points (averaged per 3600 s)")  # no hourly roll-ups stored
    # custom: the last 40 minutes hold two of the raw readings (browser-local datetime-local values)
    local = "ms => new Date(ms - new Date(ms).getTimezoneOffset() * 60000).toISOString().slice(0, 16)"
    page.fill("#range-start", page.evaluate(local, int((now - timedelta(minutes=40)).timestamp() * 1000)))
    page.fill("#range-end", page.evaluate(local, int((now + timedelta(minutes=2)).timestamp() * 1000)))
    page.click("#custom-range button[type=submit]")
    expect(info).to_have_text("2 points")
    page.fill("#range-start", page.evaluate(local, int((now + timedelta(minutes=5)).timestamp() * 1000)))
    page.click("#custom-range button[type=submit]")
    expect(info).to_have_text("choose a start before the end")
    assert page.errors == []


def test_alarms_acknowledge_and_live_state(page, world, live):
    """An operator acknowledges an alarm on the alarms page; another alarm's row follows its events live (no
    reload): cleared, its buttons gone; an alarm not on the page shows the reload hint."""
    from tests.web.test_api import insert_alarm

    dev = world.a.devices[0]
    first, second = insert_alarm(world, world.a.id, dev), insert_alarm(world, world.a.id, dev)
    sign_in(page, live, world.a.users["operator"])
    page.goto(live.url + "/alarms")
    row = page.locator(f'tr[data-alarm="{first}"]')
    row.locator("form.ack button").click()
    page.wait_for_url("**/alarms")
    expect(page.locator(f'tr[data-alarm="{first}"] td.state')).to_contain_text("acknowledged")
    expect(page.locator(f'tr[data-alarm="{first}"] form.ack')).to_have_count(0)
    expect(page.locator("body")).to_have_attribute("data-live", "live")
    other = page.locator(f'tr[data-alarm="{second}"]')
    assert other.locator("form.ack").count() == 1
    event = {"type": "alarm", "alarm_id": second, "device": dev, "rule": "hot", "metric": "t", "value": 29.0,
             "threshold": 30.0, "severity": "major", "ts": 1}
    world.cache.publish(world.a.id, {**event, "state": "acknowledged"})
    expect(other.locator("td.state")).to_have_text("acknowledged")
    expect(other.locator("form.ack")).to_have_count(0)
    assert other.locator("form.clear").count() == 1
    world.cache.publish(world.a.id, {**event, "state": "cleared"})
    expect(other.locator("td.state")).to_have_text("cleared")
    expect(other.locator("form.clear")).to_have_count(0)
    assert page.locator("#alarm-hint").is_hidden()
    # an event whose alarm the server does not know (for this tenant) adds nothing
    world.cache.publish(world.a.id, {**event, "alarm_id": "al-not-on-the-page", "state": "raised"})
    page.wait_for_timeout(500)
    assert page.locator('tr[data-alarm="al-not-on-the-page"]').count() == 0
    assert page.locator("#alarm-hint").is_hidden()
    assert page.errors == []


def _raise(world, tenant_id: int, device_id: str, severity: str = "major", publish_to: int | None = None) -> str:
    """An alarm stored as the writer stores it, then its event published as the writer publishes it (after the
    commit) on the tenant's channel (or ``publish_to``'s)."""
    import uuid

    from cloud import db
    from cloud.db.models import Alarm, utcnow

    alarm_id = "al-" + uuid.uuid4().hex[:10]
    with db.session_factory(world.backend.engine)() as s:
        s.add(Alarm(id=alarm_id, tenant_id=tenant_id, device_id=device_id, rule="hot", metric="t",
                    severity=severity, state="raised", value=31.5, threshold=30.0, raised_at=utcnow()))
        s.commit()
    world.cache.publish(tenant_id if publish_to is None else publish_to, alarm_event(alarm_id, device_id, severity))
    return alarm_id


def alarm_event(alarm_id: str, device_id: str, severity: str = "major", state: str = "raised") -> dict:
    return {"type": "alarm", "alarm_id": alarm_id, "device": device_id, "rule": "hot", "metric": "t",
            "value": 31.5, "threshold": 30.0, "severity": severity, "state": state, "ts": int(time.time() * 1000)}


def test_new_alarms_appear_live(page, world, live):
    """Alarms raised while the page is open appear without a reload when they pass the page's filters (severity,
    device, state), never another tenant's; a device named <script>alert(1)</script> is shown as text; the
    acknowledge and clear forms of rows added live work (CSRF token included)."""
    xss_dev, plain_dev = world.a.devices[1], world.a.devices[0]
    sign_in(page, live, world.a.users["operator"])
    page.goto(f"{live.url}/alarms?state=active&severity=major&device={xss_dev}")
    expect(page.locator("body")).to_have_attribute("data-live", "live")
    shown = page.locator("#alarm-table tbody tr[data-alarm]").count()

    new = _raise(world, world.a.id, xss_dev, "major")
    row = page.locator(f'tr[data-alarm="{new}"]')
    expect(row).to_have_count(1)
    expect(row.locator("td.state")).to_have_text("raised")
    expect(row.locator(".device-name")).to_have_text("<script>alert(1)</script>")
    assert row.locator("script").count() == 0 and page.dialogs == []
    csrf = page.locator("body").get_attribute("data-csrf")
    assert row.locator("form.ack input[name=csrf_token]").get_attribute("value") == csrf
    assert row.locator("form.clear input[name=csrf_token]").get_attribute("value") == csrf
    # newest first, the "No alarms." placeholder gone
    assert page.locator("#alarm-table tbody tr").first.get_attribute("data-alarm") == new
    assert page.locator("#alarm-table tbody tr.empty").count() == 0

    # filtered out: another severity, another device; another tenant's alarm on its own channel, and another
    # tenant's alarm id pushed onto this tenant's channel (the server answers 404: nothing is shown)
    minor = _raise(world, world.a.id, xss_dev, "minor")
    elsewhere = _raise(world, world.a.id, plain_dev, "major")
    rival = _raise(world, world.b.id, world.b.devices[0], "major")
    forged = _raise(world, world.b.id, world.b.devices[0], "major", publish_to=world.a.id)
    second = _raise(world, world.a.id, xss_dev, "major")  # after the others: once it shows, they had their turn
    expect(page.locator(f'tr[data-alarm="{second}"]')).to_have_count(1)
    page.wait_for_timeout(300)
    for other in (minor, elsewhere, rival, forged):
        assert page.locator(f'tr[data-alarm="{other}"]').count() == 0, other
    assert page.locator("#alarm-table tbody tr[data-alarm]").count() == shown + 2
    # a row added live follows later events like any other
    world.cache.publish(world.a.id, alarm_event(second, xss_dev, state="acknowledged"))
    expect(page.locator(f'tr[data-alarm="{second}"] td.state')).to_have_text("acknowledged")
    expect(page.locator(f'tr[data-alarm="{second}"] form.ack')).to_have_count(0)
    assert page.errors == []
    shot(page, world.backend.name, "alarms-live")

    # acknowledge through the form of a row added live (a plain POST with its CSRF token), then clear another
    row.locator("form.ack button").click()
    page.wait_for_url("**/alarms")
    expect(page.locator(".flash").first).to_contain_text("acknowledged")
    expect(page.locator(f'tr[data-alarm="{new}"] td.state')).to_contain_text("acknowledged")
    third = _raise(world, world.a.id, plain_dev, "critical")  # this page has no filters: any active alarm shows
    row3 = page.locator(f'tr[data-alarm="{third}"]')
    expect(row3).to_have_count(1)
    row3.locator("form.clear button").click()
    page.wait_for_url("**/alarms")
    expect(page.locator(".flash").first).to_contain_text("cleared")
    c = world.client()
    states = {a["id"]: a["state"] for a in c.get("/api/v1/alarms?limit=500", headers=world.a.auth("viewer")).json["items"]}
    assert states[new] == "acknowledged" and states[third] == "cleared"
    assert page.errors == [] and page.dialogs == []


def test_alarms_page_state_filter_live(page, world, live):
    """A page of acknowledged alarms: a raised alarm does not appear; once acknowledged (its event), it does."""
    dev = world.a.devices[0]
    sign_in(page, live, world.a.users["viewer"])
    page.goto(f"{live.url}/alarms?state=acknowledged")
    expect(page.locator("body")).to_have_attribute("data-live", "live")
    alarm_id = _raise(world, world.a.id, dev, "major")
    page.wait_for_timeout(500)
    assert page.locator(f'tr[data-alarm="{alarm_id}"]').count() == 0
    c = world.client()
    assert c.post(f"/api/v1/alarms/{alarm_id}/ack", headers=world.a.auth("operator")).status_code == 200
    world.cache.publish(world.a.id, alarm_event(alarm_id, dev, state="acknowledged"))
    row = page.locator(f'tr[data-alarm="{alarm_id}"]')
    expect(row.locator("td.state")).to_contain_text("acknowledged")
    assert row.locator("form").count() == 0  # a viewer gets no forms
    assert page.errors == []


def test_page_works_without_chart_library(page, world, live):
    page.route("**/static/vendor/**", lambda route: route.fulfill(status=404, body="missing"))
    sign_in(page, live, world.a.users["viewer"])
    dev = world.a.devices[0]
    page.goto(f"{live.url}/devices/{dev}")
    expect(page.locator("body")).to_have_attribute("data-live", "live")
    assert page.locator("#vendor-hint").is_visible()
    world.cache.publish(world.a.id, reading(dev, 30.25, seq=50))
    expect(page.locator("#cur-t")).to_have_text("30.25")
    # viewers see no command buttons
    assert page.locator(".cmd-panel").count() == 0
    shot(page, world.backend.name, "device-no-charts")


def test_other_pages_screenshots(page, world, live):
    sign_in(page, live, world.a.users["admin"])
    page.goto(live.url + "/alarms?state=all")
    assert page.locator("h1").inner_text().startswith("Alarms")
    shot(page, world.backend.name, "alarms")
    page.goto(live.url + "/admin")
    page.fill("input[name=id]", "br-" + os.urandom(3).hex())
    page.fill("input[name=name]", "<b>bold?</b>")
    page.click("form[action$='/admin/devices'] button[type=submit]")
    page.locator("#issued-password").wait_for()
    assert len(page.locator("#issued-password").inner_text()) >= 16
    assert page.locator("a[download='config.json']").count() == 1
    assert page.get_by_text("<b>bold?</b>").count() >= 1
    shot(page, world.backend.name, "admin")
    page.goto(live.url + "/docs")
    assert page.locator(".endpoint").count() > 20
    shot(page, world.backend.name, "docs")
    assert page.errors == []


def test_login_rejects_bad_password(page, world, live):
    page.goto(live.url + "/login")
    page.fill("input[name=email]", world.a.users["viewer"])
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    assert "wrong password" in page.locator(".flash.error").inner_text().lower()
    shot(page, world.backend.name, "login")


def test_account_page_changes_the_password(page, world, live):
    from tests.web.conftest import PASSWORD
    from tests.web.test_users import NEW_PASSWORD, add_user

    _, email = add_user(world, "viewer")
    sign_in(page, live, email)
    page.click(f"header .who a:has-text('{email}')")
    page.wait_for_url("**/account")
    page.fill("input[name=current_password]", PASSWORD)
    page.fill("input[name=new_password]", NEW_PASSWORD)
    page.fill("input[name=confirm_password]", NEW_PASSWORD)
    page.click("main button[type=submit]")
    expect(page.locator(".flash").first).to_contain_text("Password changed.")
    shot(page, world.backend.name, "account")
    assert page.errors == []


def test_admin_sets_a_role_and_asks_before_removing(page, world, live):
    from tests.web.test_users import add_user

    _, email = add_user(world, "viewer")
    sign_in(page, live, world.a.users["admin"])
    page.goto(live.url + "/admin")
    row = page.locator(f"tr[data-user='{email}']")
    row.locator("select[name=role]").select_option("operator")
    row.locator("button:has-text('Set role')").click()
    expect(page.locator(".flash").first).to_contain_text(f"{email} is now operator.")
    row = page.locator(f"tr[data-user='{email}']")
    expect(row.locator("select[name=role]")).to_have_value("operator")
    row.locator("button:has-text('Remove')").click()  # the fixture answers the confirm dialog with "cancel"
    assert page.dialogs and f"Remove {email}?" in page.dialogs[-1]
    expect(page.locator(f"tr[data-user='{email}']")).to_have_count(1)
    assert page.errors == []
