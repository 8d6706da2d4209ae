"""What ``whisperq submit`` and ``transcribe`` send: files, directories, globs and JSONL
manifests resolved to inputs, each with a key made from its name and content (the server
keeps it, so a rerun uploads nothing twice), in upload-sized chunks."""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from app.client.sdk import ClientError, Input

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


def input_key(*parts: str) -> str:
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
                idempotency_key=input_key("url", str(custom_id), url, opt_text),
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
            idempotency_key=input_key("file", name, str(custom_id), opt_text, sha256_file(source)),
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
                    idempotency_key=input_key("file", name, sha256_file(path)),
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
    return "cli-" + input_key(json.dumps(spec, sort_keys=True))[:48]


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
