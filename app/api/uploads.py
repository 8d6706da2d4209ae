"""Reading a submission's body under a byte cap, and storing its audio part (issue 14).

* The body is counted as the ASGI server hands it over, whether or not a Content-Length was
  sent, and the read stops one message past ``max_upload_bytes + upload_overhead_bytes``:
  a 2 GB chunked upload costs the cap in temporary disk, not 2 GB (Starlette's parser would
  otherwise spool the whole body to /tmp before anyone looked at its size).
* Memory stays flat: the file part is spooled by Starlette (1 MB in memory, the rest on
  disk), copied to the blob store in chunks, and never read whole into memory; form fields
  (a ``data:`` URL included) are capped at ``max_data_url_bytes``. At most
  ``upload_concurrency`` bodies are read at once per process; the others wait their turn.
* Errors are the caller's: 413 past the cap, 400 for a malformed body, with generic
  messages (no parser internals, no server paths).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import tempfile
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message

from app.errors import ServiceError
from app.jobs.submission import probe_and_store
from app.settings import Settings

COPY_CHUNK = 1024 * 1024
MAX_FORM_FILES = 2
MAX_FORM_FIELDS = 64

_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


class _BodyTooLargeError(Exception):
    pass


def body_cap(settings: Settings) -> int:
    return settings.max_upload_bytes + settings.upload_overhead_bytes


def too_large(settings: Settings) -> ServiceError:
    # Connection: close, or the server would drain (read and discard) the rest of the body.
    # A plain ServiceError, not a LimitError: the shared handler answers the OpenAI routes in
    # OpenAI's error shape, the limit handler only knows the native one.
    return ServiceError(
        413,
        "audio_too_large",
        f"the request body is over the {settings.max_upload_bytes} byte upload limit",
        field="audio",
        headers={"Connection": "close"},
    )


@asynccontextmanager
async def _upload_slot(settings: Settings) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = asyncio.Semaphore(max(settings.upload_concurrency, 1))
    async with gate:
        yield


async def read_form(request: Request, settings: Settings) -> FormData:
    """The submission's form, read under the byte cap. The caller closes it."""
    cap = body_cap(settings)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large(settings)  # refused before a byte is read
    seen = 0

    async def capped_receive() -> Message:
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise _BodyTooLargeError
        return message

    capped = Request(request.scope, capped_receive)
    async with _upload_slot(settings):
        try:
            return await capped.form(
                max_files=MAX_FORM_FILES,
                max_fields=MAX_FORM_FIELDS,
                max_part_size=settings.max_data_url_bytes,
            )
        except _BodyTooLargeError:
            raise too_large(settings) from None
        except HTTPException as exc:  # Starlette's verdict on a malformed multipart body
            raise ServiceError(400, "invalid_form", f"malformed form body: {exc.detail}") from None
        except (ValueError, UnicodeError, KeyError):
            raise ServiceError(400, "invalid_form", "malformed form body") from None


def _copy_capped(src: BinaryIO, dest: Path, *, limit: int) -> tuple[int, str]:
    """Copy in chunks; returns the size and the SHA-256 (idempotency compares uploads by it)."""
    src.seek(0)
    size = 0
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        while chunk := src.read(COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _BodyTooLargeError
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def _store_and_probe(src: BinaryIO, settings: Settings) -> tuple[str, int, str]:
    name = secrets.token_hex(16)
    # Probed in a local scratch file, then handed to the blob store (maybe another host's).
    with tempfile.TemporaryDirectory(prefix="whisperq-up-") as tmp:
        path = Path(tmp) / name
        try:
            size, sha256 = _copy_capped(src, path, limit=settings.max_upload_bytes)
        except _BodyTooLargeError:
            raise too_large(settings) from None
        if size == 0:
            raise ServiceError(400, "empty_audio", "the audio file is empty", field="audio")
        length_ms = probe_and_store(path, name, settings=settings)
    return name, length_ms, sha256


async def store_upload(upload: UploadFile, settings: Settings) -> tuple[str, int, str]:
    """Copy an uploaded file into the blob store in chunks and probe it.

    Returns the blob name, the length its header claims in ms (the worker checks the
    decoded length again) and the content's SHA-256. ServiceError for an empty, undecodable,
    too large or too long file.
    """
    if upload.size is not None and upload.size > settings.max_upload_bytes:
        raise too_large(settings)
    return await run_in_threadpool(_store_and_probe, upload.file, settings)
