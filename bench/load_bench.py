"""Load bench (issue 11): N concurrent clients against a running whisperq, loopback only.

Each client submits real speech ``--requests`` times, in webhook mode (``async``: answered at
once, the transcript arrives at a receiver this bench runs on 127.0.0.1) or synchronously
(``sync``: the transcript is in the response). Then every accepted job is followed to its
end. Printed per mode: submissions/s, p50/p99 latency, accepted, completed, lost (accepted
but never ended), duplicated (a job announced under two event ids, or jobs created beyond
those accepted: a client that saw an error but was billed), 5xx, 429, dropped connections.

The server must allow webhooks to 127.0.0.1 (WHISPERQ_WEBHOOK_ALLOWLIST) and, to measure
the API rather than the rate limiter, run with WHISPERQ_SUBMIT_RATE_PER_MINUTE=0.

    .venv/bin/python -m bench.load_bench --url http://127.0.0.1:8000 --key wq_...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

INFER = "/v1/inference/openai/whisper-tiny"
MAX_CLIENTS = 1000  # bounded: this is a bench, not a load generator for other people's hosts
SPEECH = (
    "The quick brown fox jumps over the lazy dog. A queue of recordings waits for the "
    "workers, and every one of them must come back exactly once."
)


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise SystemExit(f"load_bench: cannot resolve {host!r}: {exc}") from None
    if not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        raise SystemExit(f"load_bench: {url} is not a loopback address; refusing to load it")


@dataclass
class Events:
    """Webhook events received, by request id: the distinct event ids for each."""

    by_job: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    job_id = str(json.loads(body)["request_id"])
                except (ValueError, KeyError):
                    job_id = "?"
                with outer.lock:
                    outer.by_job[job_id].add(self.headers.get("webhook-id") or "")
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/hook"


@dataclass
class Outcome:
    status: int  # 0: no answer (dropped connection, client time-out)
    latency_s: float
    job_id: str | None
    text: str | None = None


async def client(
    http: httpx.AsyncClient, audio: bytes, n: int, webhook: str | None, out: list[Outcome]
) -> None:
    data = {"webhook": webhook} if webhook else {}
    for _ in range(n):
        t = time.perf_counter()
        try:
            r = await http.post(INFER, files={"audio": ("speech.wav", audio)}, data=data)
        except httpx.HTTPError:
            out.append(Outcome(0, time.perf_counter() - t, None))
            continue
        body: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            body = r.json()
        out.append(
            Outcome(
                r.status_code, time.perf_counter() - t, body.get("request_id"), body.get("text")
            )
        )


async def follow(http: httpx.AsyncClient, job_ids: set[str], timeout_s: float) -> dict[str, str]:
    """Each accepted job's final status (or its last one, at the deadline)."""
    status: dict[str, str] = {}
    pending = set(job_ids)
    deadline = time.monotonic() + timeout_s
    gate = asyncio.Semaphore(20)

    async def one(job_id: str) -> None:
        async with gate:
            try:
                r = await http.get(f"/v1/jobs/{job_id}")
                status[job_id] = r.json().get("status", f"http {r.status_code}")
            except (httpx.HTTPError, ValueError):
                status[job_id] = "unreachable"

    while pending and time.monotonic() < deadline:
        await asyncio.gather(*(one(j) for j in pending))
        pending = {j for j in pending if status[j] not in ("succeeded", "failed", "canceled")}
        if pending:
            await asyncio.sleep(2)
    return status


async def created_since(http: httpx.AsyncClient, since: datetime) -> set[str]:
    ids: set[str] = set()
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"created_after": since.isoformat(), "limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = (await http.get("/v1/jobs", params=params)).json()
        ids |= {j["request_id"] for j in page["data"]}
        cursor = page.get("next_cursor")
        if not cursor:
            return ids


@dataclass(frozen=True)
class Report:
    mode: str
    clients: int
    submitted: int
    wall_s: float
    p50_s: float
    p99_s: float
    accepted: int
    completed: int
    lost: int
    duplicated: int
    server_errors: int
    throttled: int
    dropped: int


async def run_mode(
    args: argparse.Namespace, mode: str, audio: bytes, events: Events, hook: str
) -> Report:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    headers = {"Authorization": f"bearer {args.key}"}
    since = datetime.now(UTC)
    out: list[Outcome] = []
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, limits=limits, timeout=args.timeout
    ) as http:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                client(http, audio, args.requests, hook if mode == "async" else None, out)
                for _ in range(args.clients)
            )
        )
        wall = time.perf_counter() - t0
        # A sync call whose wait ran out answers 202 with the job id: accepted all the same.
        ok = {202} if mode == "async" else {200, 202}
        accepted = {o.job_id for o in out if o.status in ok and o.job_id}
        final = await follow(http, accepted, args.timeout)
        created = await created_since(http, since)
    completed = sum(1 for j in accepted if final.get(j) == "succeeded")
    if mode == "async":
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(j not in events.by_job for j in accepted):
            await asyncio.sleep(0.5)
        twice = sum(1 for j in accepted if len(events.by_job.get(j, ())) > 1)
    else:
        twice = 0
    lost = sum(1 for j in accepted if final.get(j) not in ("succeeded", "failed", "canceled"))
    latencies = sorted(o.latency_s for o in out)
    return Report(
        mode=mode,
        clients=args.clients,
        submitted=len(out),
        wall_s=wall,
        p50_s=statistics.median(latencies),
        p99_s=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        accepted=len(accepted),
        completed=completed,
        lost=lost,
        duplicated=twice + len(created - accepted),
        server_errors=sum(1 for o in out if o.status >= 500),
        throttled=sum(1 for o in out if o.status == 429),
        dropped=sum(1 for o in out if o.status == 0),
    )


def speech_wav() -> bytes:
    from tests.support.real_models import speak

    with tempfile.TemporaryDirectory() as tmp:
        return speak(SPEECH, Path(tmp) / "speech.wav").read_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default=os.environ.get("WHISPERQ_BENCH_KEY", ""))
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=1, help="submissions per client")
    ap.add_argument("--mode", choices=["async", "sync", "both"], default="both")
    ap.add_argument("--audio", type=Path, help="a speech file (default: espeak-ng speech)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per request/follow-up")
    args = ap.parse_args(argv)
    if not args.key:
        ap.error("--key (or WHISPERQ_BENCH_KEY) is required")
    if not 1 <= args.clients <= MAX_CLIENTS:
        ap.error(f"--clients must be 1..{MAX_CLIENTS}")
    require_loopback(args.url)
    audio = args.audio.read_bytes() if args.audio else speech_wav()
    events = Events()
    server, hook = events.serve()
    modes = ["async", "sync"] if args.mode == "both" else [args.mode]
    reports = [asyncio.run(run_mode(args, m, audio, events, hook)) for m in modes]
    server.shutdown()
    print(
        f"# load bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, {args.url}, {len(audio)} B of speech per request"
    )
    print(
        "| mode | clients | submitted | subm/s | p50 s | p99 s | accepted | completed | lost |"
        " duplicated | 5xx | 429 | dropped |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        print(
            f"| {r.mode} | {r.clients} | {r.submitted} | {r.submitted / r.wall_s:.1f} |"
            f" {r.p50_s:.2f} | {r.p99_s:.2f} | {r.accepted} | {r.completed} | {r.lost} |"
            f" {r.duplicated} | {r.server_errors} | {r.throttled} | {r.dropped} |"
        )
    bad = any(r.lost or r.duplicated or r.server_errors or r.dropped for r in reports)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
