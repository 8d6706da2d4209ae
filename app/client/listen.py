"""``whisperq listen``: a webhook receiver for trying the asynchronous API on one machine.

It prints each event as it arrives and, given the key's ``whsec_`` secret, whether its
Standard Webhooks signature verifies. ``make up`` allows loopback webhook targets (a local
stack), so ``-F webhook=http://127.0.0.1:9000/`` reaches it; production refuses them.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

from app.infra.webhook_signing import sign

# The Standard Webhooks spec's default tolerance for the timestamp.
TOLERANCE_S = 300
MAX_BODY = 16 * 1024 * 1024


def verify(secret: str, headers: Any, body: bytes, *, now: float | None = None) -> str:
    """'verified', or why not: the signature header, its age and every v1 signature."""
    msg_id = headers.get("webhook-id") or ""
    stamp = headers.get("webhook-timestamp") or ""
    given = (headers.get("webhook-signature") or "").split()
    if not (msg_id and stamp.isdigit() and given):
        return "unsigned (no webhook-id, webhook-timestamp or webhook-signature header)"
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE_S:
        return f"stale timestamp {stamp} (more than {TOLERANCE_S} s from now)"
    want = sign(secret, msg_id=msg_id, timestamp=int(stamp), body=body)
    if any(hmac.compare_digest(want, sig) for sig in given):
        return "verified"
    return "BAD SIGNATURE (another secret, or the body was changed)"


def describe(body: bytes) -> str:
    try:
        event = json.loads(body)
    except ValueError:
        return f"{len(body)} bytes, not JSON"
    if not isinstance(event, dict):
        return json.dumps(event)[:200]
    data: dict[str, Any] = event["data"] if isinstance(event.get("data"), dict) else event
    status = (data.get("inference_status") or {}).get("status") or data.get("status")
    parts = [f"{event.get('type', 'event')}", f"request_id={data.get('request_id')}"]
    if status:
        parts.append(f"status={status}")
    if isinstance(data.get("text"), str):
        parts.append(f"text={data['text'][:120]!r}")
    return " ".join(parts)


def make_handler(secret: str | None, out: TextIO) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_BODY:
                self.send_response(413)
                self.end_headers()
                return
            body = self.rfile.read(length)
            check = verify(secret, self.headers, body) if secret else "not checked (no --secret)"
            print(f"{self.path} {describe(body)}  signature: {check}", file=out, flush=True)
            print(body.decode(errors="replace"), file=out, flush=True)
            # 204 for a good event; a bad signature gets 400, so the service's retries and
            # its delivery log show the mismatch too.
            self.send_response(400 if secret and check != "verified" else 204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per event above is the whole output

    return Handler


def cmd_listen(args: argparse.Namespace) -> int:
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.secret, sys.stdout))
    print(
        f"whisperq listen: webhooks to http://{args.host}:{server.server_port}/  (Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_parser(sub: Any) -> None:
    listen = sub.add_parser(
        "listen",
        help="receive webhooks on this machine and print them (for trying the async API)",
    )
    listen.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    listen.add_argument("--port", type=int, default=9000, help="port (default 9000)")
    listen.add_argument(
        "--secret", help="the key's whsec_ webhook secret: check each event's signature"
    )
    listen.set_defaults(func=cmd_listen)
