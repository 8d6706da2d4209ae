"""Pydantic models of every response body, so /openapi.json describes the whole contract.

``extra="forbid"`` on the models: tests validate real responses against them, and a key the
code sends but the schema does not declare fails there instead of drifting silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.infra.models import DeliveryStatus, JobStatus

Timestamp = str  # ISO 8601, UTC, "Z" suffix (see app.jobs.serialize.iso)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors -----------------------------------------------------------------------------


class ErrorDetail(Strict):
    code: str = Field(description="machine-readable; one of ErrorCode (see README)")
    message: str
    field: str | None = Field(default=None, description="the request field at fault")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. request_id when a job was created

    error: ErrorDetail


class OpenAIErrorDetail(Strict):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None
    code: str | None


class OpenAIErrorResponse(Strict):
    error: OpenAIErrorDetail


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    model = OpenAIErrorResponse if openai else ErrorResponse
    return {status: {"model": model} for status in statuses}


# --- transcripts ------------------------------------------------------------------------


class Word(Strict):
    word: str
    start: float
    end: float
    probability: float


class Segment(Strict):
    """The hosted API's segment; ``words`` only when word_timestamps was asked."""

    id: int
    text: str
    start: float
    end: float
    words: list[Word] | None = None


class DetailedSegment(Strict):
    """Everything openai-whisper reports for a segment."""

    id: int
    seek: int = 0
    start: float
    end: float
    text: str
    tokens: list[int] = Field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: list[Word] | None = None


class InferenceStatus(Strict):
    status: JobStatus
    runtime_ms: int = Field(description="model time spent on this job")
    cost: float = Field(description="runtime_ms / 1000 × price per second, USD")
    tokens_generated: int
    tokens_input: int


class JobErrorInfo(Strict):
    code: str
    message: str


class InferenceResponse(Strict):
    text: str
    segments: list[Segment]
    language: str | None
    input_length_ms: int | None
    request_id: str
    inference_status: InferenceStatus
    error: JobErrorInfo | None = None


class Results(Strict):
    text: str
    segments: list[Segment]
    language: str
    input_length_ms: int | None


class TranscriptDocument(Strict):
    """``GET /v1/jobs/{id}/transcript.json``: the full transcript of a succeeded job."""

    request_id: str
    task: Literal["transcribe", "translate"]
    language: str
    duration: float | None
    text: str
    segments: list[DetailedSegment]


# --- jobs -------------------------------------------------------------------------------


class JobSummary(Strict):
    request_id: str
    status: JobStatus
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    cancel_requested_at: Timestamp | None
    deleted_at: Timestamp | None
    input_length_ms: int | None
    inference_status: InferenceStatus
    error: JobErrorInfo | None


class JobView(JobSummary):
    options: dict[str, Any]
    webhook: str | None
    results: Results | None


class JobPage(Strict):
    data: list[JobSummary]
    has_more: bool
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null on the last page"
    )


class DeliveryAttempt(Strict):
    attempt: int
    at: Timestamp | None
    outcome: str
    status_code: int | None
    latency_ms: int
    error: str | None
    next_attempt_at: Timestamp | None


class Delivery(Strict):
    id: str
    url: str
    status: DeliveryStatus
    attempts: list[DeliveryAttempt]
    next_attempt_at: Timestamp | None
    created_at: Timestamp | None


class DeliveryList(Strict):
    request_id: str
    deliveries: list[Delivery]


class Health(Strict):
    ok: bool


# --- OpenAI's audio API -----------------------------------------------------------------


class OpenAIUsage(Strict):
    type: Literal["duration"] = "duration"
    seconds: float


class OpenAITranscription(Strict):
    text: str
    usage: OpenAIUsage | None = None


class OpenAIWord(Strict):
    word: str
    start: float
    end: float


