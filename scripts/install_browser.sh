#!/usr/bin/env bash
# Install Debian's chromium for the serve playground's browser test (tests/test_serve_browser.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or sudo) and apt.
# Playwright drives this system browser; we never let Playwright download its own.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "error: installing chromium needs root; rerun as root or install the 'chromium' package yourself" >&2
        exit 1
    fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install Chromium with your system's package manager so that /usr/bin/chromium" \
         "exists (the browser test skips without it)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
