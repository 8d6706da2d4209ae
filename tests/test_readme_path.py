"""A new user follows README.md and nothing else: `make up` (API, worker and Flower with the
embedded defaults: SQLite and the audio in one data directory, a redis-server of its own),
`whisperq keys create`, the README's curl with a recording, then /jobs in a browser: signs
in with the key, opens the job and reads the transcript.

The commands are read out of README.md and run as written (only the ports, the data
directory and the recording's name change), so a README that drifts from what works fails
here. Offline: the worker serves tiny.en from the test cache through WHISPERQ_MODEL, as the
README documents for a machine with no route to the model host. `make up` skips its install
step (WHISPERQ_SKIP_INSTALL=1): the venv under test is already installed and shared.
Screenshots and the stack's log stay in the test's tmp dir."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.browser import chromium, wait_for
from tests.support.real_models import speak, tiny_en_checkpoint
from tests.support.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SPEECH = "The quarterly report is ready. Please review the budget before Friday."
README_PORT = "127.0.0.1:8000"


def readme_command(start: str) -> str:
    """The README's shell command that begins with ``start``, backslash continuations
    joined, its trailing comment dropped."""
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S):
        lines = block.splitlines()
        for n, line in enumerate(lines):
            if line.startswith(start):
                command = [line]
                while command[-1].rstrip().endswith("\\"):
                    n += 1
                    command.append(lines[n])
                text = "\n".join(command)
                return re.sub(r"\s+#[^\n]*$", "", text)
    raise AssertionError(f"README.md has no command starting {start!r}")


def user_env(data_dir: Path, api_port: int, flower_port: int) -> dict[str, str]:
    # A new user's shell: none of the test suite's WHISPERQ_* settings (its Postgres, its
    # Redis db, its queues) leak in; only what the README tells a user to set.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERQ_")}
    env.update(
        WHISPERQ_DATA_DIR=str(data_dir),
        WHISPERQ_API_PORT=str(api_port),
        WHISPERQ_FLOWER_PORT=str(flower_port),
        WHISPERQ_MODEL=str(tiny_en_checkpoint()),
        WHISPERQ_SKIP_INSTALL="1",
    )
    return env


class Stack:
    """``make up`` in its own process group, stopped as a terminal's Ctrl-C stops it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            ["make", "up"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"make up exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{url} not up after {timeout}s:\n{self.log()}")

    def interrupt(self, timeout: float = 90) -> bool:
        """Ctrl-C: SIGINT to the whole foreground group. True when every process of the
        group (make, whisperq up, redis-server, API, worker, Flower) has exited."""
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGINT)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                self._log.close()
                return True
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()
        return False


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, dict[str, str]]]:
    env = user_env(tmp_path / "data", free_port(), free_port())
    up = Stack(env, tmp_path / "make-up.log")
    try:
        yield up, env
    finally:
        stopped = up.interrupt()
    assert stopped, f"Ctrl-C left processes of `make up` running:\n{up.log()}"
    # Stopped in order: nothing lost its broker on the way out or printed a traceback.
    after = up.log().split("Ctrl-C stops", 1)[-1]
    for noise in ("Traceback", "KeyboardInterrupt", "Cannot connect to redis", "lost Redis"):
        assert noise not in after, after


