#!/usr/bin/env bash
# Installs what whisperq needs on a fresh Debian-like machine: system tools, then .venv.
# Safe to re-run: each step is skipped when already done. Downloads stay in pip's cache.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ffmpeg >/dev/null || need_apt+=(ffmpeg)
command -v redis-server >/dev/null || need_apt+=(redis-server)
if [ "${WHISPERQ_BOOTSTRAP_TEST:-0}" = 1 ]; then
  command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
  command -v sox >/dev/null || need_apt+=(sox)
  command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
  command -v docker-compose >/dev/null || need_apt+=(docker-compose)
  # The browser test (tests/test_browser.py) drives Debian's chromium through Selenium.
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.whisperq-installed
want="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)-${WHISPERQ_BOOTSTRAP_TEST:-0}"
have="$(cat "$stamp" 2>/dev/null || true)"
# An install with the test extras serves `make up` too: switching between the two commands
# must not reinstall everything.
if [ "$have" != "$want" ] && [ "$have" != "${want%-0}-1" ]; then
  .venv/bin/pip install -q --upgrade pip
  # Every version comes from requirements.lock (scripts/lock.sh refreshes it), so a fresh
  # clone months from now installs what CI tested. torch goes first, on its own: left to the
  # resolver beside other packages, pip may pick a multi-GB CUDA build of the same release.
  torch_pin=$(grep -E '^torch==' requirements.lock)
  .venv/bin/pip install -q -c requirements.lock "$torch_pin"
  extras="server,worker"
  [ "${WHISPERQ_BOOTSTRAP_TEST:-0}" = 1 ] && extras="server,worker,dev"
  .venv/bin/pip install -q -c requirements.lock -e ".[${extras}]"
  echo "$want" > "$stamp"
fi
