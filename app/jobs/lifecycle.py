"""The end of a job's audio: what every path that ends a job calls once its transaction
committed (the worker's finish, lease expiry, a cancel, a batch cancel, a broker that was
down), so that with ``keep_audio_days`` 0 no ended job keeps its audio.

Deleting after the commit, never before: a row must not point at a blob that is gone if the
transaction rolls back. A crash between the commit and the delete leaves a finished job with
audio, or a blob no row names; the retention purge (app/jobs/retention.py) catches both.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from sqlalchemy import select, text

from app.infra import blobs
from app.infra.db import session_scope
from app.infra.models import TERMINAL_STATUSES, Job
from app.settings import Settings

log = logging.getLogger(__name__)
CHUNK = 500
# A literal, so Postgres matches it to the unfinished-jobs partial index (app/infra/models.py);
# a bound parameter's generic plan would scan every job ever run.
UNFINISHED = text("jobs.status IN ('queued', 'running')")


def drop_ended_audio(
    job_ids: Iterable[str], *, settings: Settings, even_if_kept: bool = False
) -> None:
    """Unless retention keeps audio (or ``even_if_kept``), unlink ended jobs from their
    blobs and delete the blobs no unfinished job still needs. Call after the commit that
    ended the jobs. Never raises: the jobs already ended, and the purge deletes what is left
    here."""
    ids = list(dict.fromkeys(job_ids))
    if (settings.keep_audio_days > 0 and not even_if_kept) or not ids:
        return
    try:
        names: list[str] = []
        for start in range(0, len(ids), CHUNK):
            with session_scope() as session:
                jobs = session.scalars(
                    select(Job)
                    .where(
                        Job.id.in_(ids[start : start + CHUNK]),
                        Job.status.in_([str(s) for s in TERMINAL_STATUSES]),
                        Job.audio_blob.is_not(None),
                    )
                    .with_for_update(skip_locked=True)
                ).all()
                for job in jobs:
                    assert job.audio_blob is not None
                    names.append(job.audio_blob)
                    job.audio_blob = None
        delete_unreferenced(names)
    except Exception:
        log.exception("deleting the audio of ended jobs failed; the purge will")


def delete_unreferenced(names: Collection[str]) -> list[str]:
    """Delete the blobs that no unfinished job points at (jobs may share one blob); returns
    those deleted. The caller has already unlinked its own rows, in a committed
    transaction, so two jobs of one blob ending at once cannot both see the other."""
    wanted = list(dict.fromkeys(names))
    in_use: set[str] = set()
    for start in range(0, len(wanted), CHUNK):
        with session_scope() as session:
            in_use.update(
                n
                for n in session.scalars(
                    select(Job.audio_blob).where(
                        UNFINISHED, Job.audio_blob.in_(wanted[start : start + CHUNK])
                    )
                )
                if n is not None
            )
    store = blobs.get_store()
    gone = [n for n in wanted if n not in in_use]
    for name in gone:
        store.delete(name)
    return gone
