"""The engine: pure numerics behind the worker–engine seam.

Each worker process holds one :class:`Engine`. It owns the model and its lanes (threads that
run it, each on its share of torch's threads); tasks (several in flight per process) call
:meth:`Engine.submit` and wait on the future. A lane decodes the current 30 s window of up
to ``max_batch_rows`` jobs as one batch (encoder and decoder); jobs join and leave between
windows, and lanes run their windows side by side. Per job it keeps ``whisper.transcribe()``'s
long-form semantics: seek from timestamp tokens, temperature fallback (only failing rows
re-decode, reusing their encoder output and cross-attention keys and values), no-speech
skips, prompts from previous text, initial prompt, language detection (batched), beam search
(``patience``: the beam jobs' windows at temperature 0 as a pass of their own, each job's
beams as rows), word timestamps
(whisper's alignment of the windows that want them, after their decode) and
hallucination_silence_threshold, clip_timestamps. The one option the batch cannot reproduce
exactly (best_of > 1 when sampling: whisper's draws, in whisper's order) runs through
openai-whisper's own ``transcribe()`` beside the lanes, one job at a time. No database,
Celery or HTTP here.

The modules, read beside ``whisper/transcribe.py`` and ``whisper/decoding.py``:

- :mod:`~worker.engine.types`: the job, its result, the errors (what the worker sees).
- :mod:`~worker.engine.scheduler`: :class:`Engine`, its queue, lanes and admission.
- :mod:`~worker.engine.windows`: one window of many jobs, ``decode_with_fallback`` batched
  (encoder, language detection, fallback, metering, out-of-memory split).
- :mod:`~worker.engine.longform`: one job's ``transcribe()`` loop, split at its decode call
  (seek, segments, prompts); :mod:`~worker.engine.words` beside it, what the loop does with
  a window's words (``add_word_timestamps``, hallucination_silence_threshold).
- :mod:`~worker.engine.alignment`: ``find_alignment`` (cross-attention, DTW) over many
  windows.
- :mod:`~worker.engine.decoding`: ``decode()`` over a batch of rows: prefill, one step loop
  shared by greedy, sampled and beam search, whisper's logit filters as tensor ops;
  :mod:`~worker.engine.searches` (greedy/sampled and beam updates) and
  :mod:`~worker.engine.rows` (the per-row state of a pass) beside it.
- :mod:`~worker.engine.textdecoder`: Whisper's text decoder over a ragged batch with a
  preallocated key/value cache.
- :mod:`~worker.engine.exact`: the exact path, whisper's own ``transcribe()``.
- :mod:`~worker.engine.lanes`, :mod:`~worker.engine.stats`: threads, the model lock, counters.
- :mod:`~worker.engine.sizing`: the default rows per batch (on CUDA: from free memory).
"""

from worker.engine.decoding import BatchDecoder, RowResult, RowSpec, suppress_list
from worker.engine.lanes import default_lanes
from worker.engine.longform import (
    PROMPT_RESET_ON_TEMPERATURE,
    JobState,
    batched,
    clips_within,
    log_mel,
    split_segments_by_timestamps,
)
from worker.engine.scheduler import (
    CPU_ENCODER_CHUNK,
    DEFAULT_ANNOUNCE_WAIT_MS,
    DEFAULT_CPU_DECODE_THREADS,
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_MAX_WAIT_MS,
    Engine,
)
from worker.engine.sizing import bytes_per_row, rows_for_memory
from worker.engine.stats import STATS_LOG_INTERVAL_S, EngineStats
from worker.engine.types import (
    ENCODER_TOKENS_PER_SECOND,
    SAMPLE_RATE,
    EngineInputError,
    EngineJob,
    EngineResult,
    EngineStopped,
    Segment,
    Word,
)

# The names these had in worker/engine.py, for the code that still uses them.
_batched = batched
_clips_within = clips_within
_JobState = JobState

__all__ = [
    "CPU_ENCODER_CHUNK",
    "DEFAULT_ANNOUNCE_WAIT_MS",
    "DEFAULT_CPU_DECODE_THREADS",
    "DEFAULT_MAX_BATCH_ROWS",
    "DEFAULT_MAX_WAIT_MS",
    "ENCODER_TOKENS_PER_SECOND",
    "PROMPT_RESET_ON_TEMPERATURE",
    "SAMPLE_RATE",
    "STATS_LOG_INTERVAL_S",
    "BatchDecoder",
    "Engine",
    "EngineInputError",
    "EngineJob",
    "EngineResult",
    "EngineStats",
    "EngineStopped",
    "JobState",
    "RowResult",
    "RowSpec",
    "Segment",
    "Word",
    "_JobState",
    "_batched",
    "_clips_within",
    "batched",
    "bytes_per_row",
    "clips_within",
    "default_lanes",
    "log_mel",
    "rows_for_memory",
    "split_segments_by_timestamps",
    "suppress_list",
]
