"""One-shot: create or update the connectors in this directory on a Kafka Connect worker (REST API).

    python deploy/connect/post_connectors.py --url http://connect:8083 --dir deploy/connect [--dry-run]

Every ``*.json`` here is ``{"name": ..., "config": {...}}``. ``${IOT_TOPIC_TELEMETRY}``-style placeholders are
filled from this process's environment (defaults: the platform's topic names); ``${env:...}`` placeholders are
left for the worker's EnvVarConfigProvider, so secrets never pass through this script. ``PUT
/connectors/<name>/config`` creates or updates, so running it again is harmless. Waits up to ``--wait`` seconds
for the worker; exits non-zero when a connector is rejected. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULTS = {"IOT_TOPIC_TELEMETRY": "iot-sensordata", "IOT_TOPIC_CONTROL": "iot-control"}
_PLACEHOLDER = re.compile(r"\$\{(IOT_[A-Z_]+)\}")


def render(text: str, environ=os.environ) -> dict:
    def fill(m: re.Match) -> str:
        name = m.group(1)
        value = environ.get(name) or DEFAULTS.get(name)
        if value is None:
            raise SystemExit(f"post_connectors: {name} is not set")
        return value

    return json.loads(_PLACEHOLDER.sub(fill, text))


def load(directory: Path, environ=os.environ) -> list[dict]:
    connectors = []
    for path in sorted(directory.glob("*.json")):
        spec = render(path.read_text(), environ)
        if not isinstance(spec, dict) or "name" not in spec or "config" not in spec:
            raise SystemExit(f"post_connectors: {path} must be {{\"name\": ..., \"config\": {{...}}}}")
        connectors.append(spec)
    return connectors


def request(method: str, url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8083")
    parser.add_argument("--dir", default=str(Path(__file__).parent))
    parser.add_argument("--wait", type=float, default=120.0)
    parser.add_argument("--dry-run", action="store_true", help="print what would be sent")
    args = parser.parse_args(argv)
    connectors = load(Path(args.dir))
    if args.dry_run:
        print(json.dumps(connectors, indent=2))
        return 0
    deadline = time.monotonic() + args.wait
    while True:
        try:
            request("GET", args.url.rstrip("/") + "/connectors")
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                print(f"post_connectors: Connect at {args.url} not reachable: {exc}", file=sys.stderr)
                return 1
            time.sleep(2)
    failed = 0
    for spec in connectors:
        code, body = request("PUT", f"{args.url.rstrip('/')}/connectors/{spec['name']}/config", spec["config"])
        ok = code in (200, 201)
        failed += not ok
        print(f"{spec['name']}: {'created/updated' if ok else 'REJECTED'} ({code}) {'' if ok else body}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
