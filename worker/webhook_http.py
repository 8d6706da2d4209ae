"""One webhook delivery attempt over HTTP, plus the retry schedule.

No database and no Celery here: :func:`deliver_once` makes one attempt (following a few
redirects) and classifies the result; :func:`retry_delay` says how long to wait before the
next attempt.  The caller owns persistence and scheduling.

Decisions
---------
* **SSRF.**  The URL is re-validated with :func:`app.infra.ssrf.validate_webhook_url` right before
  sending (DNS may have changed since submission) and so is every redirect target; an
  unsafe URL gives ``refused`` (never retried).
* **IP pinning.**  With the default client (``client=None``) the TCP connection goes to one
  of the addresses the SSRF check just vetted, never to a fresh DNS answer: a custom
  httpcore network backend maps the host name to the vetted addresses, for http *and*
  https.  The URL keeps its host name, so the ``Host`` header, TLS SNI and certificate
  verification use the name as usual - there is no check-then-connect (DNS rebinding)
  window.  A host the check did not vet cannot be connected to at all (fail closed).
  Environment proxies are ignored (``trust_env=False``): a proxy would defeat pinning.
  An injected ``client`` (tests, special setups) is used as is: URLs are still vetted, but
  pinning and the hard deadline are then the client's business.
* **Deadline.**  ``timeout_s`` bounds the whole attempt (connect, TLS, request, response
  headers, all redirects): every socket operation gets at most the time left, so a
  receiver that accepts and never answers, or trickles bytes, is cut at about
  ``timeout_s``.  (DNS resolution in the SSRF check is not covered: ``getaddrinfo`` has
  no timeout.)
* **Redirects** are never followed by httpx.  301/302/303/307/308 are followed by hand,
  at most ``max_redirects`` times, and always **re-POST the same body and headers** -
  including 301/302/303, where browsers switch to GET: for a webhook a body-less GET
  would drop the event, and its 2xx would be recorded as a delivery that never happened.
  (The signature covers id, timestamp and body, not the URL, so it stays valid.)
  A redirect from https to http is refused (it would leak the payload in clear text);
  too many redirects or a redirect without ``Location`` is a retryable failure.
* **Classification** (Standard Webhooks): 2xx delivered; 410 gone (disable the endpoint);
  every other status, timeouts and connection errors: retry.  ``Retry-After`` (seconds or
  HTTP-date) is parsed on every non-2xx response and capped at one day.
* At most 64 KiB of a non-2xx response body is read (raw, undecoded, with
  ``Accept-Encoding: identity`` requested); its first 500 characters go into ``error``.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import random
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, BinaryIO, Literal

import httpcore
import httpx

from app.infra.ssrf import (
    AllowList,
    IPAddress,
    UnsafeURLError,
    parse_webhook_url,
    validate_webhook_url,
)

__all__ = [
    "DEFAULT_SCHEDULE_S",
    "MAX_RESPONSE_BYTES",
    "REDIRECT_STATUSES",
    "RETRY_AFTER_CAP_S",
    "USER_AGENT",
    "AttemptResult",
    "FetchError",
    "Outcome",
    "deliver_once",
    "fetch_to_file",
    "parse_retry_after",
    "retry_delay",
]

USER_AGENT = "whisperq-webhooks/0.1"
MAX_RESPONSE_BYTES = 64 * 1024
ERROR_EXCERPT_CHARS = 500
RETRY_AFTER_CAP_S = 86_400.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# Delays after attempts 1..7 (the first attempt is immediate): 5 s, 5 min, 30 min, 2 h,
# 5 h, 10 h, 10 h - the Standard Webhooks / Svix schedule: 8 attempts, the last one about
# 27.6 h (99,305 s) after the first.
DEFAULT_SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)

Outcome = Literal["delivered", "retry", "gone", "refused"]

# Headers that the HTTP client computes itself; a caller's values would be wrong.
_DROPPED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True)
class AttemptResult:
    outcome: Outcome  # refused: SSRF check failed / invalid URL (do not retry)
    status_code: int | None
    latency_ms: int
    error: str | None  # short human-readable reason for non-2xx, timeouts, connection errors
    retry_after_s: float | None  # from Retry-After (seconds or HTTP-date), capped


# --------------------------------------------------------------------------- retry policy


_RETRY_AFTER_SECONDS_RE = re.compile(r"^\d{1,12}(?:\.\d{1,6})?$")


def parse_retry_after(
    value: str | None, *, now: float | None = None, cap_s: float = RETRY_AFTER_CAP_S
) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value (delay-seconds or HTTP-date).

    Clamped to ``[0, cap_s]``; None when absent or unparseable.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit() and len(value) > 12:
        return cap_s
    if _RETRY_AFTER_SECONDS_RE.match(value):
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), cap_s)


def retry_delay(
    attempt_no: int,
    *,
    schedule: Sequence[float] = DEFAULT_SCHEDULE_S,
    retry_after_s: float | None,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before attempt ``attempt_no + 1``; None when the schedule is exhausted.

    ``attempt_no`` counts the attempts made so far (1-based).  The scheduled delay is
    scaled by a random factor in ``[1 - jitter, 1 + jitter]``; a ``Retry-After`` raises it
    to at least that value (capped at one day) but never extends the schedule.
    """
    if attempt_no < 1:
        raise ValueError("attempt_no is 1-based")
    if not 0 <= jitter < 1:
        raise ValueError("jitter must be in [0, 1)")
    if attempt_no > len(schedule):
        return None
    base = float(schedule[attempt_no - 1])
    factor = 1.0 + (rng or random).uniform(-jitter, jitter) if jitter else 1.0
    delay = max(base * factor, 0.0)
    if retry_after_s is not None:
        delay = max(delay, min(max(retry_after_s, 0.0), RETRY_AFTER_CAP_S))
    return delay