def test_a_new_user_follows_the_readme_to_a_transcript_in_the_browser(
    stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    up, env = stack
    api = f"127.0.0.1:{env['WHISPERQ_API_PORT']}"
    # The README's promises this path relies on.
    assert "make up" in README and "WHISPERQ_MODEL=" in README
    for setting in ("WHISPERQ_API_PORT", "WHISPERQ_FLOWER_PORT", "WHISPERQ_DATA_DIR"):
        assert setting in README, setting

    # 1. make up: the stack, with its own Redis and one data directory.
    up.wait_http(f"http://{api}/readyz")
    data_dir = Path(env["WHISPERQ_DATA_DIR"])
    log = up.log()
    assert f"data in {data_dir}" in log and "own redis-server at redis://127.0.0.1:" in log
    assert (data_dir / "whisperq.db").is_file() and (data_dir / ".env").is_file()
    assert "WHISPERQ_KEY_PEPPER=" in (data_dir / ".env").read_text()

    # 2. The key, as the README creates it.
    create = readme_command(".venv/bin/whisperq keys create")
    out = subprocess.run(
        ["bash", "-c", create], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    key = re.search(r"api key:\s+(\S+)", out.stdout)
    assert key is not None, out.stdout
    # Any folder finds the same data (no .env or database in the working folder).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = subprocess.run(
        [str(REPO / ".venv/bin/whisperq"), "keys", "list"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and key.group(1)[:15] in listed.stdout, listed

    # 3. The README's synchronous curl, with a recording named as it names it.
    speak(SPEECH, tmp_path / "meeting.wav")
    curl = readme_command("curl -s http://127.0.0.1:8000/v1/inference/openai/whisper-tiny")
    assert "-F audio=@meeting.wav" in curl and "$KEY" in curl
    done = subprocess.run(
        ["bash", "-c", curl.replace(README_PORT, api)],
        cwd=tmp_path,
        env={**env, "KEY": key.group(1)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    assert answer["inference_status"]["status"] == "succeeded", answer
    assert "quarterly report" in answer["text"].lower()
    job_id = answer["request_id"]
    # The worker ran it, so its model is loaded: "one log line says which model it serves"
    assert f"serving Whisper model {env['WHISPERQ_MODEL']!r}" in up.log()

    # 3a. The README's asynchronous example, as written: a webhook receiver in another
    # terminal, a submission that keeps its request id, then the job polled.
    secret = re.search(r"webhook secret:\s+(whsec_\S+)", out.stdout)
    assert secret is not None, out.stdout
    hook_port = free_port()
    listen = readme_command(".venv/bin/whisperq listen").replace("9000", str(hook_port))
    listener = subprocess.Popen(
        ["bash", "-c", listen.replace("whsec_...", secret.group(1))],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    heard: list[str] = []
    reader = threading.Thread(target=lambda: heard.extend(listener.stdout or []), daemon=True)
    reader.start()
    try:
        submit = readme_command("REQUEST_ID=$(curl").replace("9000", str(hook_port))
        poll = readme_command("curl -s http://127.0.0.1:8000/v1/jobs/$REQUEST_ID ")

        def run(script: str) -> str:
            done = subprocess.run(
                ["bash", "-c", script.replace(README_PORT, api)],
                cwd=tmp_path,
                env={**env, "KEY": key.group(1)},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        request_id = run(f"{submit}\necho $REQUEST_ID").strip()

        def ended() -> dict[str, Any] | None:
            job: dict[str, Any] = json.loads(run(f"REQUEST_ID={request_id}\n{poll}"))
            return None if job["status"] in ("queued", "running") else job

        assert wait_for(ended, what="the job to end")["status"] == "succeeded"
        wait_for(lambda: any(f"request_id={request_id}" in line for line in heard), what="hook")
    finally:
        listener.terminate()
        listener.wait(30)
        reader.join(30)
        if listener.stdout is not None:
            listener.stdout.close()
    event = next(line for line in heard if f"request_id={request_id}" in line)
    assert "signature: verified" in event, heard

    # 3b. Eight people at once, each with a short clip: every one is answered by the idle
    # worker. SQLite has no row locks, so claimers that race for one job must each go on to
    # the next job: a claimer that gave up dropped its message, and that job waited 40-80 s
    # for the reaper while the worker idled.
    clip = tmp_path / "short.wav"
    speak("Please review the budget.", clip)
    auth_header = {"Authorization": f"bearer {key.group(1)}"}

    def sync_request(_: int) -> dict[str, Any]:
        with clip.open("rb") as f:
            r = httpx.post(
                f"http://{api}/v1/inference/openai/whisper-tiny",
                headers=auth_header,
                files={"audio": ("short.wav", f)},
                data={"temperature": "0"},
                timeout=600,
            )
        return dict(r.json())

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(sync_request, range(8)))
    assert [a["inference_status"]["status"] for a in answers] == ["succeeded"] * 8, answers
    log = up.log()
    assert "is not claimable" not in log and "messages were missing" not in log, log

    # 4. The browser, at the address the README gives.
    jobs_url = re.search(r"open (http://127\.0\.0\.1:8000/jobs)", README)
    assert jobs_url is not None, "README.md no longer says where the jobs page is"
    with chromium(tmp_path / "profile") as driver:
        driver.get(jobs_url.group(1).replace(README_PORT, api))
        wait_for(lambda: "/login" in driver.current_url, what="the sign-in form")
        driver.save_screenshot(str(tmp_path / "login.png"))
        driver.find_element(By.NAME, "api_key").send_keys(key.group(1))
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(lambda: driver.current_url.endswith("/jobs"), what="the jobs list")
        driver.save_screenshot(str(tmp_path / "jobs.png"))
        driver.find_element(By.LINK_TEXT, job_id).click()
        wait_for(lambda: job_id in driver.current_url, what="the job page")
        driver.save_screenshot(str(tmp_path / "job.png"))
        assert driver.find_element(By.ID, "status").text == "succeeded"
        transcript = driver.find_element(By.ID, "transcript").text.lower()
        assert "quarterly report" in transcript and "friday" in transcript
        assert key.group(1) not in driver.page_source

    # 5. Flower, on the port the stack was given (open on loopback: no login set), shows
    # this stack's worker and no other: the stack's Redis is its own.
    flower = f"http://127.0.0.1:{env['WHISPERQ_FLOWER_PORT']}"
    page = wait_for(
        lambda: (html := httpx.get(flower + "/workers", timeout=20).text) * ("whisperq-" in html),
        what="Flower to show the worker",
    )
    assert len(set(re.findall(r"whisperq-\d+@[\w.-]+", page))) == 1, page

    # Its tasks are named by job id: the README's job has its page under its request id.
    def task_page() -> str:
        r = httpx.get(f"{flower}/task/{job_id}", timeout=20)
        return r.text if r.status_code == 200 else ""

    assert "whisperq.run_job" in wait_for(task_page, what="Flower's page of the job")
    for name in ("login.png", "jobs.png", "job.png"):
        assert (tmp_path / name).stat().st_size > 5000
