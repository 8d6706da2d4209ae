"""The API under concurrency, as a real uvicorn process: requests hold no database connection
while they wait, sync callers are woken by the worker's completion signal, and an unreachable
database is a JSON 503 with Retry-After."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.infra.db import session_scope, utcnow
from app.infra.models import Job, JobStatus
from app.infra.notify import publish_done
from app.jobs.keys import CreatedKey
from app.settings import get_settings
from tests.support.api import INFER, auth, new_key, noise_wav
from tests.support.services import ApiProcess, free_port

pytestmark = pytest.mark.integration


@contextmanager
def api_process(tmp_path: Path, **env: str) -> Iterator[str]:
    with ApiProcess(
        log_path=tmp_path / f"api-{len(list(tmp_path.glob('api-*')))}.log", env=env
    ) as api:
        yield api.url


@pytest.fixture
def key() -> CreatedKey:
    return new_key("connections")


def test_many_sync_callers_share_a_two_connection_pool(tmp_path: Path, key: CreatedKey) -> None:
    """40 sync callers wait at once on a pool of two connections (no worker consumes their
    queue, so each waits out its sync window) while other clients read job status: nobody
    gets a 5xx or a dropped connection. Holding the auth session through the request, as the
    API once did, exhausts the pool here."""
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    env = {
        "WHISPERQ_DB_POOL_SIZE": "2",
        "WHISPERQ_DB_MAX_OVERFLOW": "0",
        "WHISPERQ_DB_POOL_TIMEOUT_S": "20",
        "WHISPERQ_SYNC_WAIT_S": "6",
        "WHISPERQ_QUEUE_INTERACTIVE": queue,
    }
    clip = noise_wav(0.5)

    async def run(base: str) -> list[int]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

            async def sync_call() -> int:
                r = await client.post(INFER, headers=auth(key), files={"audio": ("a.wav", clip)})
                return r.status_code

            async def status_reads() -> list[int]:
                codes = []
                for _ in range(10):
                    r = await client.get("/v1/jobs/" + "0" * 32, headers=auth(key))
                    codes.append(r.status_code)
                    await asyncio.sleep(0.2)
                return codes

            results = await asyncio.gather(
                *(sync_call() for _ in range(40)), *(status_reads() for _ in range(5))
            )
        flat: list[int] = []
        for r in results:
            flat.extend(r if isinstance(r, list) else [r])
        return flat

    with api_process(tmp_path, **env) as base:
        codes = asyncio.run(run(base))
    assert codes.count(202) == 40, codes  # every sync caller: still queued, told to poll
    assert codes.count(404) == 50, codes  # every status read answered
    with session_scope() as session:
        queued = session.scalars(
            select(Job.status).where(Job.api_key_id == key.row.id, Job.queue == queue)
        ).all()
    assert queued == [JobStatus.queued] * 40


def test_a_sync_caller_is_woken_by_the_completion_signal(tmp_path: Path, key: CreatedKey) -> None:
    """The waiter re-reads its row only every 120 s; the answer comes from the signal."""
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    env = {
        "WHISPERQ_SYNC_WAIT_S": "90",
        "WHISPERQ_SYNC_RECHECK_S": "120",
        "WHISPERQ_QUEUE_INTERACTIVE": queue,
    }

    def finish_when_queued() -> None:
        # Plays the worker: store a result, then publish, as worker/tasks.py does.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with session_scope() as session:
                job = session.scalars(
                    select(Job).where(Job.api_key_id == key.row.id, Job.queue == queue)
                ).one_or_none()
                if job is not None:
                    job.status = JobStatus.succeeded
                    job.finished_at = utcnow()
                    job.result = {"text": "signalled", "segments": [], "language": "en"}
                    job_id = job.id
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the sync call never created its job")
        time.sleep(0.5)  # let the API's first read see it still queued
        publish_done(job_id, redis_url=get_settings().redis_url)

    async def run(base: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=base, timeout=100) as client:
            call = asyncio.create_task(
                client.post(INFER, headers=auth(key), files={"audio": ("a.wav", noise_wav(0.5))})
            )
            await asyncio.to_thread(finish_when_queued)
            return await call

    with api_process(tmp_path, **env) as base:
        r = asyncio.run(run(base))
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "signalled"


def test_an_unreachable_database_is_a_json_503_with_retry_after(tmp_path: Path) -> None:
    env = {
        "WHISPERQ_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
        "WHISPERQ_RETRY_AFTER_S": "7",
    }
    with api_process(tmp_path, **env) as base:
        r = httpx.post(
            base + INFER,
            headers={"Authorization": "bearer wq_abc.def"},
            files={"audio": ("a.wav", noise_wav(0.2))},
            timeout=30,
        )
        status = httpx.get(base + "/v1/jobs/" + "0" * 32, headers={"Authorization": "bearer x.y"})
    for resp in (r, status):
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "7"
        assert resp.json()["error"]["code"] == "database_unavailable"
        assert "psycopg" not in resp.text and "127.0.0.1" not in resp.text
