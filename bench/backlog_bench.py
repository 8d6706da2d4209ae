"""Backlog bench (issue 13): N queued jobs drained through the real queue path, claim → finish.

Real Postgres, a throwaway redis-server, and real ``whisperq worker`` processes with the null
engine (``WHISPERQ_ENGINE=null``: an empty transcript at once, no model): the claim policy,
slots, heartbeat, reaper, audio loading (one plain 1 s WAV blob every job names, read
without ffmpeg) and the guarded finish all run as in production; only the model is out,
so what is measured is the control plane.

Per backlog size it prints: drain rate (jobs/s, from the workers' start; "steady": first claim
to last finish), the workers' CPU per job, Postgres transactions and row operations
per job, Redis commands per job (enqueue and drain), Redis memory per waiting job and at peak,
and how many jobs were claimed more than once or re-sent (must be 0).

    .venv/bin/python -m bench.backlog_bench                # 1k, 5k, 20k
    .venv/bin/python -m bench.backlog_bench --sizes 1000 --workers 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.throwaway import REPO, Throwaway, throwaway_stack

KEYS = 10  # tenants sharing the backlog


def queued_row(
    job_id: str, api_key_id: int, queue: str, opts: Any, batch_id: str, now: datetime, i: int
) -> dict[str, Any]:
    """A queued bulk job as a batch leaves it: the i-th of its backlog, a microsecond apart."""
    return {
        "id": job_id,
        "api_key_id": api_key_id,
        "status": "queued",
        "queue": queue,
        "options": opts,
        "audio_blob": "bench",
        "batch_id": batch_id,
        "created_at": now + timedelta(microseconds=i),
        "enqueued_at": now,
        "attempts": 0,
        "runtime_ms": 0,
        "cost": 0.0,
        "tokens_generated": 0,
        "tokens_input": 0,
    }


def plain_wav(seconds: float) -> bytes:
    """Quiet noise as a 16 kHz mono WAV: the worker reads it without ffmpeg."""
    import io
    import wave

    import numpy as np

    samples = (np.random.default_rng(0).standard_normal(int(seconds * 16_000)) * 300).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


@dataclass(frozen=True)
class Row:
    size: int
    drained: int
    drain_s: float
    pg_xact_per_job: float
    pg_rows_per_job: float
    redis_enqueue_cmds_per_job: float
    redis_drain_cmds_per_job: float
    redis_bytes_per_waiting_job: float
    redis_peak_mib: float
    claimed_twice: int
    resent: int
    not_ended: int
    steady_s: float = 0.0  # first claim to last finish (the workers' boot left out)
    worker_cpu_s: float = 0.0  # the workers' CPU over the same span, near enough

    @property
    def jobs_per_s(self) -> float:
        return self.drained / self.drain_s

    @property
    def steady_jobs_per_s(self) -> float:
        return self.drained / self.steady_s if self.steady_s > 0 else 0.0

    @property
    def worker_cpu_ms_per_job(self) -> float:
        return 1000 * self.worker_cpu_s / max(self.drained, 1)


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU of these processes so far (Linux /proc), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _redis_cmds(client: Any) -> int:
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


def _pg_stats(engine: Any, db: str) -> tuple[int, int]:
    from sqlalchemy import text

    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
        row = conn.execute(
            text(
                "SELECT xact_commit + xact_rollback, tup_returned + tup_fetched + tup_inserted"
                " + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = :d"
            ),
            {"d": db},
        ).one()
    return int(row[0]), int(row[1])


STATEMENTS_SQL = """
SELECT calls, shared_blks_hit + shared_blks_read AS blks, rows,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 150)
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY shared_blks_hit + shared_blks_read DESC LIMIT 12
"""
INDEX_SQL = """
SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes WHERE idx_tup_read > 0
UNION ALL SELECT relname || ' (seq)', seq_scan, seq_tup_read FROM pg_stat_user_tables
WHERE seq_tup_read > 0
"""


def _pg_breakdown(engine: Any) -> tuple[list[Any], dict[str, tuple[int, int]]]:
    """Per statement buffers (pg_stat_statements, where the server preloads it) and per
    index entries read: where the rows per job go."""
    from sqlalchemy import text

    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
        idx = {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(text(INDEX_SQL)).all()}
        try:
            stmts = list(conn.execute(text(STATEMENTS_SQL)).all())
        except Exception:
            stmts = []
    return stmts, idx


def _explain_claim(engine: Any, queue: str, key_id: int, batch_id: str) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of what a claim, a finish and a sweep read: buffers and
    heap fetches of each, on the backlog as the drain left it."""
    from sqlalchemy import text

    from app.jobs.claims import _KEYS_WITH_WORK

    statements = {
        "keys with work + last started": (str(_KEYS_WITH_WORK), {"queue": queue}),
        "oldest queued of a key": (
            "SELECT id FROM jobs WHERE status = 'queued' AND queue = :queue AND api_key_id = :k"
            " ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            {"queue": queue, "k": key_id},
        ),
        "running per key": (
            "SELECT api_key_id, count(*) FROM jobs WHERE status = 'running' GROUP BY 1",
            {},
        ),
        "batch left? (each finish)": (
            "SELECT id FROM jobs WHERE batch_id = :b AND status IN ('queued', 'running') LIMIT 1",
            {"b": batch_id},
        ),
        "queued per queue (each sweep)": (
            "SELECT queue, count(*) FROM jobs WHERE status = 'queued' AND queue IN (:queue)"
            " GROUP BY queue",
            {"queue": queue},
        ),
    }
    with engine.connect() as conn:
        for name, (sql, params) in statements.items():
            plan = [r[0] for r in conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"), params)]
            top = next((line.strip() for line in plan if "Buffers:" in line), "")
            if os.environ.get("BENCH_FULL_PLANS"):
                print("\n".join("#     " + line for line in plan))
            fetches = sum(
                int(line.split("Heap Fetches:")[1]) for line in plan if "Heap Fetches:" in line
            )
            scans = sorted(
                {
                    line.split(" on ")[0].split("->")[-1].strip()
                    for line in plan
                    if " using " in line
                }
            )
            print(f"#   EXPLAIN {name}: {top}, heap fetches {fetches}; {'; '.join(scans)}")
        conn.rollback()


def run_size(
    size: int, *, workers: int, workdir: Path, drain: int = 0, explain: bool = False
) -> Row:
    """Queue ``size`` jobs, then drain them all (or the first ``drain``, when set: rates and
    per-job counts are then taken over those, with the rest of the backlog still waiting)."""
    with throwaway_stack(workdir, KEEP_AUDIO_DAYS="1", ENGINE="null") as stack:
        return _drain(stack, size, workers=workers, workdir=workdir, drain=drain, explain=explain)


def _drain(
    stack: Throwaway, size: int, *, workers: int, workdir: Path, drain: int, explain: bool
) -> Row:
    import redis
    from sqlalchemy import create_engine, func, insert, select, text

    env, db, admin, port = stack.env, stack.db, stack.admin, stack.redis_port
    procs: list[subprocess.Popen[bytes]] = []
    engine = create_engine(stack.db_url)
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("WHISPERQ_")})
        from sqlalchemy.orm import Session

        from app.infra.blobs import build_store
        from app.infra.models import Batch, Job
        from app.infra.queue import build_celery, send_jobs
        from app.jobs.keys import create_key
        from app.jobs.options import TranscribeOptions
        from app.settings import Settings

        settings = Settings()
        client = redis.Redis(port=port)
        clip = workdir / "clip.wav"
        clip.write_bytes(plain_wav(1.0))
        build_store(settings).put_file("bench", clip)
        with Session(engine, expire_on_commit=False) as session, session.begin():
            keys = [
                create_key(session, name=f"k{i}", pepper=settings.key_pepper) for i in range(KEYS)
            ]
        opts = TranscribeOptions().to_json()
        ids = [uuid.uuid4().hex for _ in range(size)]
        now = datetime.now(UTC)
        # As a backlog arrives: one sealed batch per key, each job a microsecond apart (what
        # app/jobs/batches.py writes), so every finish also asks whether its batch has ended.
        batch_ids = [uuid.uuid4().hex for _ in range(KEYS)]
        with engine.begin() as conn:
            conn.execute(
                insert(Batch),
                [
                    {
                        "id": batch_ids[i],
                        "api_key_id": keys[i].row.id,
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
                        job_id,
                        keys[i % KEYS].row.id,
                        settings.queue_bulk,
                        opts,
                        batch_ids[i % KEYS],
                        now,
                        i,
                    )
                    for i, job_id in enumerate(ids)
                ],
            )
        producer = build_celery(settings)
        client.config_resetstat()
        mem0 = int(client.info("memory")["used_memory"])
        # As a batch sends them (app/jobs/batches.py): a units message per 64 jobs.
        send_jobs(ids, queue=settings.queue_bulk, celery=producer)
        enqueue_cmds = _redis_cmds(client)
        per_waiting = (int(client.info("memory")["used_memory"]) - mem0) / size

        client.config_resetstat()
        if explain:
            with engine.begin() as conn:
                try:
                    conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
                    conn.execute(text("SELECT pg_stat_statements_reset()"))
                except Exception as exc:
                    print(f"# no pg_stat_statements: {exc}".splitlines()[0])
            _s0, idx0 = _pg_breakdown(engine)
        x0, r0 = _pg_stats(admin, db)
        t0 = time.monotonic()
        for _ in range(workers):
            procs.append(
                subprocess.Popen(
                    # WHISPERQ_BENCH_WORKER_ARGV: another command line (a profiler, say).
                    os.environ.get(
                        "WHISPERQ_BENCH_WORKER_ARGV", f"{sys.executable} -m app.cli worker"
                    ).split(),
                    cwd=REPO,
                    env=env,
                    stdout=(workdir / "worker.log").open("ab"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        target = min(drain, size) if drain else size
        done = 0
        deadline = t0 + max(600.0, size / 5)
        # The workers' CPU from their first claim on: what the jobs cost, not the imports.
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                if conn.execute(select(Job.id).where(Job.status != "queued").limit(1)).first():
                    break
            time.sleep(0.02)
        cpu0 = _cpu_s([p.pid for p in procs])
        while done < target and time.monotonic() < deadline:
            # A partial drain counts finished jobs (its cost grows with them): less often.
            time.sleep(0.5 if target == size else 2.0)
            with engine.connect() as conn:
                if target == size:
                    # An index probe, not a count: the bench must not load what it measures.
                    busy = conn.execute(
                        select(Job.id).where(Job.status.in_(["queued", "running"])).limit(1)
                    ).first()
                    done = size if busy is None else 0
                else:
                    done = int(
                        conn.execute(
                            select(func.count()).select_from(Job).where(Job.status == "succeeded")
                        ).scalar_one()
                    )
        cpu1 = _cpu_s([p.pid for p in procs])
        with engine.connect() as conn:
            done, first, last = conn.execute(
                select(func.count(), func.min(Job.started_at), func.max(Job.finished_at)).where(
                    Job.status == "succeeded"
                )
            ).one()
            done = int(done)
        steady_s = (last - first).total_seconds() if done and first and last else 0.0
        left = target - min(done, target)
        drain_s = time.monotonic() - t0
        drain_cmds = _redis_cmds(client)
        if explain:
            per = {
                name.removeprefix("cmdstat_"): int(v["calls"])
                for name, v in client.info("commandstats").items()
            }
            n = max(done, 1)
            print(
                f"# size {size}: Redis commands per drained job: "
                + ", ".join(
                    f"{k} {v / n:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])
                )
            )
        x1, r1 = _pg_stats(admin, db)
        if explain:
            stmts, idx1 = _pg_breakdown(engine)
            n = max(done, 1)
            print(f"# size {size}: per drained job, by index (scans, entries read)")
            for name, (scans, read) in sorted(idx1.items(), key=lambda kv: -kv[1][1]):
                s0, t0_ = idx0.get(name, (0, 0))
                print(f"#   {name}: {(scans - s0) / n:.1f} scans, {(read - t0_) / n:.0f} read")
            print(f"# size {size}: per drained job, by statement (calls, buffers, rows)")
            for calls, blks, rows, query in stmts:
                print(f"#   {calls / n:.2f} {blks / n:.0f} {rows / n:.1f}  {query}")
        peak = int(client.info("memory")["used_memory_peak"]) / 2**20
        with engine.connect() as conn:
            twice = int(
                conn.execute(
                    select(func.count()).select_from(Job).where(Job.attempts > 1)
                ).scalar_one()
            )
        if explain:
            for p in procs:  # the plans of the state the drain left, without the workers
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            _explain_claim(engine, settings.queue_bulk, keys[1].row.id, batch_ids[1])
        log = (workdir / "worker.log").read_text(errors="replace")
        resent = sum(
            int(line.split("re-sent ")[1].split()[0])
            for line in log.splitlines()
            if "reaper re-sent" in line and " jobs " in line
        )
        return Row(
            size=size,
            drained=done,
            drain_s=drain_s,
            pg_xact_per_job=(x1 - x0) / done,
            pg_rows_per_job=(r1 - r0) / done,
            redis_enqueue_cmds_per_job=enqueue_cmds / size,
            redis_drain_cmds_per_job=drain_cmds / done,
            redis_bytes_per_waiting_job=per_waiting,
            redis_peak_mib=peak,
            claimed_twice=twice,
            resent=resent,
            not_ended=left,
            steady_s=steady_s,
            worker_cpu_s=cpu1 - cpu0,
        )
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument(
        "--drain", type=int, default=0, help="measure over the first N jobs only (0: all)"
    )
    ap.add_argument(
        "--explain",
        action="store_true",
        help="also print index entries and statement buffers per job (pg_stat_statements)",
    )
    args = ap.parse_args(argv)
    print(
        f"# backlog bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {args.workers} x `whisperq "
        f"worker` (WHISPERQ_ENGINE=null, default slots), {KEYS} keys"
    )
    print(
        "| backlog | drained | drain jobs/s | steady jobs/s | worker CPU ms/job | PG xacts/job |"
        " PG rows/job | Redis cmds/job enqueue |"
        " Redis cmds/job drain | Redis B/waiting job | Redis peak MiB | claimed twice |"
        " re-sent | not ended |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for size in args.sizes:  # each row as soon as it is measured
        workdir = Path(tempfile.mkdtemp(prefix="whisperq-backlog-"))
        try:
            r = run_size(
                size,
                workers=args.workers,
                workdir=workdir,
                drain=args.drain,
                explain=args.explain,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(
            f"| {r.size:,} | {r.drained:,} | {r.jobs_per_s:.0f} | {r.steady_jobs_per_s:.0f}"
            f" | {r.worker_cpu_ms_per_job:.2f} | {r.pg_xact_per_job:.1f}"
            f" | {r.pg_rows_per_job:.0f}"
            f" | {r.redis_enqueue_cmds_per_job:.1f} | {r.redis_drain_cmds_per_job:.1f}"
            f" | {r.redis_bytes_per_waiting_job:.0f} | {r.redis_peak_mib:.1f}"
            f" | {r.claimed_twice} | {r.resent} | {r.not_ended} |"
            f"  (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
