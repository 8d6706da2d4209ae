#!/usr/bin/env bash
# The stack on this machine with embedded defaults: SQLite, a local redis-server, API,
# worker and Flower. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ ! -f .env ]; then
  echo "WHISPERQ_KEY_PEPPER=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" > .env
  echo "up: wrote .env with a fresh WHISPERQ_KEY_PEPPER"
fi
exec .venv/bin/whisperq up "$@"
