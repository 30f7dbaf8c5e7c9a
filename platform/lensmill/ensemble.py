"""Ensemble: pick members among the trials with checkpoints, search their weights on validation, register.

Member probabilities on the validation split are computed once; the weight search then runs on
arrays: every point of a simplex grid with step ``ensemble.weight_step``, scored by ROC AUC
(ties broken by log loss). A temperature for the weighted probability is then fitted on the same
validation arrays (``metrics.fit_temperature``) and stored in ``ensemble.json``, so that serving and
evaluation report calibrated probabilities. The result is registered in MLflow and aliased ``@champion``.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from lensmill import tracking
from lensmill.config import Config
from lensmill.layout import ensemble_result_uri, stage_run_name
from lensmill.metrics import apply_temperature, expected_calibration_error, fit_temperature
from lensmill.models import load_classifier
from lensmill.predict import EnsemblePredictor, Member
from lensmill.records import RunSummary, TrialResult
from lensmill.shards import load_split
from lensmill.storage import download_dir, is_s3, write_json
from lensmill.tune import load_tune_results


def select_members(trials: Sequence[TrialResult], max_members: int) -> list[TrialResult]:
    """Best usable trial of each architecture first (diversity), then the next best overall."""
    usable = sorted((t for t in trials if t.usable), key=lambda t: -t.val_auc)
    firsts: dict[str, TrialResult] = {}
    for t in usable:
        firsts.setdefault(t.model, t)
    rest = [t for t in usable if t not in firsts.values()]
    return (list(firsts.values()) + rest)[:max_members]


def simplex_grid(n_members: int, step: float) -> np.ndarray:
    """All weight vectors with entries in multiples of ``step`` summing to 1: shape (K, n_members)."""
    units = round(1 / step)
    points = [c for c in itertools.product(range(units + 1), repeat=n_members - 1) if sum(c) <= units]
    return np.array([[*c, units - sum(c)] for c in points], dtype=np.float64) / units


def search_weights(member_probs: np.ndarray, labels: np.ndarray, step: float) -> tuple[np.ndarray, float]:
    """Weights (M,) maximising validation AUC of the weighted mean of member_probs (N, M)."""
    best_key, best_w = (-np.inf, -np.inf), None
    for w in simplex_grid(member_probs.shape[1], step):
        p = member_probs @ w
        key = (roc_auc_score(labels, p), -log_loss(labels, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))
        if key > best_key:
            best_key, best_w = key, w
    return best_w, float(best_key[0])


def _member_dir(cfg: Config, checkpoint_uri: str, dst: Path) -> Path:
    if is_s3(checkpoint_uri):
        return download_dir(checkpoint_uri, dst, cfg.storage)
    return Path(checkpoint_uri)


def build_ensemble(cfg: Config) -> dict[str, Any]:
    """Select members from the tune results, weight them on validation, register ``@champion``."""
    trials = load_tune_results(cfg).trials
    chosen = [t.summary for t in select_members(trials, cfg.ensemble.max_members) if t.summary]
    if not chosen:
        raise RuntimeError("no usable trials to build an ensemble from")
    with tracking.run(cfg, stage_run_name(cfg, "ensemble"), "ensemble", chosen[0].dataset_id) as run_id:
        result = _weigh_and_register(cfg, chosen, run_id)
    write_json(ensemble_result_uri(cfg), result, cfg.storage)
    return result


def _weigh_and_register(cfg: Config, chosen: list[RunSummary], run_id: str) -> dict[str, Any]:
    """Member probabilities on validation, the weight search, the temperature, the registration."""
    dataset_uri = chosen[0].dataset_uri
    images, labels, _ = load_split(dataset_uri, "val", cfg.storage)
    with tempfile.TemporaryDirectory() as tmp:
        members = []
        for i, t in enumerate(chosen):
            d = _member_dir(cfg, t.checkpoint_uri, Path(tmp) / f"ckpt-{i}")
            model, meta = load_classifier(d / t.member_file)
            members.append(
                Member(name=f"{t.model}@lr{t.lr:g}", model=model, weight=1.0 / len(chosen), meta=meta)
            )
        shape = tuple(int(s) for s in images.shape[1:])
        info = {"dataset_id": chosen[0].dataset_id, "config_hash": cfg.hash()}
        equal = EnsemblePredictor(members, shape, cfg.ensemble.threshold, info)
        probs = equal.member_probabilities(images)  # (N, M), computed once
        weights, val_auc = search_weights(probs, labels, cfg.ensemble.weight_step)
        for m, w in zip(members, weights, strict=True):
            m.weight = float(w)
        # Calibration on validation: one temperature for the weighted probability (N,).
        p_val = probs @ (weights / weights.sum())
        temperature = fit_temperature(labels, p_val)
        bins = cfg.evaluate.calibration_bins
        val_ece = expected_calibration_error(labels, p_val, bins)
        val_ece_cal = expected_calibration_error(labels, apply_temperature(p_val, temperature), bins)
        predictor = EnsemblePredictor(members, shape, cfg.ensemble.threshold, info, temperature=temperature)
        out_dir = Path(tmp) / "ensemble"
        predictor.save(out_dir)

        member_aucs = [float(roc_auc_score(labels, probs[:, j])) for j in range(len(members))]
        tracking.log_metrics(
            cfg,
            run_id,
            {
                "val_auc": val_auc,
                "temperature": temperature,
                "val_ece_uncalibrated": val_ece,
                "val_ece": val_ece_cal,
                **{f"weight_{j}": float(w) for j, w in enumerate(weights)},
                **{f"member_val_auc_{j}": a for j, a in enumerate(member_aucs)},
            },
        )
        registered = tracking.register_ensemble(cfg, run_id, out_dir)

    result = {
        "members": [
            {
                "name": m.name,
                "model": t.model,
                "lr": t.lr,
                "val_auc": a,
                "weight": float(w),
                "mlflow_run_id": t.mlflow_run_id,
            }
            for m, t, a, w in zip(members, chosen, member_aucs, weights, strict=True)
        ],
        "ensemble_weights": [float(w) for w in weights],
        "val_auc": val_auc,
        "temperature": temperature,
        "val_ece_uncalibrated": val_ece,
        "val_ece": val_ece_cal,
        "dataset_uri": dataset_uri,
        "mlflow_run_id": run_id,
        **registered,
    }
    return result
