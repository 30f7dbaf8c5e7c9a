"""Representation learning compared on one run: the DeepLense foundation-model recipe on lensmill.

On ``cfg``'s dataset (the ``substructure`` preset: no_sub / cdm / vortex), in one run, with the same
epochs and seed for every network, each trained by ``train.fit`` (Ray Train, MLflow):

1. **autoencoder + linear probe**: ``resnet18_ae`` trained on reconstruction only (labels unused),
   its encoder registered in MLflow; a logistic regression on its frozen pooled features;
2. **supervised**: ``resnet18`` on the class labels (the baseline);
3. **multi-task**: ``resnet18_ae`` on cross-entropy + ``reconstruction_weight`` x reconstruction,
   one shared encoder; registered too;
4. **fine-tuned encoder**: ``resnet18`` started from the autoencoder's registered encoder
   (``train.pretrained_uri=models:/...``) and trained on the labels.

Rows 2-4 are scored as a one-member ensemble on the test split (calibration-free probabilities);
row 1 by its probe. Every row: accuracy and macro ROC AUC with bootstrap intervals, and the RMSE of a
ridge regression head on the network's frozen features for the Einstein radius and the subhalo
mass fraction (``representation.regression_head``). A quality benchmark: nothing is timed against
a baseline; the supervised row is the reference.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lensmill.bench import machine, today, versions
from lensmill.config import Config
from lensmill.evaluate import class_evaluation
from lensmill.models import load_classifier
from lensmill.predict import EnsemblePredictor, Member
from lensmill.representation import (
    DEFAULT_TARGETS,
    encoder_features,
    encoder_file,
    linear_probe,
    regression_head,
)
from lensmill.shards import dataset_uri_for, load_split, read_manifest, write_shards
from lensmill.train import fit

log = logging.getLogger(__name__)

# name -> (train.model, train.objective, starts from the autoencoder's encoder)
ROWS: dict[str, tuple[str, str, bool]] = {
    "autoencoder + linear probe": ("resnet18_ae", "reconstruct", False),
    "supervised": ("resnet18", "classify", False),
    "multi-task": ("resnet18_ae", "multitask", False),
    "fine-tuned encoder": ("resnet18", "classify", True),
}


def _train(cfg: Config, model: str, objective: str, pretrained: str | None) -> Any:
    train = cfg.train.model_copy(
        update={"model": model, "objective": objective, "pretrained_uri": pretrained}
    )
    return fit(cfg.model_copy(update={"train": train}))


def _row(
    name: str, summary: Any, cfg: Config, data: dict[str, tuple[np.ndarray, np.ndarray, Any]], probe: bool
) -> dict[str, Any]:
    """One row of the table from a finished run: classification figures on test (its own head, or a
    linear probe on its frozen features) and the regression heads' errors."""
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_classifier(encoder_file(cfg, f"run:{summary.run_name}", Path(tmp)))
    (x_train, y_train, p_train), (x_test, y_test, p_test) = data["train"], data["test"]
    f_train, f_test = encoder_features(model, x_train), encoder_features(model, x_test)
    if probe:
        probs = linear_probe((f_train, y_train), f_test, seed=cfg.evaluate.seed)
    else:
        one = EnsemblePredictor([Member(name, model, 1.0)], x_test.shape[1:])  # as trained: T = 1
        probs = one.predict(x_test)["probs"]
    figures = class_evaluation(y_test, probs, model.classes, cfg.evaluate)
    row = {
        "name": name,
        "run_name": summary.run_name,
        "model": summary.model,
        "objective": summary.objective,
        "pretrained_uri": summary.pretrained_uri,
        "encoder_uri": summary.encoder_uri,
        "epochs_run": summary.epochs_run,
        "val_score": summary.at_best_epoch("val_score"),
        "accuracy": figures["accuracy"],
        "accuracy_ci95": figures["accuracy_ci95"],
        "macro_roc_auc": figures["macro_roc_auc"],
        "macro_roc_auc_ci95": figures["macro_roc_auc_ci95"],
        "per_class_roc_auc": {c: v["roc_auc"] for c, v in figures["per_class"].items()},
        "regression": {},
    }
    for target in DEFAULT_TARGETS:
        if p_train is not None and target in p_train.column_names:
            values = [
                p.column(target).to_numpy(zero_copy_only=False).astype(np.float64) for p in (p_train, p_test)
            ]
            r = regression_head((f_train, values[0]), (f_test, values[1]), seed=cfg.evaluate.seed)
            row["regression"][target] = {k: v for k, v in r.items() if k != "predictions"}
    return row


def representation_markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison as the README's Markdown table."""

    def ci(value: float, bounds: list[float | None]) -> str:
        return f"{value:.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds[0] is not None else f"{value:.3f}"

    def rmse(row: dict[str, Any], target: str) -> str:
        r = row["regression"].get(target)
        return ci(r["rmse"], r["rmse_ci95"]) if r else "n/a"

    lines = [
        "| model | accuracy | macro ROC AUC | θE RMSE [arcsec] | subhalo mass fraction RMSE |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {ci(r['accuracy'], r['accuracy_ci95'])} | "
            f"{ci(r['macro_roc_auc'], r['macro_roc_auc_ci95'])} | {rmse(r, 'theta_e_arcsec')} | "
            f"{rmse(r, 'subhalo_mass_fraction')} |"
        )
    return "\n".join(lines) + "\n"


def run_representation_bench(cfg: Config) -> dict[str, Any]:
    """Simulate ``cfg``'s dataset when missing, train the four networks, score them on test (see the
    module docstring); JSON-ready, with the Markdown table. Needs Ray (the CLI starts it)."""
    write_shards(cfg)
    dataset_uri = dataset_uri_for(cfg)
    manifest = read_manifest(dataset_uri, cfg.storage)
    data = {s: load_split(dataset_uri, s, cfg.storage) for s in ("train", "test")}
    summaries: dict[str, Any] = {}
    for name, (model, objective, from_encoder) in ROWS.items():
        pretrained = summaries["autoencoder + linear probe"].encoder_uri if from_encoder else None
        log.info("bench representation: %s (%s, objective %s)", name, model, objective)
        summaries[name] = _train(cfg, model, objective, pretrained)
    rows = [_row(name, summaries[name], cfg, data, probe=ROWS[name][1] == "reconstruct") for name in ROWS]
    by = {r["name"]: r for r in rows}
    return {
        "bench": "representation",
        "dataset_id": manifest.dataset_id,
        "classes": list(getattr(manifest, "classes", None) or ()),
        "splits": manifest.splits,
        "epochs": cfg.train.epochs,
        "reconstruction_weight": cfg.train.reconstruction_weight,
        "rows": rows,
        "multitask_minus_supervised_macro_auc": round(
            by["multi-task"]["macro_roc_auc"] - by["supervised"]["macro_roc_auc"], 4
        ),
        "markdown": representation_markdown(rows),
        "machine": machine(),
        "versions": versions(),
        "date": today(),
    }
