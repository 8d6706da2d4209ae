"""``GET /v1/usage``: what the caller's key used (app/jobs/usage.py counts it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.api.deps import CurrentKey, SessionDep
from app.jobs.usage import GroupBy, UsageRow, usage_for_key, window

router = APIRouter()


class Usage(BaseModel):
    key_prefix: str
    start: str = Field(description="inclusive, UTC")
    end: str = Field(description="exclusive, UTC")
    group_by: GroupBy
    rows: list[UsageRow]
    total: UsageRow


def _iso(d: datetime) -> str:
    return d.isoformat().replace("+00:00", "Z")


@router.get("/v1/usage", response_model=Usage)
def get_usage(
    key: CurrentKey,
    session: SessionDep,
    start: Annotated[str | None, Query(alias="from", description="date or ISO time")] = None,
    end: Annotated[
        str | None, Query(alias="to", description="date (inclusive) or ISO time")
    ] = None,
    group_by: GroupBy = "day",
) -> Usage:
    w = window(start, end, now=datetime.now(UTC))
    rows, total = usage_for_key(session, key_id=key.id, w=w, group_by=group_by)
    return Usage(
        key_prefix=key.prefix,
        start=_iso(w.start),
        end=_iso(w.end),
        group_by=group_by,
        rows=rows,
        total=total,
    )
