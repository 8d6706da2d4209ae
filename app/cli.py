"""``whisperq``: keys, migrations, usage, and the processes of the stack (api, worker,
flower, up); and the HTTP clients of a server (transcribe, job, submit, fetch)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.infra.models import ApiKey
    from app.settings import Settings

from app.errors import UserError
from app.stack import (
    cmd_api,
    cmd_flower,
    cmd_import_ct2,
    cmd_up,
    cmd_worker,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


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
