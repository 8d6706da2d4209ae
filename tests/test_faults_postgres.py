"""Postgres restarted while clients submit: the API answers a JSON 503 with Retry-After and
recovers by itself; a worker that cannot claim gives the message back, one that cannot save
a finished job keeps trying; no job is lost, stuck or run twice. A throwaway cluster (initdb
on a free port) and a throwaway Redis: the shared servers are never touched."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.infra.logging import Event
from app.infra.models import Job
from app.jobs.keys import create_key
from app.jobs.options import TranscribeOptions
from app.settings import get_settings
from tests.support.api import INFER, noise_wav
from tests.support.services import (
    ApiProcess,
    PostgresServer,
    RedisServer,
    Stack,
    WorkerProcess,
    migrate,
    quick_checkpoint,
)

pytestmark = pytest.mark.integration
NEVER = "http://127.0.0.1:9/never"


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer().init()
    yield server
    server.destroy()


def test_postgres_restart_while_clients_submit(pg: PostgresServer, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    url = pg.create_database("whisperq")
    migrate(url)
    # Default lease and visibility: a restart is far shorter than a lease.
    stack = Stack(
        redis_url=redis.url,
        redis=redis,
        database_url=url,
        tag=uuid.uuid4().hex[:8],
        overrides={
            "WHISPERQ_REAPER_INTERVAL_S": "0.5",
            "WHISPERQ_REQUEUE_AFTER_S": "2",
            "WHISPERQ_DB_RETRY_DELAY_S": "0.5",
        },
    )
    with Session(stack.db(), expire_on_commit=False) as session, session.begin():
        key = create_key(session, name="pg", pepper=get_settings().key_pepper)
    model = quick_checkpoint(tmp_path / "quick.pt")
    api = ApiProcess(log_path=tmp_path / "api.log", env=stack.env)
    worker = WorkerProcess(model=model, log_path=tmp_path / "w1.log", env=stack.env)
    # A second worker with free slots: it will try to claim during the outage.
    idle = WorkerProcess(model=model, log_path=tmp_path / "w2.log", env=stack.env)
    answers: list[tuple[int, dict[str, str], str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=api.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(
                        INFER,
                        headers={"Authorization": f"bearer {key.key}"},
                        files={"audio": ("a.wav", noise_wav(0.3))},
                        data={"webhook": NEVER, "logprob_threshold": "none"},
                    )
                    answers.append((r.status_code, dict(r.headers), r.text))
                except httpx.HTTPError as exc:  # a dropped connection is a failure too
                    answers.append((0, {}, repr(exc)))
                time.sleep(0.1)

    clients = [threading.Thread(target=client) for _ in range(3)]
    try:
        # A longer job that will end while Postgres is down: its final save must wait.
        long_id = stack.enqueue(
            api_key_id=key.row.id,
            audio=noise_wav(300.0),
            options=TranscribeOptions(logprob_threshold=None).to_json(),
        )[0]
        for t in clients:
            t.start()
        stack.wait([long_id], until=lambda r: r.status == "running", timeout=60)
        # Jobs committed just before Postgres goes, their messages sent just after.
        late = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(0.3), n=4, send=False)
        up_answers = len(answers)
        pg.stop("fast")
        for job_id in late:
            stack.send(job_id, stack.settings().queue_interactive)
        deadline = time.monotonic() + 90
        while not (
            (worker.events(Event.store_retry) or idle.events(Event.store_retry))
            and (worker.events(Event.claim_failed) or idle.events(Event.claim_failed))
        ):
            assert time.monotonic() < deadline, worker.log() + idle.log()
            time.sleep(0.2)
        down_answers = len(answers)
        pg.start()
        time.sleep(3)  # the clients go on submitting after the restart
        stop.set()
        for t in clients:
            t.join(60)

        statuses = [s for s, _, _ in answers]
        assert set(statuses) <= {202, 503}, [a for a in answers if a[0] not in (202, 503)][:3]
        for status, headers, body in answers:
            if status == 503:
                assert headers.get("retry-after"), headers
                assert '"error"' in body
        assert 503 in statuses[up_answers:down_answers], statuses
        assert statuses[-1] == 202  # recovered by itself

        with Session(stack.db()) as session:
            all_ids = list(session.scalars(select(Job.id)).all())
        rows = stack.wait_ended(all_ids, timeout=120)
        accepted = {b.split('"request_id":"')[1].split('"')[0] for s, _, b in answers if s == 202}
        assert accepted <= set(rows)
        assert {rows[j].status for j in accepted | {long_id, *late}} == {"succeeded"}
        assert max(r.attempts for r in rows.values()) == 1  # nothing ran twice
        assert rows[long_id].attempts == 1 and rows[long_id].status == "succeeded"
        deliveries = stack.deliveries(list(rows))
        assert all(deliveries.get(j) == 1 for j in accepted)
    finally:
        stop.set()
        worker.stop()
        idle.stop()
        api.stop()
        stack.close()
        redis.stop()
