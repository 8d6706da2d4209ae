"""The blob store across hosts, against a real S3-compatible server (SeaweedFS): the store's
contract on both backends, then an API process and a worker process that share nothing but
Postgres, Redis and the bucket (each has its own, different BLOB_DIR)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.infra.blobs import BlobMissingError, BlobStore, LocalBlobStore, S3BlobStore, build_store
from app.settings import get_settings
from tests.support.api import new_key, noise_wav
from tests.support.random_model import random_checkpoint
from tests.support.seaweed import SeaweedS3
from tests.support.services import WorkerProcess
from tests.support.stack import api_process

pytestmark = pytest.mark.integration
INFER = "/v1/inference/openai/whisper-tiny"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    server: SeaweedS3 = request.getfixturevalue("s3")
    bucket = server.create_bucket(f"contract-{tmp_path.name[-8:].lower().replace('_', '-')}")
    return S3BlobStore(server.client(), bucket=bucket, prefix="audio/")


def test_blob_store_contract(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    payload = bytes(range(256)) * 9000  # > 2 MiB: several chunks
    src.write_bytes(payload)
    store.put_file("abc123", src)
    assert store.size("abc123") == len(payload)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert store.local_path("abc123", scratch).read_bytes() == payload
    assert b"".join(store.iter_bytes("abc123")) == payload
    store.delete("abc123")
    store.delete("abc123")  # absent is fine
    assert store.size("abc123") is None
    with pytest.raises(BlobMissingError):
        store.local_path("abc123", scratch)
    with pytest.raises(BlobMissingError):
        b"".join(store.iter_bytes("abc123"))
    with pytest.raises(ValueError, match="bad blob name"):
        store.put_file("../etc/passwd", src)


def test_settings_build_an_s3_store(s3: SeaweedS3) -> None:
    bucket = s3.create_bucket("settings-check")
    settings = get_settings().model_copy(
        update={
            "blob_backend": "s3",
            "s3_endpoint_url": s3.endpoint,
            "s3_bucket": bucket,
            "s3_access_key_id": s3.env(bucket)["WHISPERQ_S3_ACCESS_KEY_ID"],
            "s3_secret_access_key": s3.env(bucket)["WHISPERQ_S3_SECRET_ACCESS_KEY"],
        }
    )
    settings = type(settings).model_validate(settings.model_dump())
    store = build_store(settings)
    assert isinstance(store, S3BlobStore)
    assert store.size("nothing") is None  # credentials accepted, bucket reachable


def test_api_and_worker_share_only_the_bucket(
    s3: SeaweedS3, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bucket = s3.create_bucket("cross-host")
    api_dir, worker_dir = tmp_path / "api-host", tmp_path / "worker-host"
    common = {**s3.env(bucket), "WHISPERQ_KEEP_AUDIO_DAYS": "0"}
    api = api_process(
        tmp_path / "api.log",
        {**common, "WHISPERQ_BLOB_DIR": str(api_dir), "WHISPERQ_DATA_DIR": str(api_dir)},
    )
    model = random_checkpoint(tmp_path_factory.mktemp("s3model") / "random.pt")
    worker = WorkerProcess(
        model=model,
        log_path=tmp_path / "worker.log",
        env={**common, "WHISPERQ_BLOB_DIR": str(worker_dir), "WHISPERQ_DATA_DIR": str(worker_dir)},
    )
    try:
        key = new_key("s3")
        headers = {"Authorization": f"bearer {key.key}"}
        # Async submission: the answer comes before the worker could have deleted the audio.
        r = httpx.post(
            api.url + INFER,
            headers=headers,
            files={"audio": ("a.wav", noise_wav(1.5, seed=3))},
            data={"webhook": "http://127.0.0.1:9/never"},
            timeout=60,
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["request_id"]
        # The audio went to the bucket; neither host's BLOB_DIR holds anything.
        deadline = time.monotonic() + 120
        status = ""
        while time.monotonic() < deadline:
            body = httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
            status = body["status"]
            if status in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.3)
        assert status == "succeeded", (body, worker.log()[-3000:])
        assert body["input_length_ms"] == 1500
        # The job ended and retention keeps nothing: the worker deleted the object.
        deadline = time.monotonic() + 30
        while s3.keys(bucket) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s3.keys(bucket) == []
        for host_dir in (api_dir, worker_dir):
            assert not host_dir.exists() or not any(p.is_file() for p in host_dir.rglob("*"))
    finally:
        worker.stop()
        api.stop()


def test_worker_says_when_the_audio_is_gone() -> None:
    from app.infra.audio_probe import AudioError
    from worker.audio import load_job_audio

    with pytest.raises(AudioError) as info:
        load_job_audio(blob="neverstored0", url=None, settings=get_settings())
    assert info.value.code == "audio_missing"
