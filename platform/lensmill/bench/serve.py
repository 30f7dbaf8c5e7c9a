"""Serving: the Ray Serve endpoint against a plain FastAPI/uvicorn process holding the same members.

In one run, with one ensemble (``--model-dir``, or the config's champion) and one set of requests
(``JSON {"npy_b64": ...}`` bodies of one seeded random image each, of the ensemble's shape):

(a) baseline: ``lensmill.bench.plain_server`` in its own process: the same decoding and answer, each
    request scored on its own, one forward pass at a time on the process's torch threads;
(b) platform: ``lensmill.serve.start_endpoint`` with ``cfg.serve`` (replicas, CPUs, batching) on the
    caller's Ray.

Each side is warmed up, then measured at concurrency 1 (latency p50 / p99 over ``requests_c1``
requests, one at a time) and at concurrency 32 (requests/s over ``requests_c32`` requests sent by 32
clients, each waiting for its answer before the next: a closed loop). Every count is bounded, and so
is the time (``max_seconds`` per measurement). Loopback only; the clients run in this process, and so
take the same share of the cores from either side. The baseline runs before the platform and again
after it, each time stopped before the other starts, so the two never share the machine; its figures
pool both runs (``baseline_drift``: requests/s after / before - 1, how far the machine moved). Both
sides must give the same ``p_lens`` for the same image (checked): the figures compare the serving, not
the models.

``throughput_ratio_c32`` = platform / baseline requests/s at 32; ``p50_overhead_ms_c1`` = platform p50
- baseline p50 at 1.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from lensmill import tracking
from lensmill.bench import machine, today, versions
from lensmill.config import Config

log = logging.getLogger(__name__)

CONCURRENCY = 32
_WARMUP_REQUESTS = 16
_DISTINCT_IMAGES = 64


def request_bodies(shape: tuple[int, ...], n: int, seed: int = 0) -> list[bytes]:
    """``n`` JSON bodies, each ``{"npy_b64": ...}`` of one (1, C, H, W) float32 image."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(n):
        buf = io.BytesIO()
        np.save(buf, rng.normal(0.0, 1.0, (1, *shape)).astype(np.float32))
        bodies.append(json.dumps({"npy_b64": base64.b64encode(buf.getvalue()).decode()}).encode())
    return bodies


@dataclass
class Load:
    """What one load run saw: each answered request's latency, the errors, the wall time."""

    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __add__(self, other: Load) -> Load:
        """Two runs at one concurrency pooled (the baseline before and after the platform)."""
        return Load(
            self.concurrency,
            self.latencies_ms + other.latencies_ms,
            self.errors + other.errors,
            self.seconds + other.seconds,
        )

    def summary(self) -> dict[str, Any]:
        ms = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        return {
            "concurrency": self.concurrency,
            "requests": len(self.latencies_ms),
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(len(self.latencies_ms) / self.seconds, 2) if self.seconds else None,
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
        }


