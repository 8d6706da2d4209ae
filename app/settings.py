"""All configuration, in one place: environment variables prefixed ``WHISPERQ_``."""

from __future__ import annotations

import math
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SECRET = "changethis"
# A server secret shorter than this, or made of fewer distinct characters, is refused in
# production (issue 14): 16 random URL-safe characters are about 96 bits.
MIN_SECRET_CHARS = 16
MIN_SECRET_DISTINCT_CHARS = 8
# Length alone passes "password12345678": a secret must also be worth this many bits once
# the parts a guesser tries first (below) are counted as guesses, not as random characters.
MIN_SECRET_BITS = 64
MAKE_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
# Words people build secrets from, matched case-blind and through common digit/symbol swaps
# (p4ssw0rd). A cracker's dictionary is far larger; these catch the habits, and the bit
# estimate catches the rest of what is short or repetitive.
COMMON_SECRET_WORDS = (
    "password", "passwort", "passwd", "secret", "changeme", "changethis", "letmein",
    "welcome", "admin", "root", "qwerty", "azerty", "iloveyou", "monkey", "dragon",
    "master", "login", "whisperq", "whisper", "flower", "pepper", "metrics", "token",
    "default", "example", "sunshine", "football", "trustno", "hello", "test",
)  # fmt: skip
_LEET = str.maketrans("013457@$!", "oieastasi")
# Keyboard rows and digit/letter runs, forwards; a run read backwards is found reversed.
_SEQUENCES = ("abcdefghijklmnopqrstuvwxyz", "0123456789", "qwertyuiop", "asdfghjkl", "zxcvbnm")
# What one guessable part (a listed word, a run, a repeat of earlier text) is worth,
# whatever its length: about one guess among a few hundred.
GUESSABLE_PART_BITS = 8.0
MIN_GUESSABLE_PART = 3


# Celery threads beyond the engine's slots when WORKER_CONCURRENCY is unset: webhook
# deliveries share the pool and must not wait behind a full engine.
WEBHOOK_THREADS = 4


def _guessable_part(secret: str, start: int) -> int:
    """Length of the longest guessable part of ``secret`` at ``start`` (0: none)."""
    lowered = secret.lower()
    plain = lowered.translate(_LEET)
    best = 0
    for word in COMMON_SECRET_WORDS:
        if lowered.startswith(word, start) or plain.startswith(word, start):
            best = max(best, len(word))
    for run in _SEQUENCES:
        for line in (run, run[::-1]):
            length = 0
            while start + length < len(lowered) and lowered[start : start + length + 1] in line:
                length += 1
            if length >= MIN_GUESSABLE_PART:
                best = max(best, length)
    # A repeat: text that already began earlier in the secret (abcabcabc, aXyzaXyz).
    length = 0
    while (
        start + length < len(secret)
        and secret.find(secret[start : start + length + 1], 0, start + length) >= 0
    ):
        length += 1
    if length >= MIN_GUESSABLE_PART:
        best = max(best, length)
    same = len(secret[start:]) - len(secret[start:].lstrip(secret[start]))
    if same >= MIN_GUESSABLE_PART:
        best = max(best, same)
    return best


def estimated_secret_bits(secret: str) -> float:
    """A rough guessing cost in bits: each character is worth the alphabet it is drawn from
    (lower, upper, digits, symbols present), except guessable parts, worth a few bits each."""
    alphabet = (
        26 * any(c.islower() for c in secret)
        + 26 * any(c.isupper() for c in secret)
        + 10 * any(c.isdigit() for c in secret)
        + 33 * any(not c.isalnum() for c in secret)
    )
    per_char = math.log2(max(alphabet, 2))
    bits, at = 0.0, 0
    while at < len(secret):
        part = _guessable_part(secret, at)
        if part:
            bits += GUESSABLE_PART_BITS
            at += part
        else:
            bits += per_char
            at += 1
    return bits


def weak_secret_reason(secret: str) -> str | None:
    """Why ``secret`` is too weak to protect production data, or None when it is not. Never
    quotes the secret: the reason ends up in logs."""
    if secret == DEFAULT_SECRET:
        return f'the default "{DEFAULT_SECRET}"'
    if not secret.strip():
        return "empty"
    if len(secret) < MIN_SECRET_CHARS:
        return f"shorter than {MIN_SECRET_CHARS} characters"
    if len(set(secret)) < MIN_SECRET_DISTINCT_CHARS:
        return f"made of fewer than {MIN_SECRET_DISTINCT_CHARS} distinct characters"
    bits = estimated_secret_bits(secret)
    if bits < MIN_SECRET_BITS:
        return (
            f"predictable (common words, keyboard or number runs, repeats: about {bits:.0f} "
            f"bits, {MIN_SECRET_BITS} needed)"
        )
    return None


