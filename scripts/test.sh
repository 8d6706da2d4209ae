#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install, start services, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
WHISPERQ_BOOTSTRAP_TEST=1 bash scripts/bootstrap.sh
bash scripts/services.sh

# One command a line: under set -e, a failure inside an && list would not stop the script.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== compose"
# Every secret comes from the environment; compose refuses to render without them.
compose_env=(WHISPERQ_KEY_PEPPER=compose-check WHISPERQ_FLOWER_PASSWORD=compose-check
  POSTGRES_PASSWORD=compose-check REDIS_PASSWORD=compose-check
  WHISPERQ_S3_ACCESS_KEY_ID=compose-check WHISPERQ_S3_SECRET_ACCESS_KEY=compose-check
  WHISPERQ_CONTROL_HOST=10.0.0.2)
env "${compose_env[@]}" docker-compose -f compose.yaml config -q
env "${compose_env[@]}" docker-compose -f compose.yaml -f compose.control.yaml config -q
env "${compose_env[@]}" docker-compose -f compose.gpu-host.yaml config -q
echo "compose files ok"
echo "== pytest"
set +e
# Two processes, a test file each at a time (module fixtures stay whole): each process has its
# own database and redis-server (tests/conftest.py), and most of the suite waits on worker
# processes, so the second core is otherwise idle. WHISPERQ_TEST_PROCESSES=0 runs in one.
procs=${WHISPERQ_TEST_PROCESSES:-2}
xdist=()
[ "$procs" != 0 ] && xdist=(-n "$procs" --dist loadfile)
.venv/bin/python -m pytest -p no:cacheprovider "${xdist[@]}" --durations=15 "$@"
rc=$?
set -e
# pytest's 5 means no test ran: a failure here, never a pass.
[ $rc -eq 5 ] && { echo "no tests ran"; exit 1; }
exit $rc
