"""Ceilings (issues 13, 23): how many jobs/s one Postgres and one Redis can carry, measured.

Postgres: ``pgbench`` replays the statements a worker issues, two ways in one run, each on
a fresh migrated database with the same backlog in sealed batches (one per key):

- per job (before issue 23, pg_stat_statements on ``bench/backlog_bench.py --explain``):
  one pgbench transaction is one job claimed and finished. The claim transaction: the keys
  with work, each with its last start and its jobs running, for both queues; the oldest
  queued job of a key ``FOR UPDATE SKIP LOCKED``; the queued → running update. The finish
  transaction: the job ``FOR UPDATE``, the outcome, the batch row ``FOR UPDATE``, "is
  anything of this batch left?". The key is drawn at random instead of by the fair order.
- batched (issue 23, ``claims.claim_many`` and ``claims.finish_many`` on Postgres): one
  pgbench transaction is ``--batch`` jobs claimed and finished. The claim transaction: the
  keys with work (and their queued counts) for both queues, then the planned claim in one
  statement (``claims._CLAIM_PLANNED``: the batch spread over the keys as the fair plan
  spreads it over keys served alike). The finish transaction: every outcome in one UPDATE
  (``lifecycle._each_statement``), then per batch touched its row ``FOR UPDATE`` and the
  batch-left probe (``batch_state.end_batches_if_done``).

jobs/s counts the jobs each way actually finished (a claim that finds its jobs held by
another client's claim comes back short), over pgbench's time.

Redis: ``redis-benchmark`` on a throwaway redis-server, one run per command kind a job
costs (counts per job from the backlog bench's commandstats, passed with ``--redis-mix``);
the per-job time is the sum of count / rate over the commands.

    .venv/bin/python -m bench.ceiling_bench --backlog 20000 --clients 8 --jobs 12000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.stack import redis_server_argv
from bench.backlog_bench import queued_row

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get(
    "WHISPERQ_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
KEYS = 10
QUEUE_BULK = "bulk"
QUEUE_INTERACTIVE = "interactive"

# Per job, from `bench.backlog_bench --explain` (Redis commandstats, 1k backlog): 2 to
# enqueue (LPUSH and one more), 12 to drain. "other" is replayed as PING.
DEFAULT_REDIS_MIX = (
    "lpush=1,other=1,brpop=1,hset=1,zadd=1,hdel=1,zrem=1,"
    "publish=2.82,multi=2.02,exec=2.02,llen=0.03"
)

CLAIM_AND_FINISH = f"""
\\set k random(1, {KEYS})
BEGIN;
{{keys_with_work_interactive}};
{{keys_with_work_bulk}};
SELECT jobs.id AS jid FROM jobs WHERE jobs.status = 'queued' AND jobs.queue = '{QUEUE_BULK}' AND jobs.api_key_id = :k ORDER BY jobs.created_at, jobs.id LIMIT 1 FOR UPDATE SKIP LOCKED \\gset
UPDATE jobs SET status='running', started_at=now(), attempts=(jobs.attempts + 1), lease_expires_at=now() + interval '60 s', worker='pgbench' WHERE jobs.id = ':jid' AND jobs.status = 'queued' RETURNING jobs.attempts, jobs.options, jobs.audio_blob, jobs.audio_url, jobs.queue, jobs.input_length_ms, jobs.batch_id AS bid \\gset
COMMIT;
BEGIN;
SELECT * FROM jobs WHERE jobs.id = ':jid' FOR UPDATE;
UPDATE jobs SET status='succeeded', finished_at=now(), lease_expires_at=NULL, input_length_ms=1000, result='{{{{"text": "", "segments": [], "language": "en"}}}}', runtime_ms=1, cost=0.0, tokens_generated=0, tokens_input=50, error_code=NULL, error_message=NULL WHERE jobs.id = ':jid';
SELECT * FROM batches WHERE batches.id = ':bid' FOR UPDATE;
SELECT jobs.id FROM jobs WHERE jobs.batch_id = ':bid' AND jobs.status IN ('queued', 'running') LIMIT 1;
COMMIT;
"""  # noqa: E501 (pgbench reads one statement per line, as the worker sends it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _libpq(url: str) -> list[str]:
    m = re.match(r"postgresql\+psycopg://([^@]+)@([^:/]+):(\d+)/(.+)", url)
    assert m, url
    user, host, port, db = m.groups()
    return ["-h", host, "-p", port, "-U", user, db]


def setup_db(backlog: int) -> str:
    from sqlalchemy import create_engine, insert, text

    db = f"whisperq_ceiling_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    admin.dispose()
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + db
    env = {**os.environ, "WHISPERQ_DATABASE_URL": url, "WHISPERQ_ENVIRONMENT": "test"}
    env.setdefault("WHISPERQ_KEY_PEPPER", "bench-pepper-" + db)
    subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    from app.infra.models import ApiKey, Batch, Job
    from app.jobs.options import TranscribeOptions

    engine = create_engine(url)
    now = datetime.now(UTC)
    opts = TranscribeOptions().to_json()
    with engine.begin() as conn:
        conn.execute(
            insert(ApiKey),
            [
                {
                    "id": i + 1,
                    "prefix": f"k{i}",
                    "secret_hash": "x",
                    "name": f"k{i}",
                    "webhook_secret": "x",
                    "created_at": now,
                }
                for i in range(KEYS)
            ],
        )
        batch_ids = [uuid.uuid4().hex for _ in range(KEYS)]
        conn.execute(
            insert(Batch),
            [
                {
                    "id": batch_ids[i],
                    "api_key_id": i + 1,
                    "default_options": {},
                    "created_at": now,
                    "sealed_at": now,
                }
                for i in range(KEYS)
            ],
        )
        conn.execute(
            insert(Job),
            [
                queued_row(
                    uuid.uuid4().hex, i % KEYS + 1, QUEUE_BULK, opts, batch_ids[i % KEYS], now, i
                )
                for i in range(backlog)
            ],
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()
    return url


def drop_db(url: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


@dataclass(frozen=True)
class PgRun:
    """One way's pgbench run: its transactions and the jobs they finished."""

    way: str
    tps: float
    latency_ms: str
    jobs: int  # finished (succeeded) during the run
    seconds: float

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds


