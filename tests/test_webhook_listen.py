"""``whisperq listen``'s signature check: what the README's async example relies on to tell
a genuine event from a forged or replayed one."""

from __future__ import annotations

import time

from app.client.listen import verify
from app.infra.webhook_signing import new_webhook_secret, signature_headers

BODY = b'{"request_id": "abc", "inference_status": {"status": "succeeded"}}'


def headers(secret: str, *, at: float, body: bytes = BODY) -> dict[str, str]:
    return signature_headers([secret], msg_id="msg_1", timestamp=int(at), body=body)


def test_a_signed_event_verifies_and_a_forged_one_does_not() -> None:
    secret, other = new_webhook_secret(), new_webhook_secret()
    now = time.time()
    assert verify(secret, headers(secret, at=now), BODY) == "verified"
    assert verify(secret, headers(other, at=now), BODY).startswith("BAD SIGNATURE")
    tampered = BODY.replace(b"succeeded", b"failed")
    assert verify(secret, headers(secret, at=now), tampered).startswith("BAD SIGNATURE")
    assert verify(secret, headers(secret, at=now - 3600), BODY).startswith("stale")
    assert verify(secret, {}, BODY).startswith("unsigned")
