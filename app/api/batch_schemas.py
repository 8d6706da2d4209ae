"""The batch routes' request and response bodies (app/api/batches.py), as the OpenAPI schema
shows them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.batch_inputs import ManifestLine, OptionValue

JSONL = "application/x-ndjson"


class BatchCounts(BaseModel):
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int
    total: int


class BatchOut(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    status: Literal["open", "in_progress", "canceling", "completed", "canceled"]
    created_at: str | None
    sealed_at: str | None
    canceled_at: str | None
    finished_at: str | None
    webhook: str | None
    options: dict[str, Any]
    counts: BatchCounts
    progress: float = Field(description="finished jobs / all jobs, 0..1")
    audio_seconds_done: float = Field(description="audio of succeeded and failed jobs")
    audio_seconds_total: float = Field(description="known audio of all jobs not canceled")
    inputs_without_duration: int = Field(
        description="unfinished inputs whose audio length is not known yet (URLs not fetched)"
    )
    cost: float
    runtime_ms: int
    rate_audio_seconds_per_second: float | None
    rate_jobs_per_second: float | None
    eta_seconds: float | None = Field(description="remaining work / rate since first start")


class AcceptedInput(BaseModel):
    job_id: str
    custom_id: str | None
    idempotency_key: str | None
    status: str
    duplicate: bool


class BatchAccepted(BaseModel):
    batch: BatchOut
    inputs: list[AcceptedInput]
    created: int
    duplicates: int


class BatchList(BaseModel):
    data: list[BatchOut]
    next_cursor: str | None


class BatchCanceled(BaseModel):
    batch: BatchOut
    canceled_jobs: int
    cancel_requested: int


class ResultError(BaseModel):
    code: str
    message: str


class ResultLine(BaseModel):
    """One line of ``GET /v1/batches/{id}/results`` (JSONL)."""

    custom_id: str | None
    job_id: str
    source_name: str | None
    status: str
    text: str | None
    segments: list[dict[str, Any]] | None
    language: str | None
    input_length_ms: int | None
    runtime_ms: int
    cost: float
    error: ResultError | None


class InputLine(BaseModel):
    """One line of ``GET /v1/batches/{id}/inputs`` (JSONL): what the batch has accepted."""

    job_id: str
    custom_id: str | None
    source_name: str | None
    idempotency_key: str | None
    content_sha256: str | None
    status: str


class BatchCreateJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")

    options: dict[str, OptionValue] = Field(default_factory=dict)
    webhook: str | None = None
    open: bool = False
    urls: list[str] = Field(default_factory=list)
    inputs: list[ManifestLine] = Field(default_factory=list)


class BatchAddJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(default_factory=list)
    inputs: list[ManifestLine] = Field(default_factory=list)


def jsonl_doc(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {JSONL: {"schema": model.model_json_schema()}}}}
