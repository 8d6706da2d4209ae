"""One job's long-form loop: ``whisper.transcribe()`` split at its decode call.

Read beside ``whisper/transcribe.py``. A lane asks each job for its next 30 s window
(:meth:`JobState.next_window`, :meth:`JobState.row`), decodes the windows of many jobs as one
batch with the temperature fallback (:mod:`worker.engine.windows`, which tests each result
with :func:`needs_fallback`), and hands each job its chosen decode back
(:meth:`JobState.cut`, then :meth:`JobState.accept`): the no-speech skip, the segments
between timestamp pairs (:func:`split_segments_by_timestamps`), word timestamps (the
window's alignment, made for many jobs at once by :mod:`worker.engine.alignment`, placed by
:mod:`worker.engine.words`), seek, and the prompt for the next window, exactly as
``transcribe()`` does them. No torch work here beyond the job's log-mel and its slices.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.jobs.options import TranscribeOptions
from worker.engine.alignment import AlignRow
from worker.engine.decoding import RowResult, RowSpec
from worker.engine.types import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    SAMPLE_RATE,
    Decoded,
    EngineInputError,
    EngineJob,
    EngineResult,
    result_of,
)
from worker.engine.words import (
    WindowClock,
    get_end,
    place_words,
    seek_after_words,
    skip_hallucinations,
    text_tokens,
)

if TYPE_CHECKING:
    from whisper.model import Whisper
    from whisper.timing import WordTiming
    from whisper.tokenizer import Tokenizer

INPUT_STRIDE = 2  # mel frames per output token
TIME_PRECISION = 0.02  # seconds per output token
# transcribe(): a window decoded above this temperature is not a prompt for the next ones
# (whisper's constant; faster-whisper's prompt_reset_on_temperature default).
PROMPT_RESET_ON_TEMPERATURE = 0.5


def batched(opts: TranscribeOptions) -> bool:
    """Whether the batched windows give this job transcribe()'s result; the rest run
    whisper's own transcribe() (the exact path, :mod:`worker.engine.exact`). Word
    timestamps, hallucination_silence_threshold (:meth:`JobState.accept`) and clip_timestamps
    (:meth:`JobState.next_window`) are batched."""
    # Several samples per window at t > 0 draw from whisper's random stream in its own order:
    # the exact path keeps a seeded result equal to transcribe()'s.
    best_of = getattr(opts, "best_of", None)
    return not (best_of is not None and best_of > 1 and any(t > 0 for t in opts.temperatures()))


def check_options(model: Whisper, opts: TranscribeOptions) -> None:
    """Refuse what this model cannot do (:class:`EngineInputError`), before any work."""
    if not model.is_multilingual and (
        opts.task == "translate" or opts.language not in (None, "en")
    ):
        raise EngineInputError(
            "unsupported_option",
            "this server runs an English-only model: task=translate and languages other "
            "than 'en' are not available",
        )
    n_vocab = model.dims.n_vocab
    bad = [t for t in opts.suppress_token_ids() if t >= n_vocab]
    if bad:
        raise EngineInputError(
            "invalid_option",
            f"suppress_tokens: ids {bad} are outside the vocabulary (size {n_vocab})",
        )


def log_mel(
    audio: np.ndarray, n_mels: int, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """The log-mel of the whole file, padded with 30 s of silence, as transcribe() makes it
    (the log-mel floor is set over the whole file, so it cannot be made per window), and the
    seconds it took. On ``device`` when given: whisper's own STFT on a GPU, where a CPU
    spends more time on it than the GPU on the whole batch (bench/RESULTS.md, the H200
    profile: log-mel 27 % of wall); its values differ from the CPU's in the last bits."""
    from whisper.audio import N_SAMPLES, log_mel_spectrogram

    start = time.perf_counter()
    samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    mel = log_mel_spectrogram(samples, n_mels, padding=N_SAMPLES, device=device)
    return mel, time.perf_counter() - start


