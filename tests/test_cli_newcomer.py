"""A new user's first hour with the client CLI, against a real API server, Postgres, Redis
and a worker: one file transcribed and printed, a job submitted without waiting (and without
a webhook) then polled, an honest ETA, ``fetch`` writing into a folder of its own, help text
without RST markup, and canceled jobs in ``whisperq usage``."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.cli import build_parser
from app.cli import main as cli_main
from app.client.cli import RateEstimator
from app.client.sdk import Client, Input
from app.infra.db import session_scope
from app.infra.models import Job, JobStatus
from app.jobs.keys import CreatedKey
from tests.support.api import new_key, noise_wav
from tests.support.services import WorkerProcess
from tests.test_cli_submit import batch_job_counts, cli_batch, quick_checkpoint
from tests.test_cli_submit import server as server  # a fixture
from tests.test_usage import finished_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    folder = tmp_path_factory.mktemp("worker")
    proc = WorkerProcess(model=quick_checkpoint(folder / "quick.pt"), log_path=folder / "log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("newcomer")


def run(server: str, key: CreatedKey, *argv: str) -> int:
    return cli_main([*argv, "--url", server, "--api-key", key.key])


def stored_job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


# ---- ETA -----------------------------------------------------------------------------------


def test_eta_is_unknown_until_enough_has_finished() -> None:
    est = RateEstimator(window_s=120, min_span_s=20, min_jobs=3)
    assert est.eta(100.0) is None  # nothing seen
    est.add(0.0, 0.0, 0)
    assert est.eta(100.0) is None
    # A warm worker finishes ten short clips in five seconds: too short a look to say.
    est.add(5.0, 20.0, 10)
    assert est.eta(200.0) is None
    est.add(30.0, 40.0, 14)
    assert est.eta(200.0) == pytest.approx(200.0 * 30.0 / 40.0)
    assert est.eta(0.0) == 0.0  # nothing left: done, whatever the rate

    # A minute, but only two long files done: a rate over two jobs is no estimate either.
    slow = RateEstimator(window_s=120, min_span_s=20, min_jobs=3)
    slow.add(0.0, 0.0, 0)
    slow.add(60.0, 1800.0, 2)
    assert slow.eta(3600.0) is None
    slow.add(90.0, 2700.0, 3)
    assert slow.eta(3600.0) == pytest.approx(120.0)


def test_eta_follows_the_recent_rate_not_the_first_jobs() -> None:
    """A burst at the start (the batch's shortest clips, a warm worker) then a steady 0.5
    audio seconds per second: the rate since the first job would promise 85 % more than the
    worker delivers; the window's rate is the steady one."""
    est = RateEstimator(window_s=120, min_span_s=20, min_jobs=3)
    est.add(0.0, 0.0, 0)
    est.add(2.0, 150.0, 10)  # the burst
    for t in range(3, 301):
        est.add(float(t), 150.0 + 0.5 * (t - 2), 10 + (t - 2) // 4)
    assert est.eta(60.0) == pytest.approx(120.0)
    # A stall as long as the window: no progress seen, so no estimate (not "ETA 0:00").
    for t in range(301, 430):
        est.add(float(t), 150.0 + 0.5 * 298, 10 + 298 // 4)
    assert est.eta(60.0) is None


def test_submit_no_wait_prints_no_eta_it_cannot_know(
    server: str,
    worker: WorkerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first chunk's jobs finish before the second chunk is sent (the case that printed
    'ETA 0:01' for a batch of minutes): --no-wait still prints no ETA."""
    user = new_key("no-wait")
    for n in range(6):
        (tmp_path / f"clip-{n}.wav").write_bytes(noise_wav(0.25, seed=300 + n))
    real_add = Client.add_inputs

    def add_then_let_them_finish(
        self: Client, batch_id: str, inputs: Sequence[Input]
    ) -> dict[str, Any]:
        answer = real_add(self, batch_id, inputs)
        deadline = time.monotonic() + 120
        while sum(batch_job_counts(batch_id).get(s, 0) for s in ("succeeded", "failed")) < 3:
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.2)
        return answer

    monkeypatch.setattr(Client, "add_inputs", add_then_let_them_finish)
    assert run(server, user, "submit", str(tmp_path), "--no-wait", "--chunk-files", "3") == 0
    err = capsys.readouterr().err
    batch_id = cli_batch(user)
    assert batch_id is not None and f"batch {batch_id} uploaded" in err, err
    assert "ETA" not in err, err


# ---- transcribe, job ---------------------------------------------------------------------


def test_transcribe_one_file_prints_its_transcript(
    server: str,
    worker: WorkerProcess,
    key: CreatedKey,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clip = tmp_path / "meeting.wav"
    clip.write_bytes(noise_wav(0.5, seed=11))
    assert run(server, key, "transcribe", str(clip)) == 0, worker.log()
    text_out = capsys.readouterr().out
    with session_scope() as session:
        jobs = session.scalars(select(Job).where(Job.api_key_id == key.row.id)).all()
        assert len(jobs) == 1 and jobs[0].status == JobStatus.succeeded
        job_id, result = jobs[0].id, jobs[0].result
    assert result is not None
    assert text_out == str(result["text"]).strip() + "\n"

    # Again, in another format: the same job is printed, nothing is transcribed twice.
    assert run(server, key, "transcribe", str(clip), "--format", "verbose_json") == 0
    body = json.loads(capsys.readouterr().out)
    assert body["text"] == str(result["text"]).strip() and body["task"] == "transcribe"
    assert body["duration"] == 0.5 and len(body["segments"]) == len(result["segments"])
    assert run(server, key, "job", job_id, "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == {"text": str(result["text"]).strip()}
    with session_scope() as session:
        assert len(session.scalars(select(Job.id).where(Job.api_key_id == key.row.id)).all()) == 1


def test_transcribe_no_wait_then_poll_the_job(
    server: str,
    worker: WorkerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No webhook anywhere: the job id on stdout, then `whisperq job ID` until it is done."""
    user = new_key("poller")
    clip = tmp_path / "call.wav"
    clip.write_bytes(noise_wav(0.5, seed=12))
    worker.pause()  # the job stays queued while we look at it
    try:
        assert run(server, user, "transcribe", str(clip), "--no-wait") == 0
        out, err = capsys.readouterr()
        job_id = out.strip()
        assert re.fullmatch(r"[0-9a-f]{32}", job_id), out
        assert f"whisperq job {job_id}" in err
        assert run(server, user, "job", job_id) == 3
        out, err = capsys.readouterr()
        assert out == "" and err == f"job {job_id}: queued\n"
    finally:
        worker.resume()
    assert run(server, user, "job", job_id, "--wait", "--format", "srt") == 0, worker.log()
    job = stored_job(job_id)
    assert job.result is not None
    srt = capsys.readouterr().out
    if job.result["segments"]:
        assert srt.startswith("1\n00:00:")
    assert run(server, user, "job", "0" * 32) == 1
    assert "(job_not_found)" in capsys.readouterr().err


# ---- fetch -------------------------------------------------------------------------------


def test_fetch_writes_into_a_folder_named_after_the_batch(
    server: str,
    worker: WorkerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    user = new_key("fetcher")
    source = tmp_path / "calls"
    source.mkdir()
    for n in range(2):
        (source / f"c{n}.wav").write_bytes(noise_wav(0.25, seed=400 + n))
    assert run(server, user, "submit", str(source)) == 0, worker.log()
    batch_id = cli_batch(user)
    assert batch_id is not None
    work = tmp_path / "here"
    work.mkdir()
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert run(server, user, "fetch", batch_id) == 0
    assert f"under whisperq-{batch_id}" in capsys.readouterr().out
    assert sorted(p.name for p in work.iterdir()) == [f"whisperq-{batch_id}"]
    assert sorted(p.name for p in (work / f"whisperq-{batch_id}").iterdir()) == [
        "c0.txt",
        "c1.txt",
    ]
    assert run(server, user, "fetch", batch_id, "-o", "elsewhere", "--format", "vtt") == 0
    assert sorted(p.name for p in (work / "elsewhere").iterdir()) == ["c0.vtt", "c1.vtt"]


# ---- help, usage ------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_no_help_text_shows_rst_markup() -> None:
    parsers = list(_parsers(build_parser()))
    names = {p.prog for p in parsers}
    assert {"whisperq transcribe", "whisperq job", "whisperq fetch"} <= names
    for parser in parsers:
        text = parser.format_help()
        assert "``" not in text and ":func:" not in text and ".. " not in text, text
    fetch_help = next(p for p in parsers if p.prog == "whisperq fetch").format_help()
    assert "default: ./whisperq-BATCH" in " ".join(fetch_help.split())


def test_usage_shows_canceled_jobs_and_what_they_cost(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A job canceled while it ran is billed for the model time it used; one canceled while
    queued costs nothing."""
    user = new_key("usage-canceled")
    day = datetime(2026, 5, 20, 12, tzinfo=UTC)
    finished_job(user, at=day, audio_ms=3000, runtime_ms=300)
    finished_job(user, at=day, status=JobStatus.canceled, audio_ms=9000, runtime_ms=200)
    finished_job(user, at=day, status=JobStatus.canceled, audio_ms=5000, runtime_ms=0)
    capsys.readouterr()
    assert cli_main(["usage", "--from", "2026-05-20", "--to", "2026-05-20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    mine = next(x.split() for x in lines if x.startswith(user.row.prefix))
    row = dict(zip(header, mine, strict=True))
    assert (row["jobs"], row["ok"], row["failed"], row["canceled"]) == ("3", "1", "0", "2")
    assert (row["cost_usd"], row["canceled_usd"]) == ("0.000250", "0.000100")
    last = next(x.split() for x in lines if x.startswith("total"))
    total = dict(zip(["key", *header[2:]], last, strict=True))  # no name on this row
    assert total["canceled"] == "2" and total["canceled_usd"] == "0.000100"
