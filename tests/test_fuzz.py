"""Issue 14: property-based fuzzing. No input may produce a 5xx.

* schemathesis over the app's whole OpenAPI document (every route, every method it
  declares), with a bounded example count per operation;
* a hand-written multipart fuzzer (hypothesis) over the submission form, whose fields come
  from strings users really send: numbers at and past every bound, special floats, special
  tokens, URLs of every kind, bytes that are not audio.

Every 4xx must carry the error shape ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from app.api.main import app
from app.jobs.keys import CreatedKey
from tests.support.api import INFER, auth, new_key, settings_override

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 12
FORM_EXAMPLES = 80
# A fuzzed submission must not wait for a worker (none runs here) or hit the rate limit.
FUZZ_SETTINGS: dict[str, Any] = {
    "sync_wait_s": 0.0,
    "submit_rate_per_minute": 0,
    "max_active_jobs_per_key": 0,
    "audio_fetch_timeout_s": 1.0,
}

schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@functools.cache
def fuzz_key() -> CreatedKey:
    return new_key("fuzz")


def assert_clean(status: int, body: bytes, content_type: str) -> None:
    assert status < 500, (status, body[:500])
    if status >= 400 and content_type.startswith("application/json"):
        import json

        error = json.loads(body)["error"]
        assert error["code"] and isinstance(error["message"], str)


@schema.parametrize()
@hsettings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_openapi_no_5xx(case: schemathesis.Case) -> None:
    case.headers = {**(case.headers or {}), **auth(fuzz_key())}
    with settings_override(**FUZZ_SETTINGS):
        response = case.call()
    content_type = response.headers.get("content-type") or [""]
    assert_clean(response.status_code, response.content, content_type[0])


NUMBERS = st.sampled_from(
    [
        "0",
        "-0",
        "1",
        "-1",
        "0.2",
        "1e-9",
        "5e-324",
        "1e-300",
        "1e308",
        "-1e308",
        "1e309",
        "nan",
        "inf",
        "-inf",
        "NaN",
        "0x10",
        "1_000",
        " 0.5 ",
        "",
        "none",
        "null",
        "true",
        "٣",  # a non-ASCII digit
        "9" * 5000,
    ]
) | st.floats(allow_nan=True, allow_infinity=True).map(repr)
TEXT = st.text(max_size=300) | st.sampled_from(
    ["<|endoftext|>", "<|en|><|translate|>", "<|0.00|>", "\x00", "\ud7ff", "a" * 3000]
)
URLS = st.sampled_from(
    [
        "http://127.0.0.1:1/x.wav",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://0x7f.1/",
        "http://2130706433/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_",
        "http:\\\\169.254.169.254\\",
        "http://user:pw@127.0.0.1/",
        "data:audio/wav;base64,@@@",
        "data:,",
        "data:audio/wav;base64,UklGRiQAAABXQVZF",
        "http://xn--/",
        "http://[::1",
        "",
    ]
)
OPTION_FIELDS = {
    "task": st.sampled_from(["transcribe", "translate", "TRANSLATE", "summarize", ""]) | TEXT,
    "language": st.sampled_from(["en", "de", "EN", "xx", "yue", ""]) | TEXT,
    "temperature": NUMBERS,
    "patience": NUMBERS,
    "suppress_tokens": st.sampled_from(["-1", "-1,50", "1;2", "51865", "-2", ",,", ""]) | TEXT,
    "initial_prompt": TEXT,
    "condition_on_previous_text": st.sampled_from(["true", "false", "maybe", ""]),
    "temperature_increment_on_fallback": NUMBERS,
    "compression_ratio_threshold": NUMBERS,
    "logprob_threshold": NUMBERS,
    "no_speech_threshold": NUMBERS,
    "webhook": URLS | TEXT,
}
AUDIO_BYTES = st.binary(max_size=4096) | st.sampled_from(
    [b"", b"RIFF\x00\x00\x00\x00WAVE", b"fLaC\x00\x00\x00\x22", b"\x89PNG\r\n\x1a\n", b"PK\x03\x04"]
)


@st.composite
def forms(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, Any] | None]:
    chosen = draw(st.sets(st.sampled_from(sorted(OPTION_FIELDS)), max_size=6))
    data = {name: draw(OPTION_FIELDS[name]) for name in sorted(chosen)}
    files = None
    kind = draw(st.sampled_from(["file", "url", "none", "file-as-field"]))
    if kind == "file":
        name = draw(st.sampled_from(["a.wav", "../../etc/passwd", "", "x" * 300, "a\x00b"]))
        files = {"audio": (name, draw(AUDIO_BYTES))}
    elif kind == "url":
        data["audio"] = draw(URLS)
    elif kind == "file-as-field" and chosen:
        files = {sorted(chosen)[0]: ("f", b"not a field")}
    return data, files


# main's CompletionListener (app/infra/notify.py) leaves its Redis stream to the GC when a sync
# wait of 0 s returns at once: a ResourceWarning, not a 5xx; reported to the lead.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@given(form=forms())
@hsettings(
    max_examples=FORM_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_submission_form_no_5xx(
    api: TestClient, form: tuple[dict[str, str], dict[str, Any] | None]
) -> None:
    data, files = form
    safe = {
        k: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for k, v in data.items()
    }
    with settings_override(**FUZZ_SETTINGS):  # one client for the module: the app's lifespan
        r = api.post(INFER, headers=auth(fuzz_key()), data=safe, files=files)
    assert_clean(r.status_code, r.content, r.headers.get("content-type", ""))
