"""Usage and billing: what finished jobs used (jobs, audio seconds, model time, cost), per
key, per day or in total; read by ``GET /v1/usage`` (app/api/usage.py) for the caller's key
and by ``whisperq usage`` for an operator across keys. A job counts on the day it finished
(when it was billed)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.errors import ServiceError
from app.infra.models import TERMINAL_STATUSES, ApiKey, Job, JobStatus

DEFAULT_WINDOW = timedelta(days=30)
GroupBy = Literal["day", "none"]


class UsageRow(BaseModel):
    day: str | None = Field(None, description="UTC day (YYYY-MM-DD) when grouped by day")
    jobs: int = Field(description="jobs that finished (succeeded, failed or canceled)")
    succeeded: int
    failed: int
    canceled: int = Field(description="jobs canceled (queued ones cost nothing)")
    audio_seconds: float = Field(description="audio length of succeeded jobs")
    runtime_ms: int = Field(description="model time billed")
    cost: float = Field(description="USD, canceled jobs' model time included")
    canceled_cost: float = Field(
        description="USD: the part of cost spent on jobs canceled while they ran"
    )


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime


def parse_instant(value: str | None, *, field: str) -> datetime | None:
    if value is None or not value.strip():
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ServiceError(
            422, "invalid_date", f"{field} must be a date or ISO 8601 time", field=field
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def window(start: str | None, end: str | None, *, now: datetime) -> Window:
    """``to`` given as a bare date includes that whole day."""
    e = parse_instant(end, field="to")
    if e is not None and end is not None and len(end.strip()) == 10:
        e += timedelta(days=1)
    e = e or now
    s = parse_instant(start, field="from") or (e - DEFAULT_WINDOW)
    if s >= e:
        raise ServiceError(422, "invalid_date", "from must be before to", field="from")
    return Window(s, e)


def _measures() -> list[Any]:
    ok = Job.status == JobStatus.succeeded
    canceled = Job.status == JobStatus.canceled
    return [
        func.count().label("jobs"),
        func.sum(case((ok, 1), else_=0)).label("succeeded"),
        func.sum(case((Job.status == JobStatus.failed, 1), else_=0)).label("failed"),
        func.sum(case((canceled, 1), else_=0)).label("canceled"),
        func.sum(case((canceled, Job.cost), else_=0.0)).label("canceled_cost"),
        func.sum(case((ok, Job.input_length_ms), else_=0)).label("audio_ms"),
        func.sum(Job.runtime_ms).label("runtime_ms"),
        func.sum(Job.cost).label("cost"),
    ]


def _row(r: Any, day: str | None = None) -> UsageRow:
    return UsageRow(
        day=day,
        jobs=int(r.jobs or 0),
        succeeded=int(r.succeeded or 0),
        failed=int(r.failed or 0),
        canceled=int(r.canceled or 0),
        audio_seconds=round((r.audio_ms or 0) / 1000, 3),
        runtime_ms=int(r.runtime_ms or 0),
        cost=round(float(r.cost or 0.0), 10),
        canceled_cost=round(float(r.canceled_cost or 0.0), 10),
    )


def _base(w: Window) -> Any:
    return (
        Job.status.in_([str(s) for s in TERMINAL_STATUSES]),
        Job.finished_at >= w.start,
        Job.finished_at < w.end,
    )


def usage_for_key(
    session: Session, *, key_id: int, w: Window, group_by: GroupBy
) -> tuple[list[UsageRow], UsageRow]:
    rows: list[UsageRow] = []
    if group_by == "day":
        day = func.date(Job.finished_at)
        for r in session.execute(
            select(day.label("day"), *_measures())
            .where(Job.api_key_id == key_id, *_base(w))
            .group_by(day)
            .order_by(day)
        ).all():
            rows.append(_row(r, str(r.day)[:10]))
    total = _row(
        session.execute(select(*_measures()).where(Job.api_key_id == key_id, *_base(w))).one()
    )
    return rows, total


def usage_by_key(session: Session, *, w: Window) -> list[tuple[ApiKey, UsageRow]]:
    """Every key (revoked ones too: they were billed), busiest first."""
    found = {
        r.api_key_id: _row(r)
        for r in session.execute(
            select(Job.api_key_id, *_measures()).where(*_base(w)).group_by(Job.api_key_id)
        ).all()
    }
    keys = session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
    empty = UsageRow(
        jobs=0,
        succeeded=0,
        failed=0,
        canceled=0,
        audio_seconds=0,
        runtime_ms=0,
        cost=0,
        canceled_cost=0,
    )
    out = [(k, found.get(k.id, empty)) for k in keys]
    return sorted(out, key=lambda kv: -kv[1].runtime_ms)
