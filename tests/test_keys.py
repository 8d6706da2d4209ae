"""API keys: only an HMAC is stored; lookup by prefix; revoked and forged keys fail."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.infra.db import utcnow
from app.infra.models import ApiKey
from app.jobs.keys import authenticate, create_key, hash_secret, rotate_webhook_secret

PEPPER = "unit-test-pepper"


def test_created_key_authenticates_and_is_stored_hashed(db_session: Session) -> None:
    created = create_key(db_session, name="alice", pepper=PEPPER)
    prefix, secret = created.key.split(".", 1)
    row = db_session.get(ApiKey, created.row.id)
    assert row is not None and row.prefix == prefix
    assert secret not in row.secret_hash and row.secret_hash == hash_secret(secret, pepper=PEPPER)
    assert authenticate(db_session, presented=created.key, pepper=PEPPER) is row
    assert created.webhook_secret.startswith("whsec_")


def test_wrong_secret_prefix_or_pepper_is_refused(db_session: Session) -> None:
    created = create_key(db_session, name="bob", pepper=PEPPER)
    prefix, secret = created.key.split(".", 1)
    for presented in (f"{prefix}.{secret}x", f"{prefix}x.{secret}", prefix, "", "."):
        assert authenticate(db_session, presented=presented, pepper=PEPPER) is None
    assert authenticate(db_session, presented=created.key, pepper="other-pepper") is None


def test_revoked_key_is_refused(db_session: Session) -> None:
    created = create_key(db_session, name="carol", pepper=PEPPER)
    created.row.revoked_at = utcnow()
    db_session.flush()
    assert authenticate(db_session, presented=created.key, pepper=PEPPER) is None


def test_rotation_keeps_the_previous_secret(db_session: Session) -> None:
    created = create_key(db_session, name="dave", pepper=PEPPER)
    new = rotate_webhook_secret(db_session, prefix=created.row.prefix)
    assert new != created.webhook_secret
    assert created.row.webhook_secret == new
    assert created.row.webhook_secret_previous == created.webhook_secret