def per_job_script() -> str:
    from app.jobs.claims import _KEYS_WITH_WORK

    cte = " ".join(str(_KEYS_WITH_WORK).split())
    return CLAIM_AND_FINISH.format(
        keys_with_work_interactive=cte.replace(":queue", f"'{QUEUE_INTERACTIVE}'"),
        keys_with_work_bulk=cte.replace(":queue", f"'{QUEUE_BULK}'"),
    )


def batched_script(batch: int, batch_of_key: dict[int, str]) -> str:
    """The worker's statements for ``batch`` jobs claimed and finished, as Postgres gets them:
    the app's own statement texts, with the values the worker binds written in (pgbench
    variables where the finish uses what the claim returned)."""
    from app.jobs import claims

    # Keys served alike: the fair plan takes them in turn.
    plan = [1 + i % KEYS for i in range(batch)]
    slots, per_key = claims._plan_params(plan, claims._Plan(datetime.now(UTC), 0, 0))
    claim = _render(
        str(claims._CLAIM_PLANNED),
        {
            **{k: _sql_literal(v) for k, v in per_key.items() if k != "starts"},
            # Each claim at the time it runs, a microsecond per place, as the worker's.
            "starts": "ARRAY[" + ", ".join(f"{_NOW} + interval '{p} us'" for p in slots) + "]",
            "queue": f"'{QUEUE_BULK}'",
            "lease": f"{_NOW} + interval '60 s'",
            "worker": "'pgbench'",
        },
    )
    reads = [
        _render(str(claims._KEYS_WITH_WORK_COUNTED), {"queue": f"'{q}'", "n": str(batch)})
        for q in (QUEUE_INTERACTIVE, QUEUE_BULK)
    ]
    probes = [
        f"SELECT * FROM batches WHERE batches.id = '{b}' FOR UPDATE;\n"
        f"SELECT jobs.id FROM jobs WHERE jobs.batch_id = '{b}' "
        "AND jobs.status IN ('queued', 'running') LIMIT 1;"
        for b in sorted({batch_of_key[k] for k in plan})
    ]
    return "\n".join(
        [
            "BEGIN;",
            *(f"{r};" for r in reads),
            # pgbench keeps one row of a result: the claimed ids and attempts as arrays.
            f"WITH claimed AS ({claim}) SELECT coalesce(array_agg(id), '{{}}') AS ids, "
            "coalesce(array_agg(attempts), '{}') AS atts FROM claimed \\gset",
            "COMMIT;",
            "BEGIN;",
            f"{_finish_statement(batch)};",
            *probes,
            "COMMIT;",
        ]
    )