class OpenAISegment(Strict):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class OpenAIVerboseTranscription(Strict):
    task: Literal["transcribe", "translate"]
    language: str = Field(description="the language's English name, as OpenAI gives it")
    duration: float
    text: str
    segments: list[OpenAISegment] | None = None
    words: list[OpenAIWord] | None = None
    usage: OpenAIUsage | None = None


# --- request bodies (the routes read their multipart forms by hand) -----------------------


def form_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """An ``openapi_extra`` describing a multipart form body."""
    schema = {"type": "object", "properties": properties, "required": required}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }


def _num(description: str, default: float | None, **bounds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "number", "description": description, **bounds}
    if default is not None:
        out["default"] = default
    return out


FILE = {"type": "string", "format": "binary"}

INFERENCE_FORM = form_body(
    {
        "audio": {
            "description": "the audio: a file upload, an http(s) URL, or a data: URL",
            "anyOf": [FILE, {"type": "string"}],
        },
        "task": {"type": "string", "enum": ["transcribe", "translate"], "default": "transcribe"},
        "language": {"type": "string", "description": "ISO 639-1 code; detected when absent"},
        "temperature": _num("sampling temperature", 0.0, minimum=0.0, maximum=1.0),
        "patience": _num("beam search patience (beam of 5); absent: greedy", None),
        "suppress_tokens": {"type": "string", "default": "-1"},
        "initial_prompt": {"type": "string", "maxLength": 2000},
        "condition_on_previous_text": {"type": "boolean", "default": True},
        "temperature_increment_on_fallback": _num("fallback step; 'none' disables", 0.2),
        "compression_ratio_threshold": _num("fallback above this gzip ratio", 2.4),
        "logprob_threshold": _num("fallback below this mean log-probability", -1.0),
        "no_speech_threshold": _num("silence above this no-speech probability", 0.6),
        "word_timestamps": {
            "type": "boolean",
            "default": False,
            "description": "add words: [{word, start, end, probability}] to each segment",
        },
        "prepend_punctuations": {"type": "string", "default": "\"'“¿([{-"},
        "append_punctuations": {"type": "string", "default": "\"'.。,，!！?？:：”)]}、"},
        "best_of": {
            "type": "integer",
            "minimum": 1,
            "maximum": 5,
            "description": "samples per window at temperature > 0, the best kept",
        },
        "length_penalty": _num(
            "alpha of the length penalty ranking beams or best_of samples",
            None,
            minimum=0.0,
            maximum=1.0,
        ),
        "clip_timestamps": {
            "type": "string",
            "default": "0",
            "description": "seconds start,end,start,end,... of the clips to transcribe",
        },
        "hallucination_silence_threshold": _num(
            "with word_timestamps: skip silences longer than this around likely hallucinations (s)",
            None,
            maximum=30.0,
        ),
        "carry_initial_prompt": {
            "type": "boolean",
            "default": False,
            "description": "prepend initial_prompt to the prompt of every window",
        },
        "webhook": {
            "type": "string",
            "format": "uri",
            "description": "answer at once (202) and POST the result here when the job ends",
        },
    },
    ["audio"],
)

OPENAI_RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def openai_form(*, translation: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "file": {**FILE, "description": "the audio file"},
        "model": {
            "type": "string",
            "description": "whisper-1 and whisper-tiny (or the served model's name) all "
            "mean the model this server runs",
        },
        "prompt": {"type": "string", "maxLength": 2000},
        "response_format": {
            "type": "string",
            "enum": list(OPENAI_RESPONSE_FORMATS),
            "default": "json",
        },
        "temperature": _num("sampling temperature", 0.0, minimum=0.0, maximum=1.0),
    }
    if not translation:
        props["language"] = {"type": "string", "description": "ISO 639-1 code"}
        props["timestamp_granularities[]"] = {
            "type": "array",
            "items": {"type": "string", "enum": ["segment", "word"]},
            "description": "word needs response_format=verbose_json",
        }
    return form_body(props, ["file", "model"])
