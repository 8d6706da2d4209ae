"""The processes of the stack as commands: ``whisperq api``, ``worker``, ``flower``,
``import-ct2`` and ``up`` (all of them on one machine, with their own redis-server). The
worker's modules load only inside the commands that start a worker (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from app.errors import UserError

if TYPE_CHECKING:
    from app.settings import Settings


def _settings() -> Settings:
    from app.settings import get_settings

    return get_settings()


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("app.api.main:app", host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    from app.infra.logging import configure_logging

    # Before the model loads: its one line saying which model is served (and why) is INFO,
    # which Python's last-resort handler would drop.
    configure_logging(settings)
    # Load the model before consuming anything: a worker that cannot run jobs says so now.
    from worker.model_loading import ModelLoadError
    from worker.runtime import get_engine

    try:
        engine = get_engine()
    except (ModelLoadError, OSError) as exc:  # OSError: e.g. a model folder it cannot write
        print(f"whisperq worker: cannot load the model: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # an engine setting this device cannot run
        print(f"whisperq worker: cannot start the engine: {exc}", file=sys.stderr)
        return 2
    from app.settings import WEBHOOK_THREADS
    from worker.celery_app import celery
    from worker.runtime import engine_slots

    threads = engine_slots(engine) + WEBHOOK_THREADS
    queues = ",".join(
        worker_queues(
            args.queues.split(",")
            if args.queues
            else [settings.queue_interactive, settings.queue_bulk, settings.queue_webhooks],
            settings,
        )
    )
    # Not worker_main(): it drops the worker's exit status, so a worker that stopped on an
    # unrecoverable error exited 0 and no restart policy (compose, systemd) brought it back.
    status = celery.start(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={args.concurrency or settings.worker_concurrency or threads}",
            "-Q",
            queues,
            "-E",
            "--loglevel=INFO",
            "-n",
            f"whisperq-{os.getpid()}@%h",
            "--without-mingle",
            "--without-gossip",
        ]
    )
    return int(status or 0)


def worker_queues(names: list[str], settings: Settings) -> list[str]:
    """The queues a worker consumes: serving a job queue is consuming its units twin too
    (a bulk enqueue's messages, app/infra/queue.py)."""
    from app.infra.queue import units_queue

    jobs = {settings.queue_interactive, settings.queue_bulk}
    out: list[str] = []
    for name in (n.strip() for n in names):
        if name and name not in out:
            out.append(name)
            if name in jobs:
                out.append(units_queue(name))
    return out


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def flower_argv(settings: Settings, *, host: str, port: int) -> list[str]:
    """Flower's arguments: basic auth from WHISPERQ_FLOWER_USER / _PASSWORD. Without them
    Flower may only listen on loopback (it shows every worker and lets you stop them)."""
    argv = ["flower", f"--port={port}", f"--address={host}"]
    password = flower_password(settings)
    if password and not settings.flower_user:
        # Else the password would be silently unused and Flower open on loopback.
        raise UserError("WHISPERQ_FLOWER_PASSWORD is set: set WHISPERQ_FLOWER_USER too")
    if password:
        argv.append(f"--basic-auth={settings.flower_user}:{password}")
    elif host not in LOOPBACK_HOSTS:
        raise UserError(
            f"refusing to serve Flower on {host} without a login: set WHISPERQ_FLOWER_USER "
            "and WHISPERQ_FLOWER_PASSWORD (or use --host 127.0.0.1)"
        )
    return argv


def flower_password(settings: Settings) -> str:
    return settings.flower_password.get_secret_value() if settings.flower_password else ""


def require_flower_login(user: str, password: str) -> None:
    """Make every request to the Flower this process starts present the login.

    Flower's --basic-auth guards its pages and API but not /metrics, /healthcheck, its
    static files or its 404 page (flower 2.2). The login is checked here before Flower
    routes a request at all, so no handler, this version's or a later one's, answers
    without it; one process and one port, no proxy in between.
    """
    import base64
    import binascii
    import hmac

    import flower.command  # type: ignore[import-untyped]
    from tornado.httputil import HTTPMessageDelegate, HTTPServerRequest
    from tornado.web import Application, RequestHandler

    base = getattr(flower.command, "Flower", None)
    if not (isinstance(base, type) and issubclass(base, Application)):
        # Patching a name Flower no longer uses would leave it open: refuse instead.
        raise UserError("this Flower version cannot be guarded; pin flower 2.x")
    expected = f"{user}:{password}".encode()

    def logged_in(request: HTTPServerRequest) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return scheme.lower() == "basic" and hmac.compare_digest(given, expected)

    class LoginRequired(RequestHandler):
        def check_xsrf_cookie(self) -> None:
            pass  # nothing here changes state, and a stranger's POST should read 401, not 403

        def prepare(self) -> None:
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Basic realm="flower"')
            self.finish("login required\n")

    class GuardedFlower(base):  # type: ignore[misc,valid-type]
        def find_handler(self, request: HTTPServerRequest, **kwargs: object) -> HTTPMessageDelegate:
            if logged_in(request):
                return super().find_handler(request, **kwargs)  # type: ignore[no-any-return]
            return self.get_handler_delegate(request, LoginRequired)  # type: ignore[no-any-return]

    flower.command.Flower = GuardedFlower


def cmd_flower(args: argparse.Namespace) -> int:
    settings = _settings()
    argv = flower_argv(settings, host=args.host, port=args.port)
    if password := flower_password(settings):
        require_flower_login(settings.flower_user, password)
    from worker.celery_app import celery

    # In-process: the password is in no process's command line.
    celery.start(argv)
    return 0


def cmd_import_ct2(args: argparse.Namespace) -> int:
    from worker.ct2_import import convert_ct2_to_whisper

    dims = convert_ct2_to_whisper(Path(args.src), Path(args.out))
    print(f"wrote {args.out}: {dims}")
    return 0


def _redis_up(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_argv(port: int, folder: Path) -> list[str]:
    """A throwaway redis-server on loopback: nothing saved, and a full memory refuses writes
    instead of evicting queued messages."""
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxmemory-policy",
        "noeviction",
        "--dir",
        str(folder),
    ]


def _own_redis(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server for this stack alone (its own port and folder), so two stacks on one
    machine never share a broker, workers or Flower."""
    if shutil.which("redis-server") is None:
        raise UserError("no redis-server to start (apt-get install redis-server)")
    port = _free_port()
    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    # Its own session, like the stack's other processes: Ctrl-C must not stop the broker
    # before the worker and Flower have let go of it.
    proc = subprocess.Popen(
        redis_server_argv(port, folder), stdout=subprocess.DEVNULL, start_new_session=True
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if _redis_up(url):
            return proc, url
        time.sleep(0.1)
    proc.kill()
    raise UserError(f"redis-server did not start on port {port}")


def cmd_up(args: argparse.Namespace) -> int:
    """The whole stack on this machine: its own redis-server (unless WHISPERQ_REDIS_URL is
    set), SQLite in the data dir, api, worker, flower. Ctrl-C stops everything it started."""
    settings = _settings()
    children: list[subprocess.Popen[bytes]] = []
    exe = [sys.executable, "-m", "app.cli"]
    env = {**os.environ, "WHISPERQ_DATA_DIR": str(settings.data_dir)}
    local_defaults = {
        # A local stack: its user's webhook receiver (whisperq listen) runs on this machine.
        # Production refuses loopback targets unless allow-listed.
        "webhook_allowlist": "127.0.0.1,::1,localhost",
        "worker_metrics_host": "127.0.0.1",
        "worker_metrics_port": str(_free_port()),
    }
    for name, value in local_defaults.items():
        if name not in settings.model_fields_set:
            env[f"WHISPERQ_{name.upper()}"] = value
    try:
        if "redis_url" in settings.model_fields_set:
            if not _redis_up(settings.redis_url):
                raise UserError(f"no Redis answers at WHISPERQ_REDIS_URL ({settings.redis_url})")
            redis_line = f"your Redis at {settings.redis_url} (WHISPERQ_REDIS_URL)"
        else:
            redis_proc, url = _own_redis(settings.data_dir)
            children.append(redis_proc)
            env["WHISPERQ_REDIS_URL"] = url
            redis_line = f"own redis-server at {url} (set WHISPERQ_REDIS_URL to use another)"
        print(f"whisperq up: data in {settings.data_dir}", flush=True)
        print(f"whisperq up: Redis: {redis_line}", flush=True)
        from app.infra.migrate import upgrade

        upgrade(settings)
        # Each in its own session: Ctrl-C reaches this process alone, which stops them in
        # order (API and Flower, the worker, then Redis), so none of them sees its broker
        # vanish or prints a KeyboardInterrupt traceback.
        for argv in (
            ["worker"],
            ["flower", "--port", str(args.flower_port)],
            ["api", "--host", args.host, "--port", str(args.port)],
        ):
            children.append(subprocess.Popen([*exe, *argv], env=env, start_new_session=True))
        print(
            f"whisperq: API http://{args.host}:{args.port} (jobs page: /jobs, docs: /docs)  "
            f"Flower http://127.0.0.1:{args.flower_port}  "
            f"worker metrics http://127.0.0.1:{env.get('WHISPERQ_WORKER_METRICS_PORT', '-')}"
            "/metrics  (Ctrl-C stops)",
            flush=True,
        )
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        failed = next(c for c in children if c.poll() is not None)
        print(f"whisperq up: {failed.args!r} exited with {failed.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_in_order(children, worker_grace_s=settings.worker_stop_grace_s)


def _stop_in_order(children: list[subprocess.Popen[bytes]], *, worker_grace_s: float) -> None:
    """API and Flower first, then the worker (it hands its running jobs back), then Redis:
    started as [redis?, worker, flower, api]."""
    groups = [children[-2:], children[-3:-2], children[:-3]]
    for group, wait_s in zip(groups, (15.0, worker_grace_s + 15.0, 15.0), strict=True):
        for child in group:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in group:
            try:
                child.wait(wait_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
