"""Tables: API keys, jobs, webhook deliveries and their attempts. Postgres is the truth."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.infra.db import Base, UTCDateTime, utcnow


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})


class DeliveryStatus(enum.StrEnum):
    pending = "pending"  # waiting for its next attempt
    sending = "sending"  # claimed by a worker (lease_expires_at says until when)
    delivered = "delivered"
    gone = "gone"  # the receiver answered 410: never again
    failed = "failed"  # retry schedule exhausted
    refused = "refused"  # the URL is not allowed (SSRF guard)


def new_job_id() -> str:
    return uuid.uuid4().hex


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(200), default="")
    # Kept in clear: we must sign with them. The previous one is still sent during rotation.
    webhook_secret: Mapped[str] = mapped_column(String(128))
    webhook_secret_previous: Mapped[str | None] = mapped_column(String(128), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Batch(Base):
    """Many jobs submitted together (issue 13). Its state is derived from its jobs; the row
    records only what the jobs cannot say: inputs closed, canceled, ended (exactly once)."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_api_key_id_created_at", "api_key_id", "created_at"),
        # A client's retried create (same key) finds its batch instead of making a second.
        Index(
            "uq_batches_api_key_id_idempotency_key", "api_key_id", "idempotency_key", unique=True
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    # Option fields as the caller sent them: inputs added later are parsed against these.
    default_options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sealed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Set once, by a guarded UPDATE, when the batch is sealed and none of its jobs is left.
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_api_key_id_created_at", "api_key_id", "created_at"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        # The claim: the oldest queued job of one key in one queue, and the keys with work.
        # Partial, so it holds the backlog only (finished jobs never enter it), and ends on
        # ``id`` so no two entries are equal: Postgres then marks each claimed job's entry
        # dead on its own (a deduplicated posting list stays until every job in it is gone,
        # and every claim walked past the whole list: rows per job grew with the backlog).
        Index(
            "ix_jobs_queued_claim",
            "queue",
            "api_key_id",
            "created_at",
            "id",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        # Jobs in flight per key (the cap and the fair order), without the backlog.
        Index(
            "ix_jobs_running_api_key_id",
            "api_key_id",
            "id",
            postgresql_where=text("status = 'running'"),
            sqlite_where=text("status = 'running'"),
        ),
        # Fair share: when did each key last have a job started. Partial: a backward scan of
        # a key's range in a full index walked all its queued rows (null started_at) first.
        Index(
            "ix_jobs_api_key_id_started_at",
            "api_key_id",
            "started_at",
            postgresql_where=text("started_at IS NOT NULL"),
            sqlite_where=text("started_at IS NOT NULL"),
        ),
        Index("ix_jobs_batch_id_status", "batch_id", "status"),
        # Who still needs a blob (jobs may share one), asked at every job end and by the
        # orphan purge: without it, each ask read the whole backlog.
        Index(
            "ix_jobs_audio_blob",
            "audio_blob",
            postgresql_where=text("audio_blob IS NOT NULL"),
            sqlite_where=text("audio_blob IS NOT NULL"),
        ),
        # "Is anything of this batch left?", asked at every finish of a batch job: the
        # unfinished jobs only, each entry distinct (see ix_jobs_queued_claim).
        Index(
            "ix_jobs_batch_unfinished",
            "batch_id",
            "id",
            postgresql_where=text("status IN ('queued', 'running')"),
            sqlite_where=text("status IN ('queued', 'running')"),
        ),
        Index("ix_jobs_batch_id_created_at_id", "batch_id", "created_at", "id"),
        # One job per input of a batch, however often the client retries the upload.
        Index("uq_jobs_batch_id_idempotency_key", "batch_id", "idempotency_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued)
    queue: Mapped[str] = mapped_column(String(32))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    audio_blob: Mapped[str | None] = mapped_column(String(200), default=None)
    audio_url: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)

    input_length_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    runtime_ms: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_generated: Mapped[int] = mapped_column(Integer, default=0)
    tokens_input: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    # Issue 15: a running job is asked to stop (the worker drops it at its next window);
    # a deleted job keeps its billing columns, its audio and transcript are gone.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    # Batches (issue 13): the batch, the caller's id for the input, its original name.
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), default=None
    )
    custom_id: Mapped[str | None] = mapped_column(String(200), default=None)
    source_name: Mapped[str | None] = mapped_column(Text, default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    content_sha256: Mapped[str | None] = mapped_column(String(64), default=None)

    api_key: Mapped[ApiKey] = relationship()


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` a caller sent with a submission (issue 15). ``job_id`` is
    null while the first request holding the key is still submitting."""

    __tablename__ = "idempotency_keys"

    api_key_id: Mapped[int] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), default=None
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class WebhookDelivery(Base):
    """One logical event for one job; retries are attempts of it, sharing its message id."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
        # A job's event or a batch's, never an orphan (its key signs it).
        CheckConstraint("job_id IS NOT NULL OR batch_id IS NOT NULL", name="owner"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_message_id)
    # Null for a batch's event (batch_id set): it belongs to no job, and a batch canceled
    # before any input has none to hang it on.
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True, default=None
    )
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)  # the exact bytes every attempt sends
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # When its id last went to the broker; the reaper re-sends a due delivery nobody took.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # A batch's "ended" event (job_id null): signed with the batch's key.
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), default=None, index=True
    )

    attempt_rows: Mapped[list[WebhookAttempt]] = relationship(
        order_by="WebhookAttempt.attempt_no", cascade="all, delete-orphan"
    )


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempt_no: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
