"""A plain (non-editable) install migrates from any folder; the compose files are valid and safe.

The package is built from a copy of the working tree and installed into a fresh venv with
``--no-deps``: its dependencies come from the test venv's site-packages, added as a plain
path (so that venv's editable install of whisperq is *not* seen), which keeps this fast.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import sqlite3
import subprocess
import venv
from pathlib import Path
from typing import Any

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


# --- compose: one control host, GPU hosts that run only workers (deployment issue) ---------

# Sentinels: a secret that reaches a service came from the environment, never from a file.
CONTROL_SECRETS = {
    "WHISPERQ_KEY_PEPPER": "sentinel-pepper-0123456789",
    "WHISPERQ_FLOWER_PASSWORD": "sentinel-flower-0123456789",
    "POSTGRES_PASSWORD": "sentinel-postgres-0123456789",
    "REDIS_PASSWORD": "sentinel-redis-0123456789",
    "WHISPERQ_S3_ACCESS_KEY_ID": "sentinel-s3-id",
    "WHISPERQ_S3_SECRET_ACCESS_KEY": "sentinel-s3-secret-0123456789",
}
CONTROL_HOST = "10.20.30.40"
GPU_HOST_VARS = {
    **{k: v for k, v in CONTROL_SECRETS.items() if k != "WHISPERQ_FLOWER_PASSWORD"},
    "WHISPERQ_CONTROL_HOST": CONTROL_HOST,
}
# name: (compose files, the variables it needs)
STACKS = {
    "single-host": (["compose.yaml"], CONTROL_SECRETS),
    "control-host": (["compose.yaml", "compose.control.yaml"], CONTROL_SECRETS),
    "gpu-host": (["compose.gpu-host.yaml"], GPU_HOST_VARS),
}
WHISPERQ_SERVICES = ("s3-bucket", "migrate", "api", "flower", "worker-gpu", "worker-cpu")
DATA_SERVICES = ("postgres", "redis", "seaweedfs")
LOOPBACK = "127.0.0.1"
# Services allowed to publish on every interface because they ask for a login: none. The
# API's /metrics (until WHISPERQ_METRICS_TOKEN) and Flower stay on loopback by default.
WILDCARD_OK: frozenset[str] = frozenset()


def _compose(
    files: list[str], variables: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with exactly ``variables`` (no .env, no inherited secrets)."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    inherited = set(CONTROL_SECRETS) | set(GPU_HOST_VARS)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in inherited and not k.startswith(("WHISPERQ_", "COMPOSE_"))
    }
    argv = ["docker-compose", "--env-file", str(empty)]
    for name in files:
        argv += ["-f", name]
    return subprocess.run(
        [*argv, "config"],
        cwd=REPO,
        env=env | variables,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _render(stack: str, tmp_path: Path, **extra: str) -> dict[str, Any]:
    import yaml

    files, variables = STACKS[stack]
    out = _compose(files, {**variables, **extra}, tmp_path)
    assert out.returncode == 0, out.stderr
    services: dict[str, Any] = yaml.safe_load(out.stdout)["services"]
    return services


def _published(port: Any) -> tuple[str, str]:
    """(host address, host port) of one rendered `ports` entry; "" means every interface."""
    if isinstance(port, dict):
        return str(port.get("host_ip") or ""), str(port.get("published") or "")
    spec = str(port).split("/")[0]
    parts = spec.rsplit(":", 2)
    if len(parts) == 3:
        return parts[0].strip("[]"), parts[1]
    return "", parts[0] if len(parts) == 2 else ""


def _bound(services: dict[str, Any]) -> dict[str, set[str]]:
    return {
        name: {_published(p)[0] for p in svc.get("ports") or []}
        for name, svc in services.items()
        if svc.get("ports")
    }


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_compose_renders_each_stack(stack: str, tmp_path: Path) -> None:
    services = _render(stack, tmp_path)
    if stack == "gpu-host":
        names = {"worker-gpu0", "worker-gpu1", "worker-gpu2", "worker-gpu3", "worker-cpu"}
        assert set(services) == names
    else:
        assert set(services) == set(WHISPERQ_SERVICES) | set(DATA_SERVICES)
        assert services["worker-gpu"]["profiles"] == ["gpu"]
        assert services["worker-cpu"]["profiles"] == ["cpu"]
        assert services["worker-cpu"]["environment"]["WHISPERQ_DEVICE"] == "cpu"
        for name in WHISPERQ_SERVICES:
            assert "profiles" not in services[name] or name.startswith("worker-")
    for name, svc in services.items():
        if name in DATA_SERVICES:
            continue
        env = svc["environment"]
        # whisperq.env reaches every whisperq service, the secrets from the environment
        assert env["WHISPERQ_KEY_PEPPER"] == CONTROL_SECRETS["WHISPERQ_KEY_PEPPER"], name
        assert env["WHISPERQ_FLOWER_USER"] == "admin", name
        assert env["WHISPERQ_BLOB_BACKEND"] == "s3", name  # every host shares the bucket
        assert env["WHISPERQ_S3_BUCKET"] == "whisperq", name
        if name != "s3-bucket":
            assert any("/models" in str(v) for v in svc["volumes"]), name


REQUIRED = [(stack, var) for stack, (_, variables) in STACKS.items() for var in variables]


@pytest.mark.parametrize(("stack", "missing"), REQUIRED, ids=[f"{s}-{v}" for s, v in REQUIRED])
def test_compose_stops_with_the_name_of_a_missing_secret(
    stack: str, missing: str, tmp_path: Path
) -> None:
    files, variables = STACKS[stack]
    out = _compose(files, {k: v for k, v in variables.items() if k != missing}, tmp_path)
    assert out.returncode != 0, f"{stack} rendered without {missing}"
    assert f"set {missing}" in out.stderr, out.stderr


def test_secrets_reach_the_control_host_services_from_the_environment(tmp_path: Path) -> None:
    s = CONTROL_SECRETS
    services = _render("control-host", tmp_path)
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == s["POSTGRES_PASSWORD"]
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == s["REDIS_PASSWORD"]
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == s["REDIS_PASSWORD"]
    seaweed = services["seaweedfs"]["environment"]
    for key in ("WHISPERQ_S3_ACCESS_KEY_ID", "WHISPERQ_S3_SECRET_ACCESS_KEY"):
        assert seaweed[key] == s[key]
    for name in WHISPERQ_SERVICES:
        env = services[name]["environment"]
        assert env["WHISPERQ_DATABASE_URL"] == (
            f"postgresql+psycopg://whisperq:{s['POSTGRES_PASSWORD']}@postgres:5432/whisperq"
        )
        assert env["WHISPERQ_REDIS_URL"] == f"redis://:{s['REDIS_PASSWORD']}@redis:6379/0"
        assert env["WHISPERQ_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
        assert env["WHISPERQ_FLOWER_PASSWORD"] == s["WHISPERQ_FLOWER_PASSWORD"]
        for key in ("WHISPERQ_S3_ACCESS_KEY_ID", "WHISPERQ_S3_SECRET_ACCESS_KEY"):
            assert env[key] == s[key]


# A key that names a secret; its value must come from the environment.
SECRET_KEY = re.compile(r"PASSWORD|SECRET|PEPPER|TOKEN|REQUIREPASS|_AUTH", re.I)
ENV_REFERENCE = re.compile(r"\$\{[A-Z0-9_]+(:?[?-][^}]*)?\}")
URL_PASSWORD = re.compile(r"://[^:/@\s]*:([^@\s]*)@")


def _literal_secrets(where: str, node: Any, key: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            found += _literal_secrets(f"{where}.{k}", v, str(k))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _literal_secrets(f"{where}[{i}]", item, key)
            if str(item) == "--requirepass" and not ENV_REFERENCE.fullmatch(str(node[i + 1])):
                found.append(f"{where}[{i + 1}]: --requirepass {node[i + 1]!r}")
    elif isinstance(node, str):
        if SECRET_KEY.search(key) and not ENV_REFERENCE.fullmatch(node):
            found.append(f"{where}: {node!r}")
        for password in URL_PASSWORD.findall(node):
            if not password.startswith("${"):
                found.append(f"{where}: a URL carrying the password {password!r}")
    elif node is not None and SECRET_KEY.search(key):
        found.append(f"{where}: {node!r}")
    return found


def test_no_literal_password_in_compose_files_or_whisperq_env() -> None:
    import yaml

    compose_files = sorted(REPO.glob("compose*.yaml")) + sorted(REPO.glob("deploy/**/*.yaml"))
    assert {p.name for p in compose_files} >= {
        "compose.yaml",
        "compose.control.yaml",
        "compose.gpu-host.yaml",
    }
    found: list[str] = []
    for path in compose_files:
        found += _literal_secrets(path.name, yaml.safe_load(path.read_text()))
    # whisperq.env is read literally (no interpolation): it may hold no secret at all.
    for n, line in enumerate((REPO / "whisperq.env").read_text().splitlines(), 1):
        name, sep, value = line.partition("=")
        if not line.startswith("#") and sep and SECRET_KEY.search(name):
            found.append(f"whisperq.env:{n}: {name} belongs in the environment")
        found += [
            f"whisperq.env:{n}: a URL carrying the password {pw!r}"
            for pw in URL_PASSWORD.findall(value)
            if not pw.startswith("${")
        ]
    for path in sorted(REPO.glob("deploy/**/*.sh")):
        found += [
            f"{path.name}: a URL carrying the password {pw!r}"
            for pw in URL_PASSWORD.findall(path.read_text())
            if not pw.startswith("$")
        ]
    assert not found, "literal secrets:\n" + "\n".join(found)


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_nothing_published_on_every_interface(stack: str, tmp_path: Path) -> None:
    bound = _bound(_render(stack, tmp_path))
    assert bound, "nothing published at all?"
    for name, addresses in bound.items():
        assert addresses == {LOOPBACK}, f"{name} publishes on {addresses} by default"
    if stack == "single-host":
        # One host: its data services are reached over the compose network only.
        assert not set(bound) & set(DATA_SERVICES), bound
    # A private address moves what the other hosts need, and only that, off loopback.
    private = "10.0.0.5"
    bound = _bound(_render(stack, tmp_path, WHISPERQ_BIND_ADDR=private))
    for name, addresses in bound.items():
        assert not addresses & {"", "0.0.0.0", "::"} or name in WILDCARD_OK, (name, addresses)
        if stack == "gpu-host" or (stack == "control-host" and name in DATA_SERVICES):
            assert addresses == {private}, (name, addresses)
        else:
            assert addresses == {LOOPBACK}, (name, addresses)
    if stack == "control-host":
        assert set(DATA_SERVICES) <= set(bound)


def _gpu_reservations(svc: dict[str, Any]) -> list[dict[str, Any]]:
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    return [d for d in devices or [] if "gpu" in d.get("capabilities", [])]


def test_each_gpu_worker_reserves_exactly_one_gpu(tmp_path: Path) -> None:
    services = _render("gpu-host", tmp_path)
    gpu_workers = sorted(n for n in services if n.startswith("worker-gpu"))
    assert len(gpu_workers) >= 2
    seen: list[str] = []
    for name in gpu_workers:
        svc = services[name]
        (device,) = _gpu_reservations(svc)
        assert device["driver"] == "nvidia"
        assert len(device.get("device_ids", [])) == 1 and "count" not in device, (name, device)
        seen.append(device["device_ids"][0])
        assert svc["profiles"] == [name.removeprefix("worker-")]  # chosen one GPU at a time
        assert svc["environment"]["WHISPERQ_DEVICE"] == "cuda"
    assert len(set(seen)) == len(seen), f"two workers share a GPU: {seen}"
    # Each publishes its metrics on its own host port.
    ports = [_published(p)[1] for n in services for p in services[n].get("ports", [])]
    assert len(set(ports)) == len(ports), ports
    assert not _gpu_reservations(services["worker-cpu"])
    assert services["worker-cpu"]["environment"]["WHISPERQ_DEVICE"] == "cpu"
    # The control host's own GPU worker reserves one GPU too.
    (device,) = _gpu_reservations(_render("single-host", tmp_path)["worker-gpu"])
    assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1, device


def test_gpu_host_runs_only_workers_against_the_control_host(tmp_path: Path) -> None:
    import yaml

    raw = yaml.safe_load((REPO / "compose.gpu-host.yaml").read_text())
    assert not set(raw["services"]) & {*DATA_SERVICES, "migrate", "api", "flower", "s3-bucket"}
    assert set(raw.get("volumes") or {}) <= {"model-cache"}  # no database volumes here
    s = GPU_HOST_VARS
    for name, svc in _render("gpu-host", tmp_path).items():
        assert name.startswith("worker-") and svc["command"] == ["whisperq", "worker"]
        assert "depends_on" not in svc, name  # nothing to wait for on this host
        env = svc["environment"]
        assert env["WHISPERQ_DATABASE_URL"] == (
            f"postgresql+psycopg://whisperq:{s['POSTGRES_PASSWORD']}@{CONTROL_HOST}:5432/whisperq"
        )
        assert env["WHISPERQ_REDIS_URL"] == f"redis://:{s['REDIS_PASSWORD']}@{CONTROL_HOST}:6379/0"
        assert env["WHISPERQ_S3_ENDPOINT_URL"] == f"http://{CONTROL_HOST}:8333"
        for key in ("WHISPERQ_S3_ACCESS_KEY_ID", "WHISPERQ_S3_SECRET_ACCESS_KEY"):
            assert env[key] == s[key]
        assert "WHISPERQ_FLOWER_PASSWORD" not in env  # no Flower here: not its secret
    # TLS towards the control host: rediss:// and sslmode from the environment.
    tls = _render(
        "gpu-host",
        tmp_path,
        WHISPERQ_REDIS_SCHEME="rediss",
        WHISPERQ_REDIS_QUERY="?ssl_cert_reqs=required",
        WHISPERQ_DATABASE_QUERY="?sslmode=require",
        WHISPERQ_S3_SCHEME="https",
    )["worker-gpu0"]["environment"]
    assert tls["WHISPERQ_REDIS_URL"].startswith("rediss://")
    assert tls["WHISPERQ_REDIS_URL"].endswith("/0?ssl_cert_reqs=required")
    assert tls["WHISPERQ_DATABASE_URL"].endswith("/whisperq?sslmode=require")
    assert tls["WHISPERQ_S3_ENDPOINT_URL"] == f"https://{CONTROL_HOST}:8333"


def test_every_setting_reaches_compose() -> None:
    """whisperq.env (compose's env_file) names every setting, so none is silently lost."""
    from app.settings import Settings

    text = (REPO / "whisperq.env").read_text()
    missing = [n for n in Settings.model_fields if f"WHISPERQ_{n.upper()}=" not in text]
    assert not missing, f"add these to whisperq.env: {missing}"
