"""Service bench (issue 12): throughput through the whole service against sequential
``whisper.transcribe()`` on the same files, in the same run, with WER beside each.

The stack is real and throwaway: a ``redis-server`` on a free port, a fresh Postgres
database (created here, dropped at the end), ``whisperq api`` (uvicorn) and ``whisperq
worker`` (Celery threads pool, the batched engine) as subprocesses, real tiny.en weights
from the project's importer (as the tests build them). The corpus is espeak-ng speech
(``bench.engine_bench``'s 10 clips, two of them over 30 s), cycled to ``--files`` files.

Per round, interleaved so a shared machine's load hits every system alike:
sequential ``whisper.transcribe()`` of the files in this process (audio loaded from the
file by whisper, as ``transcribe(path)`` does) at each ``--threads`` torch thread count
(1 and 2 by default: on a loaded 2-core box one thread is much faster, see
bench/RESULTS.md), then for each ``--clients`` count: that many clients post the files
synchronously to ``/v1/inference/openai/whisper-tiny`` (a client takes the next file when
its answer comes back) until every file is transcribed. Ratios are against the faster
sequential run of the same round. Also printed: CPU seconds per audio second (this
process, or the API + worker + redis-server with their ffmpeg children) and, after each
service run, the worker engine's counters (encoder, decode passes, rows per pass).
``--profile DIR`` records the worker with py-spy (``$PY_SPY``) during each service run.

    .venv/bin/python -m bench.service_bench                 # 16 and 64 clients, 64 files
    .venv/bin/python -m bench.service_bench --threads 1 --rounds 2
    .venv/bin/python -m bench.service_bench --clients 16 --files 32 --rounds 1

Prints a Markdown table; asserts nothing. The worker runs with the settings' defaults
unless ``--batch-rows`` / ``--concurrency`` say otherwise (they are passed as
``WHISPERQ_ENGINE_MAX_BATCH_ROWS`` / ``--concurrency``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get(
    "WHISPERQ_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
INFER = "/v1/inference/openai/whisper-tiny"
SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class File:
    path: Path
    text: str  # the script espeak-ng spoke
    seconds: float


@dataclass
class Row:
    system: str
    clients: int
    files: int
    audio_s: float
    walls: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds used per round
    texts: list[str] = field(default_factory=list)
    failed: int = 0


def proc_cpu_s(pid: int) -> float:
    """User + system CPU of a process and its waited-for children (ffmpeg, ffprobe)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[11:15] are utime, stime, cutime, cstime (man 5 proc, counted after the name)
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def corpus(workdir: Path, n_files: int) -> list[File]:
    from bench.engine_bench import build_corpus

    workdir.mkdir(parents=True, exist_ok=True)
    clips = build_corpus(False, workdir)
    files = [
        File(workdir / f"{c.name}.wav", c.text, c.seconds) for c in clips
    ]  # build_corpus leaves each clip's wav there
    return [files[i % len(files)] for i in range(n_files)]


class Stack:
    """redis-server, a fresh database, the API and one worker: started, then torn down."""

    def __init__(
        self,
        workdir: Path,
        model: Path,
        batch_rows: int,
        concurrency: int,
        ready_rows: int | None,
        workers: int = 1,
        torch_threads: int = 0,
    ) -> None:
        from sqlalchemy import create_engine, text

        from tests.support.services import ApiProcess, RedisServer, WorkerProcess, migrate

        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis").start()
        self.db = f"whisperq_svcbench_{uuid.uuid4().hex[:8]}"
        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db}"'))
        db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + self.db
        tag = uuid.uuid4().hex[:6]
        self.env = {
            "WHISPERQ_ENVIRONMENT": "test",
            "WHISPERQ_DATABASE_URL": db_url,
            "WHISPERQ_REDIS_URL": self.redis.url,
            "WHISPERQ_QUEUE_INTERACTIVE": f"interactive-{tag}",
            "WHISPERQ_QUEUE_BULK": f"bulk-{tag}",
            "WHISPERQ_QUEUE_WEBHOOKS": f"webhooks-{tag}",
            "WHISPERQ_KEY_PEPPER": "bench-pepper-" + uuid.uuid4().hex,
            "WHISPERQ_BLOB_DIR": str(workdir / "blobs"),
            "WHISPERQ_KEEP_AUDIO_DAYS": "1",
            "WHISPERQ_DEVICE": "cpu",
            "WHISPERQ_MODEL": str(model),
            # the API's limits are not what is measured here
            "WHISPERQ_SUBMIT_RATE_PER_MINUTE": "0",
            "WHISPERQ_SYNC_WAIT_S": "3000",
        }
        if batch_rows:
            self.env["WHISPERQ_ENGINE_MAX_BATCH_ROWS"] = str(batch_rows)
        if ready_rows is not None:
            self.env["WHISPERQ_ENGINE_READY_ROWS"] = str(ready_rows)
        if torch_threads:
            self.env["OMP_NUM_THREADS"] = str(torch_threads)
        self.api: Any = None
        self.worker: Any = None
        self.workers: list[Any] = []
        try:
            migrate(db_url)
            self.key = self._new_key(db_url)
            self.api = ApiProcess(log_path=workdir / "api.log", env=self.env)
            for i in range(workers):
                self.workers.append(
                    WorkerProcess(
                        model=model,
                        log_path=workdir / f"worker{i}.log",
                        env=self.env,
                        concurrency=concurrency,
                    )
                )
            self.worker = self.workers[0]
        except BaseException:
            self.stop()
            raise

    def _new_key(self, db_url: str) -> str:
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        from app.jobs.keys import create_key

        engine = create_engine(db_url)
        try:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                created = create_key(session, name="bench", pepper=self.env["WHISPERQ_KEY_PEPPER"])
            return created.key
        finally:
            engine.dispose()

    @property
    def url(self) -> str:
        return str(self.api.url)

    def cpu_s(self) -> float:
        """CPU of the API, the worker (with its ffmpeg children) and redis-server. Postgres
        is the shared server: its backends are not counted."""
        pids = [self.api.proc.pid, *(w.proc.pid for w in self.workers)]
        if self.redis.proc is not None:
            pids.append(self.redis.proc.pid)
        return sum(proc_cpu_s(p) for p in pids)

    def stop(self) -> None:
        from sqlalchemy import text

        for proc in (*self.workers, self.api):
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.stop()
        self.redis.stop()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))
        self.admin.dispose()


