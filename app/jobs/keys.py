"""API keys: ``prefix.secret``; only an HMAC of the secret is stored, looked up by prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.infra.models import ApiKey
from app.infra.webhook_signing import new_webhook_secret


@dataclass(frozen=True)
class CreatedKey:
    key: str  # shown once, never stored
    webhook_secret: str  # shown once at creation (and on rotation)
    row: ApiKey


def hash_secret(secret: str, *, pepper: str) -> str:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def create_key(session: Session, *, name: str, pepper: str) -> CreatedKey:
    prefix = "wq_" + secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(
        prefix=prefix,
        secret_hash=hash_secret(secret, pepper=pepper),
        name=name,
        webhook_secret=new_webhook_secret(),
    )
    session.add(row)
    session.flush()
    return CreatedKey(key=f"{prefix}.{secret}", webhook_secret=row.webhook_secret, row=row)


def rotate_webhook_secret(session: Session, *, prefix: str) -> str:
    """New secret; the old one keeps being sent beside it until the next rotation."""
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one()
    row.webhook_secret_previous = row.webhook_secret
    row.webhook_secret = new_webhook_secret()
    return row.webhook_secret


def authenticate(session: Session, *, presented: str, pepper: str) -> ApiKey | None:
    prefix, dot, secret = presented.partition(".")
    if not dot or not prefix or not secret:
        return None
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    # Hash even when the prefix is unknown, so timing does not reveal which prefixes exist.
    digest = hash_secret(secret, pepper=pepper)
    if row is None or row.revoked_at is not None:
        return None
    return row if hmac.compare_digest(digest, row.secret_hash) else None
