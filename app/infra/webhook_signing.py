"""Standard Webhooks (https://www.standardwebhooks.com/) message signing.

Secrets look like ``whsec_<base64 key>``.  The signed content is
``f"{msg_id}.{timestamp}.".encode() + body`` and each signature is ``v1,<base64 HMAC-SHA256>``.
During secret rotation several secrets are active; one signature per secret is sent,
space-separated, and receivers accept the message if any of them verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
from collections.abc import Sequence

__all__ = ["SECRET_PREFIX", "decode_secret", "new_webhook_secret", "sign", "signature_headers"]

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_webhook_secret() -> str:
    """A fresh random signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """The HMAC key of ``secret`` (the ``whsec_`` prefix is optional, padding may be omitted)."""
    encoded = secret.removeprefix(SECRET_PREFIX).strip()
    encoded += "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret is not valid base64") from None
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(secret: str, *, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256(key, "{msg_id}.{timestamp}." + body)>``."""
    signed_content = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(decode_secret(secret), signed_content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(
    secrets: Sequence[str], *, msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The Standard Webhooks headers for one message, signed with every secret given."""
    if isinstance(secrets, str):
        raise TypeError("secrets must be a sequence of secrets, not a single string")
    if not secrets:
        raise ValueError("at least one webhook secret is required")
    signatures = [sign(s, msg_id=msg_id, timestamp=timestamp, body=body) for s in secrets]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
    }
