"""One terminal transition (app/jobs/lifecycle.py): the source assigns a terminal status to a
job in one place only, every end writes one event and runs its batch's end and its hooks
after the commit (never after a rollback), and the worker's metrics are registered hooks, so
a direct ``from app.jobs.claims import finish`` still counts. In-process: the worker's
finish and the reaper's lease expiry run here as the worker runs them."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, true, update

from app.infra import blobs
from app.infra.db import get_sessionmaker, session_scope, utcnow
from app.infra.models import Batch, Job, JobStatus, WebhookDelivery, new_job_id
from app.jobs import lifecycle
from app.jobs.keys import CreatedKey
from app.jobs.lifecycle import EndedJob, end_job, end_jobs
from app.jobs.options import TranscribeOptions
from app.settings import Settings, get_settings
from tests.support.api import auth, new_key, noise_wav, settings_override
from tests.support.services import Receiver

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
HOOK = "http://127.0.0.1:9/never"  # an event is written for it; never delivered here


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("lifecycle")


@pytest.fixture
def keep0() -> Iterator[Settings]:
    with settings_override(keep_audio_days=0.0) as settings:
        yield settings


def make_jobs(
    key: CreatedKey,
    settings: Settings,
    *,
    n: int = 1,
    webhook: str | None = HOOK,
    batch_id: str | None = None,
    status: JobStatus = JobStatus.queued,
) -> tuple[str, list[str]]:
    """``n`` jobs sharing one stored blob, as the API makes them."""
    blob = new_job_id()
    blobs.write_blob(blob, noise_wav(0.2, seed=n))
    ids = []
    with session_scope() as session:
        for _ in range(n):
            job = Job(
                id=new_job_id(),
                api_key_id=key.row.id,
                status=status,
                queue=settings.queue_interactive,
                options=TranscribeOptions().to_json(),
                audio_blob=blob,
                webhook_url=webhook,
                batch_id=batch_id,
                enqueued_at=utcnow(),
                attempts=1 if status == JobStatus.running else 0,
            )
            session.add(job)
            ids.append(job.id)
    return blob, ids


def stored() -> set[str]:
    return {name for name, _ in blobs.get_store().iter_stored()}


def events_of(job_id: str) -> int:
    with session_scope() as session:
        return int(
            session.scalar(select(func.count()).where(WebhookDelivery.job_id == job_id)) or 0
        )


def row(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


@pytest.fixture
def ended_seen() -> Iterator[list[EndedJob]]:
    seen: list[EndedJob] = []

    def hook(jobs: Sequence[EndedJob]) -> None:
        seen.extend(jobs)

    lifecycle.on_job_ended(hook)
    lifecycle.on_job_ended(hook)  # registered twice, called once
    yield seen
    lifecycle.remove_job_ended_hook(hook)


# --- one place assigns a terminal status -------------------------------------------------

NOT_TERMINAL = {"JobStatus.queued", "JobStatus.running"}


def _table_of(node: ast.expr) -> str | None:
    """The table an ``update(X)....values()`` chain writes: X's name, or None if unknown."""
    while True:
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in ("update", "insert"):
                first = node.args[0] if node.args else None
                return first.id if isinstance(first, ast.Name) else None
            node = node.func
        elif isinstance(node, ast.Attribute):
            node = node.value
        else:
            return None


