"""A throwaway stack for a bench: its own redis-server and a fresh, migrated Postgres database
on the local server, with queue names of their own; both gone afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.stack import redis_server_argv

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get(
    "WHISPERQ_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Throwaway:
    env: dict[str, str]  # os.environ plus the WHISPERQ_* settings that point at this stack
    db: str
    db_url: str
    redis_port: int
    admin: Any  # an AUTOCOMMIT engine on the server's admin database (pg_stat_database)


@contextmanager
def throwaway_stack(workdir: Path, **settings: str) -> Iterator[Throwaway]:
    """``settings``: more WHISPERQ_* values, named without the prefix (ENGINE="null")."""
    from sqlalchemy import create_engine, make_url, text

    port = free_port()
    redis = subprocess.Popen(redis_server_argv(port, workdir), stdout=subprocess.DEVNULL)
    db = f"whisperq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    tag = uuid.uuid4().hex[:6]
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db}"'))
        # make_url, not string surgery: a socket URL (embedded Postgres) ends in ?host=/a/path
        db_url = make_url(PG_ADMIN).set(database=db).render_as_string(hide_password=False)
        env = {
            **os.environ,
            "WHISPERQ_DATABASE_URL": db_url,
            "WHISPERQ_REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "WHISPERQ_QUEUE_INTERACTIVE": f"interactive-{tag}",
            "WHISPERQ_QUEUE_BULK": f"bulk-{tag}",
            "WHISPERQ_QUEUE_WEBHOOKS": f"webhooks-{tag}",
            "WHISPERQ_KEY_PEPPER": os.environ.get("WHISPERQ_KEY_PEPPER", "bench-pepper-" + tag),
            "WHISPERQ_BLOB_DIR": str(workdir / "blobs"),
            "WHISPERQ_ENVIRONMENT": "test",
            **{f"WHISPERQ_{k}": v for k, v in settings.items()},
        }
        subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        yield Throwaway(env=env, db=db, db_url=db_url, redis_port=port, admin=admin)
    finally:
        redis.kill()
        redis.wait()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()