async def _one(http: Any, f: File, fields: dict[str, str]) -> str | None:
    r = await http.post(INFER, files={"audio": (f.path.name, f.path.read_bytes())}, data=fields)
    if r.status_code == 200:
        return str(r.json()["text"])
    if r.status_code != 202:  # failed or refused: counted, not retried
        print(f"  {f.path.name}: HTTP {r.status_code} {r.text[:200]}", file=sys.stderr)
        return None
    job_id = r.json()["request_id"]
    while True:  # the sync wait ran out: follow the job
        await asyncio.sleep(1.0)
        body = (await http.get(f"/v1/jobs/{job_id}")).json()
        if body.get("status") == "succeeded":
            return str(body["results"]["text"])
        if body.get("status") in ("failed", "canceled"):
            return None


async def _service_round(
    url: str, key: str, files: list[File], clients: int, fields: dict[str, str]
) -> list[str | None]:
    import httpx

    texts: list[str | None] = [None] * len(files)
    todo = iter(range(len(files)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"bearer {key}"},
        limits=limits,
        timeout=3600,
    ) as http:

        async def client() -> None:
            for i in todo:  # shared iterator: each client takes the next file
                texts[i] = await _one(http, files[i], fields)

        await asyncio.gather(*(client() for _ in range(clients)))
    return texts


