#!/bin/sh
# Usage: system_packages.sh PACKAGE...  (make test passes the Makefile's SYSTEM_PACKAGES)
# Installs the Debian packages named that are missing, with apt-get, when run as root; otherwise prints one message
# naming the missing packages and the command that installs them, and exits 1, so that make stops before any test.
# PYTHON (make's, default python3) must be able to make a virtual environment: Debian's own Python can only with
# python3-venv, which is then added. APT_GET replaces the apt-get command (the tests of this script use a fake one).
set -eu
apt_get=${APT_GET:-apt-get}

missing=""
for pkg in "$@"; do
    # dpkg-query prints nothing useful for a package it has never heard of; only "install ok installed" counts.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing="$missing $pkg"
done
if ! "${PYTHON:-python3}" -c "import ensurepip, venv" >/dev/null 2>&1; then
    missing="$missing python3-venv"
fi
missing=${missing# }
[ -n "$missing" ] || exit 0

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "make test needs these Debian packages (or their equivalents on this system): $missing" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "make test needs the Debian packages $missing, which are not installed. Install them with:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y $missing" >&2
    exit 1
fi
echo "installing the Debian packages the tests use: $missing"
export DEBIAN_FRONTEND=noninteractive
$apt_get update -qq
# shellcheck disable=SC2086 # one word per package
$apt_get install -y -qq $missing
