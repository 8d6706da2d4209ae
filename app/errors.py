"""Every machine-readable error code, tied to its HTTP status and to whose fault it is, and
the error that carries one: what the job logic (app/jobs/), the API and the worker raise or
store. app/api/errors.py turns a :class:`ServiceError` into a response; nothing here knows
the web framework.

Native routes answer ``{"error": {"code", "message", "field"?}}``; the OpenAI-compatible
routes answer OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the status
codes its official client maps to exception classes. tests/test_errors.py greps the
repository so that every code emitted is a member here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Fault(StrEnum):
    caller = "caller"  # the request or its audio: retrying the same thing fails the same way
    server = "server"  # ours: a bug, a missing tool, an unreachable dependency


class ErrorCode(StrEnum):
    """Every machine-readable error code, with its HTTP status and who is at fault.

    A job that fails in the worker stores one of these in ``jobs.error_code``; a sync caller
    then gets 422 for a caller fault and 500 for a server fault.
    """

    status: int
    fault: Fault

    def __new__(cls, code: str, status: int, fault: Fault) -> ErrorCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        member.fault = fault
        return member

    # Authentication and routing
    unauthorized = ("unauthorized", 401, Fault.caller)
    cross_origin_request = ("cross_origin_request", 403, Fault.caller)  # a page's CSRF guard
    not_found = ("not_found", 404, Fault.caller)
    method_not_allowed = ("method_not_allowed", 405, Fault.caller)
    http_error = ("http_error", 400, Fault.caller)
    invalid_request = ("invalid_request", 422, Fault.caller)
    invalid_form = ("invalid_form", 400, Fault.caller)
    # Options and URLs
    invalid_option = ("invalid_option", 422, Fault.caller)
    invalid_date = ("invalid_date", 422, Fault.caller)
    unsupported_option = ("unsupported_option", 422, Fault.caller)  # e.g. translate on .en
    invalid_url = ("invalid_url", 422, Fault.caller)
    invalid_audio_url = ("invalid_audio_url", 422, Fault.caller)
    webhook_forbidden_address = ("webhook_forbidden_address", 422, Fault.caller)
    webhook_unresolvable_host = ("webhook_unresolvable_host", 422, Fault.caller)
    audio_url_forbidden_address = ("audio_url_forbidden_address", 422, Fault.caller)
    audio_url_unresolvable_host = ("audio_url_unresolvable_host", 422, Fault.caller)
    # Audio
    missing_audio = ("missing_audio", 422, Fault.caller)
    empty_audio = ("empty_audio", 400, Fault.caller)
    invalid_audio = ("invalid_audio", 400, Fault.caller)
    audio_too_large = ("audio_too_large", 413, Fault.caller)
    audio_too_long = ("audio_too_long", 413, Fault.caller)
    audio_fetch_failed = ("audio_fetch_failed", 422, Fault.caller)
    # Jobs
    job_not_found = ("job_not_found", 404, Fault.caller)
    audio_not_found = ("audio_not_found", 404, Fault.caller)
    job_not_finished = ("job_not_finished", 409, Fault.caller)
    job_has_no_transcript = ("job_has_no_transcript", 409, Fault.caller)
    job_already_finished = ("job_already_finished", 409, Fault.caller)
    job_in_progress = ("job_in_progress", 409, Fault.caller)
    job_deleted = ("job_deleted", 410, Fault.caller)
    canceled = ("canceled", 409, Fault.caller)  # ended on its owner's request
    batch_canceled = ("batch_canceled", 409, Fault.caller)  # its batch was canceled
    job_still_running = ("job_still_running", 504, Fault.server)
    invalid_cursor = ("invalid_cursor", 422, Fault.caller)
    no_delivery = ("no_delivery", 409, Fault.caller)
    delivery_in_flight = ("delivery_in_flight", 409, Fault.caller)
    # Batches (issue 13)
    batch_not_found = ("batch_not_found", 404, Fault.caller)
    batch_sealed = ("batch_sealed", 409, Fault.caller)
    batch_finished = ("batch_finished", 409, Fault.caller)
    batch_empty = ("batch_empty", 409, Fault.caller)
    no_inputs = ("no_inputs", 422, Fault.caller)
    too_many_inputs = ("too_many_inputs", 413, Fault.caller)
    invalid_manifest = ("invalid_manifest", 422, Fault.caller)
    unknown_field = ("unknown_field", 422, Fault.caller)
    field_too_large = ("field_too_large", 413, Fault.caller)
    request_too_large = ("request_too_large", 413, Fault.caller)
    unsupported_media_type = ("unsupported_media_type", 415, Fault.caller)

    # Idempotency
    invalid_idempotency_key = ("invalid_idempotency_key", 422, Fault.caller)
    idempotency_key_reused = ("idempotency_key_reused", 409, Fault.caller)
    idempotency_key_in_use = ("idempotency_key_in_use", 409, Fault.caller)
    # Limits (issue 14)
    rate_limited = ("rate_limited", 429, Fault.caller)
    too_many_active_jobs = ("too_many_active_jobs", 429, Fault.caller)

    # Ours
    audio_missing = ("audio_missing", 500, Fault.server)  # the blob vanished from the store
    ffmpeg_missing = ("ffmpeg_missing", 500, Fault.server)
    queue_unavailable = ("queue_unavailable", 503, Fault.server)
    internal_error = ("internal_error", 500, Fault.server)
    # The queue branch's worker: a job whose worker died on every attempt is failed with it.
    worker_lost = ("worker_lost", 500, Fault.server)

    @classmethod
    def lookup(cls, code: str | None) -> ErrorCode | None:
        return cls._value2member_map_.get(code) if code is not None else None  # type: ignore[return-value]


def is_caller_fault(code: str | None) -> bool:
    """Unknown codes count as ours: never blame the caller for what we cannot name."""
    known = ErrorCode.lookup(code)
    return known is not None and known.fault == Fault.caller


class ServiceError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra or {}
        self.headers = headers or {}

    @classmethod
    def of(
        cls,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ServiceError:
        """The error with the status its code is tied to."""
        return cls(code.status, code, message, field=field, extra=extra)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error, **self.extra}

    def openai_status(self) -> int:
        """OpenAI answers every invalid request with 400; its client has a class per status
        (400, 401, 403, 404, 409, 422, 429, 5xx) and code written against it expects 400."""
        if self.status in (401, 403, 404, 409, 429) or self.status >= 500:
            return self.status
        return 400

    def openai_body(self) -> dict[str, Any]:
        server = self.status >= 500
        return {
            "error": {
                "message": self.message,
                "type": "server_error" if server else "invalid_request_error",
                "param": self.field,
                "code": str(self.code),
            }
        }


class UserError(Exception):
    """A mistake the user of a command can fix: printed as one line, never a traceback."""
