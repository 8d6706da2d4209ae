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
from app.db import session_scope
from app.keys import authenticate
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


def test_worker_refuses_to_start_without_a_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**__import__("os").environ, "WHISPERQ_MODEL": str(tmp_path / "nope.pt")},
    )
    assert proc.returncode == 2
    assert "cannot load the model" in proc.stderr and "import-ct2" in proc.stderr


def test_api_never_imports_torch_or_whisper() -> None:
    code = (
        "import sys, app.api.main, app.cli; "
        "bad = [m for m in ('torch', 'whisper', 'numpy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
