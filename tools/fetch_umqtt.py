#!/usr/bin/env python3
"""Fetch umqtt.simple (MicroPython MQTT client) into a MICROPYPATH directory.

Usage: python tools/fetch_umqtt.py build/mpy-lib

The package is the sdist ``micropython-umqtt.simple`` 1.3.4 on the Python package index pip
is configured with (PIP_INDEX_URL, else ``pip config``'s index-url, else pip's default).  pip
cannot install it (no setup.py), so we use the PEP 691 JSON simple API, download the sdist,
check its sha256 against the pinned constant below and extract ``umqtt/simple.py``.
Third-party code is never committed: the destination (build/) is git-ignored.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request

PROJECT = "micropython-umqtt-simple"  # PEP 503 normalised name
VERSION = "1.3.4"
SDIST_SHA256 = "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f"
MEMBER_SUFFIX = "umqtt/simple.py"
ACCEPT = "application/vnd.pypi.simple.v1+json"


def fail(msg):
    sys.stderr.write("fetch_umqtt: error: %s\n" % msg)
    sys.exit(1)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def index_url():
    env = os.environ.get("PIP_INDEX_URL")
    if env:
        return env.strip()
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith(".index-url") and value.strip():
            return value.strip().strip("'\"")
    try:
        from pip._internal.models.index import PyPI
        return PyPI.simple_url
    except Exception as e:  # pragma: no cover
        fail("cannot determine the package index (set PIP_INDEX_URL): %s" % e)


def get(url, accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        fail("HTTP %s fetching %s" % (e.code, url))
    except (urllib.error.URLError, OSError) as e:
        fail("cannot reach %s: %s" % (url, e))


def find_sdist(index):
    url = index.rstrip("/") + "/" + PROJECT + "/"
    body, ctype = get(url, ACCEPT)
    if "json" not in ctype:
        fail("index %s did not answer with the PEP 691 JSON API (Content-Type %r)" % (url, ctype))
    try:
        files = json.loads(body)["files"]
    except (ValueError, KeyError) as e:
        fail("unexpected answer from %s: %s" % (url, e))
    for f in files:
        name = f.get("filename", "")
        if name.endswith(".tar.gz") and ("-" + VERSION + ".tar.gz") in name:
            return urllib.parse.urljoin(url, f["url"]), name, f.get("hashes", {}).get("sha256")
    fail("no %s %s sdist listed at %s" % (PROJECT, VERSION, url))


def main(argv):
    if len(argv) != 2:
        fail("usage: fetch_umqtt.py DEST_DIR")
    dest = os.path.join(argv[1], "umqtt")
    target = os.path.join(dest, "simple.py")
    marker = os.path.join(dest, ".sdist-sha256")
    if os.path.exists(target) and os.path.exists(marker):
        with open(marker) as f:
            if f.read().strip() == SDIST_SHA256:
                print("fetch_umqtt: %s already present (sdist sha256 ok)" % target)
                return 0
    index = index_url()
    url, name, listed = find_sdist(index)
    print("fetch_umqtt: downloading %s" % name, flush=True)
    data, _ = get(url)
    digest = sha256(data)
    if listed and listed != digest:
        fail("%s: sha256 %s does not match the index's %s" % (name, digest, listed))
    if digest != SDIST_SHA256:
        fail("%s: sha256 %s does not match the pinned %s" % (name, digest, SDIST_SHA256))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = next((m for m in tar.getmembers()
                       if m.isfile() and m.name.endswith("/" + MEMBER_SUFFIX)), None)
        if member is None:
            fail("%s has no %s" % (name, MEMBER_SUFFIX))
        src = tar.extractfile(member).read()
    os.makedirs(dest, exist_ok=True)
    tmp = target + ".tmp"
    with open(tmp, "wb") as f:
        f.write(src)
    os.replace(tmp, target)
    init = os.path.join(dest, "__init__.py")
    if not os.path.exists(init):
        open(init, "w").close()
    with open(marker, "w") as f:
        f.write(SDIST_SHA256 + "\n")
    print("fetch_umqtt: wrote %s" % target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
