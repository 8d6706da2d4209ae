"""Job completion signals: a worker publishes a finished job's id on one Redis channel; each
API process keeps one subscription and wakes the sync callers waiting for that id.

Pub/sub is at-most-once (a signal sent while the API reconnects is gone), so it only wakes
waiters early: a waiter always re-reads the job row, the truth, and also re-reads it on a
slow timer. Hundreds of sync callers then cost one Redis connection and no Postgres polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from functools import lru_cache

import redis
import redis.asyncio as aioredis

log = logging.getLogger(__name__)

CHANNEL = "whisperq:jobs:done"
# Cancel requests for running jobs, API → workers. The heartbeat also finds them in the row
# (the truth) within a quarter lease; this only makes the stop prompt.
CANCEL_CHANNEL = "whisperq:jobs:cancel"
# How long the listener waits before reconnecting after Redis went away.
RECONNECT_DELAY_S = 1.0
# How long one read of the subscription waits before looking again.
LISTEN_POLL_S = 1.0

_publish_lock = threading.Lock()


@lru_cache(maxsize=4)
def _publisher(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)


def publish_done(job_id: str, *, redis_url: str) -> None:
    """Tell waiting API processes that ``job_id`` reached a final state. Never raises: a lost
    signal only delays a waiter until its next re-read of the row."""
    try:
        with _publish_lock:
            client = _publisher(redis_url)
        client.publish(CHANNEL, job_id)
    except redis.RedisError as exc:
        log.warning("could not publish completion of job %s: %s", job_id, exc)


def publish_cancel(job_ids: list[str], *, redis_url: str) -> None:
    """Tell workers to stop these running jobs at their next window. Call after the
    ``cancel_requested_at`` commit. Never raises: a lost signal leaves it to the heartbeat."""
    if not job_ids:
        return
    try:
        with _publish_lock:
            client = _publisher(redis_url)
        for job_id in job_ids:
            client.publish(CANCEL_CHANNEL, job_id)
    except redis.RedisError as exc:
        log.warning("could not publish cancel of %d job(s): %s", len(job_ids), exc)


class CompletionListener:
    """One subscription per API process, fanned out to per-job asyncio events."""

    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        # A task of a loop that has ended (a test client's portal) cannot listen any more.
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._listen())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def register(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        return event

    def unregister(self, job_id: str, event: asyncio.Event) -> None:
        events = self._waiters.get(job_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[job_id]

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    async def _listen(self) -> None:
        while True:
            client = aioredis.Redis.from_url(self._redis_url)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self.connected.set()
                # get_message, not listen(): a cancel (lifespan shutdown) then lands in a plain
                # await, and the finally below closes the connection; cancelled inside
                # listen()'s async generator, its close failed ("already running") and the
                # socket was left to the garbage collector.
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=LISTEN_POLL_S
                    )
                    data = message.get("data") if message else None
                    if isinstance(data, bytes):
                        self._wake(data.decode(errors="replace"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarted or unreachable: waiters fall back to timers
                self.connected.clear()
                log.warning("completion listener lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(RECONNECT_DELAY_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()
