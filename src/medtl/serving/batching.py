"""Images of concurrent requests grouped into one model call: the first image of a batch waits
at most ``wait_s`` for others, and a batch holds at most ``batch_size`` images."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import numpy as np

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


class Batcher:
    """Run ``predict`` (a normalised NCHW batch to probabilities and OOD scores) on batches
    built from the images :meth:`submit` receives; one batch at a time, in a thread, so the
    event loop keeps accepting requests meanwhile.

    ``calls`` and ``images`` count the model calls and the images they saw (for tests and
    monitoring)."""

    def __init__(self, predict: Predict, batch_size: int = 32, wait_s: float = 0.005) -> None:
        if batch_size < 1 or wait_s < 0:
            raise ValueError("batch_size must be at least 1 and wait_s not negative")
        self.predict = predict
        self.batch_size = batch_size
        self.wait_s = wait_s
        self.calls = 0
        self.images = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the worker on the running event loop."""
        # Bounded: past this many waiting images a request waits to enqueue (back-pressure)
        self._queue = asyncio.Queue(maxsize=8 * self.batch_size)
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, image: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Probabilities (K,) and OOD score (or None) of one normalised (C, S, S) image."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        if self._task is None or self._task.done():
            raise RuntimeError("the batching worker is not running")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    async def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.batch_size:
            try:  # whatever is queued already joins without waiting
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        batch: list[tuple[np.ndarray, asyncio.Future]] = []
        try:
            while True:
                batch = await self._next_batch()
                await self._run(batch)
                batch = []
        finally:  # stopped or crashed: no request may wait for an answer that will not come
            assert self._queue is not None
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for _, f in batch:
                if not f.done():
                    f.set_exception(RuntimeError("the batching worker stopped"))

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        """One model call for ``batch``; its answer, or its error, to each waiting request."""
        live = [(x, f) for x, f in batch if not f.done()]  # a client may have gone
        if not live:
            return
        try:
            proba, ood = await asyncio.to_thread(self.predict, np.stack([x for x, _ in live]))
        except Exception as exc:  # handed to each waiting request, the worker goes on
            for _, f in live:
                if not f.done():
                    f.set_exception(exc)
            return
        self.calls += 1
        self.images += len(live)
        for i, (_, f) in enumerate(live):
            if not f.done():
                f.set_result((proba[i], None if ood is None else float(ood[i])))