# The worker binds Python's clock (UTC, naive in the column); the server's stands in for it.
_NOW = "(now() AT TIME ZONE 'utc')"
_ID_MARK = "pgbench-claimed-id"
_ATTEMPT_MARK = -424242


def _finish_statement(batch: int) -> str:
    """``lifecycle._each_statement`` for ``batch`` outcomes as the old script's finish stored
    them, compiled for Postgres; the ids and attempts are the claim's (``:ids``, ``:atts``)."""
    from sqlalchemy.dialects import postgresql

    from app.infra.models import JobStatus
    from app.jobs import lifecycle
    from app.settings import Settings

    outcome = lifecycle.Outcome(
        JobStatus.succeeded,
        result={"text": "", "segments": [], "language": "en"},
        input_length_ms=1000,
        runtime_ms=1,
        tokens_input=50,
    )
    endings = [lifecycle.Ending(_ID_MARK, _ATTEMPT_MARK, outcome)] * batch
    # The default price: no environment to validate (its key pepper is not the bench's).
    settings = Settings.model_construct()
    statement = lifecycle._each_statement(endings, datetime.now(UTC), settings)
    compiled = statement.compile(dialect=postgresql.psycopg.dialect())  # type: ignore[no-untyped-call]
    values: dict[str, str] = {}
    for name, value in compiled.params.items():
        if value == [_ID_MARK] * batch:
            values[name] = "':ids'"
        elif value == [_ATTEMPT_MARK] * batch:
            values[name] = "':atts'"
        elif name == "finished_at":
            values[name] = _NOW
        else:
            values[name] = _sql_literal(value)
    assert "':ids'" in values.values() and "':atts'" in values.values(), compiled.params
    return re.sub(r"%\((\w+)\)s", lambda m: values[m.group(1)], " ".join(compiled.string.split()))


