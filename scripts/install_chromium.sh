#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian (the report's browser test needs them).
# Does nothing when both are already there; needs root (or sudo) and apt-get otherwise.
# Prints the paths of the browser and the driver, one per line.
set -euo pipefail

find_browser() { command -v chromium || command -v chromium-browser || true; }
find_driver() { command -v chromedriver || { [ -x /usr/bin/chromedriver ] && echo /usr/bin/chromedriver; } || true; }

if [ -z "$(find_browser)" ] || [ -z "$(find_driver)" ]; then
    if ! command -v apt-get >/dev/null; then
        echo "install_chromium.sh: chromium/chromedriver missing and apt-get not available;" \
             "install Debian's chromium and chromium-driver by hand" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    # An old or missing package list makes the install fail: refresh it once first.
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >&2
fi

browser="$(find_browser)"
driver="$(find_driver)"
if [ -z "$browser" ] || [ -z "$driver" ]; then
    echo "install_chromium.sh: chromium or chromedriver still missing after apt-get install" >&2
    exit 1
fi
echo "$browser"
echo "$driver"
