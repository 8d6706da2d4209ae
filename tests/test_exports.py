"""Transcript exports: SRT and WebVTT that maintained parsers from PyPI (``srt``,
``webvtt-py``) read back with cue times equal to the segment times; long segments wrapped at
spaces, never inside a word; the HTTP route's refusals. Real speech through the whole stack
is exported in tests/test_openai_compat.py."""

from __future__ import annotations

import io
import random
from datetime import timedelta
from typing import Any

import pytest
import srt
import webvtt
from fastapi.testclient import TestClient

from app.jobs.transcripts import timestamp, to_srt, to_txt, to_vtt, wrap
from tests.support.api import auth, new_key
from tests.support.iface import queued_job


def parse_vtt(text: str) -> list[Any]:
    return list(webvtt.from_buffer(io.StringIO(text)))


def seconds(td: timedelta) -> float:
    return td.total_seconds()


def vtt_seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def random_segments(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    vocab = ["hello", "world", "a", "Mr.", "Smith's", "naïve", "café", "25%", "<tag>", "R&D"]
    vocab += ["incomprehensibilities", "x" * 60, "—", "¿qué?", "日本語"]
    t = rng.uniform(0, 5)
    out = []
    for i in range(rng.randint(1, 30)):
        start = round(t, 3)
        end = round(t + rng.uniform(0.0, 30.0), 3)
        words = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        out.append({"id": i, "start": start, "end": end, "text": " " + " ".join(words)})
        t = end + rng.uniform(0, 2)
    # Past the hour and past 99 hours: subtitle tools must still read the times.
    out.append({"id": len(out), "start": 3723.456, "end": 3725.0, "text": " late"})
    out.append({"id": len(out), "start": 360000.5, "end": 360001.25, "text": " very late"})
    return out


@pytest.mark.parametrize("seed", range(20))
def test_srt_parses_and_cue_times_equal_segment_times(seed: int) -> None:
    segments = random_segments(seed)
    cues = list(srt.parse(to_srt(segments)))
    assert [c.index for c in cues] == list(range(1, len(segments) + 1))
    for cue, seg in zip(cues, segments, strict=True):
        assert seconds(cue.start) == pytest.approx(seg["start"], abs=5e-4)
        assert seconds(cue.end) == pytest.approx(seg["end"], abs=5e-4)
        assert cue.content.split() == seg["text"].split()  # wrapped, no word split or lost


@pytest.mark.parametrize("seed", range(20))
def test_vtt_parses_and_cue_times_equal_segment_times(seed: int) -> None:
    segments = random_segments(seed)
    text = to_vtt(segments)
    assert text.startswith("WEBVTT\n\n")
    cues = parse_vtt(text)
    assert len(cues) == len(segments)
    for cue, seg in zip(cues, segments, strict=True):
        assert vtt_seconds(cue.start) == pytest.approx(seg["start"], abs=5e-4)
        assert vtt_seconds(cue.end) == pytest.approx(seg["end"], abs=5e-4)
        unescaped = cue.text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        assert unescaped.split() == seg["text"].split()


def test_timestamps_are_formatted_as_subtitle_tools_expect() -> None:
    assert timestamp(0, decimal_marker=",") == "00:00:00,000"
    assert timestamp(3723.4567, decimal_marker=",") == "01:02:03,457"
    assert timestamp(59.9996, decimal_marker=".") == "00:01:00.000"  # rounding carries
    assert timestamp(360000.5, decimal_marker=".") == "100:00:00.500"
    srt_text = to_srt([{"start": 1.5, "end": 2.25, "text": " Hi there."}])
    assert srt_text == "1\n00:00:01,500 --> 00:00:02,250\nHi there.\n"
    vtt_text = to_vtt([{"start": 1.5, "end": 2.25, "text": " Hi <b> & there."}])
    assert vtt_text == "WEBVTT\n\n00:00:01.500 --> 00:00:02.250\nHi &lt;b&gt; &amp; there.\n"


def test_long_segments_wrap_at_spaces_never_inside_a_word() -> None:
    text = "the quick brown fox jumps over the lazy dog " * 6 + "antidisestablishmentarianism"
    lines = wrap(text, 42)
    assert len(lines) > 1
    assert " ".join(lines).split() == text.split()  # every word intact, in order
    assert all(len(line) <= 42 for line in lines[:-1])
    assert wrap("a " + "z" * 50 + " b", 10) == ["a", "z" * 50, "b"]  # long word kept whole
    assert wrap(text, 0) == [" ".join(text.split())]
    cue = next(iter(srt.parse(to_srt([{"start": 0, "end": 9, "text": text}]))))
    assert cue.content.split() == text.split() and "\n" in cue.content


def test_empty_segments_make_no_cue_and_txt_is_a_line_per_segment() -> None:
    segments = [
        {"start": 0.0, "end": 1.0, "text": " one"},
        {"start": 1.0, "end": 2.0, "text": "   "},
        {"start": 2.0, "end": 1.5, "text": " two"},  # end before start: clamped
    ]
    assert to_txt(segments) == "one\ntwo\n"
    cues = list(srt.parse(to_srt(segments)))
    assert [c.content for c in cues] == ["one", "two"]
    assert cues[1].start == cues[1].end == timedelta(seconds=2)


@pytest.fixture(scope="module")
def key() -> Any:
    return new_key("exports")


def test_export_of_an_unfinished_job_or_anothers_is_refused(api: TestClient, key: Any) -> None:
    job_id = queued_job(key)
    for fmt in ("txt", "srt", "vtt", "json"):
        got = api.get(f"/v1/jobs/{job_id}/transcript.{fmt}", headers=auth(key))
        assert got.status_code == 409 and got.json()["error"]["code"] == "job_not_finished"
        other = api.get(f"/v1/jobs/{job_id}/transcript.{fmt}", headers=auth(new_key("x")))
        assert other.status_code == 404
    assert api.get(f"/v1/jobs/{job_id}/transcript.doc", headers=auth(key)).status_code == 422
    # Canceled: there will never be a transcript.
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200
    got = api.get(f"/v1/jobs/{job_id}/transcript.srt", headers=auth(key))
    assert got.status_code == 409 and got.json()["error"]["code"] == "job_has_no_transcript"
