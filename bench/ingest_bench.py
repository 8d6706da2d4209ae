"""Bulk ingestion bench (issue 23): N URL inputs into one batch through the real API.

A real ``whisperq api`` process (uvicorn) over a fresh Postgres database and its own
redis-server. One key creates an open batch with the first chunk of inputs
(``POST /v1/batches``), adds the rest in chunks of the per-request limit
(``POST /v1/batches/{id}/files``) and seals it. No worker runs: what is measured is how fast
the API accepts and queues a backlog, and what it costs: the API's resident memory (sampled,
and the kernel's high-water mark), Postgres transactions and Redis commands per input.
Afterwards every input must be a queued job of the batch, each with its wake-up in Redis.

    .venv/bin/python -m bench.ingest_bench                       # 20,000 inputs, 1,000 a request
    .venv/bin/python -m bench.ingest_bench --inputs 5000 --per-request 500
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.backlog_bench import _pg_stats, _redis_cmds
from bench.throwaway import REPO, Throwaway, free_port, throwaway_stack

TARGET_PER_S = 1000.0  # issue 23: accepted and queued at >= 1,000 inputs/s


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


class RssSampler(threading.Thread):
    """The API's resident memory every 20 ms while the inputs go in."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, _status_kib(self.pid, "VmRSS"))
            except (OSError, RuntimeError):
                return  # the API exited (the run failed): the main thread reports it
            time.sleep(0.02)


@dataclass(frozen=True)
class Result:
    inputs: int
    requests: int
    seconds: float
    rss_before_mib: float
    rss_peak_mib: float
    pg_xact_per_input: float
    redis_cmds_per_input: float
    jobs_queued: int
    wakeups: int

    @property
    def per_s(self) -> float:
        return self.inputs / self.seconds


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the API did not start:\n{log.read_text()}")
        time.sleep(0.1)


def run(n: int, per_request: int, workdir: Path) -> Result:
    with throwaway_stack(
        workdir,
        # The inputs name a loopback host that is never fetched (no worker runs).
        AUDIO_URL_ALLOWLIST="127.0.0.1",
        SUBMIT_RATE_PER_MINUTE="0",
        MAX_ACTIVE_JOBS_PER_KEY=str(n + 1),
        BATCH_MAX_INPUTS_PER_REQUEST=str(per_request),
    ) as stack:
        return _ingest(stack, n, per_request, workdir)


def _ingest(stack: Throwaway, n: int, per_request: int, workdir: Path) -> Result:
    import redis
    from sqlalchemy import create_engine, func, select

    env, db, admin, port = stack.env, stack.db, stack.admin, stack.redis_port
    engine = create_engine(stack.db_url)
    api: subprocess.Popen[bytes] | None = None
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("WHISPERQ_")})
        from sqlalchemy.orm import Session

        from app.infra.models import Job
        from app.jobs.keys import create_key
        from app.settings import Settings
        from worker.broker import broker_counts

        settings = Settings()
        with Session(engine, expire_on_commit=False) as session, session.begin():
            key = create_key(session, name="ingest", pepper=settings.key_pepper).key
        api_port = free_port()
        log = workdir / "api.log"
        # WHISPERQ_BENCH_API_ARGV: another command line ending in the port (a profiler
        # around uvicorn, say).
        api_cmd = os.environ.get(
            "WHISPERQ_BENCH_API_ARGV", f"{sys.executable} -m app.cli api --port"
        )
        with log.open("wb") as out:
            api = subprocess.Popen(
                [*api_cmd.split(), str(api_port)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{api_port}"
        _wait_healthy(base, api, log)
        urls = [f"http://127.0.0.1:9/clip-{i:06d}.wav" for i in range(n)]
        chunks = [urls[i : i + per_request] for i in range(0, n, per_request)]
        client = redis.Redis(port=port)
        headers = {"Authorization": f"Bearer {key}"}
        rss_before = _status_kib(api.pid, "VmRSS")
        Path(f"/proc/{api.pid}/clear_refs").write_text("5")  # resets VmHWM
        sampler = RssSampler(api.pid)
        sampler.start()
        xact0, _ = _pg_stats(admin, db)
        cmds0 = _redis_cmds(client)
        started = time.perf_counter()
        with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
            made = http.post("/v1/batches", json={"open": True, "urls": chunks[0]})
            made.raise_for_status()
            batch_id = made.json()["batch"]["id"]
            for chunk in chunks[1:]:
                http.post(f"/v1/batches/{batch_id}/files", json={"urls": chunk}).raise_for_status()
            http.post(f"/v1/batches/{batch_id}/seal").raise_for_status()
        seconds = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
        xact1, _ = _pg_stats(admin, db)
        cmds1 = _redis_cmds(client)
        peak = max(sampler.peak_kib, _status_kib(api.pid, "VmHWM"))
        with Session(engine) as session:
            queued = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.batch_id == batch_id, Job.status == "queued")
            )
        counts = broker_counts(client, [settings.queue_interactive, settings.queue_bulk])
        return Result(
            inputs=n,
            requests=len(chunks) + 1,
            seconds=seconds,
            rss_before_mib=rss_before / 1024,
            rss_peak_mib=peak / 1024,
            pg_xact_per_input=(xact1 - xact0) / n,
            redis_cmds_per_input=(cmds1 - cmds0) / n,
            jobs_queued=int(queued or 0),
            wakeups=sum(counts.waiting.values()),
        )
    finally:
        if api is not None:
            api.terminate()
            api.wait(30)
        engine.dispose()


def print_table(r: Result, per_request: int) -> None:
    print(
        f"# ingest_bench {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs; API, Postgres and Redis on this machine"
    )
    rows: list[tuple[str, Any]] = [
        ("inputs (URLs) into one batch", r.inputs),
        ("requests (create + add + seal)", f"{r.requests} ({per_request} inputs each)"),
        ("wall, first byte to sealed", f"{r.seconds:.2f} s"),
        ("accepted and queued", f"{r.per_s:,.0f} inputs/s"),
        ("target (issue 23)", f"{TARGET_PER_S:,.0f} inputs/s"),
        ("ours / target", f"{r.per_s / TARGET_PER_S:.2f}x"),
        ("API RSS before -> peak", f"{r.rss_before_mib:.0f} -> {r.rss_peak_mib:.0f} MiB"),
        ("Postgres transactions per input", f"{r.pg_xact_per_input:.3f}"),
        ("Redis commands per input", f"{r.redis_cmds_per_input:.2f}"),
        ("jobs queued in the batch", f"{r.jobs_queued} (lost: {r.inputs - r.jobs_queued})"),
        ("wake-ups waiting in Redis", r.wakeups),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=20_000)
    parser.add_argument("--per-request", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        result = run(args.inputs, args.per_request, Path(tmp))
    print_table(result, args.per_request)
    return 0 if result.jobs_queued == result.inputs else 1


if __name__ == "__main__":
    sys.exit(main())
