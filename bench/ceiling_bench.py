"""Ceilings (issue 13): how many jobs/s one Postgres and one Redis can carry, measured.

Postgres: ``pgbench`` replays the statements a worker issues per job (pg_stat_statements on
``bench/backlog_bench.py --explain``). The claim transaction: the keys with work, each with
its last start and its jobs running, for both queues; the oldest queued job of a key
``FOR UPDATE SKIP LOCKED``; the queued → running update. The finish transaction: the job
``FOR UPDATE``, the outcome, the batch row ``FOR UPDATE``, "is anything of this batch
left?". On a migrated database with a backlog in sealed batches; one pgbench transaction is
one job claimed and finished. The key is drawn at random instead of by the fair order
(which Python computes).

Redis: ``redis-benchmark`` on a throwaway redis-server, one run per command kind a job
costs (counts per job from the backlog bench's commandstats, passed with ``--redis-mix``);
the per-job time is the sum of count / rate over the commands.

    .venv/bin/python -m bench.ceiling_bench --backlog 20000 --clients 8 --jobs 12000
"""

from __future__ import annotations

import argparse
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
from datetime import UTC, datetime
from pathlib import Path

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


def pg_ceiling(url: str, *, clients: int, jobs: int, workdir: Path) -> tuple[float, str]:
    from app.jobs.claims import _KEYS_WITH_WORK

    cte = " ".join(str(_KEYS_WITH_WORK).split())
    script = CLAIM_AND_FINISH.format(
        keys_with_work_interactive=cte.replace(":queue", f"'{QUEUE_INTERACTIVE}'"),
        keys_with_work_bulk=cte.replace(":queue", f"'{QUEUE_BULK}'"),
    )
    path = workdir / "claim_finish.sql"
    path.write_text(script)
    per_client = max(1, jobs // clients)
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
    if m is None:
        raise RuntimeError(out.stdout + out.stderr)
    lat = re.search(r"latency average = ([\d.]+) ms", out.stdout)
    return float(m.group(1)), lat.group(1) if lat else "?"


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
    ap.add_argument("--jobs", type=int, default=12000, help="jobs claimed+finished by pgbench")
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
        url = setup_db(args.backlog)
        try:
            tps, latency = pg_ceiling(url, clients=args.clients, jobs=args.jobs, workdir=workdir)
        finally:
            drop_db(url)
        redis_jobs, rates = redis_ceiling(
            mix, clients=args.clients * 6, requests=args.redis_requests, workdir=workdir
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("| server | what is replayed | clients | measured | jobs/s ceiling |")
    print("|---|---|---|---|---|")
    print(
        f"| Postgres | claim + finish transactions, {args.backlog:,} queued in {KEYS} batches |"
        f" {args.clients} | {tps:.0f} jobs/s, {latency} ms per job | {tps:.0f} |"
    )
    detail = ", ".join(f"{k} {v / 1000:.0f}k/s" for k, v in rates.items())
    print(
        f"| Redis | {sum(mix.values()):.0f} commands per job ({detail}) | {args.clients * 6} |"
        f" {1000 / redis_jobs:.3f} ms per job | {redis_jobs:.0f} |"
        f"  (load {os.getloadavg()[0]:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
