"""From what a batch request carried (uploaded files, URLs, a JSONL manifest) to checked
inputs: options parsed exactly as the single endpoint parses them, URLs through the same
SSRF guard, each manifest line's options over the batch's defaults."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.batch_upload import UploadedFile
from app.api.inference import OPTION_FIELDS
from app.errors import ServiceError
from app.infra.models import new_job_id
from app.jobs.batches import NewInput
from app.jobs.options import OptionError, parse_options
from app.jobs.submission import check_url
from app.settings import Settings

ID_MAX = 200
OptionValue = str | int | float | bool | None


class ManifestLine(BaseModel):
    """One input of a manifest: an uploaded file (by its part's filename) or a URL."""

    model_config = ConfigDict(extra="forbid")

    file: str | None = None
    url: str | None = None
    name: str | None = Field(default=None, max_length=1000)  # the source's name, for fetch
    custom_id: str | None = Field(default=None, max_length=ID_MAX)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=ID_MAX)
    options: dict[str, OptionValue] = Field(default_factory=dict)


def option_text(value: OptionValue) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_options(raw: Mapping[str, str | None], *, prefix: str = "") -> dict[str, Any]:
    """The single endpoint's validation; the error names the field (with ``prefix``)."""
    unknown = sorted(set(raw) - set(OPTION_FIELDS))
    if unknown:
        raise ServiceError(
            422, "invalid_option", f"unknown option {unknown[0]!r}", field=prefix + unknown[0]
        )
    try:
        return parse_options(dict(raw)).to_json()
    except OptionError as exc:
        raise ServiceError(422, "invalid_option", exc.message, field=prefix + exc.field) from None


# A non-blank line, as batch_upload counts them while the manifest streams in.
_LINE = re.compile(rb"[^ \t\n\r\x0b\x0c][^\n]*")


def parse_manifest(data: bytes) -> list[tuple[int, ManifestLine]]:
    """Each non-blank line with its 1-based line number (lines end at ``\\n`` only: JSON may
    hold a raw U+2028 that ``str.splitlines`` would split on). CPU-bound: run it in a
    worker thread."""
    lines: list[tuple[int, ManifestLine]] = []
    n, pos = 1, 0
    for m in _LINE.finditer(data):
        n += data.count(b"\n", pos, m.start())
        pos = m.start()
        where = f"manifest[{n}]"
        raw = m.group().decode("utf-8", "replace")
        try:
            line = ManifestLine.model_validate(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise ServiceError(
                422, "invalid_manifest", f"line {n}: not JSON ({exc.msg})", field=where
            ) from None
        except RecursionError:
            raise ServiceError(
                422, "invalid_manifest", f"line {n}: JSON nested too deeply", field=where
            ) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ServiceError(
                422, "invalid_manifest", f"line {n}: {first['msg']}", field=f"{where}.{loc}"
            ) from None
        if (line.file is None) == (line.url is None):
            raise ServiceError(
                422, "invalid_manifest", f"line {n}: give one of 'file' or 'url'", field=where
            )
        lines.append((n, line))
    return lines


async def build_inputs(
    *,
    files: Sequence[UploadedFile],
    lines: Sequence[tuple[int, ManifestLine]],
    urls: Sequence[str],
    defaults: Mapping[str, str],
    settings: Settings,
) -> list[NewInput]:
    """Manifest lines in order, then files no line names, then bare URLs. Each line comes
    with the number errors name it by (``manifest[n]``)."""
    named = {line.file for _, line in lines if line.file is not None}
    count = len(lines) + len(urls) + sum(1 for f in files if f.part_filename not in named)
    if count > settings.batch_max_inputs_per_request:
        raise ServiceError(
            413,
            "too_many_inputs",
            f"{count} inputs in one request; the limit is {settings.batch_max_inputs_per_request}",
        )
    by_name: dict[str, list[UploadedFile]] = {}
    for f in files:
        by_name.setdefault(f.part_filename, []).append(f)
    parsed: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}

    def options_for(extra: Mapping[str, OptionValue], prefix: str) -> dict[str, Any]:
        raw = {**defaults, **{k: option_text(v) for k, v in extra.items()}}
        cache_key = tuple(sorted(raw.items()))
        if cache_key not in parsed:  # a 20,000-line manifest usually repeats a few option sets
            parsed[cache_key] = check_options(raw, prefix=prefix)
        return parsed[cache_key]

    inputs: list[NewInput] = []
    used: set[str] = set()
    for n, line in lines:
        where = f"manifest[{n}]"
        opts = options_for(line.options, f"{where}.options.")
        if line.file is not None:
            matches = by_name.get(line.file, [])
            if len(matches) != 1:
                why = "was not uploaded" if not matches else "was uploaded more than once"
                raise ServiceError(
                    422,
                    "invalid_manifest",
                    f"line {n}: file {line.file!r} {why}",
                    field=f"{where}.file",
                )
            used.add(line.file)
            inputs.append(_file_input(matches[0], opts, line))
        else:
            assert line.url is not None
            url = await _checked_url(line.url, f"{where}.url", settings)
            inputs.append(_url_input(url, opts, line))
    for f in files:
        if f.part_filename not in used:
            inputs.append(_file_input(f, options_for({}, ""), None))
    for i, raw_url in enumerate(urls):
        url = await _checked_url(raw_url, f"url[{i}]", settings)
        inputs.append(_url_input(url, options_for({}, ""), None))
    return inputs


async def _checked_url(value: str, where: str, settings: Settings) -> str:
    text = value.strip()
    try:
        return await run_in_threadpool(
            check_url, text, field="audio_url", allowlist=settings.audio_url_allowlist
        )
    except ServiceError as exc:
        exc.field = where
        raise


def _file_input(f: UploadedFile, options: dict[str, Any], line: ManifestLine | None) -> NewInput:
    name = (line.name if line else None) or f.part_filename or None
    return NewInput(
        job_id=f.job_id,
        options=options,
        # A part's filename or a line's name may be longer than a custom_id may be.
        custom_id=(line.custom_id if line else None) or (name[:ID_MAX] if name else None),
        source_name=name,
        idempotency_key=line.idempotency_key if line else None,
        audio_blob=f.job_id,
        input_length_ms=f.input_length_ms,
        content_sha256=f.sha256,
        error_code=f.error_code,
        error_message=f.error_message,
    )


def _url_input(url: str, options: dict[str, Any], line: ManifestLine | None) -> NewInput:
    name = (line.name if line else None) or url
    return NewInput(
        job_id=new_job_id(),
        options=options,
        custom_id=(line.custom_id if line else None) or url[:ID_MAX],
        source_name=name,
        idempotency_key=line.idempotency_key if line else None,
        audio_url=url,
    )
