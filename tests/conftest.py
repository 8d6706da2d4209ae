"""Test environment: a fresh Postgres database and a redis-server per run, real worker processes.

Settings are read from the environment, so everything is set here before any app import.
In CI (CI=true) a missing service fails the run; nothing skips.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from tests.support.services import Receiver

RUN_ID = uuid.uuid4().hex[:8]


def _own_redis(workdir: Path) -> str:
    """A redis-server for this run alone: runs side by side (a CI run and a developer's, on
    one machine) would otherwise flush each other's messages out of a shared db. Started
    before any app import, since settings are read from the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--maxmemory-policy", "noeviction", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    atexit.register(proc.kill)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the test run's own redis-server did not start") from None
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/7"


PG_ADMIN_URL = os.environ.get(
    "WHISPERQ_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TEST_DB = f"whisperq_test_{RUN_ID}"
BASE_TMP = Path(tempfile.mkdtemp(prefix=f"whisperq-test-{RUN_ID}-"))
REDIS_URL = os.environ.get("WHISPERQ_TEST_REDIS") or _own_redis(BASE_TMP / "redis")

TEST_ENV = {
    "WHISPERQ_ENVIRONMENT": "test",
    "WHISPERQ_KEY_PEPPER": "test-pepper-" + RUN_ID,
    "WHISPERQ_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + TEST_DB,
    "WHISPERQ_REDIS_URL": REDIS_URL,
    "WHISPERQ_BLOB_DIR": str(BASE_TMP / "blobs"),
    "WHISPERQ_WEBHOOK_ALLOWLIST": '["127.0.0.1", "::1", "localhost"]',
    "WHISPERQ_AUDIO_URL_ALLOWLIST": '["127.0.0.1", "::1", "localhost"]',
    "WHISPERQ_WEBHOOK_TIMEOUT_S": "2",
    "WHISPERQ_WEBHOOK_RETRY_SCHEDULE_S": "[0.5, 0.5, 0.5]",
    "WHISPERQ_REAPER_INTERVAL_S": "1",
    "WHISPERQ_REQUEUE_AFTER_S": "30",
    "WHISPERQ_SYNC_WAIT_S": "120",
    "WHISPERQ_QUEUE_INTERACTIVE": f"interactive-{RUN_ID}",
    "WHISPERQ_QUEUE_BULK": f"bulk-{RUN_ID}",
    "WHISPERQ_QUEUE_WEBHOOKS": f"webhooks-{RUN_ID}",
    "WHISPERQ_DEVICE": "cpu",
    # Tests inspect blobs after their jobs end; tests/test_s3.py checks deletion (keep 0).
    "WHISPERQ_KEEP_AUDIO_DAYS": "1",
}
os.environ.update(TEST_ENV)


def _create_database() -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{TEST_DB}"'))
    admin.dispose()


def _drop_database() -> None:
    from sqlalchemy import create_engine, text

    from app.infra.db import get_engine

    get_engine().dispose()
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[str]:
    _create_database()
    from app.cli import main

    assert main(["migrate"]) == 0
    yield TEST_ENV["WHISPERQ_DATABASE_URL"]
    _drop_database()


@pytest.fixture(scope="session", autouse=True)
def clean_redis() -> Iterator[None]:
    import redis

    client = redis.Redis.from_url(TEST_ENV["WHISPERQ_REDIS_URL"])
    client.flushdb()
    yield
    client.flushdb()
    client.close()


@pytest.fixture(scope="module", autouse=True)
def module_isolation(database: str, clean_redis: None) -> Iterator[None]:
    """Each module starts with no jobs, batches or deliveries left by another: with claim by
    policy, a later module's worker would otherwise spend its slots draining an earlier
    module's queued backlog and retrying webhooks to receivers long gone. Keys stay (cheap,
    and each module makes its own)."""
    yield
    import redis
    from sqlalchemy import text

    from app.infra.db import get_engine

    with get_engine().begin() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '20s'"))
        conn.execute(
            text("TRUNCATE webhook_attempts, webhook_deliveries, idempotency_keys, jobs, batches")
        )
    client = redis.Redis.from_url(TEST_ENV["WHISPERQ_REDIS_URL"])
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    """The HTTP API in-process, driven over HTTP semantics by Starlette's test client."""
    from tests.support.api import client

    with client() as c:
        yield c


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real HTTP server on 127.0.0.1 that records what it is sent."""
    from tests.support.services import Receiver

    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def db_session(database: str) -> Iterator[object]:
    """A session inside a transaction that is rolled back after the test."""
    from sqlalchemy.orm import Session

    from app.infra.db import get_engine

    conn = get_engine().connect()
    trans = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint")
    yield session
    session.close()
    trans.rollback()
    conn.close()
