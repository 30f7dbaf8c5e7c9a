"""The whole path in one call: simulate -> tune (Ray Train trials) -> ensemble -> evaluate -> serve.

``run_pipeline`` ends by bringing the Serve endpoint up, scoring a few held-out test images over real
HTTP, and shutting the endpoint down (or leaving it up with ``keep_serving``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import numpy as np

from lensmill.config import Config
from lensmill.ensemble import build_ensemble
from lensmill.evaluate import evaluate
from lensmill.records import TrialResult
from lensmill.serve import start_endpoint, stop_endpoint
from lensmill.shards import load_split, write_shards
from lensmill.tune import tune_architectures

log = logging.getLogger("lensmill")

# Images simulated plus image-epochs of the whole tune grid above which the pipeline logs its cost
# estimate first: the realistic preset (~0.3 M) runs in minutes on a laptop, comprehensive (~190 M)
# takes cluster hours.
LARGE_RUN_IMAGES = 1_000_000


def log_cost_estimate(cfg: Config) -> None:
    """Log ``lensmill cost``'s table for a large run; a run is never stopped for want of an estimate."""
    sim, grid = cfg.sim, cfg.tune.trial_count
    if sim.n_train + sim.n_val + sim.n_test + grid * cfg.train.epochs * sim.n_train < LARGE_RUN_IMAGES:
        return
    try:
        from lensmill.cost import estimate_cost, log_estimate

        log_estimate(estimate_cost(cfg))
    except Exception as exc:  # no cluster file in the working folder, a stale price table, ...
        log.warning("no cost estimate for this run (%s: %s); see `lensmill cost`", type(exc).__name__, exc)


def pick_queries(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` test images, half lenses and half non-lenses where possible."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    k = min(n // 2, len(pos))
    idx = np.concatenate(
        [rng.choice(pos, k, replace=False), rng.choice(neg, min(n - k, len(neg)), replace=False)]
    )
    return np.sort(idx)


def query_endpoint(url: str, images: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    """POST images to /v1/predict; returns one answer per image with its true label."""
    resp = httpx.post(f"{url}/v1/predict", json={"images": images.tolist()}, timeout=60)
    resp.raise_for_status()
    answers = resp.json()["predictions"]
    return [
        {"p_lens": round(a["p_lens"], 4), "label": a["label"], "true_label": int(y)}
        for a, y in zip(answers, labels, strict=True)
    ]


def describe_trial(trial: TrialResult) -> dict[str, Any]:
    """What the pipeline's summary tells of one tune trial."""
    out: dict[str, Any] = {"model": trial.model, "lr": trial.lr, "run_name": trial.run_name}
    out |= {k: v for k, v in trial.params.items() if k not in out}
    if trial.summary is not None:
        s = trial.summary
        out |= {"val_auc": s.val_auc, "epochs_run": s.epochs_run, "stopped_early": s.stopped_early}
    return out | {"usable": trial.usable, "error": trial.error}


def _with_alias(cfg: Config, alias: str) -> Config:
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"alias": alias})})


def run_pipeline(
    cfg: Config, n_queries: int = 8, keep_serving: bool = False, promote: bool = False
) -> dict[str, Any]:
    stages: dict[str, float] = {}

    def stage(name: str, fn, *args):
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        out = fn(*args)
        stages[name] = round(time.perf_counter() - t0, 1)
        log.info("stage %s done in %.1fs", name, stages[name])
        return out

    log_cost_estimate(cfg)
    manifest = stage("simulate", write_shards, cfg)
    tuned = stage("tune", tune_architectures, cfg)
    ens = stage("ensemble", build_ensemble, cfg, promote)
    # The new ensemble is evaluated (under the alias it got); the champion is served.
    ev = stage("evaluate", evaluate, _with_alias(cfg, ens["alias"]))
    images, labels, _ = load_split(ens["dataset_uri"], "test", cfg.storage)
    idx = pick_queries(labels, n_queries, cfg.sim.seed)
    url = stage("serve", start_endpoint, cfg)
    try:
        served = query_endpoint(url, images[idx], labels[idx])
        for s in served:
            log.info("served  p_lens=%.3f  label=%d  true=%d", s["p_lens"], s["label"], s["true_label"])
    finally:
        if not keep_serving:
            stop_endpoint()
    return {
        "dataset_uri": ens["dataset_uri"],
        "dataset_id": manifest.dataset_id,
        "n_images": manifest.total_rows,
        "trials": [describe_trial(t) for t in tuned.trials],
        "members": [{"model": m["model"], "lr": m["lr"], "val_auc": m["val_auc"]} for m in ens["members"]],
        "ensemble_weights": ens["ensemble_weights"],
        "ensemble_val_auc": ens["val_auc"],
        "ensemble_vs": {
            k: ens[k]
            for k in (
                "objective",
                "val_objective",
                "equal_weights_val_objective",
                "best_member_val_objective",
            )
        },
        "operating_point": ens["operating_point"],
        "test_metrics": ev["metrics"],
        "test_results": ev["results"],
        "promotion": ens["promotion"],
        "model_uri": ens["model_uri"],
        "model_version": ens["version"],
        "endpoint": f"{url}/v1/predict",
        "served": served,
        "stage_seconds": stages,
    }