def status_writes(source: str) -> Iterator[tuple[int, str, str]]:
    """(line, enclosing function, value) of each write of a job's status that may be
    terminal: ``x.status = v``, ``Job(status=v)``, ``update(Job)...values(status=v)`` (or
    ``{"status": v}``), where ``v`` is anything but queued or running (a variable may hold a
    terminal status). A status passed to a function is no write: ``finish(status=...)`` asks
    the one transition to end the job."""
    tree = ast.parse(source)
    functions = {
        id(child): fn.name
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.walk(fn)
    }
    for node in ast.walk(tree):
        values: list[ast.expr] = []
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr == "status" for t in targets):
                values = [node.value] if node.value is not None else []
        elif isinstance(node, ast.Call):
            fn = node.func
            writes_job = (isinstance(fn, ast.Name) and fn.id == "Job") or (
                isinstance(fn, ast.Attribute)
                and fn.attr == "values"
                and _table_of(fn.value) in ("Job", None)
            )
            if writes_job:
                values = [k.value for k in node.keywords if k.arg == "status"]
                values += [
                    v
                    for d in node.args
                    if isinstance(d, ast.Dict)
                    for k, v in zip(d.keys, d.values, strict=True)
                    if isinstance(k, ast.Constant) and k.value == "status"
                ]
        for value in values:
            text = ast.unparse(value)
            if text not in NOT_TERMINAL and not text.startswith("DeliveryStatus."):
                yield node.lineno, functions.get(id(node), "<module>"), text


# Its ``status`` is an HTTP status, and it imports no model (tests/test_imports.py holds it
# under every layer), so it cannot touch a job.
NO_JOBS = {"app/errors.py"}


