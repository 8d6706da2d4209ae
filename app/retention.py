"""Retention: audio and transcripts of finished jobs are purged after a while; the job row
stays (status, timings, runtime_ms, cost) so usage and billing still add up.

- ``keep_audio_days`` (0: audio is deleted as soon as its job ends, by the worker): audio of
  jobs finished longer ago than that is deleted here.
- ``retention_days`` (0: keep forever): older finished jobs lose their transcript and audio.

Run by every worker every ``purge_interval_s`` and by ``whisperq purge [--dry-run]``.
Idempotent, so several workers purging at once is harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from app import blobs
from app.db import session_scope
from app.models import TERMINAL_STATUSES, Job
from app.settings import Settings

log = logging.getLogger(__name__)
BATCH = 500


@dataclass(frozen=True)
class PurgeReport:
    audio_deleted: int
    transcripts_deleted: int
    dry_run: bool


def _cutoff(now: datetime, days: float) -> datetime | None:
    return now - timedelta(days=days) if days > 0 else None


def purge(settings: Settings, *, now: datetime, dry_run: bool = False) -> PurgeReport:
    audio_cut = now if settings.keep_audio_days <= 0 else _cutoff(now, settings.keep_audio_days)
    text_cut = _cutoff(now, settings.retention_days)
    if text_cut is not None and audio_cut is not None:
        audio_cut = max(audio_cut, text_cut)
    audio_n = text_n = 0
    store = blobs.get_store()
    while True:
        with session_scope() as session:
            conds = []
            if audio_cut is not None:
                conds.append(Job.audio_blob.is_not(None) & (Job.finished_at < audio_cut))
            if text_cut is not None:
                conds.append(Job.result.is_not(None) & (Job.finished_at < text_cut))
            if not conds:
                break
            query = (
                select(Job)
                .where(Job.status.in_([str(s) for s in TERMINAL_STATUSES]), or_(*conds))
                .order_by(Job.finished_at)
                .limit(None if dry_run else BATCH)  # a dry run counts everything at once
            )
            if not settings.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            jobs = session.scalars(query).all()
            blobs_to_delete = []
            for job in jobs:
                assert job.finished_at is not None
                if job.audio_blob is not None and audio_cut and job.finished_at < audio_cut:
                    audio_n += 1
                    blobs_to_delete.append(job.audio_blob)
                    if not dry_run:
                        job.audio_blob = None
                if job.result is not None and text_cut and job.finished_at < text_cut:
                    text_n += 1
                    if not dry_run:
                        job.result = None
        if not dry_run:
            for name in blobs_to_delete:  # after the commit: a row never points at nothing
                store.delete(name)
        if dry_run or len(jobs) < BATCH:
            break
    if audio_n or text_n:
        log.info(
            "retention purge",
            extra={"audio": audio_n, "transcripts": text_n, "dry_run": dry_run},
        )
    return PurgeReport(audio_deleted=audio_n, transcripts_deleted=text_n, dry_run=dry_run)
