#!/usr/bin/env bash
# Refreshes requirements.lock, the one lock every install uses (make test, make up, CI, the
# image). `bash scripts/lock.sh` keeps every pin the resolver can keep and adds what changed
# in pyproject.toml; `bash scripts/lock.sh --upgrade` moves everything to today's releases.
# Run `make test` after either before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pip-compile ] || bash scripts/bootstrap.sh
.venv/bin/pip-compile --quiet --extra server --extra worker --extra dev --strip-extras \
  --no-emit-index-url --no-emit-find-links "$@" \
  --output-file requirements.lock pyproject.toml scripts/lock-pins.in
# pip-compile records the local CPU build this machine resolved (torch==2.13.0+cpu); the
# image and GPU hosts install the same release as a CUDA build, which only a plain pin admits.
sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/' requirements.lock
echo "requirements.lock: $(grep -c '^[a-zA-Z]' requirements.lock) pins"