def weak_secret_message(name: str, problem: str) -> str:
    return f"{name} is {problem}; set it to a long random value ({MAKE_SECRET})"


# The Standard Webhooks schedule (5 s, 5 min, 30 min, 2 h, 5 h, 10 h...), stretched to about
# three days in all before a delivery is given up.
WEBHOOK_RETRY_SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000) + (36000.0,) * 6
SQLITE_FILE = "whisperq.db"
BLOB_SUBDIR = "blobs"


def default_data_dir() -> Path:
    """One place per user for the embedded stack's files (SQLite, blobs, .env, redis socket),
    so a command run from any folder finds the same data (XDG base directory spec)."""
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "whisperq"


def data_dir_from_env() -> Path:
    return Path(os.environ.get("WHISPERQ_DATA_DIR") or default_data_dir()).expanduser().resolve()


def _comma_list(value: Any) -> Any:
    """List settings take JSON (``["a", "b"]``) or a plain comma-separated value (``a,b``)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WHISPERQ_", env_file=".env", extra="ignore")

    environment: Literal["local", "test", "production"] = "local"

    # Unset: SQLite file and blob folder inside DATA_DIR (resolved once, see _resolve_paths).
    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    blob_dir: Path = Path()

    # HMAC pepper for API-key hashes. A leaked database alone must not reveal usable keys.
    key_pepper: str = DEFAULT_SECRET

    # Engine
    # "null": no model, every job succeeds at once, empty (load-tests the control plane alone).
    engine: Literal["whisper", "null"] = "whisper"
    model: str = "tiny"  # an openai-whisper model name, or a path to a local checkpoint
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_download_root: Path | None = None
    # Batched engine (issue 12). Rows = jobs whose current 30 s window is decoded together;
    # the worker sizes its threads pool and claims from Engine.max_in_flight, so the jobs in
    # flight can fill the batches. A lone job waits at most max_wait. None: 16 on a CPU; on
    # CUDA the rows that fit the device's free memory (worker/engine/sizing.py).
    engine_max_batch_rows: int | None = Field(default=None, ge=1, le=1024)
    # Jobs held claimed, loaded and waiting in the engine beyond one batch (None: as many as
    # a batch), so the window after a batch ends starts full: without them the jobs that
    # replace finished ones were still saving, claiming and loading audio, and windows ran
    # at 7-8 of 16 rows on a 2-core CPU (issue 12).
    engine_ready_rows: int | None = Field(default=None, ge=0, le=4096)
    # Engine threads, each decoding its own windows on its share of the cores (None: 2 on a
    # CPU with 2+ threads, 1 on CUDA). Engine.max_in_flight = lanes x rows + ready.
    engine_lanes: int | None = Field(default=None, ge=1, le=64)
    engine_max_wait_ms: float = Field(default=10.0, ge=0.0, le=10_000.0)
    # How decoder steps run (worker/engine/decoding.py STEP_MODES): "graph" replays each
    # step as one CUDA graph (CUDA only; a worker on another device refuses to start).
    engine_step_mode: Literal["eager", "static", "graph"] = "eager"

    # Metering
    price_per_second: float = 0.0005

    # Input limits
    max_upload_bytes: int = 100 * 1024 * 1024
    max_audio_seconds: float = 4 * 3600
    audio_fetch_timeout_s: float = 60.0
    ffmpeg_timeout_s: float = 600.0

    # Sync requests wait this long for their job before answering 202 with the job id.
    sync_wait_s: float = 600.0
    # A sync waiter is woken by the worker's completion signal; it also re-reads its row this
    # often, in case a signal was lost (pub/sub is at-most-once).
    sync_recheck_s: float = 5.0

    # Database pool, per process. The API's requests hold a connection only per unit of work
    # (never while reading uploads or waiting), so the pool bounds concurrent queries, not
    # concurrent clients; its size should cover the threadpool's (40 threads by default).
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=30, ge=0)
    db_pool_timeout_s: float = Field(default=10.0, gt=0)
    # Seconds a caller is told to wait (Retry-After) when Postgres or Redis is unreachable.
    retry_after_s: int = Field(default=5, ge=1)

    # Worker / queue
    # Threads per worker process (Celery threads pool). None: the engine's slots
    # (Engine.max_in_flight) plus WEBHOOK_THREADS for deliveries, so every batch can fill.
    worker_concurrency: int | None = Field(default=None, ge=1)
    queue_interactive: str = "interactive"
    queue_bulk: str = "bulk"
    queue_webhooks: str = "webhooks"

    # Claims, leases and recovery (issues 11 and 13). Postgres is the truth, Redis only wakes
    # workers up. A running job's lease is renewed by its worker's heartbeat every quarter
    # lease, so a dead worker's job is taken up again about a lease after it died.
    job_lease_s: int = Field(default=60, ge=4)
    # A message held by a dead worker goes back to its queue after this long without the
    # holder's heartbeat (the heartbeat refreshes it, so a long job is never redelivered).
    visibility_timeout_s: int = Field(default=60, ge=4)
    # How often each worker looks for such abandoned messages.
    unacked_restore_interval_s: float = Field(default=10.0, gt=0)
    reaper_interval_s: float = Field(default=10.0, gt=0)
    # A queued job with no message left in Redis (a broker restart, flush or lost message) is
    # re-sent once the shortfall has lasted this long. A job merely waiting is never re-sent.
    requeue_after_s: float = Field(default=30.0, ge=0)
    # A job whose worker died this many times (a poison job) is failed, not run again.
    job_max_attempts: int = Field(default=3, ge=1)
    # Jobs of one API key running at once across all workers; 0 means no cap.
    key_max_in_flight: int = Field(default=0, ge=0)
    # The wall-time limit of one run is job_time_limit_* (issue 14's block, app/jobs/limits.py).
    # On SIGTERM a running job gets this long to finish before it is handed back (queued);
    # compose's stop_grace_period must exceed it.
    worker_stop_grace_s: float = Field(default=20.0, ge=0)
    # Postgres unreachable: a worker waits this long before giving a message back to Redis,
    # and retries a final save at this interval (doubling, at most 30 s).
    db_retry_delay_s: float = Field(default=2.0, gt=0)
    # Webhooks
    webhook_timeout_s: float = 15.0
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: list(WEBHOOK_RETRY_SCHEDULE_S)
    )
    # Exact hosts or CIDRs that webhooks may reach although private (tests: 127.0.0.1).
    webhook_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Audio URLs are fetched by the worker: the same SSRF guard, with its own allow-list.
    audio_url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_url_redirects: int = 3
    # Delays up to this are scheduled as Celery countdowns; longer ones are left to the reaper.
    webhook_countdown_max_s: float = 300.0

    # --- issue 14: hostile input -------------------------------------------------------
    # Upload bodies are counted as they arrive (chunked or not) and cut past this many bytes
    # over max_upload_bytes (multipart headers, the other form fields).
    upload_overhead_bytes: int = 1024 * 1024
    # A form field (a data: URL as `audio` included) is held in memory: capped separately.
    max_data_url_bytes: int = 16 * 1024 * 1024
    # Request bodies read at once per API process; the rest wait. Each holds about one chunk
    # in memory (the file part goes to disk) and at most max_upload_bytes of temporary disk.
    upload_concurrency: int = 8
    # Per API key: submissions per minute (429 + Retry-After past it) and jobs waiting or
    # running at once (429 past it). 0 switches a limit off.
    submit_rate_per_minute: int = 120
    max_active_jobs_per_key: int = 1000
    # A job may run for job_time_limit_min_s + factor x its audio length (see app/jobs/limits.py);
    # enforced by the worker.
    job_time_limit_factor: float = 2.0
    job_time_limit_min_s: float = 120.0

    # Issue 15: interfaces (OpenAI audio API, exports, job management, idempotency)
    # Model names OpenAI clients send that mean "the model this server runs".
    openai_model_aliases: list[str] = Field(default_factory=lambda: ["whisper-1", "whisper-tiny"])
    idempotency_ttl_s: float = 24 * 3600
    jobs_page_size_max: int = 100

    # --- Operations (issue 16): data dir, blob store, retention, metrics, Flower, logs ---
    # Where the embedded stack keeps SQLite, blobs, its .env and its redis socket.
    data_dir: Path = Field(default_factory=data_dir_from_env)
    blob_backend: Literal["local", "s3"] = "local"
    s3_endpoint_url: str | None = None  # unset: AWS; else MinIO / SeaweedFS / R2 URL
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None  # unset: boto3's usual chain (env, profile, IAM role)
    s3_secret_access_key: SecretStr | None = None
    s3_prefix: str = "audio/"
    # Audio is deleted when its job ends, unless kept this many days (then purged).
    keep_audio_days: float = 0.0
    # Finished jobs' transcripts (and any audio left) are purged after this many days; 0 keeps.
    retention_days: float = 0.0
    purge_interval_s: float = 3600.0
    # The worker serves /metrics, /healthz, /readyz on this port (0: not at all).
    worker_metrics_port: int = 0
    worker_metrics_host: str = "0.0.0.0"
    # Flower asks for these (basic auth); `whisperq flower` refuses to start without them
    # unless bound to loopback.
    flower_user: str = ""
    flower_password: SecretStr | None = None
    # The bearer token the API's /metrics asks for. Unset in production: /metrics is off.
    metrics_token: SecretStr | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # The job page's cookie / signed links are signed with this (defaults to KEY_PEPPER).
    page_link_ttl_s: int = 7 * 86400

    @field_validator(
        "webhook_retry_schedule_s", "webhook_allowlist", "audio_url_allowlist", mode="before"
    )
    @classmethod
    def _lists_accept_commas(cls, value: Any) -> Any:
        return _comma_list(value)

    # Batches (issue 13)
    batch_max_inputs_per_request: int = 1000  # files + URLs + manifest lines in one request
    batch_max_manifest_bytes: int = 16 * 1024 * 1024
    batch_results_page_size: int = 500  # rows per DB round trip while streaming JSONL
    batch_list_max_limit: int = 100

    @model_validator(mode="after")
    def _resolve_paths(self) -> Self:
        """Relative paths are resolved once, here: the same files from any working folder."""
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / SQLITE_FILE}"
        elif self.database_url.startswith("sqlite:///") and ":memory:" not in self.database_url:
            head, _, path = self.database_url.partition(":///")
            if path and not Path(path).is_absolute():
                self.database_url = f"{head}:///{Path(path).resolve()}"
        if self.blob_dir == Path():
            self.blob_dir = self.data_dir / BLOB_SUBDIR
        self.blob_dir = self.blob_dir.expanduser().resolve()
        return self

    @model_validator(mode="after")
    def _refuse_weak_secrets(self) -> Self:
        problem = weak_secret_reason(self.key_pepper)
        if problem is not None:
            message = weak_secret_message("WHISPERQ_KEY_PEPPER", problem)
            if self.environment == "production":
                raise ValueError(message)
            if self.key_pepper == DEFAULT_SECRET:
                warnings.warn(message, stacklevel=1)
        if self.environment != "production":
            return self
        # Logins anyone who reaches the port can try. An empty value counts as unset (compose
        # passes variables the shell left empty); unset, Flower stays on loopback and
        # /metrics is off.
        for name, secret in (
            ("WHISPERQ_FLOWER_PASSWORD", self.flower_password),
            ("WHISPERQ_METRICS_TOKEN", self.metrics_token),
        ):
            value = secret.get_secret_value() if secret is not None else ""
            if value and (problem := weak_secret_reason(value)) is not None:
                raise ValueError(weak_secret_message(name, problem))
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def env_files() -> tuple[Path, ...]:
    """``.env`` in the working folder, then the data dir's (which wins): ``make up`` writes
    its pepper there, so ``whisperq keys create`` run from anywhere signs the same way."""
    return (Path(".env"), data_dir_from_env() / ".env")


@lru_cache
def get_settings() -> Settings:
    return Settings(_env_file=env_files())


def _reason(err: Any) -> str:
    where = "_".join(str(p) for p in err["loc"]).upper()
    message = str(err.get("msg", "")).removeprefix("Value error, ")
    return f"setting WHISPERQ_{where}: {message}" if where else message


def settings_or_exit() -> Settings:
    """The settings, or one clear line on stderr and exit status 2: for process start-up, so
    a misconfigured API or worker refuses to start instead of failing every request."""
    try:
        return get_settings()
    except ValidationError as exc:
        reasons = "; ".join(
            (
                f"setting WHISPERQ_{'_'.join(str(p) for p in err['loc']).upper()}: "
                if err["loc"]
                else ""
            )
            + str(err.get("msg", "")).removeprefix("Value error, ")
            for err in exc.errors()
        )
        print(f"whisperq: refusing to start: {reasons}", file=sys.stderr)
        raise SystemExit(2) from None
