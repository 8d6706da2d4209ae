"""``whisperq submit`` and ``whisperq fetch``: a backlog as one batch, over HTTP.

``submit`` is resumable without local state: the batch's idempotency key is derived from
the command line (inputs, options, webhook), each file's key from its name and content
hash, and the server keeps both. A rerun finds the same batch, asks it which inputs it
already has, and uploads only the rest; a chunk the server accepted just before the client
died is answered as duplicates if sent again.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from app.client import Client, ClientError, Input
from app.client_formats import FORMATS, render

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

DEFAULT_URL = "http://127.0.0.1:8000"
AUDIO_SUFFIXES = frozenset(
    [
        ".wav",
        ".mp3",
        ".m4a",
        ".flac",
        ".ogg",
        ".oga",
        ".opus",
        ".webm",
        ".mp4",
        ".mpeg",
        ".mpga",
        ".aac",
        ".wma",
        ".amr",
        ".mkv",
        ".mov",
    ]
)
GLOB_CHARS = frozenset("*?[")
POLL_S = 1.0


def add_client_commands(sub: Any) -> None:
    """Register ``submit`` and ``fetch`` on ``whisperq``'s subcommand parser."""
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
    submit.add_argument("--no-wait", action="store_true", help="return once all is uploaded")
    submit.add_argument(
        "--tag",
        default="",
        help="part of the batch's identity: the same inputs with another tag make a new batch"
        " (rerun with the same tag to resume)",
    )
    _connection_args(submit)
    submit.set_defaults(func=lambda a: _run(cmd_submit, a))

    fetch = sub.add_parser("fetch", help="write a batch's transcripts next to their source names")
    fetch.add_argument("batch")
    fetch.add_argument("--format", choices=FORMATS, default="txt")
    fetch.add_argument("--out", default=".", help="directory to write into")
    _connection_args(fetch)
    fetch.set_defaults(func=lambda a: _run(cmd_fetch, a))


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


# ---- inputs ------------------------------------------------------------------------------


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            raise ClientError(f"--option {pair!r}: expected NAME=VALUE, e.g. language=en")
        options[name.strip()] = value.strip()
    return options


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if set(p) & GLOB_CHARS)]]
    return Path(*fixed) if fixed else Path(".")


def _files_of(arg: str) -> tuple[Path, list[Path]]:
    """(the base names are relative to, files) for a directory, glob or single file."""
    path = Path(arg)
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
        )
        if not found:
            raise ClientError(f"{arg}: no audio files in this directory")
        return path, found
    if set(arg) & GLOB_CHARS:
        found = sorted(Path(p) for p in glob.glob(arg, recursive=True) if Path(p).is_file())
        if not found:
            raise ClientError(f"{arg}: the pattern matches no file")
        return _glob_base(arg), found
    if path.is_file():
        return path.parent, [path]
    raise ClientError(f"{arg}: no such file, directory or pattern")


