"""Issue 23, claim and finish in batches, on real Postgres: ``claims.claim_many`` plans in
Python and claims each queue's share in one statement, yet takes exactly the jobs, in the
order, that as many ``claim_next`` calls one after the other would take (the same backlog
is built twice, once per way); ``claims.finish_many`` stores many outcomes in one UPDATE,
each under its own guard, with one event per stored job and each batch ended once. Both
issue a constant number of statements however many jobs."""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, event, func, insert, select, true

from app.infra.db import get_engine, session_scope, utcnow
from app.infra.models import Batch, Job, JobStatus, WebhookDelivery
from app.jobs import claims, lifecycle
from app.jobs.lifecycle import EndedJob
from app.jobs.options import TranscribeOptions
from app.jobs.serialize import webhook_payload
from app.settings import Settings, get_settings
from tests.support.api import new_key

pytestmark = pytest.mark.integration

HOOK = "http://127.0.0.1:9/never"  # an event is written for it; never delivered here
OPTIONS = TranscribeOptions().to_json()


@pytest.fixture
def queues() -> list[str]:
    """Interactive first, then bulk: queue names of this test alone."""
    tag = uuid.uuid4().hex[:8]
    return [f"interactive-{tag}", f"bulk-{tag}"]


def new_keys(n: int) -> list[int]:
    return [new_key(f"batched-{i}").row.id for i in range(n)]


def job_row(key: int, queue: str, created_at: datetime, **more: Any) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "api_key_id": key,
        "status": JobStatus.queued,
        "queue": queue,
        "options": OPTIONS,
        "audio_blob": "x",
        "created_at": created_at,
        "attempts": 0,
        "runtime_ms": 0,
        "cost": 0.0,
        "tokens_generated": 0,
        "tokens_input": 0,
        # Every row the same columns: one executemany INSERT.
        "started_at": None,
        "webhook_url": None,
        "batch_id": None,
        "input_length_ms": None,
        **more,
    }


def random_backlog(
    rng: random.Random, keys: Sequence[int], queues: Sequence[str], *, cap: int
) -> list[dict[str, Any]]:
    """Queued jobs in both queues, some keys with jobs running (some at or over the cap),
    some served before (a finished job's start), some never. Few distinct timestamps, so
    ties in the fair order (key id) and in a key's oldest job (job id) are exercised."""
    now = utcnow()
    stamps = [now - timedelta(seconds=s) for s in (900, 600, 300, 120)]
    rows: list[dict[str, Any]] = []
    for key in keys:
        served = rng.choice([None, *stamps[:3]])
        if served is not None:
            rows.append(
                job_row(key, queues[1], served, status=JobStatus.succeeded, started_at=served)
            )
        for _ in range(rng.randint(0, cap + 1 if cap else 3)):
            started = rng.choice(stamps[:3])
            running = {"status": JobStatus.running, "started_at": started, "attempts": 1}
            rows.append(job_row(key, rng.choice(queues), started, **running))
        for queue, most in ((queues[0], 3), (queues[1], 12)):
            rows += [job_row(key, queue, rng.choice(stamps)) for _ in range(rng.randint(0, most))]
    return rows


def rebuild(keys: Sequence[int], rows: Sequence[dict[str, Any]]) -> None:
    """The keys' jobs, exactly ``rows`` again: same ids, keys, times and states."""
    with get_engine().begin() as conn:
        conn.execute(delete(Job).where(Job.api_key_id.in_(keys)))
        conn.execute(insert(Job), list(rows))


Claimed = list[tuple[str, int, str]]  # (job id, attempt, queue) per claim, in order


def one_by_one(n: int, queues: Sequence[str], settings: Settings) -> tuple[Claimed, bool]:
    """The reference: ``n`` claim_next calls, as ``claim_many`` was before issue 23."""
    got: Claimed = []
    for _ in range(n):
        result = claims.claim_next(queues=queues, settings=settings)
        if result.job is None:
            return got, result.capped
        got.append((result.job.id, result.job.attempt, result.job.queue))
    return got, False


