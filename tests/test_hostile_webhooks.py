"""Issue 14: whatever a webhook receiver answers, the attempt is recorded and the delivery
leaves ``sending``; nothing escapes to be re-tried for ever by the lease sweep."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.infra.db import session_scope
from app.infra.models import DeliveryStatus, Job, JobStatus, WebhookAttempt, WebhookDelivery
from app.settings import get_settings
from tests.support.api import new_key
from tests.support.services import Receiver
from worker import deliveries

MALFORMED_LOCATIONS = [
    "http:\\\\169.254.169.254\\",  # the issue's: backslashes, an internal address
    "http://xn--/",  # an invalid IDNA label: the URL parser raises IDNAError, not InvalidURL
    "http://[::1",
    "http://a:b",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1%25eth0]/",
    "//0x7f.1/",
]


def _delivery(url: str) -> str:
    key = new_key("hostile-hooks")
    with session_scope() as session:
        job = Job(
            api_key_id=key.row.id,
            status=JobStatus.succeeded,
            queue="interactive",
            options={},
            webhook_url=url,
        )
        session.add(job)
        session.flush()
        delivery = WebhookDelivery(job_id=job.id, url=url, body="{}")
        session.add(delivery)
        session.flush()
        return delivery.id


@pytest.mark.parametrize("location", MALFORMED_LOCATIONS)
def test_malformed_redirect_ends_in_a_recorded_attempt(receiver: Receiver, location: str) -> None:
    receiver.respond = lambda _r, _n: (302, {"Location": location}, 0.0, b"")
    settings = get_settings().model_copy(update={"webhook_allowlist": ["127.0.0.1"]})
    delivery_id = _delivery(f"{receiver.url}/hook")

    deliveries.attempt(delivery_id, settings=settings)

    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        attempts = session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
        ).all()
        assert delivery.status != DeliveryStatus.sending and delivery.lease_expires_at is None
        assert delivery.attempts == 1 and len(attempts) == 1
        assert attempts[0].outcome in ("refused", "retry") and attempts[0].error
    assert len(receiver.requests) == 1  # the target of the redirect was never contacted
