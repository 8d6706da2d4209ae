"""Retention: audio and transcripts of finished jobs are purged after a while; the job row
stays (status, timings, runtime_ms, cost) so usage and billing still add up.

- ``keep_audio_days`` (0: audio is deleted as soon as its job ends, by whatever ended it,
  app/jobs/lifecycle.py): audio of jobs finished longer ago than that is deleted here; with 0,
  here is where audio a crash left on an ended job goes.
- ``retention_days`` (0: keep forever): older finished jobs lose their transcript and audio.
- Always: blobs no job row names, stored over ``ORPHAN_AGE`` ago (an upload whose request
  died before its job was committed, a crash between a commit and a delete) are deleted.

Run by every worker every ``purge_interval_s`` and by ``whisperq purge [--dry-run]``.
Idempotent, so several workers purging at once is harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from app.infra import blobs
from app.infra.db import session_scope
from app.infra.models import TERMINAL_STATUSES, Job
from app.jobs.lifecycle import delete_unreferenced
from app.settings import Settings

log = logging.getLogger(__name__)
BATCH = 500
# Far longer than any request takes from storing its upload to committing its job, so a
# blob is never taken for an orphan while its job is on the way.
ORPHAN_AGE = timedelta(hours=24)
# Blob names looked up per query: without an index on jobs.audio_blob each lookup scans
# the jobs table, so few large lookups, once per purge.
ORPHAN_CHUNK = 5000


@dataclass(frozen=True)
class PurgeReport:
    audio_deleted: int
    transcripts_deleted: int
    dry_run: bool
    orphans_deleted: int = 0  # blobs no job named


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
        if not dry_run:  # after the commit: a row never points at nothing
            delete_unreferenced(blobs_to_delete)
        if dry_run or len(jobs) < BATCH:
            break
    orphan_n = purge_orphans(store, now=now, dry_run=dry_run)
    if audio_n or text_n or orphan_n:
        log.info(
            "retention purge",
            extra={
                "audio": audio_n,
                "transcripts": text_n,
                "orphans": orphan_n,
                "dry_run": dry_run,
            },
        )
    return PurgeReport(
        audio_deleted=audio_n,
        transcripts_deleted=text_n,
        dry_run=dry_run,
        orphans_deleted=orphan_n,
    )


def purge_orphans(store: blobs.BlobStore, *, now: datetime, dry_run: bool = False) -> int:
    """Delete (or count) the blobs stored before ``now - ORPHAN_AGE`` that no job row
    names, whatever its status: a row is never left pointing at nothing."""
    cutoff = now - ORPHAN_AGE
    found = 0
    old: list[str] = []
    for name, stored_at in store.iter_stored():
        if stored_at < cutoff:
            old.append(name)
        if len(old) >= ORPHAN_CHUNK:
            found += _orphans(store, old, dry_run=dry_run)
            old = []
    if old:
        found += _orphans(store, old, dry_run=dry_run)
    return found


def _orphans(store: blobs.BlobStore, names: list[str], *, dry_run: bool) -> int:
    with session_scope() as session:
        named = set(session.scalars(select(Job.audio_blob).where(Job.audio_blob.in_(names))))
    orphans = [n for n in names if n not in named]
    if not dry_run:
        for name in orphans:
            store.delete(name)
    return len(orphans)
