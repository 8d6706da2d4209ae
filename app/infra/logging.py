"""Logs: plain text or one JSON object a line (WHISPERQ_LOG_FORMAT=json), each carrying the
``request_id`` of the job being handled (API request → worker task → webhook attempts).

What a log line must never hold: API keys, webhook secrets, transcript text. Our own lines
log ids and counts only; as a last guard, anything shaped like a key or a secret is masked.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from app.settings import Settings

request_id_var: ContextVar[str | None] = ContextVar("whisperq_request_id", default=None)

# wq_<hex>.<secret> API keys, whsec_ webhook secrets, bearer tokens.
SECRET_PATTERN = re.compile(
    r"(wq_[0-9a-f]{6,}\.[A-Za-z0-9_\-]+|whsec_[A-Za-z0-9+/=_\-]+|(?i:bearer)\s+\S+)"
)
STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "", None, None)).keys()
    | {"message", "asctime", "request_id"}
)


def bind_request_id(value: str | None) -> None:
    request_id_var.set(value)


def mask(text: str) -> str:
    return SECRET_PATTERN.sub("[redacted]", text)


# Celery's own lines about a job's message ("received", "succeeded in"): a message's task id
# is its job's id (app.infra.queue.send_job), given in the line's arguments.
JOB_TASK = "whisperq.run_job"


# Celery's task lines repeat their arguments in ``data``, with the traceback of an expected
# failure (a JobFailed, whose reason is stored and logged once already): not a field.
NOT_LOGGED = frozenset({"data"})


class Event(StrEnum):
    """What a log line records, as a machine reads it: the ``event`` field of a JSON line
    (WHISPERQ_LOG_FORMAT=json). Tests and alerts match these, never a line's wording."""

    not_claimable = "job.not_claimable"  # a message whose job ended or runs elsewhere
    claim_failed = "job.claim_failed"  # Postgres refused the claim: the message goes back
    store_retry = "job.store_retry"  # Postgres refused the outcome: retried until it lands
    outcome_dropped = "job.outcome_dropped"  # a newer run owns the job: this outcome is not kept
    lease_lost = "job.lease_lost"  # the run noticed another run took its job
    handed_back = "job.handed_back"  # shutdown: the job went back to the queue
    jobs_resent = "reaper.jobs_resent"  # messages Redis lost, sent again (``count``)
    deliveries_resent = "reaper.deliveries_resent"  # due webhook deliveries nobody took
    engine_ready = "worker.engine_ready"  # ``engine``: batched (with its ``model``) or null


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            rid = request_id_var.get()
            args = record.args
            if rid is None and isinstance(args, dict) and args.get("name") == JOB_TASK:
                rid = args.get("id")
            record.request_id = rid
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask(record.getMessage()),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in STANDARD_ATTRS and not key.startswith("_") and key not in NOT_LOGGED:
                out[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            out["exc"] = mask(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        line = super().format(record)
        return mask(f"{line} request_id={rid}" if rid else line)


def configure_logging(settings: Settings) -> None:
    """Root handler on stderr in the chosen format; idempotent."""
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_whisperq", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._whisperq = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
