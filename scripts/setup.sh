#!/usr/bin/env bash
# Set up everything tierlite needs on a fresh Debian/Ubuntu machine (run as root or with sudo):
# Mosquitto from the distribution, then tierlite with all extras and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "== installing mosquitto (apt)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto g++ >/dev/null
fi
echo "== installing tierlite[all,test,bench] (pip; bench = Ray Serve for tierlite bench offload)"
python3 -m pip install -q --disable-pip-version-check -e ".[all,test,bench]"
echo "== set-up done"
