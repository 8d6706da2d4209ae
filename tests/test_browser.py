"""A person with a browser, on a running stack (API, worker with real tiny.en weights,
Flower with a login, each its own process): signs in with the key, finds the job in the
list, reads the transcript on its page; sees a batch's progress on the list and opens the
batch's jobs; opens Flower with its credentials and sees the worker. Debian's chromium,
driven by Selenium; screenshots stay in the test's tmp dir."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api import new_key
from tests.support.browser import chromium, wait_for
from tests.support.real_models import speak, tiny_en_checkpoint
from tests.support.services import WorkerProcess
from tests.support.stack import ServerProcess, api_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SPEECH = "The quarterly report is ready. Please review the budget before Friday."
FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-test-password"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("stack")
    env = {"WHISPERQ_FLOWER_USER": FLOWER_USER, "WHISPERQ_FLOWER_PASSWORD": FLOWER_PASSWORD}
    api = api_process(tmp / "api.log", env)
    worker = WorkerProcess(model=tiny_en_checkpoint(), log_path=tmp / "worker.log", env=env)
    flower = ServerProcess(
        ["flower", "--host", "127.0.0.1"], log_path=tmp / "flower.log", env=env, ready_path="/"
    )
    try:
        yield {"api": api, "worker": worker, "flower": flower}
    finally:
        flower.stop()
        worker.stop()
        api.stop()


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    with chromium(tmp_path / "profile") as d:
        yield d


def finished_batch(api: ServerProcess, key: Any, tmp_path: Path) -> tuple[str, list[str]]:
    """Two spoken files as one batch, through the API, run by the worker to the end."""
    files = [
        ("file", (f"part-{i}.wav", speak(text, tmp_path / f"part-{i}.wav").read_bytes()))
        for i, text in enumerate(SPEECH.split(". "))
    ]
    headers = {"Authorization": f"bearer {key.key}"}
    r = httpx.post(api.url + "/v1/batches", headers=headers, files=files, timeout=60)
    assert r.status_code == 201, r.text
    batch_id = r.json()["batch"]["id"]
    wait_for(
        lambda: (
            httpx.get(f"{api.url}/v1/batches/{batch_id}", headers=headers, timeout=10).json()[
                "status"
            ]
            == "completed"
        ),
        timeout=300,
        what="the batch to complete",
    )
    return batch_id, [i["job_id"] for i in r.json()["inputs"]]


def test_a_person_reads_the_transcript_and_sees_the_worker_in_flower(
    stack: dict[str, Any], driver: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    api: ServerProcess = stack["api"]
    key = new_key("browser")
    wav = speak(SPEECH, tmp_path / "speech.wav")
    r = httpx.post(
        api.url + "/v1/inference/openai/whisper-tiny",
        headers={"Authorization": f"bearer {key.key}"},
        files={"audio": ("speech.wav", wav.read_bytes())},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    job_id = r.json()["request_id"]
    batch_id, batch_jobs = finished_batch(api, key, tmp_path)

    driver.get(api.url + "/jobs")  # not signed in: the sign-in form
    driver.find_element(By.NAME, "api_key").send_keys(key.key)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(lambda: driver.current_url.endswith("/jobs"), what="the jobs list")
    driver.save_screenshot(str(tmp_path / "jobs.png"))
    # The batch, with its progress as the API reports it.
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-batch="{batch_id}"]')
    assert "completed" in row.text and "100%" in row.text and "2 succeeded" in row.text
    bar = row.find_element(By.TAG_NAME, "progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == "2"
    row.find_element(By.LINK_TEXT, batch_id).click()
    wait_for(lambda: f"batch={batch_id}" in driver.current_url, what="the batch's page")
    driver.save_screenshot(str(tmp_path / "batch.png"))
    assert all(driver.find_elements(By.LINK_TEXT, j) for j in batch_jobs)
    # Each input under its file's name, and the finished batch downloads from its page with
    # the browser's own session (no key): every transcript under its input's name.
    assert "part-0.wav" in driver.find_element(By.ID, "jobs").text
    link = driver.find_element(By.PARTIAL_LINK_TEXT, "transcripts (.txt)")
    cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    got = httpx.get(link.get_attribute("href"), cookies=cookies, timeout=30)
    assert got.status_code == 200, got.text
    assert f'filename="batch-{batch_id}.txt"' in got.headers["content-disposition"]
    assert "== part-0.wav" in got.text and "friday" in got.text.lower(), got.text
    assert httpx.get(link.get_attribute("href"), timeout=30).status_code in (303, 307)
    driver.find_element(By.LINK_TEXT, batch_jobs[1]).click()
    wait_for(lambda: batch_jobs[1] in driver.current_url, what="a batch job's page")
    assert "friday" in driver.find_element(By.ID, "transcript").text.lower()
    driver.get(api.url + "/jobs")
    driver.find_element(By.LINK_TEXT, job_id).click()
    wait_for(lambda: job_id in driver.current_url, what="the job page")
    driver.save_screenshot(str(tmp_path / "job.png"))
    assert driver.find_element(By.ID, "status").text == "succeeded"
    transcript = driver.find_element(By.ID, "transcript").text.lower()
    assert "quarterly report" in transcript and "budget" in transcript
    assert "00:00.00" in transcript
    assert key.key not in driver.page_source
    player = driver.find_element(By.ID, "audio")
    duration = wait_for(
        lambda: driver.execute_script("return arguments[0].duration", player),
        what="the audio player to load the audio",
    )
    assert duration == pytest.approx(len(wav.read_bytes()) / 32000, abs=0.2)

    # /docs renders from assets this server serves (the browser reaches nothing else).
    driver.get(api.url + "/docs")
    wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"),
        what="Swagger UI to render the operations",
    )
    assert "/v1/inference/openai/whisper-tiny" in driver.page_source
    driver.save_screenshot(str(tmp_path / "docs.png"))

    flower: ServerProcess = stack["flower"]
    assert httpx.get(flower.url + "/workers", timeout=10).status_code == 401
    login = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
    auth = {"Authorization": f"Basic {login}"}
    workers = wait_for(
        lambda: [
            n
            for n in httpx.get(
                flower.url + "/api/workers?refresh=1", headers=auth, timeout=20
            ).json()
            if n.startswith("whisperq-")
        ],
        what="Flower to see the worker",
    )
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": auth})
    driver.get(flower.url + "/workers")
    wait_for(lambda: workers[0] in driver.page_source, what="the worker on Flower's page")
    driver.save_screenshot(str(tmp_path / "flower.png"))
    # Task names and arguments are readable and hold ids only.
    tasks = httpx.get(flower.url + "/api/tasks", headers=auth, timeout=20).json()
    ours = [t for t in tasks.values() if job_id in str(t.get("args"))]
    assert ours and ours[0]["name"] == "whisperq.run_job"
    assert ours[0]["args"] == repr([job_id]) or job_id in ours[0]["args"]
    for name in ("jobs.png", "batch.png", "job.png", "flower.png"):
        assert (tmp_path / name).stat().st_size > 5000
