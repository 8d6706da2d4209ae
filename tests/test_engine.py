"""The batched engine on a small random Whisper: every decoding option, jobs mixed in one batch,
compared with openai-whisper's own sequential ``transcribe()`` on the same model (the engine's
``transcribe`` method runs it), plus scheduling: stop checks, priority, metering, OOM split."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from whisper.tokenizer import get_tokenizer

from app.jobs.options import TranscribeOptions, parse_options
from tests.support.random_model import random_model
from worker.engine import (
    Engine,
    EngineInputError,
    EngineJob,
    EngineResult,
    EngineStopped,
    default_lanes,
)

SR = 16_000


# Thresholds set on the options as they are: the API refuses values that force every fallback
# (issue 14), but the engine must still walk the ladder right for any options it is given.
RAW_THRESHOLDS = ("logprob_threshold", "compression_ratio_threshold")


def options_of(fields: dict[str, str | None]) -> TranscribeOptions:
    raw = dict(fields)
    direct = {name: raw.pop(name) for name in RAW_THRESHOLDS if name in raw}
    opts = parse_options(raw)
    for name, text in direct.items():
        value = None if text in (None, "none") else float(text)
        opts = dataclasses.replace(opts, **{name: value})
    return opts


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    # One lane: these tests look at what shares one batch (lanes have their own test). A
    # submit makes the job's log-mel first, so jobs submitted one after another from one
    # thread need a max_wait longer than those log-mels to share a window.
    eng = Engine(random_model(seed=1), max_batch_rows=8, max_wait_ms=1000, lanes=1)
    yield eng
    eng.close(5)


@pytest.fixture
def passes(engine: Engine) -> Iterator[list[int]]:
    """Rows of every decode pass the batched decoder runs (a pass starts with its prefill,
    the only decoder call with more than one token per row)."""
    seen: list[int] = []

    def on_call(_m: Any, args: tuple[Any, ...]) -> None:
        if args[0].shape[1] > 1:
            seen.append(int(args[0].shape[0]))

    hook = engine.decoder.register_forward_pre_hook(on_call)
    yield seen
    hook.remove()


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


def run(engine: Engine, seconds: float = 5.0, **fields: str) -> EngineResult:
    job = EngineJob(audio=noise(seconds), options=options_of(fields))
    return engine.submit(job).result(timeout=300)


def key(result: EngineResult) -> list[tuple[Any, ...]]:
    return [(s.seek, s.start, s.end, s.text, s.tokens, s.temperature) for s in result.segments]


# With thresholds off, whisper decodes each 30 s window exactly once at the first temperature.
NO_FALLBACK = {
    "compression_ratio_threshold": "none",
    "logprob_threshold": "none",
    "no_speech_threshold": "none",
}
# The one option only whisper's own transcribe() runs (the exact path): its draws, its order.
BEST_OF_SAMPLED = {
    "temperature": "0.5",
    "temperature_increment_on_fallback": "none",
    "best_of": "2",
}


def test_result_shape_and_metering(engine: Engine) -> None:
    out = run(engine, 5.0, **NO_FALLBACK)
    assert out.runtime_ms > 0
    assert out.tokens_input == 250  # 5 s at 50 encoder positions per second
    assert out.tokens_generated == sum(len(s["tokens"]) for s in out.raw["segments"])
    assert out.text == out.raw["text"].strip()
    assert [s.id for s in out.segments] == list(range(len(out.segments)))
    assert out.language == out.raw["language"]
    fields = set(out.segments[0].to_json())
    assert fields >= {"id", "seek", "start", "end", "text", "tokens", "temperature"}
    assert fields >= {"avg_logprob", "compression_ratio", "no_speech_prob"}
    assert engine.max_batch_rows == 8
    assert engine.max_in_flight == 8 + 8  # a batch per lane plus one ready behind them
    assert Engine.__init__.__kwdefaults__["lanes"] is None  # the default: default_lanes()


def test_mixed_batch_matches_sequential_transcribe(engine: Engine, passes: list[int]) -> None:
    """Different options, languages and lengths in one batch; each job equals whisper's own
    transcribe() of it alone (greedy, so exactly)."""
    cases: list[tuple[float, int, dict[str, str]]] = [
        (5.0, 0, NO_FALLBACK),
        (5.0, 1, {**NO_FALLBACK, "language": "de", "task": "translate"}),
        (5.0, 2, {**NO_FALLBACK, "language": None}),  # type: ignore[dict-item]
        (65.0, 3, {**NO_FALLBACK, "language": "en", "initial_prompt": "Kaffee und Kuchen"}),
        (
            65.0,
            4,
            {
                **NO_FALLBACK,
                "initial_prompt": "Kaffee und Kuchen",
                "condition_on_previous_text": "false",
            },
        ),
        (8.0, 5, {**NO_FALLBACK, "language": "en", "suppress_tokens": "-1,11,13,50"}),
        (0.0, 6, NO_FALLBACK),  # empty audio: no window at all
    ]
    jobs = [EngineJob(noise(sec, seed), options_of(f)) for sec, seed, f in cases]
    futures = [engine.submit(j) for j in jobs]
    ours = [f.result(timeout=300) for f in futures]
    assert max(passes) == len(cases) - 1  # all but the empty job decoded in one batch
    for job, got in zip(jobs, ours, strict=True):
        ref = engine.transcribe(job)
        assert (got.text, got.language, key(got)) == (ref.text, ref.language, key(ref))
    # the long jobs really ran several windows with prompts from earlier ones
    assert len({s.seek for s in ours[3].segments}) >= 2


def test_fallback_walks_the_ladder_for_failing_rows_only(engine: Engine, passes: list[int]) -> None:
    # A random model's output fails logprob_threshold=0 every time: the whole ladder is
    # tried; the job beside it (thresholds off) is decoded once.
    failing = EngineJob(
        noise(5.0),
        options_of(
            {
                "logprob_threshold": "0",
                "compression_ratio_threshold": "none",
                "no_speech_threshold": "none",
                "temperature_increment_on_fallback": "0.25",
            }
        ),
    )
    fine = EngineJob(noise(5.0, 1), options_of(NO_FALLBACK))
    a, b = engine.submit(failing), engine.submit(fine)
    out, other = a.result(timeout=300), b.result(timeout=300)
    assert passes == [2, 1, 1, 1, 1]  # 0.0 both rows, then 0.25, 0.5, 0.75, 1.0 alone
    assert {s.temperature for s in out.segments} == {1.0}
    assert {s.temperature for s in other.segments} == {0.0}
    passes.clear()
    # Compression ratio alone: a tiny threshold makes every decode "too repetitive".
    run(
        engine,
        compression_ratio_threshold="0.01",
        logprob_threshold="none",
        no_speech_threshold="none",
        temperature_increment_on_fallback="0.5",
    )
    assert passes == [1, 1, 1]


def test_no_speech_threshold_skips_silence(engine: Engine, passes: list[int]) -> None:
    # no_speech_prob > 0 always and avg_logprob < 0 always: every window is judged silent.
    silent = run(
        engine, no_speech_threshold="0", logprob_threshold="0", compression_ratio_threshold="none"
    )
    assert silent.segments == () and silent.text == ""
    assert passes == [1]  # silence is not retried at higher temperatures
    kept = run(
        engine,
        no_speech_threshold="none",
        logprob_threshold="0",
        compression_ratio_threshold="none",
        temperature_increment_on_fallback="none",
    )
    assert kept.segments != ()


def test_beam_search_jobs_share_one_pass_and_equal_whisper(
    engine: Engine, passes: list[int]
) -> None:
    """Beam-search jobs (each with its own patience) decode their windows together, one pass
    beside the greedy rows, and each equals openai-whisper's own beam search of it alone."""
    fields = [
        {"patience": "0.5", **NO_FALLBACK},  # round(2.5) = 2 finished: unfinished beams fill up
        {"patience": "1", **NO_FALLBACK},
        {"patience": "2", **NO_FALLBACK},
        {"patience": "3", "initial_prompt": "hello there", **NO_FALLBACK},
        dict(NO_FALLBACK),  # greedy, in the same window
    ]
    jobs = [EngineJob(noise(5.0, seed), options_of(f)) for seed, f in enumerate(fields)]
    before = engine.stats.beam_jobs
    results = [f.result(timeout=300) for f in [engine.submit(j) for j in jobs]]
    assert sorted(passes) == [1, 4]  # one greedy pass, one beam pass of four jobs
    assert engine.stats.beam_jobs - before == 4
    for job, got in zip(jobs, results, strict=True):
        ref = engine.transcribe(job)
        assert (got.text, key(got)) == (ref.text, key(ref)), job.options


