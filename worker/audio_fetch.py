"""Audio by URL: a guarded GET into a file, through the same SSRF guard, address pinning and
deadline as webhook deliveries (worker/safe_http.py)."""

from __future__ import annotations

from typing import BinaryIO

import httpx

from app.infra.ssrf import AllowList, UnsafeURLError, parse_webhook_url, validate_webhook_url
from worker.safe_http import (
    REDIRECT_STATUSES,
    USER_AGENT,
    Deadline,
    PinnedBackend,
    PinnedTransport,
    same_host,
)


class FetchError(Exception):
    """A guarded GET failed. ``reason`` is machine-readable and safe to show a caller:
    ``invalid_url``, ``forbidden_address``, ``unresolvable_host`` (the SSRF verdict, also
    for redirect targets), ``too_large``, ``timeout``, ``http_status``, ``redirects``,
    ``connection``. ``detail`` is for server logs only: it may name internal status codes.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def fetch_to_file(
    url: str,
    dest: BinaryIO,
    *,
    timeout_s: float,
    allow: AllowList,
    max_bytes: int,
    max_redirects: int = 3,
    user_agent: str = USER_AGENT,
) -> int:
    """GET ``url`` into ``dest`` through the same guard as webhooks; returns the byte count.

    Every hop is vetted by the SSRF check and the connection pinned to the vetted addresses
    (no DNS-rebinding window); redirects are followed by hand, re-vetted, never from https
    to http; environment proxies are ignored; ``timeout_s`` bounds the whole fetch (every
    hop, every read); the body is cut at ``max_bytes`` while streaming, and read raw (no
    decompression: a gzip bomb stays its compressed size). Raises :class:`FetchError`.
    """
    deadline = Deadline(timeout_s)
    backend = PinnedBackend(deadline)
    headers = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
    with httpx.Client(
        transport=PinnedTransport(backend),
        trust_env=False,
        follow_redirects=False,
        timeout=timeout_s,
    ) as http:
        current = url
        for hop in range(max_redirects + 1):
            where = "redirect target" if hop else "URL"
            try:
                parsed = parse_webhook_url(current)
                addresses = validate_webhook_url(current, allow=allow)
                target = httpx.URL(current)
            except UnsafeURLError as exc:
                raise FetchError(exc.code, f"{where}: {exc}") from None
            except (httpx.InvalidURL, ValueError) as exc:
                raise FetchError("invalid_url", f"{where}: {exc}") from None
            if target.scheme != parsed.scheme or not same_host(parsed.host, parsed.ip, target):
                raise FetchError("invalid_url", f"{where}: ambiguous host")
            backend.pin(target.raw_host.decode("ascii"), addresses)
            http.cookies.clear()
            left = deadline.remaining()
            if left <= 0:
                raise FetchError("timeout", f"no answer within {timeout_s:g} s")
            try:
                request = http.build_request(
                    "GET", target, headers=headers, timeout=httpx.Timeout(left)
                )
                response = http.send(request, stream=True, follow_redirects=False)
            except httpx.TimeoutException as exc:
                raise FetchError("timeout", f"{type(exc).__name__}") from None
            except httpx.InvalidURL as exc:
                raise FetchError("invalid_url", f"{where}: {exc}") from None
            except httpx.HTTPError as exc:
                raise FetchError("connection", f"{type(exc).__name__}: {exc}") from None
            try:
                status = response.status_code
                if status in REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError("http_status", f"HTTP {status} without Location")
                    try:
                        next_url = target.join(location)
                    except (httpx.InvalidURL, ValueError) as exc:  # IDNAError is a ValueError
                        raise FetchError("invalid_url", f"redirect target: {exc}") from None
                    if target.scheme == "https" and next_url.scheme != "https":
                        raise FetchError("invalid_url", "redirect from https to http")
                    current = str(next_url)
                    continue
                if status != 200:
                    raise FetchError("http_status", f"HTTP {status}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise FetchError("too_large", f"Content-Length {declared} > {max_bytes}")
                size = 0
                try:
                    for chunk in response.iter_raw():
                        size += len(chunk)
                        if size > max_bytes:
                            raise FetchError("too_large", f"body over {max_bytes} bytes")
                        if deadline.remaining() <= 0:
                            raise FetchError("timeout", f"body not read within {timeout_s:g} s")
                        dest.write(chunk)
                except httpx.TimeoutException as exc:
                    raise FetchError("timeout", f"{type(exc).__name__}") from None
                except httpx.HTTPError as exc:
                    raise FetchError("connection", f"{type(exc).__name__}: {exc}") from None
                return size
            finally:
                response.close()
    raise FetchError("redirects", f"more than {max_redirects} redirects")
