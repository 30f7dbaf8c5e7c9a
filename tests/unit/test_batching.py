"""AdaptiveBatcher: no wait while idle, batches that grow under load, errors to every caller."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from lensmill.batching import AdaptiveBatcher


def _doubling(log: list[int], seconds: float = 0.0):
    def fn(x: np.ndarray) -> dict[str, np.ndarray]:
        log.append(len(x))
        time.sleep(seconds)
        return {"y": x[:, 0] * 2.0, "n": np.full(len(x), len(x))}

    return fn


def test_a_lone_request_runs_at_once_and_gets_its_own_rows() -> None:
    sizes: list[int] = []
    batcher = AdaptiveBatcher(_doubling(sizes), max_batch_size=8)

    async def run() -> dict[str, np.ndarray]:
        return await batcher.submit(np.arange(3, dtype=np.float32)[:, None])

    out = asyncio.run(run())
    assert out["y"].tolist() == [0.0, 2.0, 4.0]
    assert sizes == [3] and batcher.batches == 1


def test_requests_that_queue_during_a_pass_share_the_next_one() -> None:
    sizes: list[int] = []
    batcher = AdaptiveBatcher(_doubling(sizes, seconds=0.2), max_batch_size=4)

    async def run() -> list[dict[str, np.ndarray]]:
        first = asyncio.create_task(batcher.submit(np.array([[100.0]])))
        await asyncio.sleep(0.05)  # the first pass is running: these 6 queue behind it
        rest = [asyncio.create_task(batcher.submit(np.array([[float(i)]]))) for i in range(6)]
        return await asyncio.gather(first, *rest)

    outs = asyncio.run(run())
    # One alone, then at most max_batch_size requests per pass: 1 + 4 + 2.
    assert sizes == [1, 4, 2]
    assert [float(o["y"][0]) for o in outs] == [200.0] + [2.0 * i for i in range(6)]
    assert [int(o["n"][0]) for o in outs] == [1, 4, 4, 4, 4, 2, 2]


def test_an_error_reaches_every_request_of_its_batch_and_the_worker_goes_on() -> None:
    calls = threading.Event()

    def fn(x: np.ndarray) -> dict[str, np.ndarray]:
        if not calls.is_set():
            calls.set()
            raise RuntimeError("model broke")
        return {"y": x[:, 0]}

    batcher = AdaptiveBatcher(fn, max_batch_size=4)

    async def run() -> dict[str, np.ndarray]:
        with pytest.raises(RuntimeError, match="model broke"):
            await batcher.submit(np.ones((1, 1)))
        return await batcher.submit(np.full((2, 1), 7.0))

    assert asyncio.run(run())["y"].tolist() == [7.0, 7.0]


def test_max_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaptiveBatcher(_doubling([]), max_batch_size=0)
