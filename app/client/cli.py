"""``whisperq submit``, ``fetch``, ``transcribe`` and ``job``: HTTP clients of a server.

``submit`` and ``fetch`` move a backlog as one batch; ``transcribe`` is the same upload for
a single file (a batch of one), then waits for its job; ``job`` shows one job.

``submit`` is resumable without local state: the batch's idempotency key is derived from
the command line (inputs, options, webhook), each file's key from its name and content
hash, and the server keeps both. A rerun finds the same batch, asks it which inputs it
already has, and uploads only the rest; a chunk the server accepted just before the client
died is answered as duplicates if sent again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from app.client.formats import FORMATS, TRANSCRIBE_FORMATS, render, render_transcript
from app.client.inputs import (
    batch_key,
    chunks,
    input_key,
    parse_options,
    resolve_inputs,
    sha256_file,
)
from app.client.sdk import Client, ClientError, Input

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

DEFAULT_URL = "http://127.0.0.1:8000"
CLIENT_COMMANDS = frozenset({"submit", "fetch", "transcribe", "job"})
POLL_S = 1.0
FINISHED = frozenset({"succeeded", "failed", "canceled"})
EXIT_NOT_FINISHED = 3  # `whisperq job`: neither success (0) nor failure (1) yet


def add_client_commands(sub: Any) -> None:
    """Register the client commands on ``whisperq``'s subcommand parser."""
    submit = sub.add_parser(
        "submit",
        help="upload files, globs or a JSONL manifest as one batch (resumable), watch it run",
    )
    submit.add_argument("inputs", nargs="+", metavar="DIR_OR_GLOB_OR_MANIFEST")
    submit.add_argument("--webhook", help="URL POSTed (signed) once when the batch ends")
    submit.add_argument(
        "--option", action="append", default=[], metavar="K=V", help="a decoding option"
    )
    submit.add_argument("--chunk-files", type=int, default=100, help="files per upload request")
    submit.add_argument("--chunk-mb", type=float, default=64.0, help="MB per upload request")
    submit.add_argument(
        "--no-wait",
        action="store_true",
        help="return once all is uploaded (no ETA: too early to know one)",
    )
    submit.add_argument(
        "--tag",
        default="",
        help="part of the batch's identity: the same inputs with another tag make a new batch"
        " (rerun with the same tag to resume)",
    )
    _connection_args(submit)
    submit.set_defaults(func=lambda a: _run(cmd_submit, a))

    fetch = sub.add_parser(
        "fetch", help="write a batch's transcripts under their source names, in a new folder"
    )
    fetch.add_argument("batch", help="the batch id `whisperq submit` printed")
    fetch.add_argument("--format", choices=FORMATS, default="txt", help="default: txt")
    fetch.add_argument(
        "-o",
        "--out",
        default=None,
        metavar="DIR",
        help="directory to write into (default: ./whisperq-BATCH, named after the batch id)",
    )
    _connection_args(fetch)
    fetch.set_defaults(func=lambda a: _run(cmd_fetch, a))

    transcribe = sub.add_parser(
        "transcribe",
        help="transcribe one file: upload it, wait, print the transcript",
        description="Upload one file (a batch of one, as `whisperq submit` does), wait for its"
        " job and print the transcript on stdout. With --no-wait, print the job id and return:"
        " `whisperq job ID` shows it later. No webhook needed. Running the same command again"
        " prints the same job's transcript rather than transcribing (and billing) it twice.",
    )
    transcribe.add_argument("file", metavar="FILE_OR_URL")
    transcribe.add_argument(
        "--format", choices=TRANSCRIBE_FORMATS, default="text", help="default: text"
    )
    transcribe.add_argument(
        "--option", action="append", default=[], metavar="K=V", help="a decoding option"
    )
    transcribe.add_argument(
        "--no-wait", action="store_true", help="print the job id and return; poll `whisperq job`"
    )
    transcribe.add_argument(
        "--tag",
        default="",
        help="any new value transcribes again (the same command prints the earlier job)",
    )
    _connection_args(transcribe)
    transcribe.set_defaults(func=lambda a: _run(cmd_transcribe, a))

    job = sub.add_parser(
        "job",
        help="show a job: its status, and its transcript once it succeeded",
        description="Print the job's status on stderr and, once it succeeded, its transcript"
        f" on stdout. Exit status: 0 succeeded, 1 failed or canceled, {EXIT_NOT_FINISHED}"
        " still queued or running (poll again, or pass --wait).",
    )
    job.add_argument("job_id", metavar="JOB_ID")
    job.add_argument("--format", choices=TRANSCRIBE_FORMATS, default="text", help="default: text")
    job.add_argument("--wait", action="store_true", help="wait until the job has finished")
    _connection_args(job)
    job.set_defaults(func=lambda a: _run(cmd_job, a))


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help=f"server (env WHISPERQ_URL; {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None, help="API key (env WHISPERQ_API_KEY)")


