"""Word timestamps in one job's long-form loop: what ``whisper.transcribe()`` does with a
window's words once its alignment is known, as pure functions.

Read beside ``whisper/transcribe.py`` and ``whisper/timing.py``. The alignment itself
(``find_alignment``: the model's cross-attention, DTW) runs over many windows at once in
:mod:`worker.engine.alignment`; here, per window: :func:`place_words` is the rest of
``add_word_timestamps`` (long words cut at sentence and segment boundaries, punctuation
merged, each segment's words and start/end), :func:`get_end` is ``whisper.utils.get_end``,
and :func:`skip_hallucinations` is the ``hallucination_silence_threshold`` block of
transcribe()'s loop. Every expression is whisper's, in its order and with its types (numpy
floats where whisper has them): the results are compared with transcribe()'s bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine.types import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, SAMPLE_RATE

if TYPE_CHECKING:
    from whisper.timing import WordTiming

# add_word_timestamps(): a word at a sentence boundary is at most twice the median long.
SENTENCE_END_MARKS = ".。!！?？"
# whisper's cap on the median word duration (seconds) in add_word_timestamps().
MAX_MEDIAN_DURATION = 0.7
# transcribe()'s punctuation: never counted as words by the hallucination checks.
PUNCTUATION = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"

Segment = dict[str, Any]  # one of transcribe()'s segment dicts


@dataclass(frozen=True)
class WindowClock:
    """Where a window sits in the file, in transcribe()'s units and expressions."""

    seek: int  # mel frame of the window's start (transcribe()'s previous_seek)
    segment_size: int  # mel frames of audio in it
    content_frames: int  # mel frames of the whole file

    @property
    def time_offset(self) -> float:
        return float(self.seek * HOP_LENGTH / SAMPLE_RATE)

    @property
    def window_end_time(self) -> float:
        return float((self.seek + N_FRAMES) * HOP_LENGTH / SAMPLE_RATE)

    @property
    def segment_duration(self) -> float:
        return self.segment_size * HOP_LENGTH / SAMPLE_RATE

    @property
    def content_duration(self) -> float:
        return float(self.content_frames * HOP_LENGTH / SAMPLE_RATE)


def text_tokens(segments: list[Segment], eot: int) -> list[list[int]]:
    """Each segment's text tokens (timestamps dropped): what the window aligns, in order."""
    return [[t for t in s["tokens"] if t < eot] for s in segments]


def get_end(segments: list[Segment]) -> float | None:
    """whisper.utils.get_end: the last word's end, else the last segment's."""
    return next(
        (w["end"] for s in reversed(segments) for w in reversed(s["words"])),
        segments[-1]["end"] if segments else None,
    )


def place_words(
    segments: list[Segment],
    alignment: list[WordTiming],
    eot: int,
    *,
    prepend_punctuations: str,
    append_punctuations: str,
    last_speech_timestamp: float,
) -> None:
    """add_word_timestamps() after its find_alignment(): sets each segment's "words" and
    moves its start and end to them; `alignment` is changed in place, as whisper does."""
    from whisper.timing import merge_punctuations

    if len(segments) == 0:
        return
    per_segment = text_tokens(segments, eot)
    word_durations = np.array([t.end - t.start for t in alignment])
    word_durations = word_durations[word_durations.nonzero()]
    median_duration = np.median(word_durations) if len(word_durations) > 0 else 0.0
    median_duration = min(MAX_MEDIAN_DURATION, float(median_duration))
    max_duration = median_duration * 2
    if len(word_durations) > 0:
        _cut_sentence_boundaries(alignment, max_duration)
    merge_punctuations(alignment, prepend_punctuations, append_punctuations)
    time_offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    word_index = 0
    for segment, tokens in zip(segments, per_segment, strict=True):
        saved_tokens = 0
        words = []
        while word_index < len(alignment) and saved_tokens < len(tokens):
            timing = alignment[word_index]
            if timing.word:
                words.append(
                    {
                        "word": timing.word,
                        "start": round(time_offset + timing.start, 2),
                        "end": round(time_offset + timing.end, 2),
                        "probability": timing.probability,
                    }
                )
            saved_tokens += len(timing.tokens)
            word_index += 1
        if len(words) > 0:
            last_speech_timestamp = _fit_segment(
                segment, words, median_duration, max_duration, last_speech_timestamp
            )
        segment["words"] = words


def _cut_sentence_boundaries(alignment: list[WordTiming], max_duration: float) -> None:
    """whisper's hack: words at sentence boundaries no longer than twice the median."""
    for i in range(1, len(alignment)):
        if alignment[i].end - alignment[i].start > max_duration:
            if alignment[i].word in SENTENCE_END_MARKS:
                alignment[i].end = alignment[i].start + max_duration
            elif alignment[i - 1].word in SENTENCE_END_MARKS:
                alignment[i].start = alignment[i].end - max_duration


