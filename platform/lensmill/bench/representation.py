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
from lensmill.errors import ConfigError
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
    """The comparison as the README's Markdown table: each figure with its 95% bootstrap interval, or
    over several seeds their mean ± standard deviation."""

    def ci(figures: dict[str, Any], key: str) -> str:
        value, bounds = figures[key], figures[f"{key}_ci95"]
        if len(figures.get(f"{key}_per_seed", ())) > 1:  # a mean over seeds: its spread, not one interval
            return f"{value:.3f} ± {figures[f'{key}_sd']:.3f}"
        return f"{value:.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds[0] is not None else f"{value:.3f}"

    def rmse(row: dict[str, Any], target: str) -> str:
        r = row["regression"].get(target)
        return ci(r, "rmse") if r else "n/a"

    lines = [
        "| model | accuracy | macro ROC AUC | θE RMSE [arcsec] | subhalo mass fraction RMSE |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {ci(r, 'accuracy')} | {ci(r, 'macro_roc_auc')} | "
            f"{rmse(r, 'theta_e_arcsec')} | {rmse(r, 'subhalo_mass_fraction')} |"
        )
    return "\n".join(lines) + "\n"


def plan_rows(names: list[str] | None) -> list[str]:
    """The rows to train, in the table's order (default all); the fine-tuned encoder needs the
    autoencoder's row. Unknown names are refused with the known ones."""
    if not names:
        return list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ConfigError(f"--row: unknown row(s) {unknown}; rows are {list(ROWS)}")
    if "fine-tuned encoder" in names and "autoencoder + linear probe" not in names:
        raise ConfigError(
            "--row 'fine-tuned encoder' starts from the autoencoder's encoder: "
            "add --row 'autoencoder + linear probe'"
        )
    return [n for n in ROWS if n in names]


def _seed_mean(key: str, values: list[float]) -> dict[str, Any]:
    """A figure's mean over seeds, its per-seed values and their standard deviation (0 for one seed)."""
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {key: float(np.mean(values)), f"{key}_per_seed": values, f"{key}_sd": sd}


def mean_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per name over the seeds' runs (each a list of rows): the mean of each figure, the
    per-seed values beside it, and the spread (standard deviation over seeds; 0 for one seed). The
    intervals kept are the first seed's (a bootstrap interval does not average)."""
    means = []
    for first in runs[0]:
        same = [next(r for r in run if r["name"] == first["name"]) for run in runs]
        row = {**first, "seeds": [r["seed"] for r in same]}
        for key in ("accuracy", "macro_roc_auc"):
            row.update(_seed_mean(key, [r[key] for r in same]))
        for target in first["regression"]:
            values = [r["regression"][target]["rmse"] for r in same]
            row["regression"] = {**row["regression"], target: {**first["regression"][target],
                                 **_seed_mean("rmse", values)}}  # fmt: skip
        means.append(row)
    return means


def run_representation_bench(cfg: Config, rows: list[str] | None = None, seeds: int = 1) -> dict[str, Any]:
    """Simulate ``cfg``'s dataset when missing, train the networks of ``rows`` (default all four) with
    ``seeds`` seeds each (``train.seed`` + 0, 1, ...: initialisation and data order), score them on
    test (see the module docstring); JSON-ready, with the Markdown table of the means over seeds.
    Needs Ray (the CLI starts it)."""
    names = plan_rows(rows)
    write_shards(cfg)
    dataset_uri = dataset_uri_for(cfg)
    manifest = read_manifest(dataset_uri, cfg.storage)
    data = {s: load_split(dataset_uri, s, cfg.storage) for s in ("train", "test")}
    runs = []
    for k in range(seeds):
        seeded = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": cfg.train.seed + k})})
        summaries: dict[str, Any] = {}
        for name in names:
            model, objective, from_encoder = ROWS[name]
            pretrained = summaries["autoencoder + linear probe"].encoder_uri if from_encoder else None
            log.info("bench representation: %s (%s, objective %s), seed %d", name, model, objective,
                     seeded.train.seed)  # fmt: skip
            summaries[name] = _train(seeded, model, objective, pretrained)
        runs.append([
            _row(name, summaries[name], seeded, data, probe=ROWS[name][1] == "reconstruct")
            | {"seed": seeded.train.seed}
            for name in names
        ])  # fmt: skip
    table = mean_rows(runs)
    by = {r["name"]: r for r in table}
    gap = None
    if {"multi-task", "supervised"} <= set(by):
        gap = {key: [round(m - s, 4) for m, s in zip(by["multi-task"][f"{key}_per_seed"],
                                                      by["supervised"][f"{key}_per_seed"], strict=True)]
               for key in ("macro_roc_auc", "accuracy")}  # fmt: skip
    return {
        "bench": "representation",
        "dataset_id": manifest.dataset_id,
        "classes": list(getattr(manifest, "classes", None) or ()),
        "splits": manifest.splits,
        "epochs": cfg.train.epochs,
        "seeds": seeds,
        "reconstruction_weight": cfg.train.reconstruction_weight,
        "rows": table,
        "runs": runs,
        # multi-task minus supervised, per seed (paired: same seed, same data order), and the mean.
        "multitask_minus_supervised": gap,
        "multitask_minus_supervised_macro_auc": round(float(np.mean(gap["macro_roc_auc"])), 4)
        if gap
        else None,
        "markdown": representation_markdown(table),
        "machine": machine(),
        "versions": versions(),
        "date": today(),
    }
