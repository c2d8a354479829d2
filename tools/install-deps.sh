#!/usr/bin/env bash
# Install the native services the test suite runs for real (Debian 12), idempotently.
# Installs only what is missing, then stops/disables the system instances the packages auto-start so
# they do not hold the default ports: the tests start their own instances (cloud/nativestack.py).
set -euo pipefail

packages=(mosquitto mosquitto-clients postgresql redis-server prometheus chromium chromium-driver)
services=(mosquitto redis-server postgresql prometheus)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
# Tools the suite needs, by command: only installed from Debian when the command is absent (CI images often
# carry their own JDK, Maven and Node.js; those are used as they are).
declare -A tool_packages=([java]=openjdk-17-jre-headless [mvn]=maven [npm]=npm [gcc]=gcc [openssl]=openssl)
for tool in "${!tool_packages[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${tool_packages[$tool]}")
done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: missing packages: ${missing[*]}" >&2
        echo "install-deps: run as root (sudo $0) or: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "install-deps: installing ${missing[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Stop and disable the package-managed instances (there may be no systemd: fall back to service).
if [ "$(id -u)" -eq 0 ]; then
    for s in "${services[@]}"; do
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            systemctl disable --now "$s" >/dev/null 2>&1 || true
        elif command -v service >/dev/null 2>&1; then
            service "$s" stop >/dev/null 2>&1 || true
            command -v update-rc.d >/dev/null 2>&1 && update-rc.d "$s" disable >/dev/null 2>&1 || true
        fi
    done
fi

for b in /usr/sbin/mosquitto /usr/bin/redis-server; do
    [ -x "$b" ] || { echo "install-deps: $b not found after install" >&2; exit 1; }
done
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "install-deps: PostgreSQL initdb not found" >&2; exit 1; }
echo "install-deps: ok" >&2