@pytest.mark.parametrize("sample_len", [6, 40])
def test_batched_beam_decoder_is_whispers_decode(sample_len: int) -> None:
    """decode_beam over rows with different prompts and patience equals whisper.decode() with
    its BeamSearchDecoder, row by row: tokens, log-probability, no-speech probability. The
    random model leans toward EOT, so beams finish at different lengths and patience changes
    the answer; with 6 tokens most rows end at the length limit, where the unfinished beams
    fill the candidates."""
    import whisper
    from whisper.decoding import DecodingOptions

    from app.jobs.options import BEAM_SIZE
    from worker.engine.decoding import RowSpec, suppress_list

    model = random_model(seed=3)
    tok = get_tokenizer(True, num_languages=model.num_languages, language="en")
    with torch.no_grad():
        eot = model.decoder.token_embedding.weight[tok.eot]
        model.decoder.ln.bias += 3.0 * eot / eot.norm()
    eng = Engine(model, lanes=1)
    try:
        mel = torch.randn(4, 80, 3000, generator=torch.Generator().manual_seed(7))
        # (audio, prompt, patience): rows 0 and 1 differ only in patience
        cases = [
            (0, [], 1.0),
            (0, [], 0.5),  # round(2.5) = 2 finished, then the best live beams fill up to 5
            (1, tok.encode(" hello there"), 2.0),
            (2, [], 1.4),
            (3, tok.encode(" a b c d e"), 3.0),
        ]
        suppress = suppress_list(tok, "-1")
        rows = []
        for _, prompt, _ in cases:
            initial = [tok.sot_prev, *prompt, *tok.sot_sequence] if prompt else [*tok.sot_sequence]
            rows.append(RowSpec(tuple(initial), initial.index(tok.sot), suppress, 0.0))
        with torch.inference_mode():
            features = model.encoder(mel)[[m for m, _, _ in cases]]
        patience = [p for _, _, p in cases]
        got = eng.decoder.decode_beam(features, rows, sample_len, BEAM_SIZE, patience)
        refs = []
        for i, (m, prompt, p) in enumerate(cases):
            options = DecodingOptions(
                language="en",
                beam_size=BEAM_SIZE,
                patience=p,
                sample_len=sample_len,
                prompt=prompt or None,
                fp16=False,
            )
            with torch.inference_mode():  # one audio per call: whisper's beam search needs it
                ref = whisper.decode(model, mel[m], options)
            refs.append(ref)
            assert got[i].tokens == ref.tokens, (i, p)
            assert got[i].sum_logprob / (len(got[i].tokens) + 1) == pytest.approx(
                ref.avg_logprob, abs=1e-5
            )
            assert got[i].no_speech_prob == pytest.approx(ref.no_speech_prob, abs=1e-5)
            assert got[i].steps % BEAM_SIZE == 0 and 0 < got[i].steps <= sample_len * BEAM_SIZE
        if sample_len == 40:  # the case is sensitive: patience alone changed whisper's answer
            assert refs[0].tokens != refs[1].tokens
            assert len({len(r.tokens) for r in refs}) > 2
    finally:
        eng.close(5)


