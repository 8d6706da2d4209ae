"""Transcript files the CLI writes: SRT, WebVTT, plain text, JSON (from a results line)."""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("srt", "vtt", "txt", "json")


def _clock(seconds: float, *, sep: str) -> str:
    ms = max(round(seconds * 1000), 0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def _cues(segments: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    return [
        (float(s["start"]), float(s["end"]), str(s["text"]).strip())
        for s in segments
        if str(s.get("text", "")).strip()
    ]


def srt(segments: list[dict[str, Any]]) -> str:
    blocks = [
        f"{n}\n{_clock(a, sep=',')} --> {_clock(b, sep=',')}\n{text}\n"
        for n, (a, b, text) in enumerate(_cues(segments), start=1)
    ]
    return "\n".join(blocks)


def vtt(segments: list[dict[str, Any]]) -> str:
    blocks = [
        f"{_clock(a, sep='.')} --> {_clock(b, sep='.')}\n{text.replace('-->', '->')}\n"
        for a, b, text in _cues(segments)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(fmt: str, line: dict[str, Any]) -> str:
    segments = line.get("segments") or []
    if fmt == "srt":
        return srt(segments)
    if fmt == "vtt":
        return vtt(segments)
    if fmt == "txt":
        return (line.get("text") or "").strip() + "\n"
    if fmt == "json":
        keep = ("custom_id", "job_id", "text", "segments", "language", "input_length_ms")
        return json.dumps({k: line.get(k) for k in keep}, indent=2, ensure_ascii=False) + "\n"
    raise ValueError(f"unknown format {fmt!r}")
