"""``whisperq``: keys, migrations, usage, and the processes of the stack (api, worker,
flower, up); and the HTTP clients of a server (transcribe, job, submit, fetch)."""

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

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.infra.models import ApiKey
    from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """A mistake the user can fix: printed as one line, never a traceback."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("whisperq")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _settings() -> Settings:
    from app.settings import get_settings

    return get_settings()


def cmd_migrate(_: argparse.Namespace) -> int:
    from app.infra.migrate import upgrade

    upgrade(_settings())
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from app.infra.db import session_scope
    from app.jobs.keys import create_key

    with session_scope() as session:
        created = create_key(session, name=args.name, pepper=_settings().key_pepper)
        prefix = created.row.prefix
    print(f"api key:        {created.key}")
    print(f"webhook secret: {created.webhook_secret}")
    print(f"(prefix {prefix}; both are shown once: only a hash of the key is stored)")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from app.infra.db import session_scope
    from app.jobs.keys import rotate_webhook_secret

    with session_scope() as session:
        _find_key(session, args.prefix)
        secret = rotate_webhook_secret(session, prefix=args.prefix)
    print(f"webhook secret: {secret}")
    print("(the previous secret is still signed alongside until the next rotation)")
    return 0


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _find_key(session: Session, prefix: str) -> ApiKey:
    from sqlalchemy import select

    from app.infra.models import ApiKey

    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    if row is None:
        raise UserError(f"no API key with prefix {prefix!r} (see `whisperq keys list`)")
    return row


def cmd_keys_list(_: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from app.infra.db import session_scope
    from app.infra.models import ApiKey, Job

    with session_scope() as session:
        counts = dict(
            session.execute(select(Job.api_key_id, func.count()).group_by(Job.api_key_id)).all()
        )
        keys = session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
        rows = [
            [
                k.prefix,
                k.name or "-",
                k.created_at.strftime("%Y-%m-%d %H:%M"),
                k.revoked_at.strftime("%Y-%m-%d %H:%M") if k.revoked_at else "active",
                str(counts.get(k.id, 0)),
            ]
            for k in keys
        ]
    if not rows:
        print("no API keys yet: `whisperq keys create --name NAME`")
        return 0
    print(_table(["prefix", "name", "created (UTC)", "revoked", "jobs"], rows))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from app.infra.db import session_scope, utcnow

    with session_scope() as session:
        row = _find_key(session, args.prefix)
        if row.revoked_at is None:
            row.revoked_at = utcnow()
    print(f"revoked {args.prefix}: it is refused from now on (its jobs and usage are kept)")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from app.errors import ServiceError
    from app.infra.db import session_scope
    from app.jobs.usage import usage_by_key, window

    try:
        w = window(args.start, args.end, now=datetime.now(UTC))
    except ServiceError as exc:
        raise UserError(f"--{exc.field}: {exc.message}") from None
    with session_scope() as session:
        found = usage_by_key(session, w=w)
        rows = [
            [
                k.prefix,
                k.name or "-",
                str(u.jobs),
                str(u.succeeded),
                str(u.failed),
                str(u.canceled),
                f"{u.audio_seconds:.1f}",
                str(u.runtime_ms),
                f"{u.cost:.6f}",
                f"{u.canceled_cost:.6f}",
            ]
            for k, u in found
        ]
    print(f"usage from {w.start:%Y-%m-%d %H:%M} to {w.end:%Y-%m-%d %H:%M} UTC (jobs finished)")
    if rows:
        total = [
            "total",
            "",
            *(str(sum(int(r[i]) for r in rows)) for i in (2, 3, 4, 5)),
            f"{sum(float(r[6]) for r in rows):.1f}",
            str(sum(int(r[7]) for r in rows)),
            f"{sum(float(r[8]) for r in rows):.6f}",
            f"{sum(float(r[9]) for r in rows):.6f}",
        ]
        rows.append(total)
    # Canceled jobs are billed for the model time they ran before they stopped: cost_usd
    # includes it, canceled_usd says how much of it that was.
    headers = [
        "key",
        "name",
        "jobs",
        "ok",
        "failed",
        "canceled",
        "audio_s",
        "runtime_ms",
        "cost_usd",
        "canceled_usd",
    ]
    print(_table(headers, rows) if rows else "no API keys")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from app.infra.db import utcnow
    from app.jobs.retention import purge

    settings = _settings()
    report = purge(settings, now=utcnow(), dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{verb}: audio of {report.audio_deleted} jobs, transcripts of "
        f"{report.transcripts_deleted} jobs, {report.orphans_deleted} blobs no job names "
        f"(keep_audio_days={settings.keep_audio_days:g}, "
        f"retention_days={settings.retention_days:g}; 0 keeps transcripts)"
    )
    return 0


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
    from app.settings import WEBHOOK_THREADS
    from worker.celery_app import celery
    from worker.runtime import engine_slots

    threads = engine_slots(engine) + WEBHOOK_THREADS
    queues = args.queues or ",".join(
        [settings.queue_interactive, settings.queue_bulk, settings.queue_webhooks]
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
        if cmd_migrate(args) != 0:
            return 1
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


def plain_help(doc: str) -> str:
    """A docstring as help text: its RST literals (double backticks) read as plain words in
    a terminal, and its lines are joined (argparse re-wraps them anyway)."""
    return " ".join(doc.replace("``", "").split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisperq", description=plain_help(__doc__ or ""))
    parser.add_argument("--version", action="version", version=f"whisperq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="create/upgrade the database schema").set_defaults(
        func=cmd_migrate
    )

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True)
    create = keys.add_parser("create", help="create an API key (prints it once)")
    create.add_argument("--name", default="", help="a label for the key (who uses it)")
    create.set_defaults(func=cmd_keys_create)
    rotate = keys.add_parser("rotate-webhook-secret", help="new webhook signing secret")
    rotate.add_argument("prefix", help="the key's prefix (wq_...), see `whisperq keys list`")
    rotate.set_defaults(func=cmd_keys_rotate)
    keys.add_parser("list", help="every key: prefix, name, created, revoked, jobs").set_defaults(
        func=cmd_keys_list
    )
    revoke = keys.add_parser("revoke", help="refuse a key from now on (its jobs are kept)")
    revoke.add_argument("prefix", help="the key's prefix (wq_...), see `whisperq keys list`")
    revoke.set_defaults(func=cmd_keys_revoke)

    usage = sub.add_parser("usage", help="jobs, audio seconds, model time and cost per key")
    usage.add_argument(
        "--from", dest="start", default=None, help="date or ISO time (default: 30 days ago)"
    )
    usage.add_argument("--to", dest="end", default=None, help="date (inclusive) or ISO time")
    usage.set_defaults(func=cmd_usage)

    purge = sub.add_parser("purge", help="delete audio and transcripts past retention")
    purge.add_argument("--dry-run", action="store_true", help="count only, delete nothing")
    purge.set_defaults(func=cmd_purge)

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=int, default=8000, help="port to listen on")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a transcription worker")
    worker.add_argument(
        "--concurrency", type=int, default=0, help="jobs in flight (WHISPERQ_WORKER_CONCURRENCY)"
    )
    worker.add_argument("--queues", default="", help="comma-separated queues (default: all)")
    worker.set_defaults(func=cmd_worker)

    flower = sub.add_parser("flower", help="run the Flower dashboard")
    flower.add_argument(
        "--host", default="127.0.0.1", help="address; beyond loopback needs WHISPERQ_FLOWER_*"
    )
    flower.add_argument("--port", type=int, default=5555, help="port to listen on")
    flower.set_defaults(func=cmd_flower)

    model = sub.add_parser("model", help="model files").add_subparsers(
        dest="model_cmd", required=True
    )
    imp = model.add_parser("import-ct2", help="convert a CTranslate2 Whisper dir to a .pt")
    imp.add_argument("src", help="CTranslate2 / faster-whisper model directory")
    imp.add_argument("out", help="openai-whisper checkpoint (.pt) to write")
    imp.set_defaults(func=cmd_import_ct2)

    up = sub.add_parser("up", help="run the whole stack locally (SQLite, its own redis-server)")
    up.add_argument("--host", default="127.0.0.1", help="API address")
    up.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("WHISPERQ_API_PORT") or 8000),
        help="API port (env WHISPERQ_API_PORT; default 8000)",
    )
    up.add_argument(
        "--flower-port",
        type=int,
        default=int(os.environ.get("WHISPERQ_FLOWER_PORT") or 5555),
        help="Flower port on 127.0.0.1 (env WHISPERQ_FLOWER_PORT; default 5555)",
    )
    up.set_defaults(func=cmd_up)

    from app.client.cli import add_client_commands

    add_client_commands(sub)  # submit, fetch, transcribe, job: HTTP clients of a server
    from app.client.listen import add_parser as add_listen

    add_listen(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app.client.cli import CLIENT_COMMANDS

    # Clients (and the webhook receiver) run where no server settings exist, from an install
    # without the server's dependencies (`pip install whisperq`: httpx and rich only).
    client = args.command in CLIENT_COMMANDS or args.command == "listen"
    if not client:
        from app.settings import settings_or_exit

        settings_or_exit()  # weak secrets or bad settings: one line and exit, before any work
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"whisperq {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if client:
            raise
        from pydantic import ValidationError
        from sqlalchemy.exc import OperationalError

        if isinstance(exc, ValidationError):  # a bad WHISPERQ_* value
            err = exc.errors()[0]
            where = "WHISPERQ_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"whisperq: setting {where}: {err['msg']}", file=sys.stderr)
            return 2
        if isinstance(exc, OperationalError):  # wrong folder / no database / not migrated
            print(
                f"whisperq {args.command}: database unusable at {_safe_url()}: "
                f"{str(exc.orig).splitlines()[0]} (run `whisperq migrate`, or set "
                "WHISPERQ_DATA_DIR / WHISPERQ_DATABASE_URL to where your data is)",
                file=sys.stderr,
            )
            return 2
        raise


def _safe_url() -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(_settings().database_url).render_as_string(hide_password=True)
    except Exception:
        return "WHISPERQ_DATABASE_URL"


if __name__ == "__main__":
    sys.exit(main())