def _manifest_inputs(path: Path) -> Iterator[Input]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientError(f"{path}: cannot read the manifest ({exc})") from None
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            if not isinstance(line, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise ClientError(f"{path}:{n}: not a JSON object ({exc})") from None
        options = line.get("options") or {}
        custom_id = line.get("custom_id")
        opt_text = json.dumps(options, sort_keys=True)
        if line.get("url"):
            url = str(line["url"])
            name = str(line.get("name") or custom_id or url)
            yield Input(
                name=name,
                url=url,
                custom_id=custom_id,
                options=options,
                idempotency_key=_key("url", str(custom_id), url, opt_text),
            )
            continue
        rel = line.get("path") or line.get("file")
        if not rel:
            raise ClientError(f"{path}:{n}: give 'path' (a local file) or 'url'")
        source = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        if not source.is_file():
            raise ClientError(f"{path}:{n}: {rel}: no such file")
        name = str(line.get("name") or PurePosixPath(Path(rel).as_posix()))
        yield Input(
            name=name,
            path=source,
            custom_id=custom_id,
            options=options,
            size=source.stat().st_size,
            idempotency_key=_key("file", name, str(custom_id), opt_text, sha256_file(source)),
        )


def resolve_inputs(args: Sequence[str]) -> list[Input]:
    inputs: list[Input] = []
    for arg in args:
        if arg.endswith((".jsonl", ".ndjson")) and Path(arg).is_file():
            inputs.extend(_manifest_inputs(Path(arg)))
            continue
        base, files = _files_of(arg)
        for path in files:
            name = path.relative_to(base).as_posix() if base != path.parent else path.name
            inputs.append(
                Input(
                    name=name,
                    path=path,
                    size=path.stat().st_size,
                    idempotency_key=_key("file", name, sha256_file(path)),
                )
            )
    seen: dict[str, Input] = {}
    for item in inputs:
        first = seen.get(item.name)
        if first is not None:
            raise ClientError(
                f"two inputs are both named {item.name!r} ({first.path or first.url}"
                f" and {item.path or item.url}); submit them separately"
            )
        seen[item.name] = item
    return inputs


def batch_key(args: argparse.Namespace, options: dict[str, str]) -> str:
    """Same command line, same batch: what makes a rerun resume instead of duplicate."""
    spec = {
        "inputs": [str(Path(a).resolve()) if not set(a) & GLOB_CHARS else a for a in args.inputs],
        "cwd": os.getcwd(),
        "options": options,
        "webhook": args.webhook,
        "tag": args.tag,
    }
    return "cli-" + _key(json.dumps(spec, sort_keys=True))[:48]


def chunks(inputs: Sequence[Input], *, max_files: int, max_bytes: int) -> Iterator[list[Input]]:
    chunk: list[Input] = []
    size = 0
    for item in inputs:
        if chunk and (len(chunk) >= max_files or size + item.size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item.size
    if chunk:
        yield chunk


# ---- submit ------------------------------------------------------------------------------


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA -"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}:{minutes:02d}:{secs:02d}" if hours else f"ETA {minutes}:{secs:02d}"


def describe(batch: dict[str, Any]) -> str:
    return (
        f"{_hours(batch['audio_seconds_done'])} of {_hours(batch['audio_seconds_total'])} audio"
        f" · ${batch['cost']:.4f} · {_eta(batch['eta_seconds'])}"
    )


def _show(progress: Progress, task: TaskID, batch: dict[str, Any]) -> None:
    counts = batch["counts"]
    done = counts["succeeded"] + counts["failed"] + counts["canceled"]
    progress.update(task, completed=done, total=counts["total"] or None, info=describe(batch))


def cmd_submit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if args.chunk_files < 1 or args.chunk_mb <= 0:
        raise ClientError("--chunk-files and --chunk-mb must be positive")
    options = parse_options(args.option)
    inputs = resolve_inputs(args.inputs)
    console = Console(stderr=True, soft_wrap=True)
    with _client(args) as client:
        batch, existed = client.create_batch(
            idempotency_key=batch_key(args, options), options=options, webhook=args.webhook
        )
        batch_id = batch["id"]
        have = client.accepted_keys(batch_id) if existed else set()
        todo = [i for i in inputs if i.idempotency_key not in have]
        if todo and batch["status"] != "open":
            raise ClientError(
                f"batch {batch_id} from an earlier run of this command is {batch['status']}"
                f" and lacks {len(todo)} of these inputs; pass --tag NAME for a new batch"
            )
        console.print(
            f"batch {batch_id}: {len(inputs)} inputs, {len(inputs) - len(todo)} already"
            f" accepted, {len(todo)} to upload"
        )
        columns = (
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, console=console) as progress:
            uploaded = progress.add_task("uploaded", total=len(inputs), info="")
            jobs = progress.add_task("jobs done", total=len(inputs), info="")
            progress.update(uploaded, completed=len(inputs) - len(todo))
            sent_bytes = 0
            for chunk in chunks(
                todo, max_files=args.chunk_files, max_bytes=int(args.chunk_mb * 2**20)
            ):
                answer = client.add_inputs(batch_id, chunk)
                sent_bytes += sum(i.size for i in chunk)
                progress.update(
                    uploaded, advance=len(chunk), info=f"{sent_bytes / 2**20:.1f} MB sent"
                )
                _show(progress, jobs, answer["batch"])
            if batch["status"] == "open":
                batch = client.seal(batch_id)
            _show(progress, jobs, batch)
            if args.no_wait:
                progress.stop()
                console.print(f"batch {batch_id} uploaded; `whisperq fetch {batch_id}` when done")
                return 0
            while batch["finished_at"] is None:
                time.sleep(POLL_S)
                batch = client.batch(batch_id)
                _show(progress, jobs, batch)
    counts = batch["counts"]
    console.print(
        f"batch {batch_id} {batch['status']}: {counts['succeeded']} succeeded,"
        f" {counts['failed']} failed, {counts['canceled']} canceled; {describe(batch)}"
    )
    return 0 if counts["succeeded"] == counts["total"] else 1


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
    out = Path(args.out)
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