def test_word_timestamps_are_batched(engine: Engine, passes: list[int]) -> None:
    """A word-timestamp job shares the decode pass of a plain one, its window aligned after
    it (not whisper's own transcribe()); its words are whisper's, bit for bit."""
    words = EngineJob(noise(5.0), options_of({"word_timestamps": "true", **NO_FALLBACK}))
    plain = EngineJob(noise(5.0, 1), options_of(NO_FALLBACK))
    exact_before = engine.stats.exact_jobs
    out, _ = [f.result(timeout=300) for f in [engine.submit(words), engine.submit(plain)]]
    # one pass, both rows; then the word job's later windows alone (seek moves to its last
    # word's end, inside the 5 s, as transcribe()'s does)
    assert passes[0] == 2 and set(passes[1:]) <= {1}
    assert engine.stats.exact_jobs == exact_before
    assert out.segments and all(s.words is not None for s in out.segments)
    assert any(s.words for s in out.segments)
    ref = engine.transcribe(words)
    assert (out.text, key(out)) == (ref.text, key(ref))
    assert [s.get("words") for s in out.raw["segments"]] == [
        s.get("words") for s in ref.raw["segments"]
    ]


def test_suppress_tokens_are_never_emitted(engine: Engine) -> None:
    first = run(engine, language="en", **NO_FALLBACK)
    emitted = [t for s in first.raw["segments"] for t in s["tokens"] if t < 50257]
    assert emitted, "the random model produced no text tokens to suppress"
    banned = sorted(set(emitted))[:5]
    second = run(
        engine, language="en", suppress_tokens=",".join(map(str, [-1, *banned])), **NO_FALLBACK
    )
    again = {t for s in second.raw["segments"] for t in s["tokens"]}
    assert not again & set(banned)