def _run(command: Any, args: argparse.Namespace) -> int:
    """User mistakes and network trouble: one clear line, no traceback."""
    try:
        return int(command(args))
    except ClientError as exc:
        print(f"whisperq: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("whisperq: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _client(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get("WHISPERQ_URL") or DEFAULT_URL
    key = args.api_key or os.environ.get("WHISPERQ_API_KEY")
    if not key:
        raise ClientError("no API key: pass --api-key or set WHISPERQ_API_KEY")
    if urlsplit(url).scheme not in ("http", "https"):
        raise ClientError(f"--url {url!r} is not an http(s) URL")
    return Client(url, key)


class RateEstimator:
    """An ETA from the rate work finished at over the last ``window_s`` seconds of polls.

    The server's ``eta_seconds`` divides by the rate since the batch's first job started:
    the first few jobs (short clips, a warm worker) make it wildly optimistic, and its
    swings follow whichever jobs happened to finish last. A window of what this client saw
    finish follows the real throughput, and it says nothing (None) until it has seen enough
    finish: ``min_jobs`` jobs over at least ``min_span_s`` seconds.
    """

    def __init__(
        self, *, window_s: float = 120.0, min_span_s: float = 20.0, min_jobs: int = 3
    ) -> None:
        self.window_s = window_s
        self.min_span_s = min_span_s
        self.min_jobs = min_jobs
        self._points: deque[tuple[float, float, int]] = deque()

    def add(self, t: float, done: float, jobs_done: int) -> None:
        """One observation: at time ``t`` (seconds), ``done`` units of work (audio seconds,
        or jobs) and ``jobs_done`` jobs had finished."""
        if self._points and t <= self._points[-1][0]:
            self._points.pop()  # a newer reading of the same instant
        self._points.append((t, done, jobs_done))
        # The oldest point kept is the last one at or before the window's start, so the
        # rate spans the whole window rather than whatever part of it polls happened to hit.
        while len(self._points) > 2 and self._points[1][0] <= t - self.window_s:
            self._points.popleft()

    def eta(self, remaining: float) -> float | None:
        if remaining <= 0:
            return 0.0
        if len(self._points) < 2:
            return None
        t0, done0, jobs0 = self._points[0]
        t1, done1, jobs1 = self._points[-1]
        if t1 - t0 < self.min_span_s or jobs1 - jobs0 < self.min_jobs or done1 <= done0:
            return None
        return remaining * (t1 - t0) / (done1 - done0)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA --"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}:{minutes:02d}:{secs:02d}" if hours else f"ETA {minutes}:{secs:02d}"


def describe(batch: dict[str, Any]) -> str:
    return (
        f"{_hours(batch['audio_seconds_done'])} of {_hours(batch['audio_seconds_total'])} audio"
        f" · ${batch['cost']:.4f}"
    )


def _jobs_done(batch: dict[str, Any]) -> int:
    counts = batch["counts"]
    return int(counts["succeeded"] + counts["failed"] + counts["canceled"])


class _Watch:
    """The ``jobs done`` bar: counts and audio from the server, the ETA from the client's
    own window of observations (``estimator`` None: no ETA at all)."""

    def __init__(
        self, progress: Progress, task: TaskID, estimator: RateEstimator | None, by_audio: bool
    ) -> None:
        self.progress = progress
        self.task = task
        self.estimator = estimator
        self.by_audio = by_audio

    def show(self, batch: dict[str, Any]) -> None:
        counts = batch["counts"]
        done = _jobs_done(batch)
        info = describe(batch)
        if self.estimator is not None:
            if self.by_audio:
                # Every input is a local file: lengths are known once uploaded.
                finished, total = batch["audio_seconds_done"], batch["audio_seconds_total"]
            else:  # URL inputs: lengths unknown until fetched, so count jobs
                finished, total = done, counts["total"] - counts["canceled"]
            self.estimator.add(time.monotonic(), finished, done)
            # While inputs are still being added the total is not known yet.
            eta = None if batch["status"] == "open" else self.estimator.eta(total - finished)
            info += " · " + eta_text(eta)
        self.progress.update(self.task, completed=done, total=counts["total"] or None, info=info)


def _open_batch(
    client: Client,
    inputs: Sequence[Input],
    *,
    idempotency_key: str,
    options: dict[str, str],
    webhook: str | None,
) -> tuple[dict[str, Any], list[Input]]:
    """The batch (created, or found on a rerun) and the inputs the server still lacks."""
    batch, existed = client.create_batch(
        idempotency_key=idempotency_key, options=options, webhook=webhook
    )
    have = client.accepted_keys(batch["id"]) if existed else set()
    todo = [i for i in inputs if i.idempotency_key not in have]
    if todo and batch["status"] != "open":
        raise ClientError(
            f"batch {batch['id']} from an earlier run of this command is {batch['status']}"
            f" and lacks {len(todo)} of these inputs; pass --tag NAME for a new batch"
        )
    return batch, todo


def _send(
    client: Client,
    batch: dict[str, Any],
    chunked: Iterator[list[Input]],
    on_chunk: Callable[[Sequence[Input], dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Upload the chunks, then seal: the batch as the server has it afterwards."""
    for chunk in chunked:
        answer = client.add_inputs(batch["id"], chunk)
        if on_chunk is not None:
            on_chunk(chunk, answer["batch"])
    return client.seal(batch["id"]) if batch["status"] == "open" else batch


def cmd_submit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if args.chunk_files < 1 or args.chunk_mb <= 0:
        raise ClientError("--chunk-files and --chunk-mb must be positive")
    options = parse_options(args.option)
    inputs = resolve_inputs(args.inputs)
    console = Console(stderr=True, soft_wrap=True)
    columns = (
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
    )
    by_audio = all(i.path is not None for i in inputs)
    with _client(args) as client:
        # Before any progress bar: a refused option or webhook is one line, nothing else.
        batch, todo = _open_batch(
            client,
            inputs,
            idempotency_key=batch_key(args, options),
            options=options,
            webhook=args.webhook,
        )
        batch_id = batch["id"]
        console.print(
            f"batch {batch_id}: {len(inputs)} inputs, {len(inputs) - len(todo)} already"
            f" accepted, {len(todo)} to upload"
        )
        with Progress(*columns, console=console) as progress:
            uploaded = progress.add_task("uploaded", total=len(inputs), info="")
            jobs = progress.add_task("jobs done", total=len(inputs), info="")
            progress.update(uploaded, completed=len(inputs) - len(todo))
            # With --no-wait the client leaves before it could observe any rate: no ETA
            # rather than one made of the first few jobs.
            watch = _Watch(progress, jobs, None if args.no_wait else RateEstimator(), by_audio)
            sent = [0]

            def on_chunk(chunk: Sequence[Input], answer: dict[str, Any]) -> None:
                sent[0] += sum(i.size for i in chunk)
                info = f"{sent[0] / 2**20:.1f} MB sent"
                progress.update(uploaded, advance=len(chunk), info=info)
                watch.show(answer)

            chunked = chunks(todo, max_files=args.chunk_files, max_bytes=int(args.chunk_mb * 2**20))
            batch = _send(client, batch, chunked, on_chunk)
            watch.show(batch)
            if args.no_wait:
                progress.stop()
                console.print(f"batch {batch_id} uploaded; `whisperq fetch {batch_id}` when done")
                return 0
            while batch["finished_at"] is None:
                time.sleep(POLL_S)
                batch = client.batch(batch_id)
                watch.show(batch)
    counts = batch["counts"]
    console.print(
        f"batch {batch_id} {batch['status']}: {counts['succeeded']} succeeded,"
        f" {counts['failed']} failed, {counts['canceled']} canceled; {describe(batch)}"
    )
    return 0 if counts["succeeded"] == counts["total"] else 1


# ---- transcribe, job ---------------------------------------------------------------------


def _single_input(arg: str, options: dict[str, str]) -> Input:
    opt_text = json.dumps(options, sort_keys=True)
    if urlsplit(arg).scheme in ("http", "https"):
        return Input(name=arg, url=arg, idempotency_key=input_key("url", arg, opt_text))
    path = Path(arg)
    if not path.is_file():
        raise ClientError(f"{arg}: no such file")
    return Input(
        name=path.name,
        path=path,
        size=path.stat().st_size,
        idempotency_key=input_key("file", path.name, sha256_file(path)),
    )


def _status_line(job: dict[str, Any]) -> str:
    line = f"job {job['request_id']}: {job['status']}"
    error = job.get("error") or {}
    if job.get("deleted_at"):
        line += " (its transcript was deleted)"
    elif error:
        line += f" ({error.get('code')}: {error.get('message')})"
    return line


def _print_job(job: dict[str, Any], fmt: str) -> int:
    """The transcript on stdout (what a script pipes on), everything else on stderr."""
    if job["status"] == "succeeded" and job.get("results"):
        line = {**job["results"], "task": (job.get("options") or {}).get("task")}
        sys.stdout.write(render_transcript(fmt, line))
        return 0
    print(_status_line(job), file=sys.stderr)
    return 1 if job["status"] in FINISHED else EXIT_NOT_FINISHED


def _wait_job(client: Client, job_id: str) -> dict[str, Any]:
    job = client.job(job_id)
    while job["status"] not in FINISHED:
        time.sleep(POLL_S)
        job = client.job(job_id)
    return job


def cmd_transcribe(args: argparse.Namespace) -> int:
    options = parse_options(args.option)
    item = _single_input(args.file, options)
    spec = {"input": item.idempotency_key, "options": options, "tag": args.tag}
    key = "cli-transcribe-" + input_key(json.dumps(spec, sort_keys=True))[:40]
    with _client(args) as client:
        batch, todo = _open_batch(
            client, [item], idempotency_key=key, options=options, webhook=None
        )
        batch = _send(client, batch, iter([todo] if todo else []))
        job_id = next(client.inputs(batch["id"]))["job_id"]
        if args.no_wait:
            print(job_id)
            print(
                f"queued; `whisperq job {job_id}` shows it (and its transcript once done)",
                file=sys.stderr,
            )
            return 0
        return _print_job(_wait_job(client, job_id), args.format)


def cmd_job(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _wait_job(client, args.job_id) if args.wait else client.job(args.job_id)
    return _print_job(job, args.format)


# ---- fetch -------------------------------------------------------------------------------


def output_name(line: dict[str, Any]) -> PurePosixPath:
    """A relative path inside --out: the source's name, never outside the directory."""
    name = line.get("source_name") or line.get("custom_id") or ""
    if "://" in name:  # a URL input: its custom id, else the last part of its path
        custom = line.get("custom_id") or ""
        name = custom if custom and "://" not in custom else urlsplit(name).path
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", ".")]
    if not parts or ".." in parts or any(":" in p for p in parts[:1]):
        return PurePosixPath(line["job_id"])
    return PurePosixPath(*parts)


def cmd_fetch(args: argparse.Namespace) -> int:
    # A folder of its own by default: transcripts never land among the user's files.
    out = Path(args.out if args.out is not None else f"whisperq-{args.batch}")
    written = 0
    problems: list[str] = []
    taken: set[Path] = set()
    with _client(args) as client:
        for line in client.results(args.batch):
            name = output_name(line)
            if line["status"] != "succeeded":
                error = line.get("error") or {}
                problems.append(f"{name}: {line['status']} {error.get('code') or ''}".rstrip())
                continue
            target = out / name.with_suffix(f".{args.format}")
            if target in taken:  # two sources with the same stem (a.wav, a.mp3)
                target = out / name.with_name(f"{name.name}.{args.format}")
            taken.add(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(render(args.format, line), encoding="utf-8")
            written += 1
    print(f"wrote {written} {args.format} transcripts under {out}")
    for problem in problems[:20]:
        print(f"  not written: {problem}", file=sys.stderr)
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more", file=sys.stderr)
    return 0 if not problems else 1
