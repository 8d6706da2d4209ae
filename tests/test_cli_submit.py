"""Issue 13, the proof: a 500-file backlog through ``whisperq submit`` against a real API
server (uvicorn on loopback), Postgres, Redis and a real worker process; the CLI killed
halfway and rerun makes no duplicate job; every file accounted for exactly once; the JSONL
results, the progress numbers and the batch webhook agree with the database."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import func, select
from standardwebhooks import Webhook

from app.cli import main as cli_main
from app.infra.db import session_scope
from app.infra.models import Batch, Job, JobStatus
from app.jobs.keys import CreatedKey
from tests.support.api import new_key, noise_wav
from tests.support.random_model import random_model
from tests.support.services import REPO, ApiProcess, Receiver, WorkerProcess, free_port

pytestmark = pytest.mark.integration

FILES = 500
EOT = 50257  # multilingual vocabulary's end-of-text token


def quick_checkpoint(path: Path) -> Path:
    """The random test model, changed so that its decoder emits end-of-text after a few
    tokens whatever the audio: a job costs a few decode steps, not 224, so 500 of them run
    in about a minute on two cores. One residual dimension carries only a positional
    signal (zero in every token embedding and every block's output) that turns large from
    position 11 on, and the end-of-text embedding (tied to the output projection) reads it."""
    model = random_model(seed=7)
    with torch.no_grad():
        dec = model.decoder
        dec.token_embedding.weight[:, 0] = 0
        dec.token_embedding.weight[EOT, 0] = 30
        dec.positional_embedding[:, 0] = 0
        dec.positional_embedding[11:, 0] = 50
        for block in dec.blocks:
            for linear in (block.attn.out, block.cross_attn.out, block.mlp[2]):
                linear.weight[0, :] = 0
                if linear.bias is not None:
                    linear.bias[0] = 0
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    return path


API_PIDS: dict[str, int] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``whisperq api`` (uvicorn) in its own process, on loopback."""
    with ApiProcess(log_path=tmp_path_factory.mktemp("api") / "api.log") as api:
        API_PIDS[api.url] = api.pid
        yield api.url


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("cli")


@pytest.fixture(scope="module")
def backlog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """500 distinct tiny clips in five folders (names are kept relative to the folder)."""
    root = tmp_path_factory.mktemp("backlog")
    names = []
    for n in range(FILES):
        name = f"team-{n % 5}/call-{n:03d}.wav"
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(noise_wav(0.25, seed=1000 + n))
        names.append(name)
    return root, names


def cli(base: str, key: CreatedKey, *args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args, "--url", base, "--api-key", key.key]


def batch_job_counts(batch_id: str) -> dict[str, int]:
    with session_scope() as session:
        rows = session.execute(
            select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
        ).all()
    return {str(s): int(n) for s, n in rows}


def cli_batch(key: CreatedKey) -> str | None:
    with session_scope() as session:
        return session.scalar(select(Batch.id).where(Batch.api_key_id == key.row.id))


def test_user_mistakes_are_one_clear_line(
    server: str, key: CreatedKey, backlog: tuple[Path, list[str]], capsys: Any
) -> None:
    root, _ = backlog
    cases = [
        (["submit", str(root / "nowhere")], "no such file, directory or pattern"),
        (["submit", str(root), "--option", "language"], "expected NAME=VALUE"),
        (["submit", str(root / "team-0"), "--option", "temperature=5"], "field temperature"),
        (["submit", str(root / "team-0"), "--webhook", "http://10.0.0.1/x"], "forbidden"),
        (["fetch", "0123456789abcdef0123456789abcdef"], "batch_not_found"),
    ]
    for argv, expected in cases:
        assert cli_main([*argv, "--url", server, "--api-key", key.key]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert cli_main(["fetch", "x", "--url", server, "--api-key", "wq_x.nope"]) == 1
    assert "unknown or revoked API key" in capsys.readouterr().err
    os.environ.pop("WHISPERQ_API_KEY", None)
    assert cli_main(["fetch", "x", "--url", server]) == 1
    assert (
        capsys.readouterr().err == "whisperq: no API key: pass --api-key or set WHISPERQ_API_KEY\n"
    )
    assert (
        cli_main(["fetch", "x", "--url", f"http://127.0.0.1:{free_port()}", "--api-key", "k"]) == 1
    )
    assert "cannot reach" in capsys.readouterr().err
    assert cli_batch(key) is None  # nothing was created by any of these


# What `pip install whisperq[server]` adds: none of it may load for a client command.
SERVER_ONLY = [
    "fastapi",
    "starlette",
    "uvicorn",
    "multipart",
    "pydantic",
    "pydantic_settings",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "celery",
    "kombu",
    "redis",
    "boto3",
    "botocore",
    "prometheus_client",
    "jinja2",
    "fastapi_offline",
    "torch",
    "whisper",
]
# A finder first on sys.meta_path refuses them, as their absence from a client-only install
# would; then the real command runs against the real server.
CLIENT_ONLY = f"""
import sys
BLOCKED = {SERVER_ONLY!r}
class ClientOnlyInstall:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (a client-only install)")
        return None
sys.meta_path.insert(0, ClientOnlyInstall())
from app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_client_commands_run_without_the_servers_dependencies(server: str, tmp_path: Path) -> None:
    key = new_key("client-only")  # its own: the module's key holds the one backlog batch
    audio = tmp_path / "hello.wav"
    audio.write_bytes(noise_wav(0.5, seed=7))

    def client(*args: str, to_server: bool = True) -> subprocess.CompletedProcess[str]:
        connection = ["--url", server, "--api-key", key.key] if to_server else []
        argv = [sys.executable, "-c", CLIENT_ONLY, *args, *connection]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)

    sent = client("transcribe", str(audio), "--no-wait")
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.split()[-1]
    shown = client("job", job_id)
    # Queued (no worker here): neither success nor failure yet, and said so.
    assert shown.returncode == 3, shown.stdout + shown.stderr
    assert shown.stderr == f"job {job_id}: queued\n"
    with session_scope() as session:
        assert session.get(Job, job_id) is not None
    assert client("listen", "--help", to_server=False).returncode == 0
    # The guard itself: a server command in the same interpreter needs what it refuses.
    refused = client("keys", "list", to_server=False)
    assert refused.returncode != 0 and "a client-only install" in refused.stderr
    # And a plain `pip install whisperq` brings the client's two dependencies, nothing else.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
    assert names == {"httpx", "rich"}, names


# About 0.5 s of CPU per file over all processes (probe, upload, decode, engine, Celery,
# Postgres): a few minutes on an idle 2-core machine; the hang guard is sized for one
# shared six ways (bench/RESULTS.md, "Batches").
@pytest.mark.timeout(1800)
def test_a_500_file_backlog_killed_halfway_and_resumed(
    server: str,
    key: CreatedKey,
    backlog: tuple[Path, list[str]],
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    root, names = backlog
    argv = cli(
        server,
        key,
        "submit",
        str(root),
        "--option", "logprob_threshold=none",
        "--option", "language=en",
        "--chunk-files", "20",
        "--webhook", receiver.url + "/batch-done",
    )  # fmt: skip
    worker = WorkerProcess(
        model=quick_checkpoint(tmp_path / "quick.pt"),
        log_path=tmp_path / "worker.log",
        # This test is about batches: fewer of the reaper's time-based re-sends (the queue
        # branch's subject), yet a queue another test's FLUSHALL emptied (one Redis server
        # is shared) is still re-sent within minutes.
        env={"WHISPERQ_REQUEUE_AFTER_S": "120"},
    )
    try:
        # First run: killed (SIGKILL, no goodbye) once a good part of the files is in.
        first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        accepted_at_kill = 0
        while time.monotonic() < deadline:
            batch_id = cli_batch(key)
            accepted_at_kill = sum(batch_job_counts(batch_id).values()) if batch_id else 0
            if accepted_at_kill >= 100:
                break
            assert first.poll() is None, first.communicate()[0]
            time.sleep(0.05)
        first.kill()
        first.communicate()
        assert batch_id is not None and 100 <= accepted_at_kill < FILES

        # Second run: the same command resumes the same batch, uploads only the rest, and
        # watches it to the end. Meanwhile the progress it reads must agree with the DB.
        second = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        samples: list[tuple[dict[str, int], dict[str, Any], dict[str, int]]] = []
        with httpx.Client(base_url=server, headers={"Authorization": f"bearer {key.key}"}) as http:
            while second.poll() is None:
                db_before = batch_job_counts(batch_id)
                seen = http.get(f"/v1/batches/{batch_id}").json()
                samples.append((db_before, seen, batch_job_counts(batch_id)))
                time.sleep(0.5)
            out = second.communicate()[0].decode()
            assert second.returncode == 0, out
            resumed = re.search(r"(\d+) already accepted, (\d+) to upload", out)
            assert resumed is not None, out
            assert (
                int(resumed[1]) >= accepted_at_kill and int(resumed[1]) + int(resumed[2]) == FILES
            )
            assert f"batch {batch_id} completed: {FILES} succeeded, 0 failed" in out

            # Every file exactly once: one job per file, each claimed and run once.
            with session_scope() as session:
                jobs = session.scalars(select(Job).where(Job.batch_id == batch_id)).all()
                assert (
                    session.scalar(
                        select(func.count())
                        .select_from(Batch)
                        .where(Batch.api_key_id == key.row.id)
                    )
                    == 1
                )
            assert len(jobs) == FILES
            assert sorted(j.source_name or "" for j in jobs) == sorted(names)
            assert len({j.idempotency_key for j in jobs}) == FILES
            assert {(j.status, j.attempts) for j in jobs} == {(JobStatus.succeeded, 1)}
            # The --option values reached every job.
            assert {(j.options["language"], j.options["logprob_threshold"]) for j in jobs} == {
                ("en", None)
            }

            # Progress while it ran: consistent snapshots, never ahead of the database.
            for db_before, seen, db_after in samples:
                counts = seen["counts"]
                assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
                done = counts["succeeded"] + counts["failed"] + counts["canceled"]
                assert done <= FILES and 0.0 <= seen["progress"] <= 1.0
                finished = ("succeeded", "failed", "canceled")
                assert sum(db_before.get(k, 0) for k in finished) <= done
                assert done <= sum(db_after.get(k, 0) for k in finished)
                if seen["eta_seconds"] is not None:
                    assert seen["eta_seconds"] >= 0
            dones = [s[1]["counts"]["succeeded"] for s in samples]
            assert dones == sorted(dones)  # never goes backwards

            # The final numbers are the database's.
            final = http.get(f"/v1/batches/{batch_id}").json()
            assert final["status"] == "completed" and final["progress"] == 1.0
            assert final["counts"]["succeeded"] == FILES and final["eta_seconds"] == 0.0
            assert final["audio_seconds_done"] == pytest.approx(
                sum(j.input_length_ms or 0 for j in jobs) / 1000
            )
            assert final["audio_seconds_total"] == final["audio_seconds_done"]
            assert final["cost"] == pytest.approx(sum(j.cost for j in jobs))
            assert final["runtime_ms"] == sum(j.runtime_ms for j in jobs)

            # JSONL results, streamed: one line per file, in submission order, with text.
            with http.stream("GET", f"/v1/batches/{batch_id}/results") as r:
                assert r.headers["content-type"].startswith("application/x-ndjson")
                lines = [json.loads(x) for x in r.iter_lines() if x]
        assert sorted(x["custom_id"] for x in lines) == sorted(names)
        by_job = {j.id: j for j in jobs}
        for line in lines:
            job = by_job[line["job_id"]]
            assert line["status"] == "succeeded" and line["text"] == job.result["text"]  # type: ignore[index]
            assert line["cost"] == job.cost and line["error"] is None
        created = [by_job[x["job_id"]].created_at for x in lines]
        assert created == sorted(created)

        # The batch webhook: once, signed with the key's secret, after the last job.
        got = receiver.wait_for(1, timeout=120)
        time.sleep(2)  # a second (duplicate) event would arrive by now
        assert len(receiver.requests) == 1
        assert Webhook(key.webhook_secret).verify(got[0].body, got[0].headers)
        event = got[0].json()
        assert event["type"] == "batch.completed" and event["batch_id"] == batch_id
        assert event["counts"]["succeeded"] == FILES

        # fetch: transcripts next to their source names.
        out_dir = tmp_path / "out"
        done = subprocess.run(
            cli(server, key, "fetch", batch_id, "--format", "srt", "--out", str(out_dir)),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        written = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.srt"))
        assert written == sorted(n.removesuffix(".wav") + ".srt" for n in names)
        first_line = next(x for x in lines if x["segments"])
        srt = (out_dir / (first_line["custom_id"].removesuffix(".wav") + ".srt")).read_text()
        assert srt.startswith("1\n00:00:") and " --> " in srt
        assert first_line["segments"][0]["text"].strip() in srt
    finally:
        worker.stop()


def test_fetch_formats(server: str, key: CreatedKey, tmp_path: Path) -> None:
    """vtt/txt/json from the same results (after the backlog test, or on an empty key)."""
    from app.client.formats import render

    line = {
        "custom_id": "a.wav",
        "job_id": "j",
        "text": " Hello there. General",
        "segments": [
            {"id": 0, "text": " Hello there.", "start": 0.0, "end": 1.5},
            {"id": 1, "text": " General", "start": 61.25, "end": 3723.5},
        ],
        "language": "en",
        "input_length_ms": 4000,
    }
    assert render("srt", line) == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
        "2\n00:01:01,250 --> 01:02:03,500\nGeneral\n"
    )
    assert render("vtt", line).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n")
    assert render("txt", line) == "Hello there.\nGeneral\n"  # a line per segment
    assert json.loads(render("json", line))["segments"][1]["end"] == 3723.5


def test_fetch_never_writes_outside_the_output_directory() -> None:
    from app.client.cli import output_name

    assert str(output_name({"job_id": "j1", "source_name": "../../etc/passwd"})) == "j1"
    assert str(output_name({"job_id": "j2", "source_name": "/abs/x.wav"})) == "abs/x.wav"
    assert str(output_name({"job_id": "j3", "source_name": "C:\\x.wav"})) == "j3"
    assert str(output_name({"job_id": "j4", "source_name": "https://h/p/a.mp3"})) == "p/a.mp3"
    named = {"job_id": "j5", "source_name": "https://h/a.mp3", "custom_id": "row-5"}
    assert str(output_name(named)) == "row-5"


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_large_upload_is_streamed_not_held_in_memory(server: str, key: CreatedKey) -> None:
    """60 MiB of WAV through the real server: its peak memory grows by a small part of it."""
    samples = 60 * 2**20
    header = noise_wav(0.0)[:44]  # a 16 kHz mono 16-bit header; fix its two sizes
    header = header[:4] + (36 + samples).to_bytes(4, "little") + header[8:40]
    header += samples.to_bytes(4, "little")
    block = os.urandom(2**20)

    def body() -> Iterator[bytes]:
        yield header
        for _ in range(samples // len(block)):
            yield block

    pid = API_PIDS[server]
    before = peak_rss_kib(pid)
    boundary = "whisperq-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def multipart() -> Iterator[bytes]:
        yield head
        yield from body()
        yield tail

    r = httpx.post(
        server + "/v1/batches",
        headers={
            "Authorization": f"bearer {key.key}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        content=multipart(),
        timeout=120,
    )
    assert r.status_code == 201, r.text
    item = r.json()["inputs"][0]
    assert item["status"] == "queued"
    growth_mib = (peak_rss_kib(pid) - before) / 1024
    assert growth_mib < 20, f"the API's peak memory grew {growth_mib:.0f} MiB for a 60 MiB upload"
    with session_scope() as session:
        job = session.get(Job, item["job_id"])
        assert job is not None and job.input_length_ms == samples // 2 * 1000 // 16_000
    batch_id = r.json()["batch"]["id"]
    httpx.post(
        f"{server}/v1/batches/{batch_id}/cancel", headers={"Authorization": f"bearer {key.key}"}
    )


def test_a_rerun_uploads_nothing_twice(
    server: str, backlog: tuple[Path, list[str]], capsys: Any
) -> None:
    """No worker: uploaded, sealed, and the same command again finds everything accepted."""
    other = new_key("rerun")
    root, _ = backlog
    argv = ["submit", str(root / "team-3"), "--no-wait", "--chunk-files", "7"]
    argv += ["--url", server, "--api-key", other.key]
    assert cli_main(argv) == 0
    first = capsys.readouterr().err
    assert "0 already accepted, 100 to upload" in first, first
    assert cli_main(argv) == 0
    again = capsys.readouterr().err
    assert "100 already accepted, 0 to upload" in again, again
    batch_id = cli_batch(other)
    assert batch_id is not None
    assert sum(batch_job_counts(batch_id).values()) == 100
    # Another tag is another batch; the first is left as it was.
    assert cli_main([*argv, "--tag", "second"]) == 0
    assert "0 already accepted, 100 to upload" in capsys.readouterr().err
    with session_scope() as session:
        n = session.scalar(select(func.count()).where(Batch.api_key_id == other.row.id))
        assert n == 2
        ids = session.scalars(select(Batch.id).where(Batch.api_key_id == other.row.id)).all()
    for b in ids:  # nothing of this test is left for a later worker
        httpx.post(
            f"{server}/v1/batches/{b}/cancel", headers={"Authorization": f"bearer {other.key}"}
        )
