#!/usr/bin/env bash
# Set up everything `make run` / `make test` need on a fresh Debian machine: Debian packages, then .venv.
# Idempotent and quick when nothing changed (the Makefile only calls it when requirements change).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(espeak-ng sox libsndfile1 chromium chromium-driver postgresql)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# openai-whisper hard-requires triton (~1 GB, useless on CPU); its real dependencies are in requirements.txt.
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