def test_initial_prompt_reaches_the_decoder(engine: Engine) -> None:
    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    prompt_tokens = tokenizer.encode(" Kaffee und Kuchen")
    prefills: list[list[int]] = []

    def on_call(_m: Any, args: tuple[Any, ...]) -> None:
        if args[0].shape[1] > 1:
            prefills.append(args[0][0].tolist())

    hook = engine.decoder.register_forward_pre_hook(on_call)
    try:
        run(engine, 65.0, language="en", initial_prompt="Kaffee und Kuchen", **NO_FALLBACK)
    finally:
        hook.remove()
    sot_prev = tokenizer.sot_prev
    first = prefills[0]
    assert first == [sot_prev, *prompt_tokens, *tokenizer.sot_sequence]
    assert len(prefills[1]) > len(first)  # + the first window's output


def test_stop_check_drops_a_job_at_a_window_boundary(engine: Engine) -> None:
    calls = 0

    def stop_after_first_window() -> str | None:
        nonlocal calls
        calls += 1
        return "canceled" if calls > 1 else None

    opts = options_of(NO_FALLBACK)
    stopped = engine.submit(EngineJob(noise(65.0), opts, stop_check=stop_after_first_window))
    beside = EngineJob(noise(65.0, 1), opts)
    kept = engine.submit(beside)
    with pytest.raises(EngineStopped) as err:
        stopped.result(timeout=300)
    assert err.value.reason == "canceled"
    assert err.value.runtime_ms > 0  # its first window was decoded and charged
    assert calls == 2
    # the job beside it is unaffected
    assert key(kept.result(timeout=300)) == key(engine.transcribe(beside))


def test_interactive_jobs_go_first() -> None:
    eng = Engine(random_model(seed=1), max_batch_rows=1, max_wait_ms=0, lanes=1)
    release = threading.Event()
    done: list[str] = []
    try:
        opts = options_of(NO_FALLBACK)

        def hold() -> None:
            release.wait(60)  # the engine thread waits here while the others queue up

        blocker = eng.submit(EngineJob(noise(1.0), opts, stop_check=lambda: hold()))
        time.sleep(0.2)  # let the engine take the blocker (order, not timing, is asserted)
        futures = {
            name: eng.submit(EngineJob(noise(1.0), opts, priority=prio))
            for name, prio in (("bulk-1", 0), ("bulk-2", 0), ("interactive", 1))
        }
        for name, fut in futures.items():
            fut.add_done_callback(lambda _f, n=name: done.append(n))
        release.set()
        blocker.result(timeout=300)
        for fut in futures.values():
            fut.result(timeout=300)
    finally:
        eng.close(5)
    assert done == ["interactive", "bulk-1", "bulk-2"]


def test_jobs_ready_beyond_a_batch_wait_for_the_next_window() -> None:
    """The worker may hand in a batch and the next one; a pass never exceeds max_batch_rows,
    and the jobs left over make up the next window whole."""
    eng = Engine(random_model(seed=1), max_batch_rows=2, ready_rows=3, max_wait_ms=200, lanes=1)
    assert eng.max_in_flight == 5
    prefills: list[int] = []
    eng.decoder.register_forward_pre_hook(
        lambda _m, args: prefills.append(int(args[0].shape[0])) if args[0].shape[1] > 1 else None
    )
    try:
        opts = options_of(NO_FALLBACK)
        futures = [eng.submit(EngineJob(noise(3.0, seed), opts)) for seed in range(5)]
        for fut in futures:
            fut.result(timeout=300)
    finally:
        eng.close(5)
    assert prefills == [2, 2, 1]
    with pytest.raises(ValueError):
        Engine(random_model(seed=1), ready_rows=-1)


