"""The embedded profile's MQTT broker: amqtt (a pure-Python MQTT 3.1.1 broker) in a thread of the demo process.

It speaks the same protocol as Mosquitto for what the platform uses (QoS 1, retained messages, last will), so
the firmware and the bridge cannot tell the difference. It does not support shared subscriptions, so the demo
runs a single bridge with plain subscriptions; production uses Mosquitto 2.
"""

from __future__ import annotations

import asyncio
import logging
import threading

log = logging.getLogger(__name__)


class EmbeddedBroker:
    name = "mqtt-broker"

    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="mqtt-broker", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"embedded MQTT broker did not start on {self.host}:{self.port} within {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"embedded MQTT broker failed to start on {self.host}:{self.port}: {self._error}")
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)

    def health(self) -> tuple[bool, dict]:
        return self._thread.is_alive() and self._error is None, {"url": self.url}

    def _main(self) -> None:
        from amqtt.broker import Broker

        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            broker = Broker({
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            })
            try:
                await broker.start()
            except BaseException as exc:  # noqa: BLE001 - reported to start() in the caller's thread
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stopped.wait()
            await broker.shutdown()

        # amqtt logs every connection at INFO; the demo's console is for the operator
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        asyncio.run(run())