def as_a_set(n: int, queues: Sequence[str], settings: Settings) -> tuple[Claimed, bool]:
    batch = claims.claim_many(n, queues=queues, settings=settings)
    return [(j.id, j.attempt, j.queue) for j in batch.jobs], batch.capped


def states(keys: Sequence[int]) -> dict[str, tuple[str, int, str | None]]:
    with session_scope() as session:
        rows = session.execute(
            select(Job.id, Job.status, Job.attempts, Job.worker).where(Job.api_key_id.in_(keys))
        ).all()
    return {r.id: (r.status, r.attempts, r.worker) for r in rows}


def started_order(ids: Sequence[str]) -> list[str]:
    with session_scope() as session:
        rows = session.execute(select(Job.id, Job.started_at).where(Job.id.in_(ids))).all()
    return [r.id for r in sorted(rows, key=lambda r: (r.started_at, ids.index(r.id)))]


@contextmanager
def statements() -> Iterator[list[str]]:
    """The SQL statements sent to Postgres meanwhile, each once (an executemany too)."""
    sent: list[str] = []

    def seen(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        sent.append(sql)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", seen)


# --- the set-based claim ---------------------------------------------------------------


@pytest.mark.parametrize("cap", [0, 2, 3])
def test_claim_many_takes_what_as_many_claims_one_by_one_take(queues: list[str], cap: int) -> None:
    """Random backlogs over six keys: each way claims in rounds (sizes below, the last larger
    than the backlog); every round must give the same jobs, attempts and queues, in the same
    order, and the same ``capped``. Later rounds also check what a set claim leaves behind
    (each key's running count and last start) for the next claim's fair order."""
    keys = new_keys(6)
    settings = get_settings().model_copy(update={"key_max_in_flight": cap})
    for seed in range(4):
        rng = random.Random(f"{seed}-{cap}")
        rows = random_backlog(rng, keys, queues, cap=cap)
        rounds = [rng.randint(1, 5), rng.randint(5, 30), 1, 200]
        results = {}
        left = {}
        for way in (one_by_one, as_a_set):
            rebuild(keys, rows)
            results[way] = [way(n, queues, settings) for n in rounds]
            left[way] = sorted(states(keys).items())
        assert results[as_a_set] == results[one_by_one], f"seed {seed}, cap {cap}"
        assert left[as_a_set] == left[one_by_one]
        claimed = [job_id for ids, _ in results[as_a_set] for job_id, _, _ in ids]
        assert claimed and started_order(claimed) == claimed  # started in claim order
        # The last round asked for more than the backlog: it is capped exactly where queued
        # work is left (every key of it at its cap).
        queued_left = any(status == JobStatus.queued for _, (status, _, _) in left[as_a_set])
        assert results[as_a_set][-1][1] == queued_left and (cap or not queued_left)


def test_interactive_first_then_the_keys_in_turn_up_to_the_cap(queues: list[str]) -> None:
    a, b, c = new_keys(3)
    now = utcnow()
    interactive, bulk = queues
    rows = [job_row(c, interactive, now)]
    rows += [job_row(k, bulk, now - timedelta(seconds=10 - i)) for i in range(3) for k in (a, b)]
    rebuild([a, b, c], rows)
    settings = get_settings().model_copy(update={"key_max_in_flight": 2})
    got = claims.claim_many(10, queues=queues, settings=settings)
    by_id = {r["id"]: r for r in rows}
    assert [(by_id[j.id]["queue"], by_id[j.id]["api_key_id"]) for j in got.jobs] == [
        (interactive, c),
        (bulk, a),
        (bulk, b),
        (bulk, a),
        (bulk, b),
    ]
    assert got.capped and {j.attempt for j in got.jobs} == {1}
    # Nothing is left that the cap allows; with no cap, the rest, oldest first.
    assert claims.claim_many(10, queues=queues, settings=settings).jobs == []
    rest = claims.claim_many(10, queues=queues, settings=get_settings())
    assert [j.id for j in rest.jobs] == [rows[5]["id"], rows[6]["id"]] and not rest.capped


def test_a_set_claim_issues_the_same_statements_for_1_or_100_jobs(queues: list[str]) -> None:
    """Per queue one read of the keys' work and one claim, however many jobs and keys."""
    keys = new_keys(4)
    now = utcnow()
    rows = [job_row(keys[0], queues[0], now)]
    rows += [
        job_row(k, queues[1], now + timedelta(microseconds=i)) for i in range(60) for k in keys
    ]
    counts = {}
    for n in (2, 30, 100):
        rebuild(keys, rows)
        with statements() as sent:
            got = claims.claim_many(n, queues=queues, settings=get_settings())
        assert len(got.jobs) == n
        counts[n] = len(sent)
        assert sum(s.lstrip().startswith("WITH picked") for s in sent) == 2  # one per queue
    assert counts == {2: 4, 30: 4, 100: 4}


def test_jobs_other_claimers_hold_are_stepped_over_and_planned_again(queues: list[str]) -> None:
    """SKIP LOCKED: a key whose planned jobs another transaction holds comes back short; its
    share goes to the other keys in a new round, and a claim that finds every job held ends
    with none, at once."""
    a, b = new_keys(2)
    now = utcnow()
    bulk = queues[1]
    rows = [job_row(k, bulk, now + timedelta(microseconds=i)) for i in range(5) for k in (a, b)]
    a_ids = [r["id"] for r in rows if r["api_key_id"] == a]
    b_ids = [r["id"] for r in rows if r["api_key_id"] == b]
    settings = get_settings()

    def claim_while_held(held: Sequence[str], n: int) -> list[str]:
        with get_engine().connect() as other:
            other.execute(select(Job.id).where(Job.id.in_(held)).with_for_update())
            got = claims.claim_many(n, queues=queues, settings=settings)
            other.rollback()
        assert not got.capped
        return [j.id for j in got.jobs]

    rebuild([a, b], rows)
    assert claim_while_held(a_ids, 6) == b_ids  # a held: all b's, b's oldest first
    rebuild([a, b], rows)
    # a's two oldest held: a's next two, still alternating with b as one by one would.
    assert claim_while_held(a_ids[:2], 4) == [a_ids[2], b_ids[0], a_ids[3], b_ids[1]]
    rebuild([a, b], rows)
    with statements() as sent:
        assert claim_while_held(a_ids + b_ids, 6) == []
    # The lock; interactive: a read (nothing there); bulk: a read and a claim that comes back
    # empty (both keys short), a read that leaves nothing to plan.
    assert len(sent) == 5, sent


# --- the set-based finish --------------------------------------------------------------


def make_jobs(
    n: int, *, webhook: str | None = HOOK, batch_id: str | None = None, **more: Any
) -> list[claims.ClaimedJob]:
    """``n`` jobs of a key of their own, claimed (running, attempt 1)."""
    (key,) = new_keys(1)
    queue = get_settings().queue_interactive
    now = utcnow()
    rows = [
        job_row(key, queue, now, webhook_url=webhook, batch_id=batch_id, **more) for _ in range(n)
    ]
    rebuild([key], rows)
    claimed = [claims.claim(r["id"], settings=get_settings()) for r in rows]
    assert all(claimed)
    return [c for c in claimed if c is not None]


def loaded(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def events(job_id: str) -> list[WebhookDelivery]:
    with session_scope() as session:
        rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
        found = list(rows.all())
        session.expunge_all()
        return found


@pytest.fixture
def ended_seen() -> Iterator[list[EndedJob]]:
    seen: list[EndedJob] = []

    def hook(jobs: Sequence[EndedJob]) -> None:
        seen.extend(jobs)

    lifecycle.on_job_ended(hook)
    yield seen
    lifecycle.remove_job_ended_hook(hook)


TRANSCRIPT = {"text": " hi there", "segments": [{"id": 0, "text": " hi", "start": 0.0,
              "end": 1.25, "words": None}], "language": "en"}  # fmt: skip


def test_finish_many_stores_each_outcome_under_its_own_guard(
    ended_seen: list[EndedJob],
) -> None:
    settings = get_settings()
    stale, canceled, ok, failed, kept_length, dropped = make_jobs(6, input_length_ms=1234)
    (quiet,) = make_jobs(1, webhook=None)  # no webhook: no event
    with session_scope() as session:  # a cancel won the job meanwhile
        lifecycle.end_job(session, canceled.id, JobStatus.canceled, where=true(), settings=settings)
    S, F, C = JobStatus.succeeded, JobStatus.failed, JobStatus.canceled  # noqa: N806
    outcomes = [
        (dataclasses.replace(stale, attempt=stale.attempt - 1), claims.Outcome(F, runtime_ms=9)),
        (canceled, claims.Outcome(S, result=TRANSCRIPT, runtime_ms=10)),
        (ok, claims.Outcome(S, TRANSCRIPT, 4000, 2500, tokens_generated=7, tokens_input=3)),
        (failed, claims.Outcome(F, runtime_ms=700, error_code="invalid_audio",
                                error_message="not audio")),
        (kept_length, claims.Outcome(S, result=TRANSCRIPT, runtime_ms=1)),
        (dropped, claims.Outcome(C, runtime_ms=300, error_code="canceled", error_message="x")),
        (quiet, claims.Outcome(S, result=TRANSCRIPT, runtime_ms=1000)),
        (ok, claims.Outcome(F, runtime_ms=5)),  # the same run again: the first counts
    ]  # fmt: skip
    done = claims.finish_many(outcomes, settings=settings)

    assert [d.stored for d in done] == [False, False, True, True, True, True, True, False]
    assert loaded(stale.id).status == JobStatus.running and events(stale.id) == []
    assert loaded(canceled.id).status == JobStatus.canceled and len(events(canceled.id)) == 1
    stored = [ok, failed, kept_length, dropped, quiet]
    for claimed, (_, outcome), finished in zip(stored, outcomes[2:7], done[2:7], strict=True):
        job = loaded(claimed.id)
        assert (job.status, job.runtime_ms, job.error_code) == (
            outcome.status,
            outcome.runtime_ms,
            outcome.error_code,
        )
        assert job.cost == round(outcome.runtime_ms / 1000 * settings.price_per_second, 10)
        assert job.finished_at is not None and job.lease_expires_at is None
        assert job.result == outcome.result
        written = events(claimed.id)
        if claimed is quiet:
            assert written == [] and finished.delivery_id is None
            continue
        # One event each, its body what the webhook payload of the stored job says.
        assert [e.id for e in written] == [finished.delivery_id]
        assert written[0].body == json.dumps(webhook_payload(job))
    assert loaded(ok.id).input_length_ms == 4000 and loaded(ok.id).tokens_generated == 7
    assert loaded(kept_length.id).input_length_ms == 1234  # no length given: kept
    with session_scope() as session:  # SQL NULL, not JSON null: retention's "no transcript"
        no_result = select(Job.id).where(Job.id == failed.id, Job.result.is_(None))
        assert session.scalar(no_result) == failed.id
    # The hooks see each stored job once, as the database has it.
    assert ended_seen[0].id == canceled.id
    assert sorted(e.id for e in ended_seen[1:]) == sorted(c.id for c in stored)
    for seen in ended_seen[1:]:
        job = loaded(seen.id)
        assert (seen.status, seen.attempts, seen.started_at, seen.finished_at) == (
            job.status,
            job.attempts,
            job.started_at,
            job.finished_at,
        )
        assert (seen.queue, seen.batch_id, seen.input_length_ms) == (
            job.queue,
            None,
            job.input_length_ms,
        )


def test_the_payload_matches_the_one_job_path_byte_for_byte() -> None:
    """The same outcome stored by ``finish_many`` and by one ``end_job`` (the ORM path):
    the event bodies differ in the request id only."""
    settings = get_settings()
    mine, theirs = make_jobs(2, input_length_ms=2000)
    outcome = claims.Outcome(JobStatus.succeeded, TRANSCRIPT, 2100, 1337, 5, 6)
    assert claims.finish_many([(mine, outcome)], settings=settings)[0].stored
    with session_scope() as session:
        lifecycle.end_job(
            session,
            theirs.id,
            outcome.status,
            where=true(),
            settings=settings,
            **{f.name: getattr(outcome, f.name) for f in dataclasses.fields(outcome)[1:]},
        )
    (a,), (b,) = events(mine.id), events(theirs.id)
    assert a.body.replace(mine.id, "ID") == b.body.replace(theirs.id, "ID")


def batch_events(batch_id: str) -> int:
    with session_scope() as session:
        query = select(func.count()).where(WebhookDelivery.batch_id == batch_id)
        return int(session.scalar(query) or 0)


def new_batch() -> str:
    (key,) = new_keys(1)
    with session_scope() as session:
        batch = Batch(api_key_id=key, webhook_url=HOOK, sealed_at=utcnow())
        session.add(batch)
        session.flush()
        return batch.id


def test_batches_whose_last_jobs_end_in_one_finish_end_once() -> None:
    settings = get_settings()
    one, other = new_batch(), new_batch()
    first = make_jobs(4, webhook=None, batch_id=one)
    second = make_jobs(3, webhook=None, batch_id=other)
    ok = claims.Outcome(JobStatus.succeeded, runtime_ms=10)
    claims.finish_many([(first[0], ok)], settings=settings)
    with session_scope() as session:
        assert session.get(Batch, one).finished_at is None  # type: ignore[union-attr]
    stale = dataclasses.replace(second[0], attempt=0)
    done = claims.finish_many(
        [(stale, ok), *((c, ok) for c in first[1:] + second)], settings=settings
    )
    assert [d.stored for d in done] == [False] + [True] * 6
    with session_scope() as session:
        for batch_id in (one, other):
            assert session.get(Batch, batch_id).finished_at is not None  # type: ignore[union-attr]
    assert (batch_events(one), batch_events(other)) == (1, 1)
    claims.finish_many([(c, ok) for c in first], settings=settings)  # all refused now
    assert (batch_events(one), batch_events(other)) == (1, 1)


def test_finish_many_issues_the_same_statements_for_1_or_50_outcomes() -> None:
    settings = get_settings()
    counts = {}
    for n in (1, 50):
        jobs = make_jobs(n)
        outcome = claims.Outcome(JobStatus.succeeded, TRANSCRIPT, runtime_ms=10)
        with statements() as sent:
            done = claims.finish_many([(c, outcome) for c in jobs], settings=settings)
        assert all(d.stored for d in done)
        assert sum(s.startswith("UPDATE jobs") for s in sent) == 1
        assert sum(s.startswith("INSERT INTO webhook_deliveries") for s in sent) == 1
        counts[n] = len(sent)
    assert counts == {1: 2, 50: 2}, counts


def test_an_unknown_job_or_a_non_terminal_status_is_refused() -> None:
    settings = get_settings()
    (job,) = make_jobs(1)
    ghost = dataclasses.replace(job, id=uuid.uuid4().hex)
    ok = claims.Outcome(JobStatus.succeeded, runtime_ms=1)
    assert [d.stored for d in claims.finish_many([(ghost, ok), (job, ok)], settings=settings)] == [
        False,
        True,
    ]
    with pytest.raises(ValueError, match="does not end"):
        claims.finish_many([(job, claims.Outcome(JobStatus.running))], settings=settings)
    assert claims.finish_many([], settings=settings) == []
