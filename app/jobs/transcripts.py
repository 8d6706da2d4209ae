"""A stored transcript as the files people use: plain text, SRT and WebVTT subtitles.

One cue per segment, so cue times are exactly the segment times; a long segment is wrapped
onto several lines at spaces, never inside a word (a word longer than a line keeps its own
line whole).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# The usual subtitle line length (BBC and Netflix guidelines: 37-42 characters).
DEFAULT_LINE_WIDTH = 42


def timestamp(seconds: float, *, decimal_marker: str) -> str:
    """``HH:MM:SS<marker>mmm``; hours keep growing past 99 rather than wrapping."""
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap; ``width <= 0`` keeps the text on one line."""
    words = text.split()
    if width <= 0 or not words:
        return [" ".join(words)] if words else []
    lines: list[str] = []
    current = ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return lines


def _cues(segments: Iterable[Mapping[str, Any]]) -> Iterable[tuple[float, float, str]]:
    for seg in segments:
        text = str(seg["text"]).strip()
        if not text:
            continue  # an empty cue would end the block early in every parser
        start = float(seg["start"])
        yield start, max(start, float(seg["end"])), text


def to_txt(segments: Iterable[Mapping[str, Any]]) -> str:
    """One line per segment, as openai-whisper's own ``.txt`` writer does."""
    return "".join(f"{text}\n" for _, _, text in _cues(segments))


def to_srt(segments: Iterable[Mapping[str, Any]], *, line_width: int = DEFAULT_LINE_WIDTH) -> str:
    blocks = []
    for n, (start, end, text) in enumerate(_cues(segments), start=1):
        times = f"{timestamp(start, decimal_marker=',')} --> {timestamp(end, decimal_marker=',')}"
        blocks.append(f"{n}\n{times}\n" + "\n".join(wrap(text, line_width)) + "\n")
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    # WebVTT cue text is markup: & and < start entities and tags, and "-->" is forbidden.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(segments: Iterable[Mapping[str, Any]], *, line_width: int = DEFAULT_LINE_WIDTH) -> str:
    blocks = ["WEBVTT\n"]
    for start, end, text in _cues(segments):
        times = f"{timestamp(start, decimal_marker='.')} --> {timestamp(end, decimal_marker='.')}"
        lines = wrap(_vtt_escape(text), line_width)
        blocks.append(f"{times}\n" + "\n".join(lines) + "\n")
    return "\n".join(blocks)
