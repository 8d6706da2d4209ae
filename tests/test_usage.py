"""Usage and billing per key (API and CLI), key listing and revocation, retention purge.

Jobs are written as the worker leaves them (finished rows in Postgres) on chosen days, so
the sums and day buckets are known exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.cli import main
from app.infra import blobs
from app.infra.db import session_scope
from app.infra.models import Job, JobStatus
from app.jobs.keys import CreatedKey
from app.settings import get_settings
from tests.support.api import auth, new_key

DAY1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 23, 30, tzinfo=UTC)


def finished_job(
    key: CreatedKey,
    *,
    at: datetime,
    status: JobStatus = JobStatus.succeeded,
    audio_ms: int = 1000,
    runtime_ms: int = 100,
    blob: str | None = None,
) -> str:
    job = Job(
        api_key_id=key.row.id,
        status=status,
        queue="interactive",
        options={},
        audio_blob=blob,
        input_length_ms=audio_ms,
        runtime_ms=runtime_ms,
        cost=runtime_ms / 1000 * get_settings().price_per_second,
        result={"text": "hello", "segments": [], "language": "en"}
        if status == JobStatus.succeeded
        else None,
        created_at=at - timedelta(seconds=5),
        enqueued_at=at - timedelta(seconds=5),
        started_at=at - timedelta(seconds=1),
        finished_at=at,
    )
    with session_scope() as session:
        session.add(job)
        session.flush()
        return job.id


def test_usage_per_day_for_the_callers_key_only(api: TestClient) -> None:
    mine, other = new_key("usage-a"), new_key("usage-b")
    finished_job(mine, at=DAY1, audio_ms=2000, runtime_ms=300)
    finished_job(mine, at=DAY1 + timedelta(hours=2), audio_ms=1500, runtime_ms=200)
    finished_job(mine, at=DAY2, status=JobStatus.failed, audio_ms=9000, runtime_ms=0)
    finished_job(mine, at=DAY2 + timedelta(days=40), runtime_ms=999)  # outside the window
    finished_job(other, at=DAY1, runtime_ms=5000)

    r = api.get(
        "/v1/usage",
        params={"from": "2026-03-01", "to": "2026-03-02", "group_by": "day"},
        headers=auth(mine),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["key_prefix"] == mine.row.prefix
    assert body["start"] == "2026-03-01T00:00:00Z" and body["end"] == "2026-03-03T00:00:00Z"
    day1, day2 = body["rows"]
    assert (day1["day"], day1["jobs"], day1["succeeded"], day1["runtime_ms"]) == (
        "2026-03-01",
        2,
        2,
        500,
    )
    assert day1["audio_seconds"] == 3.5
    assert day1["cost"] == pytest.approx(0.5 * 0.0005)
    assert (day2["day"], day2["jobs"], day2["failed"], day2["audio_seconds"]) == (
        "2026-03-02",
        1,
        1,
        0.0,
    )
    assert body["total"]["jobs"] == 3 and body["total"]["runtime_ms"] == 500

    no_group = api.get(
        "/v1/usage",
        params={"from": "2026-03-01", "to": "2026-03-02", "group_by": "none"},
        headers=auth(mine),
    ).json()
    assert no_group["rows"] == [] and no_group["total"] == body["total"]

    bad = api.get(
        "/v1/usage", params={"from": "2026-03-05", "to": "2026-03-01"}, headers=auth(mine)
    )
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "from"
    bad = api.get("/v1/usage", params={"from": "yesterday"}, headers=auth(mine))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_date"
    assert api.get("/v1/usage").status_code == 401


def test_cli_usage_keys_list_and_revoke(
    api: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = new_key("cli-usage-a"), new_key("cli-usage-b")
    day = datetime(2026, 4, 10, 12, tzinfo=UTC)
    finished_job(a, at=day, audio_ms=4000, runtime_ms=400)
    finished_job(b, at=day, audio_ms=1000, runtime_ms=100)
    capsys.readouterr()
    assert main(["usage", "--from", "2026-04-10", "--to", "2026-04-10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row_a = next(line.split() for line in lines if line.startswith(a.row.prefix))
    row_b = next(line.split() for line in lines if line.startswith(b.row.prefix))
    assert row_a[2:] == ["1", "1", "0", "0", "4.0", "400", "0.000200", "0.000000"]
    assert row_b[2:] == ["1", "1", "0", "0", "1.0", "100", "0.000050", "0.000000"]
    total = next(line.split() for line in lines if line.startswith("total"))
    assert total[1:] == ["2", "2", "0", "0", "5.0", "500", "0.000250", "0.000000"]

    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert a.row.prefix in listed and "cli-usage-a" in listed and a.key not in listed

    assert api.get("/v1/usage", headers=auth(a)).status_code == 200
    assert main(["keys", "revoke", a.row.prefix]) == 0
    assert api.get("/v1/usage", headers=auth(a)).status_code == 401
    assert main(["keys", "list"]) == 0
    revoked_line = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith(a.row.prefix)
    )
    assert "active" not in revoked_line

    # A user mistake is one clear line, never a traceback.
    assert main(["keys", "revoke", "wq_nosuchkey"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no API key with prefix 'wq_nosuchkey'" in err
    assert main(["keys", "rotate-webhook-secret", "wq_nosuchkey"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["usage", "--from", "soon"]) == 2
    assert "--from" in capsys.readouterr().err


def test_purge_dry_run_then_purge(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from app import settings as settings_module

    key = new_key("purge")
    now = datetime.now(UTC)
    blobs.write_blob("purgeold0", b"old audio")
    blobs.write_blob("purgenew0", b"new audio")
    old = finished_job(key, at=now - timedelta(days=40), blob="purgeold0")
    new = finished_job(key, at=now - timedelta(hours=1), blob="purgenew0")
    patched = get_settings().model_copy(update={"retention_days": 30.0, "keep_audio_days": 2.0})
    monkeypatch.setattr(settings_module, "get_settings", lambda: patched)
    monkeypatch.setattr("app.cli._settings", lambda: patched)

    assert main(["purge", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would delete: audio of ")
    store = blobs.get_store()
    assert store.size("purgeold0") is not None  # nothing touched
    with session_scope() as session:
        assert session.get(Job, old).result is not None  # type: ignore[union-attr]

    assert main(["purge"]) == 0
    assert capsys.readouterr().out.startswith("deleted: ")
    with session_scope() as session:
        gone, kept = session.get(Job, old), session.get(Job, new)
        assert gone is not None and kept is not None
        assert gone.result is None and gone.audio_blob is None and gone.runtime_ms == 100
        assert kept.result is not None and kept.audio_blob == "purgenew0"
    assert store.size("purgeold0") is None and store.size("purgenew0") is not None
    assert main(["purge", "--dry-run"]) == 0
    assert "audio of 0 jobs, transcripts of 0 jobs" in capsys.readouterr().out
