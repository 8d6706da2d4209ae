"""The public shapes of a job: the hosted API's response and webhook payload, job status, and
the full transcript behind exports and OpenAI's verbose_json (app/api/schemas.py declares them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.infra.models import Job, JobStatus


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


# The hosted API's segment keys; the rest of what whisper reports is in the detailed views.
HOSTED_SEGMENT_KEYS = ("id", "text", "start", "end")


def hosted_segment(segment: dict[str, Any]) -> dict[str, Any]:
    out = {k: segment[k] for k in HOSTED_SEGMENT_KEYS}
    if segment.get("words") is not None:
        out["words"] = segment["words"]
    return out


def results(job: Job) -> dict[str, Any] | None:
    if job.status != JobStatus.succeeded or job.result is None:
        return None
    return {
        "text": job.result["text"],
        "segments": [hosted_segment(s) for s in job.result["segments"]],
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


def job_summary(job: Job) -> dict[str, Any]:
    return {
        "request_id": job.id,
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "cancel_requested_at": iso(job.cancel_requested_at),
        "deleted_at": iso(job.deleted_at),
        "input_length_ms": job.input_length_ms,
        "inference_status": inference_status(job),
        "error": error(job),
    }


def job_status(job: Job) -> dict[str, Any]:
    return {
        **job_summary(job),
        "options": job.options,
        "webhook": job.webhook_url,
        "results": results(job),
    }


def detailed_segment(segment: dict[str, Any]) -> dict[str, Any]:
    """A stored segment with every field whisper reports; rows stored before the engine kept
    them get neutral values rather than a missing key."""
    return {
        "id": segment["id"],
        "seek": segment.get("seek", 0),
        "start": segment["start"],
        "end": segment["end"],
        "text": segment["text"],
        "tokens": segment.get("tokens", []),
        "temperature": segment.get("temperature", 0.0),
        "avg_logprob": segment.get("avg_logprob", 0.0),
        "compression_ratio": segment.get("compression_ratio", 0.0),
        "no_speech_prob": segment.get("no_speech_prob", 0.0),
        "words": segment.get("words"),
    }


def transcript_document(job: Job) -> dict[str, Any]:
    """The full transcript of a succeeded job (``transcript.json``)."""
    assert job.result is not None
    return {
        "request_id": job.id,
        "task": job.options.get("task", "transcribe"),
        "language": job.result["language"],
        "duration": None if job.input_length_ms is None else job.input_length_ms / 1000,
        "text": job.result["text"],
        "segments": [detailed_segment(s) for s in job.result["segments"]],
    }
