"""Reading a batch upload: multipart parsed as it arrives, each file streamed into the blob
store (hashed and size-checked on the way), never held in memory whole.

Starlette's ``request.form()`` would spool every file to a temporary file first and keep all
of them until the request ends; here a file goes straight to its blob and is probed as soon
as its part ends. No database session is open while this runs.

What is held in memory is bounded while the body streams in, the way app/api/uploads.py bounds a
single submission (a ``LimitError`` with ``Connection: close``, so the server stops reading
instead of draining the rest): the manifest and URL fields together within
``batch_max_manifest_bytes``, each of their lines within ``MAX_LINE_BYTES``, their lines and
the file parts each within ``batch_max_inputs_per_request``, other fields within
``MAX_FIELD_BYTES`` each and ``MAX_FORM_FIELDS`` in number, part headers within
``MAX_FIELD_BYTES``. A body that passes any of these is refused at that chunk.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from io import BufferedWriter
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.multipart import MultipartParser, parse_options_header

from app.api.uploads import MAX_FORM_FIELDS
from app.errors import ServiceError
from app.infra import blobs
from app.infra.models import new_job_id
from app.jobs.limits import LimitError
from app.jobs.submission import probe_and_store
from app.settings import Settings

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FILE_FIELDS = frozenset({"file", "files", "audio"})
MANIFEST_FIELD = "manifest"
URL_FIELDS = frozenset({"url", "urls"})
MAX_FIELD_BYTES = 64 * 1024  # an ordinary text field (an option, a URL, the webhook)
# An honest manifest line is under 64 KiB even fully \u-escaped (a 2,048-char URL, a
# 1,000-char name, a 2,000-char prompt); the bound keeps each json.loads short, so the
# parsing thread never holds the GIL long enough to stall the event loop.
MAX_LINE_BYTES = 256 * 1024
# A non-blank stretch of a line: bytes.strip()'s whitespace, so counts agree with parsing.
_CONTENT = re.compile(rb"[^ \t\n\r\x0b\x0c][^\n]*")


@dataclass(frozen=True)
class UploadedFile:
    part_filename: str
    job_id: str  # also its blob's name
    size: int
    sha256: str
    input_length_ms: int | None
    error_code: str | None = None  # the file is unusable: its job will be born failed
    error_message: str | None = None


@dataclass
class BatchForm:
    fields: dict[str, list[str]] = field(default_factory=dict)
    manifest: bytes | None = None
    files: list[UploadedFile] = field(default_factory=list)
    manifest_parts: int = 0
    text_bytes: int = 0  # manifest and URL fields, all parts together
    text_lines: int = 0  # their non-blank lines: one input each
    other_fields: int = 0

    def blob_names(self) -> list[str]:
        return [f.job_id for f in self.files if f.error_code is None]

    def discard(self) -> None:
        for name in self.blob_names():
            blobs.delete_blob(name)


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    text: bytearray = field(default_factory=bytearray)
    job_id: str = ""
    sink: BufferedWriter | None = None
    tmp: Path | None = None
    size: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    too_large: bool = False
    line_open: bool = False  # the last chunk ended inside a non-blank line
    line_bytes: int = 0  # of that line so far


def _new_lines(part: _Part, data: bytes) -> int:
    """Non-blank lines begun in ``data``, a chunk of a manifest or URL field: counted by
    C-speed scans (a field of blank lines costs no Python loop), each line's length bounded
    across chunks."""
    pos = 0
    if part.line_open:
        nl = data.find(b"\n")
        part.line_bytes += len(data) if nl < 0 else nl
        _check_line(part.line_bytes, part.name)
        if nl < 0:
            return 0
        part.line_open = False
        pos = nl + 1
    new = 0
    for m in _CONTENT.finditer(data, pos):
        new += 1
        part.line_bytes = m.end() - m.start()
        _check_line(part.line_bytes, part.name)
        part.line_open = m.end() == len(data)
    return new


def _check_line(size: int, where: str) -> None:
    if size > MAX_LINE_BYTES:
        raise _limit("field_too_large", f"a line of {where!r} over {MAX_LINE_BYTES} bytes", where)


def _limit(code: str, message: str, where: str | None) -> LimitError:
    # Connection: close, or the server would drain (read and discard) the rest of the body.
    return LimitError(413, code, message, field=where, headers={"Connection": "close"})


class _Events:
    """python-multipart's callbacks, turned into a list the async reader works through."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, bytes]] = []
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": lambda: self.items.append(("begin", b"", b"")),
            "on_header_field": lambda d, s, e: self._header_bytes(self._field, d[s:e]),
            "on_header_value": lambda d, s, e: self._header_bytes(self._value, d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": lambda: self.items.append(("headers", b"", b"")),
            "on_part_data": lambda d, s, e: self.items.append(("data", bytes(d[s:e]), b"")),
            "on_part_end": lambda: self.items.append(("end", b"", b"")),
        }

    @staticmethod
    def _header_bytes(into: bytearray, data: bytes) -> None:
        # python-multipart does not bound a header: one endless header would fill memory.
        if len(into) + len(data) > MAX_FIELD_BYTES:
            raise _limit("request_too_large", f"a part header over {MAX_FIELD_BYTES} bytes", None)
        into.extend(data)

    def _header_end(self) -> None:
        self.items.append(("header", bytes(self._field), bytes(self._value)))
        self._field.clear()
        self._value.clear()


def boundary_of(request: Request) -> bytes:
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServiceError(400, "invalid_form", "multipart body without a boundary")
    return boundary