def sources() -> Iterator[tuple[str, str]]:
    for package in ("app", "worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            if name not in NO_JOBS:
                yield name, path.read_text(encoding="utf-8")


def test_one_place_in_the_source_assigns_a_terminal_status() -> None:
    found = [
        (path, function, value)
        for path, source in sources()
        for _, function, value in status_writes(source)
    ]
    # end_jobs and end_jobs_each both build their UPDATE there.
    assert found == [("app/jobs/lifecycle.py", "_ending", "status")], found


def test_the_finder_sees_each_kind_of_write() -> None:
    """The checks above pass on nothing if the finder is blind: it must see these."""
    planted = """
def a(job, s):
    job.status = JobStatus.failed
def b(s):
    s.execute(update(Job).where(Job.id == 1).values(status=JobStatus.canceled))
def c(st):
    return Job(status=st)
def d(s):
    s.execute(update(Job).values({"status": "failed"}))
def fine(job, s):
    job.status = JobStatus.queued
    s.execute(update(WebhookDelivery).values(status=st))
    job.status = DeliveryStatus.pending
"""
    assert [(f, v) for _, f, v in sorted(status_writes(planted))] == [
        ("a", "JobStatus.failed"),
        ("b", "JobStatus.canceled"),
        ("c", "st"),
        ("d", "'failed'"),
    ]


# --- the transition ----------------------------------------------------------------------


def test_an_end_sets_outcome_metering_and_one_event_and_ends_once(
    key: CreatedKey, ended_seen: list[EndedJob]
) -> None:
    settings = get_settings()
    _, (job_id,) = make_jobs(key, settings, status=JobStatus.running)
    with session_scope() as session:
        ended = end_job(
            session,
            job_id,
            JobStatus.succeeded,
            where=true(),
            settings=settings,
            result={"text": "hi", "segments": [], "language": "en"},
            runtime_ms=2000,
            input_length_ms=3000,
        )
        assert ended is not None and ended.delivery_id is not None
        assert ended_seen == []  # hooks wait for the commit
    job = row(job_id)
    assert (job.status, job.runtime_ms, job.input_length_ms) == ("succeeded", 2000, 3000)
    assert job.cost == pytest.approx(2 * settings.price_per_second)
    assert job.finished_at is not None and job.lease_expires_at is None
    assert [e.id for e in ended_seen] == [job_id]
    # Ended already: no guard lets it end again, nor write a second event.
    with session_scope() as session:
        again = end_job(session, job_id, JobStatus.failed, where=true(), settings=settings)
    assert again is None and row(job_id).status == "succeeded"
    assert events_of(job_id) == 1 and len(ended_seen) == 1


def test_a_failed_end_stores_no_transcript(key: CreatedKey) -> None:
    settings = get_settings()
    _, (job_id,) = make_jobs(key, settings)
    with session_scope() as session:
        end_job(session, job_id, JobStatus.failed, where=true(), settings=settings, error_code="x")
        # SQL NULL, which retention's ``result IS NOT NULL`` passes over.
        assert session.scalar(select(Job.id).where(Job.id == job_id, Job.result.is_(None)))


def test_only_terminal_statuses_end_a_job(key: CreatedKey) -> None:
    with session_scope() as session, pytest.raises(ValueError, match="does not end"):
        end_jobs(session, JobStatus.queued, where=true(), settings=get_settings())


def test_nothing_happens_after_a_rollback(
    key: CreatedKey, keep0: Settings, ended_seen: list[EndedJob]
) -> None:
    blob, (job_id,) = make_jobs(key, keep0)
    with get_sessionmaker()() as session:
        with pytest.raises(RuntimeError), session.begin():
            assert end_job(session, job_id, JobStatus.canceled, where=true(), settings=keep0)
            raise RuntimeError("the transaction fails after the end")
        assert row(job_id).status == "queued" and row(job_id).audio_blob == blob
        assert blob in stored() and events_of(job_id) == 0 and ended_seen == []
        # The session's next transaction does not inherit the dropped work.
        with session.begin():
            session.execute(update(Job).where(Job.id == job_id).values(worker="x"))
    assert ended_seen == [] and blob in stored()


def test_a_failing_hook_neither_fails_the_end_nor_stops_the_others(
    key: CreatedKey, keep0: Settings, ended_seen: list[EndedJob]
) -> None:
    def broken(_jobs: Sequence[EndedJob]) -> None:
        raise RuntimeError("a hook's own bug")

    lifecycle.on_job_ended(broken)
    try:
        blob, (job_id,) = make_jobs(key, keep0)
        with session_scope() as session:
            end_job(session, job_id, JobStatus.canceled, where=true(), settings=keep0)
    finally:
        lifecycle.remove_job_ended_hook(broken)
    assert [e.id for e in ended_seen] == [job_id] and blob not in stored()


def test_ending_every_job_of_a_batch_at_once_ends_the_batch_once(key: CreatedKey) -> None:
    settings = get_settings()
    with session_scope() as session:
        batch = Batch(api_key_id=key.row.id, webhook_url=HOOK, sealed_at=utcnow())
        session.add(batch)
        session.flush()
        batch_id = batch.id
    _, ids = make_jobs(key, settings, n=3, webhook=None, batch_id=batch_id)
    with session_scope() as session:
        first = end_jobs(session, JobStatus.failed, where=Job.id.in_(ids[:1]), settings=settings)
        assert len(first) == 1
    with session_scope() as session:
        assert session.get(Batch, batch_id).finished_at is None  # type: ignore[union-attr]
        rest = end_jobs(
            session, JobStatus.canceled, where=Job.batch_id == batch_id, settings=settings
        )
        assert sorted(e.id for e in rest) == sorted(ids[1:])  # not the one that had ended
    with session_scope() as session:
        assert session.get(Batch, batch_id).finished_at is not None  # type: ignore[union-attr]
        n = session.scalar(select(func.count()).where(WebhookDelivery.batch_id == batch_id))
    assert n == 1


def test_finishing_a_batchs_jobs_in_one_transaction_ends_it_once(key: CreatedKey) -> None:
    """claims.finish_many, the worker's coalesced finish: each job ends as alone, a stale
    run's outcome is refused among them, and the batch ends once, with one event."""
    from app.jobs import claims

    settings = get_settings()
    with session_scope() as session:
        batch = Batch(api_key_id=key.row.id, webhook_url=HOOK, sealed_at=utcnow())
        session.add(batch)
        session.flush()
        batch_id = batch.id
    _, ids = make_jobs(key, settings, n=3, webhook=None, batch_id=batch_id)
    runs = [claims.claim(job_id, settings=settings) for job_id in ids]
    assert all(runs)
    stale = dataclasses.replace(runs[0], attempt=runs[0].attempt - 1)  # type: ignore[type-var]
    done = claims.finish_many(
        [
            (stale, claims.Outcome(JobStatus.failed, runtime_ms=5)),
            *((r, claims.Outcome(JobStatus.succeeded, runtime_ms=1000)) for r in runs),
        ],
        settings=settings,
    )
    assert [d.stored for d in done] == [False, True, True, True]
    assert {row(j).status for j in ids} == {"succeeded"}
    assert {row(j).cost for j in ids} == {0.0005}
    with session_scope() as session:
        assert session.get(Batch, batch_id).finished_at is not None  # type: ignore[union-attr]
        n = session.scalar(select(func.count()).where(WebhookDelivery.batch_id == batch_id))
    assert n == 1


def test_an_outcome_the_database_refuses_fails_alone_in_a_coalesced_finish(
    key: CreatedKey,
) -> None:
    """The worker's finisher (worker/tasks.py) stores outcomes many to a transaction; one the
    database refuses (here a result JSON cannot hold) fails its own task, not its neighbours'."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.jobs import claims
    from worker import tasks

    settings = get_settings()
    _, ids = make_jobs(key, settings, n=2)
    bad, good = (claims.claim(job_id, settings=settings) for job_id in ids)
    assert bad is not None and good is not None
    answers = tasks._finish_batch(
        [
            (bad, claims.Outcome(JobStatus.succeeded, result={"text": float("nan")})),
            (good, claims.Outcome(JobStatus.succeeded, runtime_ms=10)),
        ]
    )
    assert isinstance(answers[0], SQLAlchemyError)
    assert isinstance(answers[1], claims.Finished) and answers[1].stored
    assert (row(ids[0]).status, row(ids[1]).status) == ("running", "succeeded")


def test_a_stale_run_cannot_end_a_job_a_newer_run_owns(key: CreatedKey) -> None:
    """The claim side's guard, in the one transition's statement: this run's attempt."""
    from app.jobs import claims

    settings = get_settings()
    _, (job_id,) = make_jobs(key, settings)
    first = claims.claim(job_id, settings=settings)
    assert first is not None
    with session_scope() as session:  # its lease ran out; the reaper queued it again
        session.execute(
            update(Job).where(Job.id == job_id).values(status=JobStatus.queued, worker=None)
        )
    second = claims.claim(job_id, settings=settings)
    assert second is not None and second.attempt == first.attempt + 1
    late = claims.finish(first, status=JobStatus.failed, settings=settings, runtime_ms=9000)
    assert not late.stored and row(job_id).status == "running"
    assert claims.finish(second, status=JobStatus.succeeded, settings=settings).stored
    assert (row(job_id).status, row(job_id).runtime_ms) == ("succeeded", 0)
    assert events_of(job_id) == 1


def test_a_broker_outage_fails_only_jobs_nobody_claimed(key: CreatedKey) -> None:
    """A worker claims by policy, not by message: an unsent job may be running already."""
    from app.jobs import claims
    from app.jobs.submission import _fail_unsent

    settings = get_settings()
    _, (running, queued) = make_jobs(key, settings, n=2)
    assert claims.claim(running, settings=settings) is not None
    _fail_unsent([running, queued], ConnectionError("down"), settings)
    assert (row(running).status, row(queued).status) == ("running", "failed")
    assert row(queued).error_code == "queue_unavailable"


def test_a_lost_workers_last_batch_job_ends_the_batch(key: CreatedKey) -> None:
    from app.jobs import claims

    settings = get_settings().model_copy(update={"job_max_attempts": 1})
    with session_scope() as session:
        batch = Batch(api_key_id=key.row.id, webhook_url=HOOK, sealed_at=utcnow())
        session.add(batch)
        session.flush()
        batch_id = batch.id
    _, (job_id,) = make_jobs(key, settings, webhook=None, batch_id=batch_id)
    assert claims.claim(job_id, settings=settings) is not None
    with session_scope() as session:  # its worker died: the lease ran out
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=5))
        )
    assert [j for j, _ in claims.expire_leases(settings).failed] == [job_id]
    with session_scope() as session:
        assert session.get(Batch, batch_id).finished_at is not None  # type: ignore[union-attr]
        n = session.scalar(select(func.count()).where(WebhookDelivery.batch_id == batch_id))
    assert n == 1


