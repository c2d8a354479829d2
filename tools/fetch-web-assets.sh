#!/usr/bin/env bash
# Install the dashboard's front-end dependencies (pinned in package.json / package-lock.json) and copy the
# charting library into cloud/web/static/vendor/ (git-ignored). The dashboard never loads anything from a CDN;
# without this step it still works, with live tables instead of charts and a hint to run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
VENDOR=cloud/web/static/vendor

if ! command -v npm >/dev/null 2>&1; then
    echo "fetch-web-assets: npm not found; install Node.js 18+ (the dashboard works without charts meanwhile)" >&2
    exit 1
fi
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
mkdir -p "$VENDOR"
for f in uPlot.iife.min.js uPlot.min.css; do
    src=node_modules/uplot/dist/$f
    if [ ! -s "$src" ]; then
        echo "fetch-web-assets: $src missing after npm ci" >&2
        exit 1
    fi
    cp "$src" "$VENDOR/$f"
done
cp node_modules/uplot/LICENSE "$VENDOR/uPlot.LICENSE" 2>/dev/null || true
version=$(node -p "require('./node_modules/uplot/package.json').version")
echo "uplot $version" > "$VENDOR/.fetched"
echo "fetch-web-assets: uPlot $version -> $VENDOR/"