def test_lanes_decode_windows_side_by_side_and_exact_jobs_on_their_own_model() -> None:
    """Two lanes run windows at the same time, each on its share of torch's threads;
    whisper's own transcribe() (best_of when sampling) runs on the exact thread, on a copy of the
    model: the hooks it runs with never touch the model the lanes decode with."""
    eng = Engine(random_model(seed=1), max_batch_rows=1, max_wait_ms=0, lanes=2)
    assert eng.lane_threads == max(1, torch.get_num_threads() // 2)
    assert eng.max_in_flight == 2 * 1 + 1
    assert default_lanes(torch.device("cpu")) == (2 if torch.get_num_threads() >= 2 else 1)
    assert default_lanes(torch.device("cuda")) == 1
    spans: list[tuple[str, float, float]] = []
    step, exact = eng._step_window, eng._run_exact_alone

    def slow_step(states: list[Any]) -> None:
        start = time.monotonic()
        time.sleep(0.4)  # a window long enough for the other lane to start one beside it
        step(states)
        spans.append(("window", start, time.monotonic()))

    def timed_exact(*args: Any) -> None:
        start = time.monotonic()
        exact(*args)
        spans.append(("exact", start, time.monotonic()))

    eng._step_window = slow_step  # type: ignore[method-assign]
    eng._run_exact_alone = timed_exact  # type: ignore[method-assign]
    try:
        opts = options_of(NO_FALLBACK)
        sampled = options_of({**NO_FALLBACK, **BEST_OF_SAMPLED})
        futures = [eng.submit(EngineJob(noise(1.0, seed), opts)) for seed in range(2)]
        time.sleep(0.1)  # both lanes hold a window now
        futures += [eng.submit(EngineJob(noise(1.0, 5), sampled))]
        futures += [eng.submit(EngineJob(noise(1.0, seed), opts)) for seed in (3, 4)]
        for fut in futures:
            fut.result(timeout=300)
    finally:
        eng.close(5)
    windows = [(a, b) for kind, a, b in spans if kind == "window"]
    assert len([kind for kind, _, _ in spans if kind == "exact"]) == 1
    assert len(windows) == 4
    first, second = sorted(windows)[:2]
    assert second[0] < first[1]  # side by side
    exact_model = eng.exact_model()
    assert exact_model is not eng.model
    shared = {id(p) for p in eng.model.parameters()}
    assert not shared & {id(p) for p in exact_model.parameters()}
    with pytest.raises(ValueError):
        Engine(random_model(seed=1), lanes=0)


def test_a_short_job_ends_while_a_long_exact_job_runs() -> None:
    """One lane (a GPU's default): a long job only whisper's transcribe() can run (here
    best_of when sampling) must not hold up the batched jobs behind it. (A long word-timestamp
    job shares the lane's windows instead: tests/test_engine_words.py.)"""
    eng = Engine(random_model(seed=1), max_batch_rows=4, max_wait_ms=0, lanes=1)
    try:
        sampled = options_of({**NO_FALLBACK, **BEST_OF_SAMPLED})
        long = eng.submit(EngineJob(noise(600.0, 1), sampled))
        deadline = time.monotonic() + 60
        while not long.running():  # a lane took it (and handed it to the exact thread)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        short = eng.submit(EngineJob(noise(1.0, 2), options_of(NO_FALLBACK)))
        short.result(timeout=120)
        assert not long.done(), "the long job ended first: nothing was shown"
        long.result(timeout=600)
    finally:
        eng.close(5)


def test_a_free_lane_takes_over_the_next_window_of_another_lanes_job() -> None:
    """Jobs are not tied to a lane: a long file's next window goes back to the shared queue,
    so while the lane that ran its last window is busy, an idle lane runs the next one."""
    eng = Engine(random_model(seed=1), max_batch_rows=1, max_wait_ms=0, lanes=2)
    windows: list[str] = []
    step, requeue = eng._step_window, eng._requeue
    first = threading.Event()

    def recording_step(states: list[Any]) -> None:
        windows.append(threading.current_thread().name)
        step(states)

    def busy_after_first(states: Any) -> None:
        requeue(states)
        if not first.is_set():
            first.set()
            time.sleep(1.5)  # this lane is busy now; the other one is idle

    eng._step_window = recording_step  # type: ignore[method-assign]
    eng._requeue = busy_after_first  # type: ignore[method-assign]
    try:
        job = EngineJob(noise(65.0, 3), options_of(NO_FALLBACK))
        got = eng.submit(job).result(timeout=300)
        assert key(got) == key(eng.transcribe(job))
    finally:
        eng.close(5)
    assert len(windows) >= 2
    assert windows[1] != windows[0], windows


def test_a_window_waits_for_announced_jobs() -> None:
    """A job the worker announced (claimed, audio still loading) joins the window about to
    start instead of missing it; a withdrawn announcement holds nothing up."""
    eng = Engine(
        random_model(seed=1), max_batch_rows=4, max_wait_ms=0, announce_wait_ms=600_000, lanes=1
    )
    prefills: list[int] = []
    eng.decoder.register_forward_pre_hook(
        lambda _m, args: prefills.append(int(args[0].shape[0])) if args[0].shape[1] > 1 else None
    )
    opts = options_of(NO_FALLBACK)
    # Each task is a thread with at most one announcement, as in the worker's threads pool.
    tasks = ThreadPoolExecutor(max_workers=2)
    go = threading.Event()

    def task(seed: int, wait: threading.Event | None) -> Future[EngineResult]:
        with eng.announcing():
            eng.announce()  # a second announce of the same task counts once
            if wait is not None:
                wait.wait(60)  # this task's audio is still loading
            return eng.submit(EngineJob(noise(3.0, seed), opts))  # ends the announcement

    def announced(n: int) -> None:
        deadline = time.monotonic() + 60
        while eng.announced != n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.announced == n

    try:
        second = tasks.submit(task, 1, go)  # announced, its audio "loading"
        announced(1)
        first = tasks.submit(task, 0, None).result(timeout=60)  # submitted: announcement over
        announced(1)
        time.sleep(0.3)  # the engine holds the first job now (order, not timing, is asserted)
        go.set()
        first.result(timeout=300)
        second.result(timeout=60).result(timeout=300)
        assert prefills == [2]  # one window of two rows, not two windows of one
        stuck = threading.Event()

        def failed_load() -> None:
            with eng.announcing():
                stuck.wait(60)  # the claim found nothing, or the audio failed to load

        failing = tasks.submit(failed_load)
        announced(1)
        third = eng.submit(EngineJob(noise(3.0, 2), opts))
        time.sleep(0.3)
        stuck.set()  # its announcement ends with it: the window starts without it
        failing.result(timeout=60)
        third.result(timeout=120)  # far below the 600 s it would otherwise wait
        assert eng.announced == 0
    finally:
        go.set()
        tasks.shutdown()
        eng.close(5)


def test_batch_shares_sum_to_wall_time(engine: Engine) -> None:
    """Each job pays its share of a batch, not the whole batch."""
    jobs = [EngineJob(noise(5.0, seed), options_of(NO_FALLBACK)) for seed in range(6)]
    start = time.perf_counter()
    results = [f.result(timeout=300) for f in [engine.submit(j) for j in jobs]]
    wall_ms = (time.perf_counter() - start) * 1000
    assert all(r.runtime_ms > 0 for r in results)
    # shares partition the engine's time (+1 ms rounding per job)
    assert sum(r.runtime_ms for r in results) <= wall_ms + len(results)


def test_out_of_memory_splits_the_batch(engine: Engine, passes: list[int]) -> None:
    real = engine.decoder.decode
    refused: list[int] = []

    def small_memory(features: torch.Tensor, rows: Any, *args: Any, **kw: Any) -> Any:
        if len(rows) > 2:  # as if a bigger batch did not fit
            refused.append(len(rows))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(features, rows, *args, **kw)

    engine.decoder.decode = small_memory  # type: ignore[method-assign]
    try:
        jobs = [EngineJob(noise(3.0, seed), options_of(NO_FALLBACK)) for seed in range(5)]
        results = [f.result(timeout=300) for f in [engine.submit(j) for j in jobs]]
    finally:
        del engine.decoder.decode
    assert refused == [5, 3]  # 5 -> 2 + 3 -> 2 + 1 + 2
    assert sorted(passes) == [1, 2, 2]
    for job, got in zip(jobs, results, strict=True):
        assert key(got) == key(engine.transcribe(job))


def test_many_threads_share_one_engine(engine: Engine) -> None:
    """Tasks of a threads pool hand jobs in concurrently; each gets its own result."""
    results: dict[int, Any] = {}
    opts = TranscribeOptions(
        compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None
    )

    def task(i: int) -> None:
        results[i] = engine.submit(EngineJob(noise(3.0, seed=i), opts)).result(timeout=300)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    solo = {i: engine.transcribe(EngineJob(noise(3.0, seed=i), opts)) for i in range(4)}
    assert {i: r.text for i, r in results.items()} == {i: r.text for i, r in solo.items()}


def test_errors_reach_the_caller(engine: Engine) -> None:
    bad = EngineJob(audio=noise(1.0), options=options_of({"suppress_tokens": "99999"}))
    with pytest.raises(EngineInputError) as err:
        engine.submit(bad).result(timeout=60)
    assert err.value.code == "invalid_option"
    # The engine thread survives a failed job.
    assert run(engine, 1.0, **NO_FALLBACK).runtime_ms > 0


def test_english_only_model_refuses_translate() -> None:
    from whisper.model import ModelDimensions

    from tests.support.random_model import TINY_RANDOM

    dims = ModelDimensions(**{**TINY_RANDOM.__dict__, "n_vocab": 51864})
    eng = Engine(random_model(dims=dims))
    assert eng.max_batch_rows == 16  # unset, on a CPU: the fixed default
    try:
        for fields in ({"task": "translate"}, {"language": "de"}):
            with pytest.raises(EngineInputError) as err:
                eng.submit(EngineJob(audio=noise(1.0), options=options_of(fields))).result(60)
            assert err.value.code == "unsupported_option"
    finally:
        eng.close(5)


def test_cpu_logits_are_whispers_projection() -> None:
    """On CPU the vocabulary projection runs through oneDNN or torch's matmul, whichever was
    faster at start; either must stay whisper's ``x @ token_embedding.T`` up to rounding."""
    model = random_model(seed=2)
    eng = Engine(model, lanes=1)
    try:
        dec = eng.decoder
        assert eng.projection in ("torch", "onednn")
        assert dec._onednn_weight is not None
        for weight in (dec._onednn_weight, None):
            dec._embed_onednn = weight
            hidden = torch.randn(5, model.dims.n_text_state)
            ref = (hidden @ model.decoder.token_embedding.weight.T).float()
            got = dec.logits(hidden)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
            # a view (a decoder step's last position) is read as whisper reads it
            steps = torch.randn(3, 4, model.dims.n_text_state)
            torch.testing.assert_close(
                dec.logits(steps[:, -1]),
                (steps[:, -1] @ model.decoder.token_embedding.weight.T).float(),
                rtol=1e-5,
                atol=1e-5,
            )
    finally:
        eng.close(5)


def test_the_faster_projection_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    eng = Engine(random_model(seed=2), lanes=1)
    try:
        dec = eng.decoder
        real_onednn, real_dense = torch._C._nn.mkldnn_linear, dec.embed_out

        def slow_onednn(*args: Any) -> torch.Tensor:
            time.sleep(0.02)
            return real_onednn(*args)

        class SlowDense:  # `hidden @ embed_out`, slowed down
            def __rmatmul__(self, hidden: torch.Tensor) -> torch.Tensor:
                time.sleep(0.02)
                return hidden @ real_dense

        monkeypatch.setattr(torch._C._nn, "mkldnn_linear", slow_onednn)
        assert dec.pick_projection() == "torch" and dec._embed_onednn is None
        monkeypatch.setattr(torch._C._nn, "mkldnn_linear", real_onednn)
        monkeypatch.setattr(dec, "embed_out", SlowDense())
        assert dec.pick_projection() == "onednn" and dec._embed_onednn is dec._onednn_weight
    finally:
        eng.close(5)


def test_split_segments_by_timestamps_is_transcribes_split() -> None:
    """The window's segments and seek, as whisper.transcribe() cuts them (pure function)."""
    from worker.engine.longform import Span, split_segments_by_timestamps

    tb = 50364  # <|0.00|>
    text = [400, 401]

    def split(tokens: list[int]) -> tuple[list[Span], int]:
        return split_segments_by_timestamps(tokens, tb, 10.0, 3000, 30.0)

    # two closed segments, then a single timestamp at the end: no speech after it
    spans, advance = split([tb, *text, tb + 50, tb + 50, *text, tb + 100])
    assert [(s.start, s.end) for s in spans] == [(10.0, 11.0), (11.0, 12.0)]
    assert spans[1].tokens == [tb + 50, *text, tb + 100]
    assert advance == 3000
    # ending on a pair: seek moves to the pair, not past the window
    spans, advance = split([tb, *text, tb + 50, tb + 50, *text, tb + 100, tb + 100])
    assert [(s.start, s.end) for s in spans] == [(10.0, 11.0), (11.0, 12.0)]
    assert advance == 100 * 2  # mel frames: two per timestamp position
    # the last segment unfinished: dropped, and seek moves to the end of the one before
    spans, advance = split([tb, *text, tb + 50, tb + 60, *text])
    assert [(s.start, s.end) for s in spans] == [(10.0, 11.0)]
    assert advance == 50 * 2
    # no consecutive timestamps: one segment, as long as its last timestamp says
    spans, advance = split([tb, *text, tb + 75])
    assert [(s.start, s.end, s.tokens) for s in spans] == [(10.0, 11.5, [tb, *text, tb + 75])]
    assert advance == 3000
    # no timestamp at all (or only <|0.00|>): the whole window
    assert [(s.start, s.end) for s in split(text)[0]] == [(10.0, 40.0)]
    assert [(s.start, s.end) for s in split([*text, tb])[0]] == [(10.0, 40.0)]


def test_stats_are_typed_and_still_read_as_a_mapping(engine: Engine) -> None:
    run(engine, 1.0, **NO_FALLBACK)
    stats = engine.stats
    assert stats.windows >= 1 and stats.decode_passes >= 1
    assert stats["windows"] == stats.windows  # the benchmarks' dict reading
    assert set(dict(stats)) == set(stats.snapshot()) >= {"windows", "beam_jobs", "exact_s"}
    with pytest.raises(KeyError):
        stats["_lock"]


def test_rows_for_memory_buckets_free_memory_to_a_power_of_two() -> None:
    """ENGINE_MAX_BATCH_ROWS unset on CUDA: the rows the free device memory fits (made-up
    numbers, no GPU needed)."""
    from whisper.model import ModelDimensions

    from worker.engine.sizing import MAX_AUTO_ROWS, MEMORY_SHARE, bytes_per_row, rows_for_memory

    tiny = ModelDimensions(80, 1500, 384, 6, 4, 51864, 448, 384, 6, 4)
    large = ModelDimensions(128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 32)
    fp16 = torch.float16
    per_row = bytes_per_row(tiny, fp16)
    assert 16 * 2**20 < per_row < 32 * 2**20  # the H200 run measured 16 MiB per tiny.en row
    assert bytes_per_row(tiny, torch.float32) > per_row
    gib = 2**30
    # exactly 100 rows fit: 64, the power of two below
    assert rows_for_memory(int(100 * per_row / MEMORY_SHARE) + 1, tiny, fp16) == 64
    assert rows_for_memory(int(128 * per_row / MEMORY_SHARE) + 1, tiny, fp16) == 128
    assert rows_for_memory(0, tiny, fp16) == 1  # never none
    assert rows_for_memory(10**15, tiny, fp16) == MAX_AUTO_ROWS
    assert rows_for_memory(10**15, tiny, fp16, cap=256) == 256
    # a large model gets fewer rows of the same memory, and more memory never fewer rows
    assert rows_for_memory(75 * gib, large, fp16) < rows_for_memory(75 * gib, tiny, fp16)
    counts = [rows_for_memory(g * gib, large, fp16) for g in range(1, 141)]
    assert counts == sorted(counts) and all(c & (c - 1) == 0 for c in counts)


def test_default_batch_rows_follow_device_memory_only_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.support.random_model import TINY_RANDOM
    from worker.engine.scheduler import DEFAULT_MAX_BATCH_ROWS
    from worker.engine.sizing import default_batch_rows, rows_for_memory

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (40 * 2**30, 80 * 2**30))
    expected = rows_for_memory(40 * 2**30, TINY_RANDOM, torch.float16)
    assert default_batch_rows(cuda, TINY_RANDOM, torch.float16, fixed=16) == expected
    assert default_batch_rows(cpu, TINY_RANDOM, torch.float32, fixed=16) == 16
    assert DEFAULT_MAX_BATCH_ROWS == 16
    assert Engine.__init__.__kwdefaults__["max_batch_rows"] is None  # unset: the rule above


