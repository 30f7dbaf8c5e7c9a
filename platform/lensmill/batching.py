"""Micro-batching for the endpoint's replicas that adds no wait while the model is idle.

``AdaptiveBatcher.submit(images)`` queues one request's (n, C, H, W) images; one worker task runs the
model on whatever is queued each time the model is free:

- at low load a request finds the model free and runs at once, so batching costs it nothing;
- under load, the requests that arrive during one forward pass go into the next one together (up to
  ``max_batch_size`` requests), so batches grow with the load and the cores do more per image.

Why not ``@serve.batch``: in Ray 2.60 it closes a batch when its ``batch_wait_timeout_s`` window ends
whether or not the model is free, and queues it behind the running one. A window short enough to
keep the added latency of a lone request under a few ms then leaves batches of one or two requests
under load; a window long enough to fill batches adds its whole length to every lone request.
``wait_s`` > 0 still waits that long for company before a batch starts, for models where a fuller
batch is worth the latency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

Scores = dict[str, np.ndarray]


class AdaptiveBatcher:
    """One forward pass at a time over the requests queued meanwhile; results split back per request."""

    def __init__(self, fn: Callable[[np.ndarray], Scores], max_batch_size: int, wait_s: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.fn = fn  # (N, C, H, W) -> {name: (N, ...)}; replaced when a new model is swapped in
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        # Created on first use, on the event loop of the replica that awaits the results.
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[Scores]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # forward passes run, and the requests in them (for tests and logs)
        self.requests = 0

    async def submit(self, images: np.ndarray) -> Scores:
        """The model's outputs for ``images`` (n, C, H, W), once its batch has run."""
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(self._queue))
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((images, future))
        return await future

    async def _run(self, queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[Scores]]]) -> None:
        while True:
            batch = [await queue.get()]
            if self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            while len(batch) < self.max_batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [(x, f) for x, f in batch if not f.done()]  # a client gone away is not scored
            if batch:
                await self._score(batch)

    async def _score(self, batch: list[tuple[np.ndarray, asyncio.Future[Scores]]]) -> None:
        counts = [int(x.shape[0]) for x, _ in batch]
        stacked = np.concatenate([x for x, _ in batch]) if len(batch) > 1 else batch[0][0]
        try:
            # In a worker thread, so the event loop keeps decoding and queueing requests meanwhile.
            out = await asyncio.to_thread(self.fn, stacked)
        except Exception as exc:  # every request of the batch gets the error, the worker goes on
            for _, f in batch:
                if not f.done():
                    f.set_exception(exc)
            return
        self.batches += 1
        self.requests += len(batch)
        bounds = np.cumsum(counts)[:-1]
        pieces = {k: np.split(v, bounds) for k, v in out.items()}
        for i, (_, f) in enumerate(batch):
            if not f.done():
                f.set_result({k: pieces[k][i] for k in out})
