"""An HTTP client of whisperq's batch and job API (what ``whisperq submit``, ``fetch``,
``transcribe`` and ``job`` use).

It talks to a remote server only over HTTP: no database, no settings of the server. Every
call it retries is safe to repeat: batch creation carries an ``Idempotency-Key``, every
input its own key, so a chunk resent after a lost answer makes no second job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RETRY_STATUSES = frozenset({502, 503, 504})
USER_AGENT = "whisperq-cli/0.1"
FIRST_CONTACT_RETRIES = 2  # a wrong --url should fail in seconds, a server restart be ridden out


class ClientError(Exception):
    """A problem worth one line to the user (no traceback)."""


@dataclass(frozen=True)
class Input:
    """One input of a batch, as the client sends it."""

    name: str  # the source's name, relative: transcripts are written under it
    idempotency_key: str
    path: Path | None = None
    url: str | None = None
    custom_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    size: int = 0

    def manifest_line(self, part: str | None) -> dict[str, Any]:
        line: dict[str, Any] = {"name": self.name, "idempotency_key": self.idempotency_key}
        line["custom_id"] = self.custom_id or self.name
        if part is not None:
            line["file"] = part
        else:
            line["url"] = self.url
        if self.options:
            line["options"] = self.options
        return line


class Client:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 300.0,
        retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._reached = False  # until the server answered once, a refused connect fails fast
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"bearer {api_key}", "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- plumbing -------------------------------------------------------------------

    def _send(self, attempt: Callable[[], httpx.Response]) -> httpx.Response:
        """Run ``attempt`` (which must rebuild its request body), retrying transport errors
        and 502/503/504 with backoff: every request here is idempotent."""
        delay = 0.5
        for n in range(self.retries + 1):
            try:
                response = attempt()
            except httpx.TransportError as exc:
                first_contact = not self._reached and isinstance(exc, httpx.ConnectError)
                if n == self.retries or (first_contact and n >= FIRST_CONTACT_RETRIES):
                    raise ClientError(f"cannot reach {self.base_url}: {_reason(exc)}") from None
            else:
                self._reached = True
                if response.status_code not in RETRY_STATUSES or n == self.retries:
                    return _checked(response)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(lambda: self._http.request(method, path, **kwargs)).json()

    def iter_jsonl(self, path: str) -> Iterator[dict[str, Any]]:
        """Stream a JSONL answer line by line (results of a 20,000-job batch stay small)."""
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    _checked(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach {self.base_url}: {_reason(exc)}") from None

    # ---- the batch API --------------------------------------------------------------

    def create_batch(
        self, *, idempotency_key: str, options: dict[str, str], webhook: str | None
    ) -> tuple[dict[str, Any], bool]:
        """An open batch; the second value says whether it already existed (a rerun)."""
        body: dict[str, Any] = {"open": True, "options": options}
        if webhook:
            body["webhook"] = webhook
        response = self._send(
            lambda: self._http.post(
                "/v1/batches", json=body, headers={"Idempotency-Key": idempotency_key}
            )
        )
        return response.json()["batch"], response.status_code == 200

    def add_inputs(self, batch_id: str, inputs: Sequence[Input]) -> dict[str, Any]:
        """One request: a manifest naming each file part, then the files, streamed from
        disk (httpx reads them in chunks while sending)."""

        def attempt() -> httpx.Response:
            lines: list[dict[str, Any]] = []
            with ExitStack() as stack:
                parts: list[tuple[str, Any]] = []
                for n, item in enumerate(inputs):
                    if item.path is not None:
                        handle = stack.enter_context(item.path.open("rb"))
                        parts.append(("file", (str(n), handle, "application/octet-stream")))
                        lines.append(item.manifest_line(str(n)))
                    else:
                        lines.append(item.manifest_line(None))
                manifest = "".join(json.dumps(line) + "\n" for line in lines).encode()
                parts.insert(0, ("manifest", ("manifest.jsonl", manifest, "application/x-ndjson")))
                return self._http.post(f"/v1/batches/{batch_id}/files", files=parts)

        result: dict[str, Any] = self._send(attempt).json()
        return result

    def seal(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("POST", f"/v1/batches/{batch_id}/seal")
        return result

    def batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/batches/{batch_id}")
        return result

    def accepted_keys(self, batch_id: str) -> set[str]:
        return {
            line["idempotency_key"] for line in self.inputs(batch_id) if line.get("idempotency_key")
        }

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        return self.iter_jsonl(f"/v1/batches/{batch_id}/results")

    def inputs(self, batch_id: str) -> Iterator[dict[str, Any]]:
        return self.iter_jsonl(f"/v1/batches/{batch_id}/inputs")

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/jobs/{job_id}")
        return result


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    message = error.get("message") or response.reason_phrase or "request failed"
    code = error.get("code") or f"http {response.status_code}"
    where = f", field {error['field']}" if error.get("field") else ""
    raise ClientError(f"{message} ({code}{where})")


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({text})"
    return text