def service_run(
    stack: Stack,
    files: list[File],
    clients: int,
    fields: dict[str, str],
    profile: Path | None = None,
) -> tuple[float, float, list[str | None]]:
    spy = None
    if profile is not None:  # py-spy on the worker for the whole run (threads, idle too)
        spy = subprocess.Popen(
            [
                os.environ.get("PY_SPY", "py-spy"),
                "record",
                "--pid",
                str(stack.worker.proc.pid),
                "--rate",
                "50",
                "--threads",
                "--idle",
                "--format",
                "raw",
                "--output",
                str(profile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    cpu0, start = stack.cpu_s(), time.perf_counter()
    texts = asyncio.run(_service_round(stack.url, stack.key, files, clients, fields))
    wall, cpu = time.perf_counter() - start, stack.cpu_s() - cpu0
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(60)
    return wall, cpu, texts


def sequential_run(
    model: Any, files: list[File], fields: dict[str, str]
) -> tuple[float, float, list[str]]:
    import torch
    import whisper

    from app.jobs.options import parse_options

    # the options the API builds from the same form fields
    kwargs = parse_options(dict(fields)).transcribe_kwargs(fp16=False)
    cpu0, start = self_cpu_s(), time.perf_counter()
    texts = []
    for f in files:
        with torch.inference_mode():
            texts.append(str(whisper.transcribe(model, str(f.path), **kwargs)["text"]))
    return time.perf_counter() - start, self_cpu_s() - cpu0, texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--files", type=int, default=64, help="files per run (the corpus cycled)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds")
    ap.add_argument("--batch-rows", type=int, default=0, help="engine max batch rows (0: default)")
    ap.add_argument("--concurrency", type=int, default=0, help="worker threads (0: default)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes")
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: unset)"
    )
    ap.add_argument(
        "--ready-rows", type=int, default=None, help="WHISPERQ_ENGINE_READY_ROWS (default: unset)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch threads of the sequential runs (one row each; ratios are against the "
        "faster of them in each round)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        help="folder for py-spy profiles of the worker (raw stacks; py-spy from $PY_SPY)",
    )
    ap.add_argument(
        "--patience",
        type=float,
        default=None,
        help="every request asks beam search of 5 at this patience (sequential likewise)",
    )
    args = ap.parse_args(argv)
    # form fields of every request: the API's defaults, or beam search
    fields = {} if args.patience is None else {"patience": str(args.patience)}

    import torch
    import whisper

    from bench.engine_bench import corpus_wer, normalize
    from tests.support.real_models import tiny_en_checkpoint, warm_whisper_tokenizers

    warm_whisper_tokenizers()
    checkpoint = tiny_en_checkpoint()
    workdir = Path(tempfile.mkdtemp(prefix="whisperq-svcbench-"))
    load = os.getloadavg()
    started = datetime.now(UTC)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        files = corpus(workdir / "audio", args.files)
        audio_s = sum(f.seconds for f in files)
        refs = [f.text for f in files]
        model = whisper.load_model(str(checkpoint), device="cpu")
        stack = Stack(
            workdir,
            checkpoint,
            args.batch_rows,
            args.concurrency,
            args.ready_rows,
            workers=args.workers,
            torch_threads=args.torch_threads,
        )
        try:
            # warm-up, untimed: first request through every process, first transcribe()
            service_run(stack, files[:2], 2, fields)
            sequential_run(model, files[:1], fields)
            seqs = {
                t: Row(
                    f"openai-whisper transcribe(), sequential, {t} torch thread(s)",
                    1,
                    len(files),
                    audio_s,
                )
                for t in args.threads
            }
            svc = {c: Row("whisperq service", c, len(files), audio_s) for c in args.clients}
            for r in range(args.rounds):
                for t, seq in seqs.items():
                    torch.set_num_threads(t)
                    wall, cpu, texts = sequential_run(model, files, fields)
                    seq.walls.append(wall)
                    seq.cpu.append(cpu)
                    seq.texts = texts
                    print(
                        f"round {r}: sequential, {t} threads, {wall:.1f} s"
                        f" (load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
                for c in args.clients:
                    spy = args.profile / f"worker-{c}-round{r}.txt" if args.profile else None
                    wall, cpu, got = service_run(stack, files, c, fields, spy)
                    svc[c].walls.append(wall)
                    svc[c].cpu.append(cpu)
                    svc[c].failed = sum(t is None for t in got)
                    svc[c].texts = [t or "" for t in got]
                    time.sleep(0.5)  # the engine logs its counters once idle
                    for w in stack.workers:
                        stats = [ln for ln in w.log().splitlines() if "engine: " in ln]
                        print(
                            f"  worker, cumulative: {stats[-1] if stats else 'no engine line'}",
                            flush=True,
                        )
                    print(
                        f"round {r}: {c} clients {wall:.1f} s (load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
        finally:
            stack.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        f"# service bench, {started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs,"
        f" load at start {load[0]:.1f} / end {os.getloadavg()[0]:.1f}; tiny.en fp32; {len(files)}"
        f" files ({audio_s:.1f} s of audio, espeak-ng corpus cycled); API defaults ("
        + ("greedy" if args.patience is None else f"beam search of 5, patience {args.patience}")
        + ", fallback ladder, condition_on_previous_text); worker batch rows"
        f" {args.batch_rows or 'default'}, ready rows"
        f" {'default' if args.ready_rows is None else args.ready_rows},"
        f" concurrency {args.concurrency or 'default'}, {args.workers} worker process(es),"
        f" torch threads {args.torch_threads or 'default'}"
    )
    print()
    print(
        "| system | clients | files | audio s | wall s | × real time | vs sequential | WER |"
        " same text as sequential | failed | CPU s per audio s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [*seqs.values(), *svc.values()]
    # the sequential baseline of each round: the faster of its thread counts
    base = [min(walls) for walls in zip(*(q.walls for q in seqs.values()), strict=True)]
    ref_texts = next(iter(seqs.values())).texts
    for row in rows:
        best = min(row.walls)
        # each round's ratio against the sequential baseline of the same round
        ratios = [s / w for s, w in zip(base, row.walls, strict=True)]
        same = sum(normalize(a) == normalize(b) for a, b in zip(row.texts, ref_texts, strict=True))
        print(
            f"| {row.system} | {row.clients} | {row.files} | {row.audio_s:.1f} | {best:.1f} |"
            f" {row.audio_s / best:.1f} | {min(base) / best:.2f}"
            f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)}) |"
            f" {corpus_wer(refs, row.texts):.3f} | {same}/{len(files)} | {row.failed} |"
            f" {min(row.cpu) / row.audio_s:.3f} |"
        )
    print()
    print(
        "vs sequential: best wall against the best sequential wall (of its thread counts);"
        " each round's ratio in brackets. wall s: best of the rounds. CPU s: user + system"
        " of this process (sequential) or of"
        " the API, worker and redis-server with their ffmpeg children (service; the shared"
        " Postgres not counted), least of the rounds. All rounds (wall s / CPU s):"
    )
    for row in rows:
        each = ", ".join(f"{w:.1f}/{c:.1f}" for w, c in zip(row.walls, row.cpu, strict=True))
        print(f"- {row.system}, {row.clients} clients: {each}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