async def _load(url: str, bodies: list[bytes], requests: int, concurrency: int, max_seconds: float) -> Load:
    """``requests`` POSTs from ``concurrency`` closed-loop clients (fewer when ``max_seconds`` runs
    out)."""
    run = Load(concurrency)
    sent = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits, headers=headers) as client:

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", content=body)
                except httpx.HTTPError as exc:
                    run.errors.append(repr(exc))
                    continue
                if r.status_code != 200:
                    run.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                run.latencies_ms.append((time.perf_counter() - t0) * 1000.0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.seconds = time.perf_counter() - t0
    return run


def measure(
    url: str, bodies: list[bytes], requests_c1: int, requests_c32: int, max_seconds: float
) -> dict[str, Load]:
    """Warm-up, then concurrency 1 (latency) and concurrency 32 (throughput) against ``url``."""

    async def run() -> dict[str, Load]:
        await _load(url, bodies, _WARMUP_REQUESTS, 4, max_seconds)
        c1 = await _load(url, bodies, requests_c1, 1, max_seconds)
        c32 = await _load(url, bodies, requests_c32, CONCURRENCY, max_seconds)
        return {"c1": c1, "c32": c32}

    return asyncio.run(run())


def p_lens_of(url: str, body: bytes) -> float:
    r = httpx.post(
        f"{url}/v1/predict", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    r.raise_for_status()
    return float(r.json()["predictions"][0]["p_lens"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _plain_side(model_dir: Path, bodies: list[bytes], **load: Any) -> tuple[dict[str, Load], float]:
    from lensmill.serve import wait_healthy

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lensmill.bench.plain_server", str(model_dir), str(port)], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s=120.0)
        return measure(url, bodies, **load), p_lens_of(url, bodies[0])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _serve_side(
    cfg: Config, model_dir: Path, bodies: list[bytes], **load: Any
) -> tuple[dict[str, Load], float]:
    from lensmill.serve import start_endpoint, stop_endpoint

    url = start_endpoint(cfg, model_dir=model_dir)
    try:
        return measure(url, bodies, **load), p_lens_of(url, bodies[0])
    finally:
        stop_endpoint()


def run_serve_bench(
    cfg: Config,
    model_dir: Path | None = None,
    requests_c1: int = 200,
    requests_c32: int = 1000,
    max_seconds: float = 120.0,
) -> dict[str, Any]:
    """Both sides on the same ensemble and requests; Ray must be initialised by the caller."""
    tree = cfg.model_dump(mode="json")
    tree["serve"].update(api_key_env=None, api_key_file=None)  # the bench's own endpoint, on loopback
    cfg = Config.model_validate(tree)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    load = {"requests_c1": requests_c1, "requests_c32": requests_c32, "max_seconds": max_seconds}
    with tempfile.TemporaryDirectory(prefix="lensmill-bench-serve-") as tmp:
        loaded = tracking.load_ensemble(cfg, Path(tmp), model_dir)
        shape = tuple(loaded.manifest.image_shape)
        bodies = request_bodies(shape, _DISTINCT_IMAGES, seed=cfg.train.seed)
        log.info("bench serve: baseline (plain FastAPI/uvicorn) on %s", loaded.ref)
        before, plain_p = _plain_side(loaded.path, bodies, **load)
        log.info("bench serve: platform (Ray Serve) on %s", loaded.ref)
        serve_runs, serve_p = _serve_side(cfg, loaded.path, bodies, **load)
        log.info("bench serve: baseline again")
        after, _ = _plain_side(loaded.path, bodies, **load)
    if abs(plain_p - serve_p) > 1e-4:
        raise RuntimeError(
            f"the two sides disagree on one image: p_lens {plain_p} (plain) vs {serve_p} (Serve)"
        )
    plain = {c: (before[c] + after[c]).summary() for c in before}
    platform = {c: run.summary() for c, run in serve_runs.items()}
    drift = {
        c: round(after[c].summary()["requests_per_s"] / before[c].summary()["requests_per_s"] - 1, 3)
        for c in before
    }
    s = cfg.serve
    return {
        "benchmark": "serve",
        "date": today(),
        "model": loaded.ref,
        "members": [m.name for m in loaded.manifest.members],
        "image_shape": list(shape),
        "throughput_ratio_c32": round(platform["c32"]["requests_per_s"] / plain["c32"]["requests_per_s"], 3),
        "p50_overhead_ms_c1": round(platform["c1"]["p50_ms"] - plain["c1"]["p50_ms"], 2),
        "baseline": plain,
        "baseline_drift": drift,
        "platform": platform,
        "serve": {
            "ingress": s.ingress,
            "num_replicas": s.num_replicas,
            "autoscaling": s.autoscaling.model_dump() if s.autoscaling else None,
            "cpus_per_replica": s.cpus_per_replica,
            "gpus_per_replica": s.gpus_per_replica,
            "max_batch_size": s.max_batch_size,
            "batch_wait_timeout_s": s.batch_wait_timeout_s,
        },
        "timed": "closed-loop HTTP clients in the bench's process; JSON npy_b64 bodies, 1 image; loopback",
        "machine": machine(),
        "versions": versions(),
    }
