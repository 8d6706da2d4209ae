"""First run mistakes an operator meets, each as one clear line and never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_model_cache_the_worker_cannot_write_is_one_line(tmp_path: Path) -> None:
    # compose once mounted a host folder the containers' user could not write as the model
    # cache: the tiny.en fallback died converting into it with a PermissionError traceback,
    # and the worker restarted forever. A folder under a plain file fails the same way for
    # any user (root included).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {
        **os.environ,
        "WHISPERQ_MODEL": "tiny",
        "WHISPERQ_MODEL_DOWNLOAD_ROOT": str(blocker / "cache"),
        # No download either way, whatever the network: the proxy refuses at once.
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "cannot load the model" in x)
    assert str(blocker) in line
