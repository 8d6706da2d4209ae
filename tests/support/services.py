"""Real processes and servers for integration tests: a Celery worker, a webhook receiver."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from app.stack import redis_server_argv

REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """``whisperq worker`` in a subprocess, logging JSON lines: ``events()`` reads what it
    recorded (app/infra/logging.Event), ``log()`` keeps it all for failure messages."""

    def __init__(
        self,
        *,
        model: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        queues: str = "",
        concurrency: int = 4,
        wait_ready: bool = True,
    ) -> None:
        self.log_path = log_path
        run_env = {
            **os.environ,
            "WHISPERQ_MODEL": str(model),
            "WHISPERQ_LOG_FORMAT": "json",
            **(env or {}),
        }
        args = [sys.executable, "-m", "app.cli", "worker", "--concurrency", str(concurrency)]
        if queues:
            args += ["--queues", queues]
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=run_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait_ready:
            self._wait_ready(timeout=120)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log records of this event, oldest first."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == event:
                        found.append(record)
        return found

    def wait_event(self, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not (found := self.events(event)):
            assert time.monotonic() < deadline, f"no {event} after {timeout} s:\n{self.log()}"
            time.sleep(0.1)
        return found[0]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: a crash, no chance to clean up or ack."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def pause(self) -> None:
        """SIGSTOP: a stalled process (a long GC pause, a frozen VM, a network partition)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM to the worker itself (what ``docker stop`` sends), without waiting."""
        os.kill(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1. ``respond`` decides each answer: (status, headers,
    seconds to stall first, body)."""

    respond: Callable[[Received, int], tuple[int, dict[str, str], float, bytes]] = lambda _r, _n: (
        200,
        {},
        0.0,
        b"ok",
    )
    requests: list[Received] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> Receiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                got = Received(
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                with outer.arrived:
                    outer.requests.append(got)
                    n = len(outer.requests)
                    outer.arrived.notify_all()
                status, headers, stall, body = outer.respond(got, n)
                time.sleep(stall)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout): expected in some tests

            do_POST = _handle  # noqa: N815 (http.server naming)
            do_GET = _handle  # noqa: N815

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"receiver got {len(self.requests)} of {count} requests")
                self.arrived.wait(left)
            return list(self.requests)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


class RedisServer:
    """A throwaway ``redis-server`` on a free port, without persistence: a restart loses
    everything, like a broker that crashed or was flushed."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            redis_server_argv(self.port, self.workdir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port)
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Killed and started again on the same port: every message is gone."""
        self.stop()
        self.start()


class PostgresServer:
    """A throwaway PostgreSQL cluster (``initdb``) on a free port, run as user postgres."""

    def __init__(self) -> None:
        # Its own directory: a pytest tmp_path is private to root, and the server runs as
        # postgres.
        self.workdir = Path(tempfile.mkdtemp(prefix="whisperq-pg-"))
        self.data = self.workdir / "pgdata"
        self.port = free_port()

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:  # initdb refuses root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.decode(errors='replace')}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")
        return self.start()

    def start(self) -> PostgresServer:
        opts = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.workdir / "pg.log"),
            "-w",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)


class ApiProcess:
    """``whisperq api`` (uvicorn) in a subprocess on a free loopback port, ready once its
    /healthz answers: the one way the tests start a real API server. Use it as a context
    manager, or call ``stop()``."""

    def __init__(
        self, *, log_path: Path, env: dict[str, str] | None = None, timeout: float = 60
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{self.log()}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> ApiProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def migrate(database_url: str) -> None:
    """Alembic upgrade of a database that is not the session's own."""
    subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        cwd=REPO,
        env={**os.environ, "WHISPERQ_DATABASE_URL": database_url},
        check=True,
        capture_output=True,
        timeout=120,
    )


