"""Fallback service starters for the bridge tests and bench, used only while/if cloud.nativestack is missing.

Mosquitto and a single-node KRaft Kafka on free loopback ports, in a work directory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

KAFKA_LIBS = Path(os.environ.get("IOT_KAFKA_LIBS", "/root/.cache/iot-platform/kafka-4.1.1/libs"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


class Mosquitto:
    def __init__(self, workdir: Path, port: int | None = None, extra: str = ""):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.workdir}/\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            f"max_keepalive 65535\nlog_dest file {self.workdir}/mosquitto.log\n{self.extra}\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Kafka:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.controller_port = free_port()
        self.proc: subprocess.Popen | None = None
        props = self.workdir / "server.properties"
        props.write_text("\n".join([
            "process.roles=broker,controller", "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER", "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={self.workdir}/data", "num.partitions=1", "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1", "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1", "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0", "offsets.topic.num.partitions=3",
            "auto.create.topics.enable=true", "log.flush.interval.messages=9223372036854775807", "",
        ]))
        (self.workdir / "log4j2.yaml").write_text(
            "Configuration:\n  Appenders:\n    File:\n      name: F\n      fileName: " + str(self.workdir / "kafka.log")
            + "\n      PatternLayout:\n        pattern: \"%d %p %c: %m%n\"\n  Loggers:\n    Root:\n      level: WARN\n"
            "      AppenderRef:\n        - ref: F\n")
        subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", uuid.uuid4().hex[:22], "-c",
                                  str(props)), check=True, stdout=subprocess.DEVNULL)
        self.start()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, main: str, *args: str) -> list[str]:
        return ["java", "-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={self.workdir}/log4j2.yaml",
                "-cp", f"{KAFKA_LIBS}/*", main, *args]

    def start(self) -> None:
        self.proc = subprocess.Popen(self._java("kafka.Kafka", str(self.workdir / "server.properties")),
                                     stdout=subprocess.DEVNULL, stderr=open(self.workdir / "stderr.log", "ab"))
        wait_port(self.port, 90, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
