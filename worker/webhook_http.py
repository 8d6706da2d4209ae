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
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Literal

import httpx

from app.infra.ssrf import (
    AllowList,
    IPAddress,
    UnsafeURLError,
    parse_webhook_url,
    validate_webhook_url,
)
from worker.safe_http import (
    REDIRECT_STATUSES,
    USER_AGENT,
    Deadline,
    PinnedBackend,
    PinnedTransport,
    same_host,
)

__all__ = [
    "DEFAULT_SCHEDULE_S",
    "MAX_RESPONSE_BYTES",
    "REDIRECT_STATUSES",
    "RETRY_AFTER_CAP_S",
    "USER_AGENT",
    "AttemptResult",
    "Outcome",
    "deliver_once",
    "parse_retry_after",
    "retry_delay",
]

MAX_RESPONSE_BYTES = 64 * 1024
ERROR_EXCERPT_CHARS = 500
RETRY_AFTER_CAP_S = 86_400.0

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


# ------------------------------------------------------------------------------ delivery


def _short(text: str, limit: int = ERROR_EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_excerpt(response: httpx.Response, deadline: Deadline) -> str:
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


@dataclass(frozen=True)
class _Attempt:
    """One attempt's fixed inputs and clock, shared by each hop of its redirect chain."""

    body: bytes
    headers: Mapping[str, str]
    allow: AllowList
    max_redirects: int
    timeout_s: float
    started: float  # time.monotonic() when the attempt began
    deadline: Deadline

    def done(
        self,
        outcome: Outcome,
        status_code: int | None = None,
        error: str | None = None,
        retry_after_s: float | None = None,
    ) -> AttemptResult:
        latency_ms = round((time.monotonic() - self.started) * 1000)
        return AttemptResult(
            outcome=outcome,
            status_code=status_code,
            latency_ms=latency_ms,
            error=_short(error) if error is not None else None,
            retry_after_s=retry_after_s,
        )


@dataclass(frozen=True)
class _Hop:
    """One request of the redirect chain."""

    url: str
    redirects: int = 0  # redirects followed to reach ``url``
    # Status of the redirect that led to ``url``: reported when its target is refused.
    redirect_status: int | None = None


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
    deadline = Deadline(timeout_s)
    attempt = _Attempt(
        body=body,
        headers=_request_headers(headers),
        allow=allow,
        max_redirects=max_redirects,
        timeout_s=timeout_s,
        started=started,
        deadline=deadline,
    )
    http, backend = _client(client, deadline, timeout_s)
    try:
        hop = _Hop(url)
        while True:
            vetted = _vet(attempt, hop)
            if isinstance(vetted, AttemptResult):
                return vetted
            target, addresses = vetted
            response = _send(attempt, http, backend, target, addresses)
            if isinstance(response, AttemptResult):
                return response
            try:
                answer = _classify(attempt, hop, target, response)
            finally:
                response.close()
            if isinstance(answer, AttemptResult):
                return answer
            hop = answer
    finally:
        if client is None:
            http.close()


def _client(
    client: httpx.Client | None, deadline: Deadline, timeout_s: float
) -> tuple[httpx.Client, PinnedBackend | None]:
    """The client to send with and, when it is our own, the backend that pins its addresses."""
    if client is not None:
        return client, None
    backend = PinnedBackend(deadline)
    http = httpx.Client(
        transport=PinnedTransport(backend),
        trust_env=False,
        follow_redirects=False,
        timeout=timeout_s,
    )
    return http, backend


def _vet(attempt: _Attempt, hop: _Hop) -> tuple[httpx.URL, list[IPAddress]] | AttemptResult:
    """The hop's URL and the addresses it may connect to, or why it is refused."""
    where = "redirect target: " if hop.redirect_status is not None else ""
    try:
        parsed = parse_webhook_url(hop.url)
        addresses = validate_webhook_url(hop.url, allow=attempt.allow)
        target = httpx.URL(hop.url)
    except UnsafeURLError as exc:
        return attempt.done("refused", hop.redirect_status, f"{exc.code}: {where}{exc}")
    except (httpx.InvalidURL, ValueError) as exc:
        return attempt.done("refused", hop.redirect_status, f"invalid_url: {where}{exc}")
    if target.scheme != parsed.scheme or not same_host(parsed.host, parsed.ip, target):
        return attempt.done("refused", hop.redirect_status, f"invalid_url: {where}ambiguous host")
    return target, addresses


def _send(
    attempt: _Attempt,
    http: httpx.Client,
    backend: PinnedBackend | None,
    target: httpx.URL,
    addresses: list[IPAddress],
) -> httpx.Response | AttemptResult:
    """POST to ``target`` within the time left; the streamed response, or why there is none."""
    timeout_s = attempt.timeout_s
    left = attempt.deadline.remaining()
    if left <= 0:
        return attempt.done("retry", error=f"timeout: no response within {timeout_s:g} s")
    if backend is not None:
        backend.pin(target.raw_host.decode("ascii"), addresses)
        http.cookies.clear()

    request = http.build_request(
        "POST", target, content=attempt.body, headers=attempt.headers, timeout=httpx.Timeout(left)
    )
    try:
        return http.send(request, stream=True, follow_redirects=False)
    except httpx.TimeoutException as exc:
        return attempt.done(
            "retry",
            error=f"timeout: no response within {timeout_s:g} s ({type(exc).__name__})",
        )
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        return attempt.done("refused", error=f"invalid_url: {exc}")
    except httpx.HTTPError as exc:
        return attempt.done("retry", error=f"connection error: {exc}")


def _classify(
    attempt: _Attempt, hop: _Hop, target: httpx.URL, response: httpx.Response
) -> _Hop | AttemptResult:
    """The redirect to follow next, or the attempt's result."""
    status = response.status_code
    if status in REDIRECT_STATUSES:
        return _redirect(attempt, hop, target, response)
    if 200 <= status < 300:
        return attempt.done("delivered", status)
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    excerpt = _read_excerpt(response, attempt.deadline)
    reason = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
    if status == 410:
        return attempt.done("gone", status, reason, retry_after)
    return attempt.done("retry", status, reason, retry_after)


def _redirect(
    attempt: _Attempt, hop: _Hop, target: httpx.URL, response: httpx.Response
) -> _Hop | AttemptResult:
    status = response.status_code
    max_redirects = attempt.max_redirects
    location = response.headers.get("location")
    if not location:
        return attempt.done("retry", status, f"HTTP {status} redirect without Location")
    if hop.redirects >= max_redirects:
        return attempt.done("retry", status, f"too many redirects (> {max_redirects})")
    try:
        next_url = target.join(location)
    except (httpx.InvalidURL, ValueError) as exc:  # IDNAError is a ValueError
        return attempt.done("refused", status, f"invalid_url: redirect target: {exc}")
    if target.scheme == "https" and next_url.scheme == "http":
        return attempt.done("refused", status, "invalid_url: redirect from https to http")
    return _Hop(str(next_url), redirects=hop.redirects + 1, redirect_status=status)
