"""Simulation throughput: a plain lenstronomy loop versus the platform's Ray Data shard writer.

In one run, on one config:

(a) baseline: ``Simulator(cfg.sim)`` built once, then rows rendered one after another in this process
    (one BLAS/OpenMP thread, no Ray, no I/O); timed is the render loop only.
(b) platform: ``shards.write_shards`` into a temporary storage root on every local core: the Ray Data
    actor pool renders, serialises to Parquet, checksums and writes each shard, then the manifest.
    Ray is started (or joined) and warmed up first (a tiny dataset through the same path, so that
    the driver's Ray Data machinery and the OS file cache are warm); timed is the one
    ``write_shards`` call, which includes starting its actor pool (each actor imports lenstronomy
    and builds its Simulator), since every real run pays that too.

The baseline runs before Ray starts, so it is not slowed by Ray's own processes.
``per_core_efficiency = platform_images_per_s / (cores x baseline_images_per_s)``.
"""

from __future__ import annotations

import logging
import math
import os
import platform as pyplatform
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lensmill.config import Config, SimConfig, StorageConfig

log = logging.getLogger(__name__)

# The platform part should keep every core busy for about this long: long enough to amortise the
# actor pool's start-up, short enough for a quick run.
_PLATFORM_SECONDS_PER_CORE = 20.0
_BASELINE_MIN_SECONDS = 4.0


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return pyplatform.processor() or pyplatform.machine()


