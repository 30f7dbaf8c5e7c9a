"""Representation probes: a trained encoder, frozen, under a linear classifier and a regression head.

``probe_encoder(cfg, source)`` reads an encoder (``models:/<name>/<version>`` as a reconstruct or
multitask run registers it, ``run:<run name>``, or a member file), computes its pooled features
(N, F) on the train and test splits of ``cfg``'s dataset once, and fits with scikit-learn on the
train features:

- a linear probe: multinomial logistic regression on standardised features; its test class
  probabilities are scored like an ensemble's (``evaluate.class_evaluation``: accuracy, macro ROC
  AUC, per-class AUCs, bootstrap intervals);
- a regression head per target column (default the Einstein radius and, where the dataset has it,
  the subhalo mass fraction): ridge regression with its penalty chosen by cross-validation on the
  train features; test RMSE (with a bootstrap interval), MAE and R², on the rows where the target
  applies (finite).

The encoder is never trained here, so the figures say what its features hold. A PNG of predicted
against true values and the figures go to an MLflow run (``lensmill probe``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensmill import plots, tracking
from lensmill.config import Config
from lensmill.errors import ConfigError
from lensmill.evaluate import class_evaluation
from lensmill.layout import stage_run_name
from lensmill.models import LensClassifier, load_classifier
from lensmill.shards import dataset_uri_for, load_split, read_manifest
from lensmill.storage import download_dir, is_s3
from lensmill.train import read_summary

log = logging.getLogger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = ("theta_e_arcsec", "subhalo_mass_fraction")


def encoder_file(cfg: Config, source: str, dst: Path) -> Path:
    """The local member file of an encoder: ``models:/`` (the registry), ``run:<run name>`` (its
    best checkpoint) or a path."""
    if source.startswith("models:/"):
        return tracking.download_encoder(cfg, source, dst)
    if source.startswith("run:"):
        summary = read_summary(cfg, source[len("run:") :])
        if summary is None:
            raise ConfigError(
                f"no finished run {source[len('run:') :]!r}: the run name `lensmill train` prints"
            )
        folder = summary.checkpoint_uri
        local = download_dir(folder, dst, cfg.storage) if is_s3(folder) else Path(folder)
        return local / summary.member_file
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"encoder {source!r}: not a models:/ URI, run:<name> or an existing file")
    return path


def encoder_features(model: LensClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, F) float64 pooled encoder features of raw images (N, C, H, W), in batches."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32))
            out.append(model.features(x).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def linear_probe(
    train: tuple[np.ndarray, np.ndarray], test_features: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Test class probabilities (N, C) of a logistic regression on standardised train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = train
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(x, y)
    return probe.predict_proba(test_features)


def regression_head(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Ridge regression (penalty by cross-validation) of one target on features: the test RMSE with
    a 95% bootstrap interval, MAE, R², the rows used and the test predictions (for the plot)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import mean_absolute_error, r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x, y), (xt, yt) = train, test
    keep, keep_t = np.isfinite(y), np.isfinite(yt)
    if keep.sum() < 10 or keep_t.sum() < 2:
        raise ConfigError(f"too few rows with the target ({int(keep.sum())} train, {int(keep_t.sum())} test)")
    head = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    head.fit(x[keep], y[keep])
    pred, truth = head.predict(xt[keep_t]), yt[keep_t]
    err2 = (pred - truth) ** 2
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, err2.size, size=(n_boot, err2.size))
    boot = np.sqrt(err2[idx].mean(axis=1))
    return {
        "rmse": float(np.sqrt(err2.mean())),
        "rmse_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "mae": float(mean_absolute_error(truth, pred)),
        "r2": float(r2_score(truth, pred)),
        "target_std": float(truth.std()),
        "n_train": int(keep.sum()),
        "n_test": int(keep_t.sum()),
        "predictions": (truth, pred),
    }


def probe_encoder(
    cfg: Config, source: str, targets: tuple[str, ...] = DEFAULT_TARGETS, mlflow: bool = True
) -> dict[str, Any]:
    """Linear probe and regression heads on a frozen encoder (see the module docstring)."""
    dataset_uri = dataset_uri_for(cfg)
    manifest = read_manifest(dataset_uri, cfg.storage)
    with tempfile.TemporaryDirectory() as tmp:
        model, meta = load_classifier(encoder_file(cfg, source, Path(tmp)))
    splits = {}
    for split in ("train", "test"):
        images, labels, params = load_split(dataset_uri, split, cfg.storage)
        log.info("probe: %s features of %d %s images", model.model_name, len(labels), split)
        splits[split] = (encoder_features(model, images), labels, params)
    (x, y, params), (xt, yt, params_t) = splits["train"], splits["test"]
    probs = linear_probe((x, y), xt, seed=cfg.evaluate.seed)
    classification = class_evaluation(yt, probs, model.classes, cfg.evaluate)
    regression = {}
    for target in targets:
        if params is None or target not in params.column_names:
            log.info("probe: the dataset has no column %s: no regression head for it", target)
            continue
        column = params.column(target).to_numpy(zero_copy_only=False).astype(np.float64)
        column_t = params_t.column(target).to_numpy(zero_copy_only=False).astype(np.float64)
        regression[target] = regression_head((x, column), (xt, column_t), seed=cfg.evaluate.seed)
    result = {
        "encoder": source,
        "model": model.model_name,
        "features": int(x.shape[1]),
        "dataset_id": manifest.dataset_id,
        "classes": list(model.classes),
        "linear_probe": {
            k: classification[k] for k in ("accuracy", "accuracy_ci95", "macro_roc_auc", "macro_roc_auc_ci95")
        }
        | {"per_class_roc_auc": {c: v["roc_auc"] for c, v in classification["per_class"].items()}},
        "regression": {t: {k: v for k, v in r.items() if k != "predictions"} for t, r in regression.items()},
    }
    if mlflow:
        _log(cfg, result, regression, manifest.dataset_id)
    return result


def _log(cfg: Config, result: dict[str, Any], regression: dict[str, Any], dataset_id: str) -> None:
    """The probe's figures and its regression plot in an MLflow run."""
    params = {"encoder": result["encoder"], "model": result["model"]}
    with tracking.run(cfg, stage_run_name(cfg, "probe"), "probe", dataset_id, params) as run_id:
        lp = result["linear_probe"]
        metrics = {"probe_accuracy": lp["accuracy"], "probe_macro_roc_auc": lp["macro_roc_auc"]}
        for target, r in result["regression"].items():
            metrics |= {f"{target}_rmse": r["rmse"], f"{target}_r2": r["r2"], f"{target}_mae": r["mae"]}
        tracking.log_metrics(cfg, run_id, metrics)
        tracking.log_dict(cfg, run_id, result, "probe.json")
        if regression:
            with tempfile.TemporaryDirectory() as tmp:
                path = plots.plot_regression(
                    {t: r["predictions"] for t, r in regression.items()}, Path(tmp) / "regression.png",
                    title=f"Regression heads on {result['model']} features (test split)",
                )  # fmt: skip
                tracking.log_artifacts(cfg, run_id, [path], "probe")
        result["mlflow_run_id"] = run_id
