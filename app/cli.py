"""``whisperq``: keys, migrations, and the processes of the stack (api, worker, flower, up)."""

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
    from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def _settings() -> Settings:
    from app.settings import get_settings

    return get_settings()


def cmd_migrate(_: argparse.Namespace) -> int:
    from alembic import command
    from alembic.config import Config

    settings = _settings()
    if settings.is_sqlite:
        db_path = settings.database_url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    command.upgrade(cfg, "head")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.keys import create_key

    with session_scope() as session:
        created = create_key(session, name=args.name, pepper=_settings().key_pepper)
        prefix = created.row.prefix
    print(f"api key:        {created.key}")
    print(f"webhook secret: {created.webhook_secret}")
    print(f"(prefix {prefix}; both are shown once: only a hash of the key is stored)")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.keys import rotate_webhook_secret

    with session_scope() as session:
        secret = rotate_webhook_secret(session, prefix=args.prefix)
    print(f"webhook secret: {secret}")
    print("(the previous secret is still signed alongside until the next rotation)")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("app.api.main:app", host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    # Load the model before consuming anything: a worker that cannot run jobs says so now.
    from worker.model_loading import ModelLoadError
    from worker.runtime import get_engine

    try:
        get_engine()
    except ModelLoadError as exc:
        print(f"whisperq worker: cannot load the model: {exc}", file=sys.stderr)
        return 2
    from worker.celery_app import celery

    queues = args.queues or ",".join(
        [settings.queue_interactive, settings.queue_bulk, settings.queue_webhooks]
    )
    celery.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={args.concurrency or settings.worker_concurrency}",
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
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from worker.celery_app import celery

    celery.start(["flower", f"--port={args.port}", f"--address={args.host}"])
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


def cmd_up(args: argparse.Namespace) -> int:
    """The whole stack on this machine: redis-server if none answers, SQLite, api, worker,
    flower. Ctrl-C stops everything it started."""
    settings = _settings()
    children: list[subprocess.Popen[bytes]] = []
    exe = [sys.executable, "-m", "app.cli"]
    try:
        if not _redis_up(settings.redis_url):
            if shutil.which("redis-server") is None:
                print(
                    "whisperq up: no Redis at WHISPERQ_REDIS_URL and no redis-server to start "
                    "(apt-get install redis-server)",
                    file=sys.stderr,
                )
                return 2
            port = urlsplit(settings.redis_url).port or 6379
            Path("var").mkdir(exist_ok=True)
            children.append(
                subprocess.Popen(
                    [
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
                        "var",
                    ]
                )
            )
            for _ in range(50):
                if _redis_up(settings.redis_url):
                    break
                time.sleep(0.1)
        if cmd_migrate(args) != 0:
            return 1
        children.append(subprocess.Popen([*exe, "worker"]))
        children.append(subprocess.Popen([*exe, "flower", "--port", str(args.flower_port)]))
        children.append(
            subprocess.Popen([*exe, "api", "--host", args.host, "--port", str(args.port)])
        )
        print(
            f"whisperq: API http://{args.host}:{args.port}  Flower "
            f"http://127.0.0.1:{args.flower_port}  (Ctrl-C stops)",
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
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisperq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="create/upgrade the database schema").set_defaults(
        func=cmd_migrate
    )

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True)
    create = keys.add_parser("create", help="create an API key (prints it once)")
    create.add_argument("--name", default="")
    create.set_defaults(func=cmd_keys_create)
    rotate = keys.add_parser("rotate-webhook-secret", help="new webhook signing secret")
    rotate.add_argument("prefix")
    rotate.set_defaults(func=cmd_keys_rotate)

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a transcription worker")
    worker.add_argument("--concurrency", type=int, default=0)
    worker.add_argument("--queues", default="")
    worker.set_defaults(func=cmd_worker)

    flower = sub.add_parser("flower", help="run the Flower dashboard")
    flower.add_argument("--host", default="127.0.0.1")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)

    model = sub.add_parser("model", help="model files").add_subparsers(
        dest="model_cmd", required=True
    )
    imp = model.add_parser("import-ct2", help="convert a CTranslate2 Whisper dir to a .pt")
    imp.add_argument("src")
    imp.add_argument("out")
    imp.set_defaults(func=cmd_import_ct2)

    up = sub.add_parser("up", help="run the whole stack locally (SQLite, local redis-server)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--flower-port", type=int, default=5555)
    up.set_defaults(func=cmd_up)

    from app.client_cli import add_client_commands  # submit, fetch: HTTP clients (issue 13)

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