def seek_clips(clip_seconds: list[float], n_samples: int) -> list[tuple[int, int]]:
    """transcribe()'s ``seek_clips``: (start, end) mel frames of each clip to decode, the
    clips first cut at the end of the audio (:func:`clips_within`); no clips: the file."""
    points = [round(t * FRAMES_PER_SECOND) for t in clips_within(clip_seconds, n_samples)]
    points = points or [0]
    if len(points) % 2 == 1:
        points.append(n_samples // HOP_LENGTH)  # transcribe()'s content_frames
    return list(zip(points[::2], points[1::2], strict=True))


def clips_within(clips: list[float], n_samples: int) -> list[float]:
    """whisper's clip list, cut at the end of the audio. Past the end a clip's window is
    empty (segment_size 0 or below), so transcribe() can decode it again and again without
    moving on; a clip that starts after the end is skipped by whisper anyway. Unchanged for
    clips inside the audio."""
    content_frames = n_samples // HOP_LENGTH  # transcribe()'s mel frames of the audio itself
    end_s = content_frames / FRAMES_PER_SECOND
    kept: list[float] = []
    for i in range(0, len(clips), 2):
        start, end = clips[i], clips[i + 1] if i + 1 < len(clips) else None
        if round(start * FRAMES_PER_SECOND) >= content_frames:
            break  # the clips increase (the API checks): every later one is past the end too
        kept.append(start)
        if end is not None:
            kept.append(end if round(end * FRAMES_PER_SECOND) <= content_frames else end_s)
    if not kept and clips:
        return [end_s, end_s]  # nothing to transcribe; an empty list would mean the whole file
    return kept


def needs_fallback(opts: TranscribeOptions, d: Decoded) -> bool:
    """decode_with_fallback's test of one result: decode again at the next temperature?"""
    needs = False
    if opts.compression_ratio_threshold is not None and (
        d.compression_ratio > opts.compression_ratio_threshold
    ):
        needs = True  # too repetitive
    if opts.logprob_threshold is not None and d.avg_logprob < opts.logprob_threshold:
        needs = True  # average log probability is too low
    if (
        opts.no_speech_threshold is not None
        and d.no_speech_prob > opts.no_speech_threshold
        and opts.logprob_threshold is not None
        and d.avg_logprob < opts.logprob_threshold
    ):
        needs = False  # silence
    return needs


def is_silent(opts: TranscribeOptions, d: Decoded) -> bool:
    """transcribe()'s no-voice-activity check: skip the window without segments."""
    if opts.no_speech_threshold is None:
        return False
    should_skip = d.no_speech_prob > opts.no_speech_threshold
    if opts.logprob_threshold is not None and d.avg_logprob > opts.logprob_threshold:
        should_skip = False  # don't skip if the logprob is high enough
    return should_skip


def single_timestamp_ending(tokens: list[int], timestamp_begin: int) -> bool:
    """transcribe(): the window's tokens end on a lone timestamp (no speech after it)."""
    return [t >= timestamp_begin for t in tokens[-2:]] == [False, True]


@dataclass(frozen=True)
class Span:
    """One segment of a window: its times (seconds) and tokens (timestamps included)."""

    start: float
    end: float
    tokens: list[int]


def split_segments_by_timestamps(
    tokens: list[int],
    timestamp_begin: int,
    time_offset: float,
    segment_size: int,
    segment_duration: float,
) -> tuple[list[Span], int]:
    """transcribe()'s split of one window's tokens into segments, as a pure function
    (faster-whisper's ``_split_segments_by_timestamps``): the segments between consecutive
    timestamp pairs and the mel frames seek moves on by.

    With consecutive timestamps, each pair closes a segment; a single timestamp at the end
    means no speech after it (seek moves past the window), otherwise the unfinished last
    segment is dropped and seek moves to its starting timestamp. Without them the window is
    one segment, as long as its last timestamp says (or the window)."""
    tb = timestamp_begin
    is_timestamp = [t >= tb for t in tokens]
    single_ending = single_timestamp_ending(tokens, tb)
    consecutive = [i + 1 for i in range(len(tokens) - 1) if is_timestamp[i] and is_timestamp[i + 1]]
    if not consecutive:
        duration = segment_duration
        timestamps = [t for t in tokens if t >= tb]
        if timestamps and timestamps[-1] != tb:
            # no consecutive timestamps but it has a timestamp; use the last one
            duration = (timestamps[-1] - tb) * TIME_PRECISION
        return [Span(time_offset, time_offset + duration, list(tokens))], segment_size

    slices = list(consecutive)
    if single_ending:
        slices.append(len(tokens))
    spans = []
    last_slice = 0
    for current_slice in slices:
        sliced = tokens[last_slice:current_slice]
        spans.append(
            Span(
                time_offset + (sliced[0] - tb) * TIME_PRECISION,
                time_offset + (sliced[-1] - tb) * TIME_PRECISION,
                sliced,
            )
        )
        last_slice = current_slice
    if single_ending:
        return spans, segment_size
    return spans, (tokens[last_slice - 1] - tb) * INPUT_STRIDE


@dataclass(frozen=True)
class Window:
    """The window a job decodes next: where it starts and the decoder's initial tokens."""

    seek: int  # mel frame of its start
    segment_size: int  # mel frames of audio in it (the rest is padding)
    initial: tuple[int, ...]  # [sot_prev, *prompt]? + sot_sequence
    sot_index: int  # index of <|startoftranscript|> in initial


@dataclass(frozen=True)
class Outcome:
    """A window's chosen decode cut into transcribe()'s ``current_segments`` (dicts, as
    whisper's: the word steps fill them in), before its words."""

    result: Decoded
    silent: bool  # the no-speech skip: no segments, seek moves past the window
    segments: list[dict[str, Any]]
    seek: int  # where the next window starts, words aside
    single_timestamp_ending: bool


class JobState:
    """One job's long-form loop, whisper.transcribe() split at its decode call."""

    def __init__(
        self,
        job: EngineJob,
        fut: Future[EngineResult],
        seq: int,
        mel: torch.Tensor,
        mel_s: float,
        *,
        multilingual: bool,
    ) -> None:
        self.job, self.fut, self.seq = job, fut, seq
        self.opts = job.options
        self.mel = mel  # made by submit(), on the submitting thread
        self.content_frames = mel.shape[-1] - N_FRAMES
        self.runtime_s = mel_s  # the job's own host work, charged to it alone
        self.language: str | None = self.opts.language
        if self.language is None and not multilingual:
            self.language = "en"
        self.clips = seek_clips(self.opts.clip_seconds(), len(job.audio))
        self.clip_idx = 0
        self.seek = self.clips[0][0]
        self._into_clip()
        self.all_tokens: list[int] = []
        self.all_segments: list[dict[str, Any]] = []
        self.prompt_reset_since = 0
        self.last_speech_timestamp = 0.0  # transcribe()'s, for the word timestamps
        self.initial_prompt_tokens: list[int] = []
        self.temps = self.opts.temperatures()
        self.tokenizer: Tokenizer | None = None
        self.window: Window | None = None

    @property
    def done(self) -> bool:
        return self.tokenizer is not None and self.clip_idx >= len(self.clips)

    def _into_clip(self) -> None:
        """The head of transcribe()'s loop: seek within the current clip, else on to the
        next one (:attr:`clip_idx` past the last: the job is done)."""
        while self.clip_idx < len(self.clips):
            start, end = self.clips[self.clip_idx]
            self.seek = max(self.seek, start)
            if self.seek < end:
                return
            self.clip_idx += 1
            if self.clip_idx < len(self.clips):
                self.seek = self.clips[self.clip_idx][0]

    @property
    def tok(self) -> Tokenizer:
        """The job's tokenizer, once its language is known."""
        assert self.tokenizer is not None
        return self.tokenizer

    def set_language(self, model: Whisper, language: str) -> None:
        from whisper.tokenizer import get_tokenizer

        self.language = language
        self.tokenizer = get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=language,
            task=self.opts.task,
        )
        if self.opts.initial_prompt is not None:
            self.initial_prompt_tokens = self.tokenizer.encode(
                " " + self.opts.initial_prompt.strip()
            )
            self.all_tokens.extend(self.initial_prompt_tokens)

    def detection_mel(self) -> torch.Tensor:
        from whisper.audio import pad_or_trim

        mel: torch.Tensor = pad_or_trim(self.mel, N_FRAMES)
        return mel

    def next_window(self, n_text_ctx: int) -> tuple[torch.Tensor, list[int]]:
        """The next window's mel (padded to 30 s) and initial tokens; sets :attr:`window`."""
        from whisper.audio import pad_or_trim

        clip_end = self.clips[self.clip_idx][1]
        segment_size = min(N_FRAMES, self.content_frames - self.seek, clip_end - self.seek)
        mel_segment = pad_or_trim(self.mel[:, self.seek : self.seek + segment_size], N_FRAMES)
        if self.opts.carry_initial_prompt:
            # transcribe()'s own slicing, kept as written: a prompt that fills half the
            # context leaves a bound <= 0, which slices from the start, then the cut below
            # keeps the last tokens
            initial_tokens = self.initial_prompt_tokens
            bound = n_text_ctx // 2 - 1 - len(initial_tokens)
            ignored = max(len(initial_tokens), self.prompt_reset_since)
            prompt = initial_tokens + self.all_tokens[ignored:][-bound:]
        else:
            prompt = self.all_tokens[self.prompt_reset_since :]
        sot = list(self.tok.sot_sequence)
        last = prompt[-(n_text_ctx // 2 - 1) :]
        initial = [self.tok.sot_prev, *last, *sot] if prompt else sot
        self.window = Window(self.seek, segment_size, tuple(initial), initial.index(self.tok.sot))
        return mel_segment, initial

    def row(self, temperature: float, suppress: tuple[int, ...]) -> RowSpec:
        """The current window as a row of a decode pass at `temperature`."""
        assert self.window is not None
        return RowSpec(
            initial_tokens=self.window.initial,
            sot_index=self.window.sot_index,
            suppress=suppress,
            temperature=temperature,
        )

    def to_decoded(self, r: RowResult, temperature: float) -> Decoded:
        from whisper.utils import compression_ratio

        text = self.tok.decode(r.tokens).strip()
        return Decoded(
            tokens=r.tokens,
            text=text,
            avg_logprob=r.sum_logprob / (len(r.tokens) + 1),
            no_speech_prob=r.no_speech_prob,
            temperature=temperature,
            compression_ratio=compression_ratio(text),
        )

    def needs_fallback(self, d: Decoded) -> bool:
        return needs_fallback(self.opts, d)

    def cut(self, result: Decoded) -> Outcome:
        """transcribe()'s loop body after decode_with_fallback, up to its word timestamps:
        the no-speech skip, then the segments between timestamp pairs. Changes nothing."""
        window = self.window
        assert window is not None
        if is_silent(self.opts, result):
            return Outcome(result, True, [], window.seek + window.segment_size, False)
        tokenizer = self.tok
        spans, advance = split_segments_by_timestamps(
            result.tokens,
            tokenizer.timestamp_begin,
            time_offset=float(window.seek * HOP_LENGTH / SAMPLE_RATE),
            segment_size=window.segment_size,
            segment_duration=window.segment_size * HOP_LENGTH / SAMPLE_RATE,
        )
        segments = [
            {
                "seek": window.seek,
                "start": span.start,
                "end": span.end,
                "text": tokenizer.decode([t for t in span.tokens if t < tokenizer.eot]),
                "tokens": span.tokens,
                "temperature": result.temperature,
                "avg_logprob": result.avg_logprob,
                "compression_ratio": result.compression_ratio,
                "no_speech_prob": result.no_speech_prob,
            }
            for span in spans
        ]
        ending = single_timestamp_ending(result.tokens, tokenizer.timestamp_begin)
        return Outcome(result, False, segments, window.seek + advance, ending)

    def align_row(self, outcome: Outcome) -> AlignRow | None:
        """What the window's word alignment needs (None: this job has no words to place)."""
        if not self.opts.word_timestamps or outcome.silent:
            return None
        assert self.window is not None
        tokens = [t for seg in text_tokens(outcome.segments, self.tok.eot) for t in seg]
        return AlignRow(self.tok, tokens, self.window.segment_size)

    def accept(self, outcome: Outcome, alignment: list[WordTiming] | None = None) -> None:
        """The rest of transcribe()'s loop body: word timestamps (given the window's
        alignment, when the job has them), seek, the segments kept, the next prompt; then
        the loop's head (the clip the next window is in)."""
        self._accept(outcome, alignment)
        self._into_clip()

    def _accept(self, outcome: Outcome, alignment: list[WordTiming] | None) -> None:
        if outcome.silent:
            self.seek = outcome.seek  # fast-forward to the next segment boundary
            return
        current = outcome.segments
        seek = outcome.seek
        if self.opts.word_timestamps:
            assert alignment is not None
            seek, dropped = self._place_words(outcome, alignment)
            if dropped:  # a hallucination after silence: transcribe()'s `continue`
                self.seek = seek
                return
        self.seek = seek
        for segment in current:  # an instantaneous segment, or one without text, is cleared
            if segment["start"] == segment["end"] or segment["text"].strip() == "":
                segment["text"] = ""
                segment["tokens"] = []
                if self.opts.word_timestamps:
                    segment["words"] = []
        self.all_segments.extend(
            {"id": i, **segment} for i, segment in enumerate(current, start=len(self.all_segments))
        )
        self.all_tokens.extend(t for segment in current for t in segment["tokens"])
        if (
            not self.opts.condition_on_previous_text
            or outcome.result.temperature > PROMPT_RESET_ON_TEMPERATURE
        ):
            # do not feed the prompt tokens if a high temperature was used
            self.prompt_reset_since = len(self.all_tokens)

    def _place_words(self, outcome: Outcome, alignment: list[WordTiming]) -> tuple[int, bool]:
        """transcribe()'s `if word_timestamps:` block: the segments' words, the next seek,
        and whether hallucination_silence_threshold drops the whole window."""
        window = self.window
        assert window is not None
        clock = WindowClock(window.seek, window.segment_size, self.content_frames)
        opts, segments = self.opts, outcome.segments
        place_words(
            segments,
            alignment,
            self.tok.eot,
            prepend_punctuations=opts.prepend_punctuations,
            append_punctuations=opts.append_punctuations,
            last_speech_timestamp=self.last_speech_timestamp,
        )
        seek = seek_after_words(segments, clock, outcome.seek, outcome.single_timestamp_ending)
        if opts.hallucination_silence_threshold is not None:
            seek, dropped = skip_hallucinations(
                segments,
                clock,
                seek,
                threshold=opts.hallucination_silence_threshold,
                single_timestamp_ending=outcome.single_timestamp_ending,
                last_speech_timestamp=self.last_speech_timestamp,
            )
            if dropped:
                return seek, True
        last_word_end = get_end(segments)
        if last_word_end is not None:
            self.last_speech_timestamp = last_word_end
        return seek, False

    def result(self) -> EngineResult:
        assert self.language is not None
        text = self.tok.decode(self.all_tokens[len(self.initial_prompt_tokens) :])
        raw = {"text": text, "segments": self.all_segments, "language": self.language}
        return result_of(raw, len(self.job.audio), self.runtime_s)

    def succeed(self, result: EngineResult) -> None:
        if not self.fut.done():
            self.fut.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)