def _fit_segment(
    segment: Segment,
    words: list[dict[str, Any]],
    median_duration: float,
    max_duration: float,
    last_speech_timestamp: float,
) -> float:
    """One segment's long words cut at its boundaries and its start/end moved to its words
    (whisper's hacks, as written); the new last_speech_timestamp."""
    # the first and second word after a pause are not longer than twice the median
    if words[0]["end"] - last_speech_timestamp > median_duration * 4 and (
        words[0]["end"] - words[0]["start"] > max_duration
        or (len(words) > 1 and words[1]["end"] - words[0]["start"] > max_duration * 2)
    ):
        if len(words) > 1 and words[1]["end"] - words[1]["start"] > max_duration:
            boundary = max(words[1]["end"] / 2, words[1]["end"] - max_duration)
            words[0]["end"] = words[1]["start"] = boundary
        words[0]["start"] = max(0, words[0]["end"] - max_duration)
    # the segment's own start, if the first word is too long
    if segment["start"] < words[0]["end"] and segment["start"] - 0.5 > words[0]["start"]:
        words[0]["start"] = max(0, min(words[0]["end"] - median_duration, segment["start"]))
    else:
        segment["start"] = words[0]["start"]
    # the segment's own end, if the last word is too long
    if segment["end"] > words[-1]["start"] and segment["end"] + 0.5 < words[-1]["end"]:
        words[-1]["end"] = max(words[-1]["start"] + median_duration, segment["end"])
    else:
        segment["end"] = words[-1]["end"]
    end: float = segment["end"]
    return end


def seek_after_words(
    segments: list[Segment], clock: WindowClock, seek: int, single_timestamp_ending: bool
) -> int:
    """transcribe(): unless the window ended on a single timestamp, the next one starts at
    its last word's end (when that is inside the window)."""
    if not single_timestamp_ending:
        last_word_end = get_end(segments)
        if last_word_end is not None and last_word_end > clock.time_offset:
            return round(last_word_end * FRAMES_PER_SECOND)
    return seek


def word_anomaly_score(word: dict[str, Any]) -> float:
    """transcribe()'s anomalous word: very long, very short or improbable."""
    probability = word.get("probability", 0.0)
    duration = word["end"] - word["start"]
    score = 0.0
    if probability < 0.15:
        score += 1.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_segment_anomaly(segment: Segment | None) -> bool:
    if segment is None or not segment["words"]:
        return False
    words = [w for w in segment["words"] if w["word"] not in PUNCTUATION]
    words = words[:8]
    score = sum(word_anomaly_score(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def next_words_segment(segments: list[Segment]) -> Segment | None:
    return next((s for s in segments if s["words"]), None)


def skip_hallucinations(
    segments: list[Segment],
    clock: WindowClock,
    seek: int,
    *,
    threshold: float,
    single_timestamp_ending: bool,
    last_speech_timestamp: float,
) -> tuple[int, bool]:
    """transcribe()'s hallucination_silence_threshold block: the next seek, and whether the
    window is dropped whole (whisper's ``continue``: no segments, no prompt tokens, and
    last_speech_timestamp unchanged). Drops the segments from a hallucination on, in place."""
    previous_seek = clock.seek
    if not single_timestamp_ending:
        last_word_end = get_end(segments)
        if last_word_end is not None and last_word_end > clock.time_offset:
            remaining_duration = clock.window_end_time - last_word_end
            if remaining_duration > threshold:
                seek = round(last_word_end * FRAMES_PER_SECOND)
            else:
                seek = previous_seek + clock.segment_size
    # if the first segment might be a hallucination, skip the silence before it
    first_segment = next_words_segment(segments)
    if first_segment is not None and is_segment_anomaly(first_segment):
        gap = first_segment["start"] - clock.time_offset
        if gap > threshold:
            return previous_seek + round(gap * FRAMES_PER_SECOND), True
    return _cut_at_hallucination(segments, clock, seek, threshold, last_speech_timestamp), False


def _cut_at_hallucination(
    segments: list[Segment],
    clock: WindowClock,
    seek: int,
    threshold: float,
    last_speech_timestamp: float,
) -> int:
    """Skip the silence before a possible hallucination surrounded by silence or more
    hallucinations: the segments from it on are dropped, the next window starts there."""
    hal_last_end = last_speech_timestamp
    for si in range(len(segments)):
        segment = segments[si]
        if not segment["words"]:
            continue
        if is_segment_anomaly(segment):
            next_segment = next_words_segment(segments[si + 1 :])
            if next_segment is not None:
                hal_next_start = next_segment["words"][0]["start"]
            else:
                hal_next_start = clock.time_offset + clock.segment_duration
            silence_before = (
                segment["start"] - hal_last_end > threshold
                or segment["start"] < threshold
                or segment["start"] - clock.time_offset < 2.0
            )
            silence_after = (
                hal_next_start - segment["end"] > threshold
                or is_segment_anomaly(next_segment)
                or clock.window_end_time - segment["end"] < 2.0
            )
            if silence_before and silence_after:
                seek = round(max(clock.time_offset + 1, segment["start"]) * FRAMES_PER_SECOND)
                if clock.content_duration - segment["end"] < threshold:
                    seek = clock.content_frames
                segments[si:] = []
                break
        hal_last_end = segment["end"]
    return seek