@dataclass
class Stack:
    """What one fault test's processes share: the test database, a Redis of its own, queue
    names of its own (so no other test's jobs are ever claimed), and settings overrides."""

    redis_url: str
    database_url: str
    tag: str
    overrides: dict[str, str] = field(default_factory=dict)
    redis: RedisServer | None = None  # when the test owns the server

    @property
    def env(self) -> dict[str, str]:
        return {
            "WHISPERQ_DATABASE_URL": self.database_url,
            "WHISPERQ_REDIS_URL": self.redis_url,
            "WHISPERQ_QUEUE_INTERACTIVE": f"interactive-{self.tag}",
            "WHISPERQ_QUEUE_BULK": f"bulk-{self.tag}",
            "WHISPERQ_QUEUE_WEBHOOKS": f"webhooks-{self.tag}",
            # Jobs of a test share their audio blob: a finished one must not delete it.
            "WHISPERQ_KEEP_AUDIO_DAYS": "1",
            **self.overrides,
        }

    def settings(self) -> Any:
        from app.settings import get_settings

        return get_settings().model_copy(
            update={
                "database_url": self.database_url,
                "redis_url": self.redis_url,
                "queue_interactive": f"interactive-{self.tag}",
                "queue_bulk": f"bulk-{self.tag}",
                "queue_webhooks": f"webhooks-{self.tag}",
            }
        )

    def db(self) -> Any:
        from app.infra.db import make_engine

        if not hasattr(self, "_engine"):
            self._engine = make_engine(self.database_url)
        return self._engine

    def producer(self) -> Any:
        from app.infra.queue import build_celery

        if not hasattr(self, "_celery"):
            self._celery = build_celery(self.settings())
        return self._celery

    def send(self, job_id: str, queue: str) -> None:
        from app.infra.queue import RUN_JOB

        self.producer().send_task(RUN_JOB, args=[job_id], queue=queue)

    def enqueue(
        self,
        *,
        api_key_id: int,
        audio: bytes,
        n: int = 1,
        bulk: bool = False,
        options: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        send: bool = True,
    ) -> list[str]:
        """Jobs as the API makes them: audio in the blob store, rows committed, then one
        message each. All ``n`` share one blob (the worker never deletes it)."""
        from sqlalchemy.orm import Session

        from app.infra import blobs
        from app.infra.db import utcnow
        from app.infra.models import Job, JobStatus, new_job_id
        from app.jobs.options import TranscribeOptions

        settings = self.settings()
        queue = settings.queue_bulk if bulk else settings.queue_interactive
        blob = new_job_id()
        blobs.write_blob(blob, audio)
        opts = options or TranscribeOptions(logprob_threshold=None).to_json()
        ids = []
        with Session(self.db()) as session, session.begin():
            for _ in range(n):
                job = Job(
                    id=new_job_id(),
                    api_key_id=api_key_id,
                    status=JobStatus.queued,
                    queue=queue,
                    options=opts,
                    audio_blob=blob,
                    webhook_url=webhook_url,
                    enqueued_at=utcnow(),
                )
                session.add(job)
                ids.append(job.id)
                # Distinct creation times keep the order of submission.
                session.flush()
        if send:  # as the API sends them: a units message per 64, one per job for the rest
            from app.infra.queue import send_jobs

            send_jobs(ids, queue=queue, celery=self.producer())
        return ids

    def jobs(self, ids: list[str]) -> dict[str, Any]:
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from app.infra.models import Job

        with Session(self.db()) as session:
            rows = session.scalars(select(Job).where(Job.id.in_(ids))).all()
            session.expunge_all()
        return {r.id: r for r in rows}

    def deliveries(self, ids: list[str]) -> dict[str, int]:
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from app.infra.models import WebhookDelivery

        with Session(self.db()) as session:
            rows = session.execute(
                select(WebhookDelivery.job_id, func.count())
                .where(WebhookDelivery.job_id.in_(ids))
                .group_by(WebhookDelivery.job_id)
            ).all()
        return {job_id: n for job_id, n in rows if job_id is not None}

    def wait(self, ids: list[str], *, until: Callable[[Any], bool], timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.jobs(ids)
            if len(rows) == len(ids) and all(until(r) for r in rows.values()):
                return rows
            if time.monotonic() > deadline:
                states = sorted((r.status, r.attempts) for r in rows.values())
                raise AssertionError(f"jobs not there after {timeout}s: {states}")
            time.sleep(0.1)

    def wait_ended(self, ids: list[str], *, timeout: float = 120) -> Any:
        return self.wait(
            ids, until=lambda r: r.status in ("succeeded", "failed", "canceled"), timeout=timeout
        )

    def close(self) -> None:
        if hasattr(self, "_engine"):
            self._engine.dispose()


def quick_checkpoint(path: Path) -> Path:
    """A random-weight Whisper whose greedy decoding ends every window at once (end of text
    outweighs every other token, timestamps included): a job costs its audio decoding, one
    encoder pass and a few decoder steps, so hundreds of jobs fit in a test."""
    import torch
    from whisper.tokenizer import get_tokenizer

    from tests.support.random_model import random_model

    model = random_model(seed=1)
    eot = get_tokenizer(multilingual=model.is_multilingual).eot
    with torch.no_grad():
        # The final layer norm's output becomes the same unit vector at every position, so
        # the logits are one column of the embedding, where end of text is far ahead.
        model.decoder.ln.weight.zero_()
        model.decoder.ln.bias.zero_()
        model.decoder.ln.bias[0] = 1.0
        model.decoder.token_embedding.weight[:, 0].normal_(0, 0.2)
        model.decoder.token_embedding.weight[eot, 0] = 40.0
    from dataclasses import asdict

    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    return path


@contextlib.contextmanager
def stack_with_own_redis(
    database_url: str, workdir: Path, overrides: dict[str, str]
) -> Iterator[Stack]:
    """A Stack on a redis-server of its own, for tests that flush, stop or restart it."""
    redis = RedisServer(workdir / "redis").start()
    s = Stack(
        redis_url=redis.url,
        redis=redis,
        database_url=database_url,
        tag=uuid.uuid4().hex[:8],
        overrides=overrides,
    )
    try:
        yield s
    finally:
        s.close()
        redis.stop()
