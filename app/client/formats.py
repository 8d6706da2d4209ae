"""Transcript files the CLI writes: SRT, WebVTT and plain text through the server's own
writers (``app.jobs.transcripts``: pure functions, nothing of the server is imported), JSON as
the results line carries it."""

from __future__ import annotations

import json
from typing import Any

from app.jobs.transcripts import to_srt, to_txt, to_vtt

FORMATS = ("srt", "vtt", "txt", "json")
# `whisperq transcribe` prints what OpenAI's transcription API answers for the same
# response_format, so scripts written against either read the same thing.
TRANSCRIBE_FORMATS = ("text", "json", "verbose_json", "srt", "vtt")


def render(fmt: str, line: dict[str, Any]) -> str:
    segments = line.get("segments") or []
    if fmt == "srt":
        return to_srt(segments)
    if fmt == "vtt":
        return to_vtt(segments)
    if fmt == "txt":
        return to_txt(segments) or (line.get("text") or "").strip() + "\n"
    if fmt == "json":
        keep = ("custom_id", "job_id", "text", "segments", "language", "input_length_ms")
        return json.dumps({k: line.get(k) for k in keep}, indent=2, ensure_ascii=False) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


def render_transcript(fmt: str, line: dict[str, Any]) -> str:
    """One transcript (a results line, or a job's ``results``) as ``transcribe`` prints it."""
    text = str(line.get("text") or "").strip()
    if fmt == "text":
        return text + "\n"
    if fmt == "json":
        return json.dumps({"text": text}, ensure_ascii=False) + "\n"
    if fmt == "verbose_json":
        ms = line.get("input_length_ms")
        body = {
            "task": line.get("task") or "transcribe",
            "language": line.get("language"),
            "duration": None if ms is None else ms / 1000,
            "text": text,
            "segments": line.get("segments") or [],
        }
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"
    if fmt in ("srt", "vtt"):
        return render(fmt, line)
    raise ValueError(f"unknown format {fmt!r}")
