"""The public shapes of a job: the hosted API's response and webhook payload, and job status."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.models import Job, JobStatus


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def inference_status(job: Job) -> dict[str, Any]:
    return {
        "status": job.status,
        "runtime_ms": job.runtime_ms,
        "cost": job.cost,
        "tokens_generated": job.tokens_generated,
        "tokens_input": job.tokens_input,
    }


def results(job: Job) -> dict[str, Any] | None:
    if job.status != JobStatus.succeeded or job.result is None:
        return None
    return {
        "text": job.result["text"],
        "segments": job.result["segments"],
        "language": job.result["language"],
        "input_length_ms": job.input_length_ms,
    }


def error(job: Job) -> dict[str, Any] | None:
    if job.error_code is None:
        return None
    return {"code": job.error_code, "message": job.error_message or ""}


def inference_response(job: Job) -> dict[str, Any]:
    """Synchronous answer, in the hosted API's flat shape."""
    body: dict[str, Any] = {
        "text": "",
        "segments": [],
        "language": None,
        "input_length_ms": job.input_length_ms,
    }
    body.update(results(job) or {})
    body["request_id"] = job.id
    body["inference_status"] = inference_status(job)
    if (err := error(job)) is not None:
        body["error"] = err
    return body


def webhook_payload(job: Job) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "request_id": job.id,
        "inference_status": inference_status(job),
        "results": results(job),
    }
    if (err := error(job)) is not None:
        payload["error"] = err
    return payload


def job_status(job: Job) -> dict[str, Any]:
    return {
        "request_id": job.id,
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "options": job.options,
        "webhook": job.webhook_url,
        "input_length_ms": job.input_length_ms,
        "inference_status": inference_status(job),
        "results": results(job),
        "error": error(job),
    }