async def read_batch_form(request: Request, *, settings: Settings, max_files: int) -> BatchForm:
    form = BatchForm()
    events = _Events()
    parser = MultipartParser(boundary_of(request), events.callbacks())
    part: _Part | None = None
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except ServiceError:
                raise
            except Exception as exc:  # malformed multipart
                raise ServiceError(400, "invalid_form", f"could not read the form: {exc}") from None
            for kind, a, b in events.items:
                if kind == "begin":
                    part = _Part()
                elif part is None:
                    raise ServiceError(400, "invalid_form", "malformed multipart body")
                elif kind == "header":
                    part.headers[a.decode("latin-1").lower()] = b.decode("latin-1")
                elif kind == "headers":
                    _start(part, form, settings=settings, max_files=max_files)
                elif kind == "data":
                    _feed(part, a, form, settings=settings)
                elif kind == "end":
                    await _finish(part, form, settings=settings)
                    part = None
            events.items.clear()
        parser.finalize()
    except BaseException:
        if part is not None:
            _drop_partial(part)
        form.discard()
        raise
    return form


def _start(part: _Part, form: BatchForm, *, settings: Settings, max_files: int) -> None:
    _, opts = parse_options_header(part.headers.get("content-disposition"))
    part.name = opts.get(b"name", b"").decode("utf-8", "replace")
    raw_filename = opts.get(b"filename")
    part.filename = None if raw_filename is None else raw_filename.decode("utf-8", "replace")
    if part.name == MANIFEST_FIELD:
        form.manifest_parts += 1
        if form.manifest_parts > 1:
            # Joined, two manifests would merge lines and renumber every error.
            raise ServiceError(
                422, "invalid_request", "'manifest' given more than once", field=MANIFEST_FIELD
            )
        return
    if part.filename is None:
        if part.name not in URL_FIELDS:
            form.other_fields += 1
            if form.other_fields > MAX_FORM_FIELDS:
                raise _limit("request_too_large", f"more than {MAX_FORM_FIELDS} form fields", None)
        return
    if part.name not in FILE_FIELDS:
        raise ServiceError(
            422,
            "unknown_field",
            f"file part {part.name!r}: audio files go in 'file' parts, a manifest in 'manifest'",
            field=part.name,
        )
    if len(form.files) >= max_files:
        raise _limit("too_many_inputs", f"more than {max_files} inputs in one request", "file")
    part.job_id = new_job_id()
    # A local scratch file: probed there, then handed to the blob store (maybe S3).
    fd, tmp = tempfile.mkstemp(prefix="whisperq-batch-")
    part.tmp = Path(tmp)
    part.sink = os.fdopen(fd, "wb")


def _feed(part: _Part, data: bytes, form: BatchForm, *, settings: Settings) -> None:
    if part.sink is None and part.job_id:
        return  # an oversized file: the rest of it is read and dropped
    if part.sink is None:
        if part.name == MANIFEST_FIELD or part.name in URL_FIELDS:
            _feed_inputs(part, data, form, settings=settings)
        elif len(part.text) + len(data) > MAX_FIELD_BYTES:
            raise _limit(
                "field_too_large", f"{part.name!r} over {MAX_FIELD_BYTES} bytes", part.name
            )
        part.text.extend(data)
        return
    part.size += len(data)
    if part.size > settings.max_upload_bytes:
        part.too_large = True
        _drop_partial(part)
        return
    part.digest.update(data)
    part.sink.write(data)


def _feed_inputs(part: _Part, data: bytes, form: BatchForm, *, settings: Settings) -> None:
    """Checked per chunk, so an oversized or overlong body is refused before the rest of it
    is read (the totals are checked again on the parsed inputs)."""
    cap = settings.batch_max_manifest_bytes
    form.text_bytes += len(data)
    if form.text_bytes > cap:
        raise _limit(
            "request_too_large",
            f"the manifest and URL fields are over {cap} bytes in all",
            part.name,
        )
    form.text_lines += _new_lines(part, data)
    limit = settings.batch_max_inputs_per_request
    if form.text_lines > limit:
        raise _limit("too_many_inputs", f"more than {limit} inputs in one request", part.name)


async def _finish(part: _Part, form: BatchForm, *, settings: Settings) -> None:
    if not part.job_id:
        if part.name == MANIFEST_FIELD:
            form.manifest = bytes(part.text)
        else:
            form.fields.setdefault(part.name, []).append(part.text.decode("utf-8", "replace"))
        return
    name = part.filename or ""
    if part.too_large:
        form.files.append(
            _failed(part, name, "audio_too_large", f"over {settings.max_upload_bytes} bytes")
        )
        return
    assert part.sink is not None and part.tmp is not None
    part.sink.close()
    part.sink = None
    if part.size == 0:
        part.tmp.unlink(missing_ok=True)
        form.files.append(_failed(part, name, "empty_audio", "the audio file is empty"))
        return
    try:
        length_ms = await run_in_threadpool(
            probe_and_store, part.tmp, part.job_id, settings=settings
        )
    except ServiceError as exc:  # not audio, or too long: nothing was stored
        form.files.append(_failed(part, name, exc.code, exc.message))
        return
    finally:
        part.tmp.unlink(missing_ok=True)
    form.files.append(
        UploadedFile(name, part.job_id, part.size, part.digest.hexdigest(), length_ms)
    )


def _failed(part: _Part, name: str, code: str, message: str) -> UploadedFile:
    return UploadedFile(name, part.job_id, part.size, part.digest.hexdigest(), None, code, message)


def _drop_partial(part: _Part) -> None:
    if part.sink is not None:
        part.sink.close()
        part.sink = None
    if part.tmp is not None:
        part.tmp.unlink(missing_ok=True)
