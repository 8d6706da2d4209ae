"""Transcript files the CLI writes: SRT, WebVTT and plain text through the server's own
writers (``app.transcripts``: pure functions, nothing of the server is imported), JSON as
the results line carries it."""

from __future__ import annotations

import json
from typing import Any

from app.transcripts import to_srt, to_txt, to_vtt

FORMATS = ("srt", "vtt", "txt", "json")


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
