"""All configuration, in one place: environment variables prefixed ``WHISPERQ_``."""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET = "changethis"
# The Standard Webhooks schedule (5 s, 5 min, 30 min, 2 h, 5 h, 10 h...), stretched to about
# three days in all before a delivery is given up.
WEBHOOK_RETRY_SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000) + (36000.0,) * 6


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WHISPERQ_", env_file=".env", extra="ignore")

    environment: Literal["local", "test", "production"] = "local"

    database_url: str = "sqlite:///./var/whisperq.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    blob_dir: Path = Path("./var/blobs")

    # HMAC pepper for API-key hashes. A leaked database alone must not reveal usable keys.
    key_pepper: str = DEFAULT_SECRET

    # Engine
    model: str = "tiny"  # an openai-whisper model name, or a path to a local checkpoint
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_download_root: Path | None = None

    # Metering
    price_per_second: float = 0.0005

    # Input limits
    max_upload_bytes: int = 100 * 1024 * 1024
    max_audio_seconds: float = 4 * 3600
    audio_fetch_timeout_s: float = 60.0
    ffmpeg_timeout_s: float = 600.0

    # Sync requests wait this long for their job before answering 202 with the job id.
    sync_wait_s: float = 600.0

    # Worker / queue
    worker_concurrency: int = 4  # jobs in flight per worker process (threads pool)
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
    # Wall-time limit of one run: the larger of the minimum and factor x audio length.
    job_time_limit_factor: float = Field(default=3.0, gt=0)
    job_time_limit_min_s: float = Field(default=600.0, ge=0)
    # On SIGTERM a running job gets this long to finish before it is handed back (queued);
    # compose's stop_grace_period must exceed it.
    worker_stop_grace_s: float = Field(default=20.0, ge=0)
    # Postgres unreachable: a worker waits this long before giving a message back to Redis,
    # and retries a final save at this interval (doubling, at most 30 s).
    db_retry_delay_s: float = Field(default=2.0, gt=0)
    # Webhooks
    webhook_timeout_s: float = 15.0
    webhook_retry_schedule_s: list[float] = Field(
        default_factory=lambda: list(WEBHOOK_RETRY_SCHEDULE_S)
    )
    # Exact hosts or CIDRs that webhooks may reach although private (tests: 127.0.0.1).
    webhook_allowlist: list[str] = Field(default_factory=list)
    # Audio URLs are fetched by the worker: the same SSRF guard, with its own allow-list.
    audio_url_allowlist: list[str] = Field(default_factory=list)
    max_url_redirects: int = 3
    # Delays up to this are scheduled as Celery countdowns; longer ones are left to the reaper.
    webhook_countdown_max_s: float = 300.0

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Self:
        if self.key_pepper == DEFAULT_SECRET:
            message = (
                'WHISPERQ_KEY_PEPPER is "changethis"; set it to a long random value '
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
            if self.environment == "production":
                raise ValueError(message)
            warnings.warn(message, stacklevel=1)
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
