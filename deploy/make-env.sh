#!/bin/sh
# Writes .env beside compose.yaml (mode 600) with fresh random secrets for the control host;
# copy the same file to each GPU host and add WHISPERQ_CONTROL_HOST there. Never overwrites.
set -eu
cd "$(dirname "$0")/.."
if [ -e .env ]; then
  echo ".env exists: not overwritten" >&2
  exit 1
fi
umask 077
hex() { python3 -c "import secrets; print(secrets.token_hex($1))"; }
{
  echo "POSTGRES_PASSWORD=$(hex 32)"
  echo "REDIS_PASSWORD=$(hex 32)"
  echo "WHISPERQ_KEY_PEPPER=$(hex 32)"
  echo "WHISPERQ_FLOWER_PASSWORD=$(hex 16)"
  echo "WHISPERQ_S3_ACCESS_KEY_ID=whisperq$(hex 8)"
  echo "WHISPERQ_S3_SECRET_ACCESS_KEY=$(hex 32)"
  echo "WHISPERQ_METRICS_TOKEN=$(hex 32)"
  echo "# This host's private address (control host: postgres, redis, S3; GPU hosts: metrics)."
  echo "# WHISPERQ_BIND_ADDR=10.0.0.2"
  echo "# GPU hosts only: the control host's private address."
  echo "# WHISPERQ_CONTROL_HOST=10.0.0.2"
} >.env
echo "wrote $(pwd)/.env"
