#!/usr/bin/env bash
# The stack on this machine with embedded defaults: SQLite, its own redis-server, API,
# worker and Flower. Ctrl-C stops it all. Ports: WHISPERQ_API_PORT, WHISPERQ_FLOWER_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
# WHISPERQ_SKIP_INSTALL=1: .venv is already installed (tests/test_readme_path.py runs this
# script against the shared test venv, which an install step must not rewrite).
[ "${WHISPERQ_SKIP_INSTALL:-0}" = 1 ] || bash scripts/bootstrap.sh
# One data directory (SQLite, blobs, the pepper's .env), the same from any folder.
data_dir=$(.venv/bin/python -c 'from app.settings import data_dir_from_env as d; print(d())')
mkdir -p "$data_dir"
if [ ! -f "$data_dir/.env" ] && [ -z "${WHISPERQ_KEY_PEPPER:-}" ]; then
  echo "WHISPERQ_KEY_PEPPER=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" > "$data_dir/.env"
  chmod 600 "$data_dir/.env"
  echo "up: wrote $data_dir/.env with a fresh WHISPERQ_KEY_PEPPER"
fi
exec .venv/bin/whisperq up "$@"