# ------------------------------------------------------- pinned, deadline-bound transport


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.at = time.monotonic() + timeout_s

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def budget(self, timeout: float | None, exc: type[Exception]) -> float:
        """The per-operation timeout: ``timeout`` clamped to the time left."""
        left = self.remaining()
        if left <= 0:
            raise exc("attempt deadline exceeded")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """Every read/write/TLS handshake gets at most the time left before the deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        budget = self._deadline.budget(timeout, httpcore.ReadTimeout)
        return self._inner.read(max_bytes, budget)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        budget = self._deadline.budget(timeout, httpcore.WriteTimeout)
        self._inner.write(buffer, budget)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        budget = self._deadline.budget(timeout, httpcore.ConnectTimeout)
        tls = self._inner.start_tls(ssl_context, server_hostname, budget)
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects only to addresses vetted by the SSRF check, never to a fresh DNS answer."""

    def __init__(self, deadline: _Deadline) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline
        self._pins: dict[str, tuple[IPAddress, ...]] = {}

    def pin(self, host: str, addresses: Iterable[IPAddress]) -> None:
        self._pins[host.lower()] = tuple(addresses)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._pins.get(host.lower())
        if not addresses:
            raise httpcore.ConnectError(f"refusing to connect to unvetted host {host!r}")
        options = list(socket_options) if socket_options is not None else None
        last_error: Exception | None = None
        for ip in addresses:
            budget = self._deadline.budget(timeout, httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(
                    str(ip), port, budget, local_address=local_address, socket_options=options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        assert last_error is not None
        raise last_error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed for webhooks")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# Most specific first.
_EXCEPTION_MAP: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _map_httpcore_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for source, target in _EXCEPTION_MAP:
            if isinstance(exc, source):
                raise target(str(exc) or type(exc).__name__) from exc
        raise


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _map_httpcore_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class _PinnedTransport(httpx.BaseTransport):
    """httpx transport over an httpcore pool that uses :class:`_PinnedBackend`."""

    def __init__(self, backend: _PinnedBackend) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=4,
            max_keepalive_connections=0,
            network_backend=backend,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        stream = request.stream
        assert isinstance(stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=stream,
            extensions=request.extensions,
        )
        with _map_httpcore_errors():
            core_response = self._pool.handle_request(core_request)
        assert isinstance(core_response.stream, Iterable)
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_ResponseStream(core_response.stream),
            extensions=core_response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


# ------------------------------------------------------------------------------ delivery


def _short(text: str, limit: int = ERROR_EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_excerpt(response: httpx.Response, deadline: _Deadline) -> str:
    """Up to MAX_RESPONSE_BYTES of the raw body, as a short single-line string."""
    buffer = bytearray()
    with contextlib.suppress(httpx.HTTPError):
        for chunk in response.iter_raw():
            buffer += chunk
            if len(buffer) >= MAX_RESPONSE_BYTES or deadline.remaining() <= 0:
                break
    return _short(bytes(buffer[:MAX_RESPONSE_BYTES]).decode("utf-8", "replace"))


def _request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in _DROPPED_HEADERS}
    lower = {k.lower() for k in out}
    if "user-agent" not in lower:
        out["User-Agent"] = USER_AGENT
    if "accept-encoding" not in lower:
        out["Accept-Encoding"] = "identity"
    return out


def _same_host(parsed_host: str, parsed_ip: IPAddress | None, url: httpx.URL) -> bool:
    """Do the SSRF parser and httpx agree on the host?  (Defence against parser confusion.)"""
    raw = url.raw_host.decode("ascii").lower().rstrip(".")
    if isinstance(parsed_ip, ipaddress.IPv6Address):
        try:
            return ipaddress.IPv6Address(raw) == parsed_ip
        except ValueError:
            return False
    return raw == parsed_host


def deliver_once(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    allow: AllowList,
    max_redirects: int = 3,
    client: httpx.Client | None = None,
) -> AttemptResult:
    """POST ``body`` to ``url`` once (following up to ``max_redirects`` redirects by hand)."""
    started = time.monotonic()
    deadline = _Deadline(timeout_s)

    def done(
        outcome: Outcome,
        status_code: int | None = None,
        error: str | None = None,
        retry_after_s: float | None = None,
    ) -> AttemptResult:
        latency_ms = round((time.monotonic() - started) * 1000)
        return AttemptResult(
            outcome=outcome,
            status_code=status_code,
            latency_ms=latency_ms,
            error=_short(error) if error is not None else None,
            retry_after_s=retry_after_s,
        )

    send_headers = _request_headers(headers)
    backend: _PinnedBackend | None = None
    if client is None:
        backend = _PinnedBackend(deadline)
        http = httpx.Client(
            transport=_PinnedTransport(backend),
            trust_env=False,
            follow_redirects=False,
            timeout=timeout_s,
        )
    else:
        http = client

    try:
        current = url
        redirects = 0
        # Status of the redirect that led to ``current``: reported when its target is refused.
        redirect_status: int | None = None
        while True:
            where = "redirect target: " if redirect_status is not None else ""
            try:
                parsed = parse_webhook_url(current)
                addresses = validate_webhook_url(current, allow=allow)
                target = httpx.URL(current)
            except UnsafeURLError as exc:
                return done("refused", redirect_status, f"{exc.code}: {where}{exc}")
            except (httpx.InvalidURL, ValueError) as exc:
                return done("refused", redirect_status, f"invalid_url: {where}{exc}")
            if target.scheme != parsed.scheme or not _same_host(parsed.host, parsed.ip, target):
                return done("refused", redirect_status, f"invalid_url: {where}ambiguous host")

            left = deadline.remaining()
            if left <= 0:
                return done("retry", error=f"timeout: no response within {timeout_s:g} s")
            if backend is not None:
                backend.pin(target.raw_host.decode("ascii"), addresses)
                http.cookies.clear()

            request = http.build_request(
                "POST", target, content=body, headers=send_headers, timeout=httpx.Timeout(left)
            )
            try:
                response = http.send(request, stream=True, follow_redirects=False)
            except httpx.TimeoutException as exc:
                return done(
                    "retry",
                    error=f"timeout: no response within {timeout_s:g} s ({type(exc).__name__})",
                )
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                return done("refused", error=f"invalid_url: {exc}")
            except httpx.HTTPError as exc:
                return done("retry", error=f"connection error: {exc}")

            try:
                status = response.status_code
                if status in REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        return done("retry", status, f"HTTP {status} redirect without Location")
                    if redirects >= max_redirects:
                        return done("retry", status, f"too many redirects (> {max_redirects})")
                    try:
                        next_url = target.join(location)
                    except (httpx.InvalidURL, ValueError) as exc:  # IDNAError is a ValueError
                        return done("refused", status, f"invalid_url: redirect target: {exc}")
                    if target.scheme == "https" and next_url.scheme == "http":
                        return done("refused", status, "invalid_url: redirect from https to http")
                    redirects += 1
                    redirect_status = status
                    current = str(next_url)
                    continue
                if 200 <= status < 300:
                    return done("delivered", status)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                excerpt = _read_excerpt(response, deadline)
                reason = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
                if status == 410:
                    return done("gone", status, reason, retry_after)
                return done("retry", status, reason, retry_after)
            finally:
                response.close()
    finally:
        if client is None:
            http.close()


# ------------------------------------------------------------------------------ fetching


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
    deadline = _Deadline(timeout_s)
    backend = _PinnedBackend(deadline)
    headers = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
    with httpx.Client(
        transport=_PinnedTransport(backend),
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
            if target.scheme != parsed.scheme or not _same_host(parsed.host, parsed.ip, target):
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
