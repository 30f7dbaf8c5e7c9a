"""Catalog scoring: ``lensmill predict --input FOLDER`` (Ray Data) against a plain PyTorch loop over the
same files.

In one run, with one ensemble (``--model-dir``, or the config's champion) and one folder of cutouts
(``--input``, or ``images`` seeded noise cutouts of the ensemble's shape written as FITS, the survey
format; scoring costs the same whatever they show):

(a) baseline: one process, no Ray: the ensemble loaded, then the files read and decoded by the same
    ``lensmill.catalog.decode_cutout`` and scored ``scoring.batch_size`` at a time on all the
    process's torch threads;
(b) platform: ``lensmill.catalog.score_catalog`` into a temporary output: Ray Data decode tasks, the
    scorer actor pool (``scoring.*``), Parquet parts written by the driver.

Timed, in both, from the start to the last score (b: to the last part written), with the model's
loading included: what a user waits for. The baseline runs before and after the platform;
``baseline_images_per_s`` is their combined rate and ``baseline_drift`` (last / first - 1) says how
much the machine's speed moved meanwhile. Each side also scores the first quarter of the files, so
that ``steady_ratio`` compares the rates per image once started (``marginal_rate``: start-up taken
out, the figure that holds for a survey's 10^6 cutouts) and ``platform_startup_s`` says what the
platform's start-up costs. Both sides must give the same ``p_lens`` (checked). Ray must be
initialised by the caller.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from lensmill import tracking
from lensmill.bench import machine, today, versions
from lensmill.catalog import decode_cutout, read_catalog, score_catalog
from lensmill.config import Config
from lensmill.predict import EnsemblePredictor

log = logging.getLogger(__name__)


def write_cutouts(folder: Path, shape: tuple[int, ...], n: int, seed: int = 0) -> Path:
    """``n`` FITS cutouts of ``shape`` (C, H, W), seeded per file, into ``folder``."""
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = np.random.default_rng([seed, i]).normal(0.0, 1.0, shape).astype(np.float32)
        fits.PrimaryHDU(image).writeto(folder / f"cutout-{i:07d}.fits")
    return folder


def run_baseline(cfg: Config, model_dir: Path, paths: list[str]) -> tuple[float, np.ndarray]:
    """The plain loop: seconds, and ``p_lens`` per file in order."""
    t0 = time.perf_counter()
    predictor = EnsemblePredictor.load(model_dir, batch_size=cfg.scoring.batch_size)
    predictor = predictor.to("cuda" if cfg.scoring.gpus_per_actor > 0 else "cpu")  # as the actors
    shape = tuple(predictor.image_shape)
    p_lens = []
    step = cfg.scoring.batch_size
    for s in range(0, len(paths), step):
        images = np.stack([decode_cutout([p], cfg.storage, shape) for p in paths[s : s + step]])
        p_lens.append(predictor.predict(images)["p_lens"])
    return time.perf_counter() - t0, np.concatenate(p_lens)


def _platform(
    cfg: Config, paths: list[str], model_dir: Path, out: Path
) -> tuple[float, dict[str, Any], np.ndarray]:
    """``score_catalog`` over a list file of ``paths``: seconds, its summary, ``p_lens`` in order."""
    out.mkdir(parents=True)
    listing = out.with_suffix(".txt")
    listing.write_text("".join(f"{p}\n" for p in paths))
    t0 = time.perf_counter()
    summary = score_catalog(cfg, str(listing), str(out), model_dir)
    seconds = time.perf_counter() - t0
    table = pq.read_table(out, columns=["p_lens"])  # parts in name order = input order
    return seconds, summary, table.column("p_lens").to_numpy(zero_copy_only=False)


def marginal_rate(n_small: int, s_small: float, n_large: int, s_large: float) -> float | None:
    """Images/s of the extra images of the larger run: what a run costs per image once started, with
    the fixed start-up (the model loading; for the platform also Ray Data and its actors) taken out.
    The rate a survey of 10^6 cutouts sees. None when the two runs do not tell."""
    if n_large <= n_small or s_large <= s_small:
        return None
    return (n_large - n_small) / (s_large - s_small)


def run_predict_bench(
    cfg: Config, model_dir: Path | None = None, input_uri: str | None = None, images: int = 2000
) -> dict[str, Any]:
    """Both sides over the same files with the same ensemble; each also over the first quarter of
    them, for the rates without start-up."""
    with tempfile.TemporaryDirectory(prefix="lensmill-bench-predict-") as tmp:
        root = Path(tmp)
        loaded = tracking.load_ensemble(cfg, root / "model", model_dir)
        shape = tuple(loaded.manifest.image_shape)
        if input_uri is None:
            log.info("bench predict: writing %d FITS cutouts of shape %s", images, list(shape))
            input_uri = str(write_cutouts(root / "cutouts", shape, images, seed=cfg.train.seed))
        catalog = read_catalog(input_uri, cfg.storage)
        if len(catalog.path_columns) > 1:
            raise ValueError(
                "bench predict reads one file per cutout: give a folder or a list, not per-band paths"
            )
        paths = catalog.table.column(catalog.path_columns[0]).to_pylist()
        n = len(paths)
        head = paths[: max(1, n // 4)]
        log.info("bench predict: baseline (plain loop), %d cutouts", n)
        first_s, expected = run_baseline(cfg, loaded.path, paths)
        log.info("bench predict: platform (Ray Data catalog scoring), %d then %d cutouts", len(head), n)
        head_s, _, _ = _platform(cfg, head, loaded.path, root / "scores-head")
        platform_s, summary, got = _platform(cfg, paths, loaded.path, root / "scores")
        log.info("bench predict: baseline again, %d then %d cutouts", len(head), n)
        baseline_head_s, _ = run_baseline(cfg, loaded.path, head)
        last_s, _ = run_baseline(cfg, loaded.path, paths)
    if summary["unreadable"]:
        raise RuntimeError(f"{summary['unreadable']} of {n} cutouts were unreadable: not a fair comparison")
    diff = float(np.nanmax(np.abs(got - expected)))
    if diff > 1e-4:
        raise RuntimeError(f"the two sides disagree: max |p_lens difference| {diff}")
    baseline = 2 * n / (first_s + last_s)
    platform = n / platform_s
    steady_baseline = marginal_rate(len(head), baseline_head_s, n, (first_s + last_s) / 2)
    steady_platform = marginal_rate(len(head), head_s, n, platform_s)
    steady_ratio = steady_platform / steady_baseline if steady_baseline and steady_platform else None
    sc = cfg.scoring
    return {
        "benchmark": "predict",
        "date": today(),
        "model": loaded.ref,
        "members": [m.name for m in loaded.manifest.members],
        "image_shape": list(shape),
        "cutouts": n,
        "input_uri": catalog.uri,
        "baseline_images_per_s": round(baseline, 1),
        "platform_images_per_s": round(platform, 1),
        "ratio": round(platform / baseline, 3),
        # Per image once started (see marginal_rate): the figure that holds at survey scale.
        "baseline_steady_images_per_s": steady_baseline and round(steady_baseline, 1),
        "platform_steady_images_per_s": steady_platform and round(steady_platform, 1),
        "steady_ratio": steady_ratio and round(steady_ratio, 3),
        "platform_startup_s": steady_platform and round(platform_s - n / steady_platform, 2),
        "baseline_seconds": {
            "all": [round(first_s, 3), round(last_s, 3)],
            "quarter": round(baseline_head_s, 3),
        },
        "baseline_drift": round(first_s / last_s - 1, 3),
        "platform_seconds": {"all": round(platform_s, 3), "quarter": round(head_s, 3)},
        "parts": summary["parts"],
        "max_abs_p_lens_difference": diff,
        "scoring": {
            "batch_size": sc.batch_size,
            "min_actors": sc.min_actors,
            "max_actors": sc.max_actors,
            "cpus_per_actor": sc.cpus_per_actor,
            "torch_threads": sc.threads,
            "gpus_per_actor": sc.gpus_per_actor,
        },
        "timed": "model load + read + decode + score (platform: + Ray Data start-up and Parquet parts)",
        "machine": machine(),
        "versions": versions(),
    }