def _render(sql: str, values: dict[str, str]) -> str:
    """A text() statement on one line with its ``:name`` parameters written in (every one,
    or KeyError: pgbench would take a leftover for a variable of its own)."""
    return re.sub(r"(?<![:\w]):(\w+)", lambda m: values[m.group(1)], " ".join(sql.split()))


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_sql_literal(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def pgbench(url: str, script: str, *, clients: int, per_client: int, workdir: Path) -> PgRun:
    path = workdir / "script.sql"
    path.write_text(script)
    out = subprocess.run(
        [
            "pgbench",
            "-n",
            "-f",
            str(path),
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-t",
            str(per_client),
            *_libpq(url),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if m is None or (failed is not None and int(failed.group(1))):
        raise RuntimeError(out.stdout + out.stderr)
    lat = re.search(r"latency average = ([\d.]+) ms", out.stdout)
    tps = float(m.group(1))
    return PgRun(
        way="",
        tps=tps,
        latency_ms=lat.group(1) if lat else "?",
        jobs=_succeeded(url),
        seconds=clients * per_client / tps,
    )


def _succeeded(url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'succeeded'")).scalar()
    engine.dispose()
    return int(n or 0)


def _batches(url: str) -> dict[int, str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT api_key_id, id FROM batches")).all()
    engine.dispose()
    return {int(k): str(b) for k, b in rows}


def pg_ceilings(*, backlog: int, clients: int, jobs: int, batch: int, workdir: Path) -> list[PgRun]:
    """Each way on a database of its own, the same backlog in each."""
    runs = []
    for way in ("per job", "batched"):
        url = setup_db(backlog)
        try:
            if way == "per job":
                script, per_client = per_job_script(), max(1, jobs // clients)
            else:
                script = batched_script(batch, _batches(url))
                per_client = max(1, jobs // (clients * batch))
            run = pgbench(url, script, clients=clients, per_client=per_client, workdir=workdir)
            runs.append(dataclasses.replace(run, way=way))
        finally:
            drop_db(url)
    return runs


def redis_ceiling(
    mix: dict[str, float], *, clients: int, requests: int, workdir: Path
) -> tuple[float, dict[str, float]]:
    port = free_port()
    server = subprocess.Popen(redis_server_argv(port, workdir), stdout=subprocess.DEVNULL)
    # The job queue's own commands, on keys shaped like kombu's (a message ~1 KB).
    commands = {
        "lpush": ["LPUSH", "q", "x" * 1000],
        "brpop": ["RPOP", "q"],  # BRPOP on a non-empty list does what RPOP does
        "hset": ["HSET", "unacked", "tag__rand_int__", "x" * 1000],
        "hdel": ["HDEL", "unacked", "tag__rand_int__"],
        "zadd": ["ZADD", "unacked_index", "__rand_int__", "tag__rand_int__"],
        "zrem": ["ZREM", "unacked_index", "tag__rand_int__"],
        "publish": ["PUBLISH", "whisperq:jobs:done", "0123456789abcdef0123456789abcdef"],
        "multi": ["PING"],  # MULTI/EXEC cost a round trip each, like PING
        "exec": ["PING"],
        "llen": ["LLEN", "q"],
    }
    rates: dict[str, float] = {}
    try:
        subprocess.run(["redis-cli", "-p", str(port), "--raw", "PING"], capture_output=True)
        # Fill the list first so RPOP always finds a message.
        subprocess.run(
            [
                "redis-benchmark",
                "-p",
                str(port),
                "-n",
                str(requests * 2),
                "-c",
                str(clients),
                "-r",
                "100000",
                "-q",
                *commands["lpush"],
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        for name in mix:
            cmd = commands.get(name, ["PING"])
            out = subprocess.run(
                [
                    "redis-benchmark",
                    "-p",
                    str(port),
                    "-n",
                    str(requests),
                    "-c",
                    str(clients),
                    "-r",
                    "100000",
                    "-q",
                    *cmd,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            m = re.search(r"([\d.]+) requests per second", out.stdout)
            if m is None:
                raise RuntimeError(out.stdout + out.stderr)
            rates[name] = float(m.group(1))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    seconds_per_job = sum(n / rates[name] for name, n in mix.items())
    return 1 / seconds_per_job, rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backlog", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=8, help="pgbench / redis-benchmark clients")
    ap.add_argument("--jobs", type=int, default=12000, help="jobs claimed+finished each way")
    ap.add_argument("--batch", type=int, default=64, help="jobs per batched claim and finish")
    ap.add_argument("--redis-requests", type=int, default=200000)
    ap.add_argument("--redis-mix", default=DEFAULT_REDIS_MIX, help="command=count per job")
    args = ap.parse_args(argv)
    mix = {k: float(v) for k, v in (p.split("=") for p in args.redis_mix.split(","))}
    print(
        f"# ceiling bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="whisperq-ceiling-"))
    try:
        runs = pg_ceilings(
            backlog=args.backlog,
            clients=args.clients,
            jobs=args.jobs,
            batch=args.batch,
            workdir=workdir,
        )
        redis_jobs, rates = redis_ceiling(
            mix, clients=args.clients * 6, requests=args.redis_requests, workdir=workdir
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("| server | what is replayed | clients | measured | jobs/s ceiling |")
    print("|---|---|---|---|---|")
    for run in runs:
        unit = "1 job" if run.way == "per job" else f"{args.batch} jobs"
        print(
            f"| Postgres | claim + finish {run.way} ({unit} a pgbench transaction), "
            f"{args.backlog:,} queued in {KEYS} batches | {args.clients} | {run.jobs:,} jobs"
            f" in {run.seconds:.1f} s, {run.tps:.0f} tps, {run.latency_ms} ms a transaction"
            f" | {run.jobs_per_s:.0f} |"
        )
    detail = ", ".join(f"{k} {v / 1000:.0f}k/s" for k, v in rates.items())
    print(
        f"| Redis | {sum(mix.values()):.0f} commands per job ({detail}) | {args.clients * 6} |"
        f" {1000 / redis_jobs:.3f} ms per job | {redis_jobs:.0f} |"
    )
    per_job, batched = runs
    print(
        f"\nbatched / per job: {batched.jobs_per_s / per_job.jobs_per_s:.1f}x"
        f"  (load {os.getloadavg()[0]:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