# --- the worker's hooks: registered, not patched in ---------------------------------------


def test_a_direct_import_of_finish_still_counts_and_drops_audio(
    key: CreatedKey, keep0: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.infra.queue import get_celery
    from app.jobs import claims
    from app.jobs.claims import claim, finish  # bound before the worker installs anything
    from worker import deliveries, observability

    before = (claims.finish, deliveries.deliver_once)
    monkeypatch.setattr(observability, "_installed", False)
    monkeypatch.setattr(observability, "configure_logging", lambda _settings: None)
    observability.install(get_celery())
    assert (claims.finish, deliveries.deliver_once) == before  # nothing wrapped

    def counted(status: str) -> float:
        labels = {"status": status, "queue": keep0.queue_interactive}
        sample = observability.METRICS.registry.get_sample_value(
            "whisperq_worker_jobs_total", labels
        )
        return sample or 0.0

    for status, outcome in (
        (JobStatus.succeeded, {"result": {"text": "", "segments": [], "language": "en"}}),
        (JobStatus.failed, {"error_code": "invalid_audio", "error_message": "not audio"}),
    ):
        was = counted(status)
        blob, (job_id,) = make_jobs(key, keep0)
        claimed = claim(job_id, settings=keep0)
        assert claimed is not None
        assert finish(claimed, status=status, settings=keep0, **outcome).stored
        assert counted(status) == was + 1
        assert row(job_id).audio_blob is None and blob not in stored()


def test_webhook_attempts_reach_the_registered_hook(key: CreatedKey, receiver: Receiver) -> None:
    from worker import deliveries, observability

    observability.register_hooks()
    settings = get_settings()
    _, (job_id,) = make_jobs(key, settings, webhook=receiver.url + "/hook")
    with session_scope() as session:
        ended = end_job(session, job_id, JobStatus.canceled, where=true(), settings=settings)
    assert ended is not None and ended.delivery_id is not None

    def delivered() -> float:
        registry = observability.METRICS.registry
        sample = registry.get_sample_value(
            "whisperq_webhook_attempts_total", {"outcome": "delivered"}
        )
        return sample or 0.0

    was = delivered()
    deliveries.attempt(ended.delivery_id, settings=settings)
    assert delivered() == was + 1 and len(receiver.requests) == 1


# --- every API end path goes through it -----------------------------------------------------


def test_a_queued_cancel_and_a_batch_cancel_call_the_hooks(
    api: TestClient, key: CreatedKey, ended_seen: list[EndedJob]
) -> None:
    r = api.post(
        "/v1/inference/openai/whisper-tiny",
        headers=auth(key),
        files={"audio": ("a.wav", noise_wav(0.3))},
        data={"webhook": HOOK},
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["request_id"]
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200
    assert [(e.id, e.status) for e in ended_seen] == [(job_id, "canceled")]
    assert events_of(job_id) == 1
    assert row(job_id).cancel_requested_at is not None

    files = [("file", (f"{i}.wav", noise_wav(0.3, seed=i), "audio/wav")) for i in range(2)]
    b = api.post("/v1/batches", headers=auth(key), files=files)
    assert b.status_code == 201, b.text
    ids = {i["job_id"] for i in b.json()["inputs"]}
    c = api.post(f"/v1/batches/{b.json()['batch']['id']}/cancel", headers=auth(key))
    assert c.status_code == 200, c.text
    assert {e.id for e in ended_seen[1:]} == ids
