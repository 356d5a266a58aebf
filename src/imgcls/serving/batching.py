"""Micro-batching: concurrent prediction requests share one model call.

Each request puts its images (uint8 (n, H, W, C)) on a queue and awaits a
future.  One worker task takes the first waiting request, then gathers more
until ``max_batch`` images are collected or ``max_wait_ms`` have passed since
the first arrived, runs ONE model call in a worker thread (the event loop stays
free to accept and decode other uploads meanwhile) and hands every request its
slice of the result.  A request is never split: one larger than ``max_batch``
runs alone.

Under load this trades at most ``max_wait_ms`` of latency for fewer, larger
forward passes; when idle a request waits at most ``max_wait_ms``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from imgcls.errors import ConfigError

BATCH_RECORD = 10_000  # batch sizes kept for inspection (the Prometheus histogram keeps them all)


@dataclass
class _Request:
    images: np.ndarray  # uint8 (n, H, W, C)
    future: asyncio.Future


class MicroBatcher:
    """Gathers concurrent ``predict`` calls into batched calls of ``predict_fn``.

    Args:
        predict_fn: uint8 (N, H, W, C) -> float (N, K); called in a worker
            thread, one call at a time.
        max_batch: most images per call; 1 disables batching.
        max_wait_ms: longest wait (milliseconds) after the first request for
            others to join; 0 disables batching.
        on_batch: optional callback with the number of images of every call
            (for metrics).

    Use ``await start()`` / ``await stop()`` from the event loop that serves
    the requests (the app's lifespan does).
    """

    def __init__(self, predict_fn: Callable[[np.ndarray], np.ndarray], max_batch: int = 32,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None):
        if int(max_batch) < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch!r}")
        if float(max_wait_ms) < 0:
            raise ConfigError(f"max_wait_ms must be 0 or more, got {max_wait_ms!r}")
        self.predict_fn = predict_fn
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0  # seconds
        self.on_batch = on_batch
        self.batch_sizes: deque[int] = deque(maxlen=BATCH_RECORD)  # images per model call, oldest first
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Request | None = None  # a request that did not fit in the last batch

    @property
    def batching(self) -> bool:
        """Whether requests may share a model call."""
        return self.max_batch > 1 and self.max_wait > 0

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._carry = None
        self._worker = asyncio.create_task(self._run(), name="imgcls-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still waiting fail with RuntimeError."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
        pending = [self._carry] if self._carry is not None else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        _fail(pending, RuntimeError("the server is shutting down"))

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (n, K) of uint8 images (n, H, W, C), computed in a shared batch."""
        if not self.running:
            raise RuntimeError("the batcher is not running (start() it from the app's lifespan)")
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ConfigError(f"images must be uint8 (n, H, W, C), got {images.dtype} with shape {images.shape}")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(images, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch: list[_Request] = []
            try:
                await self._gather(batch)
                await self._call(batch)
            except asyncio.CancelledError:
                _fail(batch, RuntimeError("the server is shutting down"))
                raise

    async def _gather(self, batch: list[_Request]) -> None:
        """Fill ``batch``: the first request, then others within the wait and size limits."""
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch.append(first)
        count = len(first.images)
        if not self.batching:
            return
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while count < self.max_batch:
            try:
                if self._queue.empty():
                    async with asyncio.timeout_at(deadline):
                        nxt = await self._queue.get()
                else:  # already waiting: take it even when the deadline has passed
                    nxt = self._queue.get_nowait()
            except TimeoutError:
                break
            if count + len(nxt.images) > self.max_batch:
                self._carry = nxt
                break
            batch.append(nxt)
            count += len(nxt.images)

    async def _call(self, batch: list[_Request]) -> None:
        """One model call for the whole batch; every future gets its slice or the error."""
        live = [r for r in batch if not r.future.done()]  # a client that went away cancels its future
        if not live:
            return
        images = live[0].images if len(live) == 1 else np.concatenate([r.images for r in live])
        try:
            proba = await asyncio.to_thread(self.predict_fn, images)
            proba = np.asarray(proba)
            if len(proba) != len(images):
                raise RuntimeError(f"the model returned {len(proba)} rows for {len(images)} images")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request, never lost
            _fail(live, exc)
            return
        self.batch_sizes.append(len(images))
        if self.on_batch is not None:
            self.on_batch(len(images))
        start = 0
        for r in live:
            n = len(r.images)
            if not r.future.done():
                r.future.set_result(proba[start:start + n])
            start += n


def _fail(requests: list[_Request], exc: BaseException) -> None:
    for r in requests:
        if not r.future.done():
            r.future.set_exception(exc)