def _versions() -> dict[str, str]:
    import lenstronomy
    import pyarrow
    import ray

    import lensmill

    return {
        "lensmill": lensmill.__version__,
        "lenstronomy": lenstronomy.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def run_baseline(sim: SimConfig, n_images: int | None = None) -> dict[str, Any]:
    """Render rows of the train split in a plain loop; ``n_images`` None = for a few seconds."""
    from threadpoolctl import threadpool_limits

    from lensmill.simulate import Simulator, label_for, row_rng

    t0 = time.perf_counter()
    simulator = Simulator(sim)
    build_s = time.perf_counter() - t0
    # One thread, as each Ray actor runs (Ray sets OMP_NUM_THREADS=1 in its workers).
    with threadpool_limits(1):
        for i in range(3):  # first calls fill lenstronomy's caches: not part of the steady state
            simulator.render(row_rng(sim.seed, "train", i), label_for(i, sim.positive_fraction))
        n, t0 = 0, time.perf_counter()
        while (n_images is None and (time.perf_counter() - t0 < _BASELINE_MIN_SECONDS or n < 50)) or (
            n_images is not None and n < n_images
        ):
            simulator.render(row_rng(sim.seed, "train", n), label_for(n, sim.positive_fraction))
            n += 1
        elapsed = time.perf_counter() - t0
    return {"images": n, "seconds": elapsed, "images_per_s": n / elapsed, "simulator_build_s": build_s}


def _bench_storage(cfg: Config) -> tuple[StorageConfig, str, bool]:
    """A fresh storage root for the bench dataset: a temporary folder, or a prefix under an S3 root."""
    if cfg.storage.root.startswith("s3://"):
        root = f"{cfg.storage.root}/bench/simulate-{uuid.uuid4().hex[:12]}"
        return cfg.storage.model_copy(update={"root": root}), root, True
    root = tempfile.mkdtemp(prefix="lensmill-bench-")
    return cfg.storage.model_copy(update={"root": root}), root, False


def _remove(root: str, storage: StorageConfig, remote: bool) -> None:
    if not remote:
        shutil.rmtree(root, ignore_errors=True)
        return
    from lensmill.storage import locate

    loc = locate(root, storage)
    try:
        loc.filesystem.delete_dir(loc.path)
    except OSError as exc:
        log.warning("could not remove the bench data at %s: %s", root, exc)


def _bench_config(cfg: Config, storage: StorageConfig, n_images: int) -> Config:
    """``cfg`` with its sim section sized to ``n_images`` (train; 2 each in val and test)."""
    sim = SimConfig.model_validate({**cfg.sim.model_dump(), "n_train": n_images - 4, "n_val": 2, "n_test": 2})
    return cfg.model_copy(update={"sim": sim, "storage": storage, "dataset_uri": None})


def _start_ray(cfg: Config) -> bool:
    """Join ``ray.address`` / $RAY_ADDRESS, or start a local Ray with one CPU per core (not
    ``ray.num_cpus``: more logical CPUs than cores would run more actors than cores). True when
    this call started or joined Ray (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    return True


def _cores(actors: int) -> int:
    """Physical cores the actor pool ran on: the actors, capped at this machine's cores when the
    cluster is this one machine (a local Ray may declare more logical CPUs than there are cores)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1:
        return max(1, min(actors, os.cpu_count() or 1))
    return actors


def run_simulate_bench(
    cfg: Config, n_images: int | None = None, baseline_images: int | None = None, warmup: bool = True
) -> dict[str, Any]:
    """Baseline loop, then the platform's ``write_shards`` on all cores; one JSON-ready dict."""
    import ray

    from lensmill.shards import _pool_size, shard_specs, write_shards

    sim = cfg.sim
    base = run_baseline(sim, baseline_images)
    log.info(
        "baseline: %d images in %.2f s = %.0f img/s", base["images"], base["seconds"], base["images_per_s"]
    )

    t0 = time.perf_counter()
    started = _start_ray(cfg)
    ray_start_s = time.perf_counter() - t0
    storage, root, remote = _bench_storage(cfg)
    try:
        ray_cpus = int(ray.cluster_resources().get("CPU", 1))
        actors_hint = min(ray_cpus, os.cpu_count() or 1) if len(ray.nodes()) == 1 else ray_cpus
        if n_images is None:
            # Enough work for about _PLATFORM_SECONDS_PER_CORE per core, in whole waves of shards.
            target = base["images_per_s"] * _PLATFORM_SECONDS_PER_CORE * actors_hint
            wave = sim.rows_per_shard * ray_cpus
            n_images = max(wave, math.ceil(target / wave) * wave)
        n_images = max(n_images, 8)
        warm_s = 0.0
        if warmup:
            t0 = time.perf_counter()
            # Another seed: another dataset id under the same root, never the one timed.
            tiny = _bench_config(cfg, storage, 4 + 2 * ray_cpus)
            tiny = tiny.model_copy(update={"sim": tiny.sim.model_copy(update={"seed": sim.seed + 1})})
            write_shards(tiny)
            warm_s = time.perf_counter() - t0
        bench_cfg = _bench_config(cfg, storage, n_images)
        specs = shard_specs(bench_cfg.sim)
        actors = _pool_size(len(specs))
        log.info(
            "platform: %d images in %d shards on %d actors (%d Ray CPUs)",
            n_images,
            len(specs),
            actors,
            ray_cpus,
        )
        t0 = time.perf_counter()
        manifest = write_shards(bench_cfg)
        platform_s = time.perf_counter() - t0
        total_bytes = sum(f["bytes"] for f in manifest["files"])
        cores = _cores(actors)
    finally:
        _remove(root, storage, remote)
        if started:
            ray.shutdown()

    platform_rate = n_images / platform_s
    return {
        "bench": "simulate",
        "baseline_images_per_s": round(base["images_per_s"], 1),
        "platform_images_per_s": round(platform_rate, 1),
        "cores": cores,
        "per_core_efficiency": round(platform_rate / (cores * base["images_per_s"]), 3),
        "image_shape": [len(sim.bands), sim.image_size_px, sim.image_size_px],
        "image_size_px": sim.image_size_px,
        "supersampling": sim.supersampling,
        "n_images": n_images,
        "baseline_images": base["images"],
        "rows_per_shard": sim.rows_per_shard,
        "shards": len(specs),
        "actors": actors,
        "ray_cpus": ray_cpus,
        "baseline_s": round(base["seconds"], 3),
        "platform_s": round(platform_s, 3),
        "simulator_build_s": round(base["simulator_build_s"], 3),
        "ray_start_s": round(ray_start_s, 2) if started else None,
        "warmup_s": round(warm_s, 2),
        "parquet_mb": round(total_bytes / 2**20, 1),
        "timed": (
            "baseline: the render loop of one Simulator in this process, one thread, before Ray starts; "
            "platform: one write_shards call (actor pool start-up, render, Parquet, sha256, write, "
            "manifest) from a warm Ray"
        ),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "processor": pyplatform.processor(),
            "cpu_count": os.cpu_count(),
            "platform": pyplatform.platform(),
        },
        "versions": _versions(),
    }
