"""A plain (non-editable) install migrates from any folder; compose.yaml is valid.

The package is built from a copy of the working tree and installed into a fresh venv with
``--no-deps``: its dependencies come from the test venv's site-packages, added as a plain
path (so that venv's editable install of whisperq is *not* seen), which keeps this fast.
"""

from __future__ import annotations

import os
import shutil
import site
import sqlite3
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRACKED = ("pyproject.toml", "README.md", "app", "worker", "migrations")


def _copy_tree(dest: Path) -> Path:
    src = dest / "src"
    src.mkdir()
    for name in TRACKED:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding a non-editable whisperq; returns its bin folder."""
    root = tmp_path_factory.mktemp("pkg")
    src = _copy_tree(root)
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    # Dependencies (and pip, setuptools) from the test venv, appended after the fresh
    # venv's own site-packages: the installed whisperq shadows nothing and is shadowed by
    # nothing (a path line in a .pth is not itself scanned for .pth hooks).
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(src)  # nothing of the source tree may be needed any more
    return env_dir / "bin"


def test_installed_package_is_not_the_source_tree(installed: Path) -> None:
    out = subprocess.check_output(
        [str(installed / "python"), "-c", "import app, migrations; print(app.__file__)"],
        cwd="/",
        text=True,
    )
    assert "site-packages" in out and str(REPO) not in out


def test_whisperq_migrate_from_an_unrelated_folder(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    db = tmp_path / "db" / "whisperq.db"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WHISPERQ_") and k not in ("PYTHONPATH",)
    }
    env |= {
        "WHISPERQ_DATABASE_URL": f"sqlite:///{db}",
        "WHISPERQ_KEY_PEPPER": "packaging-test",
        "WHISPERQ_DATA_DIR": str(tmp_path / "data"),
    }
    proc = subprocess.run(
        [str(installed / "whisperq"), "migrate"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        head = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"jobs", "api_keys", "webhook_deliveries", "alembic_version"} <= tables
    assert head is not None
    # And the version is reported without a source tree.
    ver = subprocess.run(
        [str(installed / "whisperq"), "--version"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ver.returncode == 0 and ver.stdout.startswith("whisperq "), ver.stderr


def test_compose_has_gpu_and_cpu_profiles() -> None:
    import yaml

    env = {**os.environ, "WHISPERQ_KEY_PEPPER": "compose-check"}
    out = subprocess.run(
        ["docker-compose", "-f", "compose.yaml", "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert "devices" in services["worker-gpu"]["deploy"]["resources"]["reservations"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker-cpu"]["environment"]["WHISPERQ_DEVICE"] == "cpu"
    for name in ("migrate", "api", "flower", "worker-gpu", "worker-cpu"):
        svc = services[name]
        assert "profiles" not in svc or name.startswith("worker-")
        # whisperq.env reaches every whisperq service, the secret from the shell
        assert svc["environment"]["WHISPERQ_KEY_PEPPER"] == "compose-check"
        assert svc["environment"]["WHISPERQ_FLOWER_USER"] == "admin"
        assert any(str(v).endswith(":/models") or "/models" in str(v) for v in svc["volumes"])


def test_every_setting_reaches_compose() -> None:
    """whisperq.env (compose's env_file) names every setting, so none is silently lost."""
    from app.settings import Settings

    text = (REPO / "whisperq.env").read_text()
    missing = [n for n in Settings.model_fields if f"WHISPERQ_{n.upper()}=" not in text]
    assert not missing, f"add these to whisperq.env: {missing}"