def test_the_log_mel_is_made_on_the_engines_device_only_on_a_gpu() -> None:
    """On a CPU the engine's log-mel is transcribe()'s own (no device argument); the device
    argument reaches whisper's STFT, which runs wherever its input is."""
    from worker.engine.longform import log_mel

    audio = np.random.default_rng(3).standard_normal(16_000 * 2).astype(np.float32) * 0.1
    plain, _ = log_mel(audio, 80)
    on_cpu, _ = log_mel(audio, 80, torch.device("cpu"))
    assert on_cpu.device.type == "cpu"
    assert torch.equal(plain, on_cpu)
    eng = Engine(random_model(seed=1), max_batch_rows=2, lanes=1)
    try:
        assert eng.mel_device is None
    finally:
        eng.close(5)


def test_fallback_rungs_reuse_the_cross_attention_of_their_first_pass(
    engine: Engine, passes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row that falls back decodes again on the cross-attention keys and values its first
    pass made (whisper makes them again for each rung: they are the same), each its own."""
    from worker.engine import windows

    made: list[int] = []
    real = engine.decoder.cross_kv

    def counted(features: torch.Tensor) -> Any:
        made.append(int(features.shape[0]))
        return real(features)

    # every rung fails: each window walks the whole ladder (0.0 to 1.0 by 0.2)
    opts = dataclasses.replace(options_of({}), logprob_threshold=0.0)
    jobs = [EngineJob(noise(3.0, seed), opts) for seed in range(3)]

    def decode_all() -> list[EngineResult]:
        torch.manual_seed(11)  # the sampled rungs draw the same on both runs
        return [f.result(timeout=300) for f in [engine.submit(j) for j in jobs]]

    monkeypatch.setattr(engine.decoder, "cross_kv", counted)
    reused = decode_all()
    assert made == [3] and len(passes) == 6  # one window of 3 rows, 6 rungs
    made.clear()
    monkeypatch.setattr(windows.WindowCross, "of", lambda self, idx: None)
    remade = decode_all()
    assert made == [3] * 6
    assert [key(r) for r in reused] == [key(r) for r in remade]
