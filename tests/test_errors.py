"""One error enumeration: every code the API or the worker emits is an ErrorCode member, with
the status it is tied to; sync failures and OpenAI-shaped errors take their status from it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from app.errors import ErrorCode, Fault, ServiceError, is_caller_fault
from app.infra.ssrf import FORBIDDEN_ADDRESS, INVALID_URL, UNRESOLVABLE_HOST

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("app", "worker") for p in (REPO / d).rglob("*.py"))
CODE_CALLS = {"ServiceError": 1, "AudioError": 0, "EngineInputError": 0}  # position of the code
# f-string codes: the prefixes a caller puts before an SSRF verdict (app/jobs/submission.py's
# check_url fields, worker/audio.py's "audio_url_") and the verdicts that get a prefix.
DYNAMIC_PREFIXES = ("audio_url", "webhook")
SSRF_VERDICTS = (FORBIDDEN_ADDRESS, UNRESOLVABLE_HOST)


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _codes_of(node: ast.expr, constants: dict[str, str]) -> list[str] | None:
    """The codes an expression can produce, or None when it is a variable passed along."""
    if isinstance(node, ast.Name) and node.id in constants:
        return [constants[node.id]]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        tail = "".join(
            v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
        )
        # "audio_url_{exc.code}" / "{field}_{exc.code}": a prefix before an SSRF verdict.
        return [f"{p}_{v}" for p in DYNAMIC_PREFIXES for v in SSRF_VERDICTS] + (
            [tail] if tail.strip("_") and not tail.endswith("_") else []
        )
    if isinstance(node, ast.Attribute) and _name(node.value) == "ErrorCode":
        return [node.attr]
    if isinstance(node, ast.IfExp):  # code = a if ... else b
        either = [_codes_of(node.body, constants), _codes_of(node.orelse, constants)]
        return [c for codes in either for c in codes or []]
    return None


def module_constants(tree: ast.Module) -> dict[str, str]:
    """``NAME = "text"`` at module level: codes are often kept in such constants."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    out[target.id] = node.value.value
    return out


def emitted_codes() -> list[tuple[str, str, int | None]]:
    """(where, code, literal status or None) for every code written in app/ and worker/."""
    found: list[tuple[str, str, int | None]] = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        constants = module_constants(tree)
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                pos = CODE_CALLS.get(_name(node.func) or "")
                if pos is not None and len(node.args) > pos:
                    status = None
                    if pos == 1 and isinstance(node.args[0], ast.Constant):
                        status = int(node.args[0].value)
                    for code in _codes_of(node.args[pos], constants) or []:
                        found.append((where, code, status))
                for kw in node.keywords:
                    if kw.arg == "error_code":
                        found += [(where, c, None) for c in _codes_of(kw.value, constants) or []]
            elif (
                isinstance(node, ast.Attribute)
                and _name(node.value) == "ErrorCode"
                # a member (or a misspelt one) named anywhere is emitted; methods are not
                and (node.attr in ErrorCode.__members__ or not hasattr(ErrorCode, node.attr))
            ):
                found.append((where, node.attr, None))
            elif isinstance(node, ast.Assign):
                targets = [t for t in node.targets if _name(t) in ("error_code", "code")]
                if targets:
                    found += [(where, c, None) for c in _codes_of(node.value, constants) or []]
    return found


def test_the_scan_sees_the_code_base() -> None:
    """The scan must find the codes we know are there, or it would pass on nothing."""
    codes = {code for _, code, _ in emitted_codes()}
    assert {
        "unauthorized",
        "invalid_audio",
        "queue_unavailable",
        "internal_error",
        "unsupported_option",
        "audio_url_forbidden_address",
        "webhook_unresolvable_host",
        "batch_canceled",  # kept in a module constant (app/jobs/batches.py)
    } <= codes


def test_ssrf_verdicts_passed_through_unprefixed_are_codes() -> None:
    # app/jobs/submission.py's check_url hands INVALID_URL on as it is (a variable, unseen above).
    assert ErrorCode.lookup(INVALID_URL) is not None


def test_every_emitted_code_is_in_the_enumeration_with_its_status() -> None:
    unknown = [(w, c) for w, c, _ in emitted_codes() if ErrorCode.lookup(c) is None]
    assert unknown == [], f"codes missing from app.api.errors.ErrorCode: {unknown}"
    wrong = [
        (w, c, s, ErrorCode(c).status)
        for w, c, s in emitted_codes()
        if s is not None and ErrorCode(c).status != s
    ]
    assert wrong == [], f"ServiceError status differs from the code's status: {wrong}"


def test_every_code_has_a_status_and_a_fault() -> None:
    for code in ErrorCode:
        assert 400 <= code.status <= 599 and code.fault in (Fault.caller, Fault.server)
        assert code.value == code.name
        # A server fault is never a 4xx, a caller fault never a 5xx.
        assert (code.fault == Fault.server) == (code.status >= 500), code


def test_the_issue_example_an_english_only_model_asked_to_translate_is_the_callers_fault() -> None:
    from app.api.inference import _status_code
    from app.infra.models import Job, JobStatus

    job = Job(status=JobStatus.failed, error_code="unsupported_option")
    assert _status_code(job) == 422
    assert _status_code(Job(status=JobStatus.failed, error_code="internal_error")) == 500
    # A code nobody declared is ours, never blamed on the caller.
    assert _status_code(Job(status=JobStatus.failed, error_code="brand_new_code")) == 500
    assert not is_caller_fault(None)


@pytest.mark.parametrize(
    ("code", "native", "openai", "kind"),
    [
        (ErrorCode.invalid_option, 422, 400, "invalid_request_error"),
        (ErrorCode.audio_too_large, 413, 400, "invalid_request_error"),
        (ErrorCode.invalid_audio, 400, 400, "invalid_request_error"),
        (ErrorCode.unauthorized, 401, 401, "invalid_request_error"),
        (ErrorCode.job_not_found, 404, 404, "invalid_request_error"),
        (ErrorCode.idempotency_key_reused, 409, 409, "invalid_request_error"),
        (ErrorCode.internal_error, 500, 500, "server_error"),
        (ErrorCode.queue_unavailable, 503, 503, "server_error"),
    ],
)
def test_openai_shape_and_status(code: ErrorCode, native: int, openai: int, kind: str) -> None:
    err = ServiceError.of(code, "why", field="f")
    assert err.status == native
    assert err.body() == {"error": {"code": code.value, "message": "why", "field": "f"}}
    assert err.openai_status() == openai
    assert err.openai_body() == {
        "error": {"message": "why", "type": kind, "param": "f", "code": code.value}
    }
