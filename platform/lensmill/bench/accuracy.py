"""Accuracy on a foreign set: lensmill's default pipeline against a plain PyTorch loop, same files.

In one run, on one folder of labelled cutouts (default: ``bench.foreign``'s 2,000 8-bit PNGs,
written first):

(a) ``lensmill import`` of the folder (the splits both sides use);
(b) baseline: what a newcomer writes first. torchvision's ResNet-18 (first conv for the file's
    channels, one logit), pixels / 255 standardised by the train split's mean and std, Adam at
    1e-3, batch 64, random flips, ``epochs`` epochs on the train split, scored on the test split
    after the last epoch;
(c) platform: the default pipeline's tune (its default grid of architectures, ``epochs`` epochs
    each), ensemble (weights, temperature and threshold on validation) and evaluate stages, into a
    temporary storage root and MLflow store; the champion scored on the same test split.

Reported: test ROC AUC (with a bootstrap interval) and accuracy for both, and the difference. A
quality benchmark: no timing is compared.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from lensmill import tracking
from lensmill.bench import machine, today, versions
from lensmill.config import Config
from lensmill.metrics import bootstrap_intervals, tpr_at_max_fp
from lensmill.shards import load_split

log = logging.getLogger(__name__)


def run_plain_loop(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], epochs: int, seed: int = 0
) -> np.ndarray:
    """The baseline's test probabilities (N,): a plain ResNet-18 loop, images (N, C, H, W) 0-255."""
    import torchvision
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_train, y_train = train
    mean, std = float((x_train / 255).mean()), float((x_train / 255).std())

    def prepare(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x / 255 - mean) / std).astype(np.float32))

    model = torchvision.models.resnet18(num_classes=1)
    model.conv1 = nn.Conv2d(x_train.shape[1], 64, kernel_size=7, stride=2, padding=3, bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    xs, ys = prepare(x_train), torch.from_numpy(y_train.astype(np.float32))
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(ys))
        total = 0.0
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            xb = xs[idx]
            if rng.uniform() < 0.5:
                xb = xb.flip(-1)
            if rng.uniform() < 0.5:
                xb = xb.flip(-2)
            opt.zero_grad()
            loss = loss_fn(model(xb).squeeze(-1), ys[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        log.info("plain loop epoch %d: loss %.4f", epoch, total / len(ys))
    model.eval()
    with torch.inference_mode():
        logits = torch.cat(
            [model(prepare(test[0][i : i + 256])).squeeze(-1) for i in range(0, len(test[0]), 256)]
        )
    return torch.sigmoid(logits.double()).numpy()


def _figures(labels: np.ndarray, p: np.ndarray, threshold: float, seed: int) -> dict[str, Any]:
    boot = bootstrap_intervals(labels, p, threshold, n_samples=1000, seed=seed)
    return {
        "test_roc_auc": round(float(roc_auc_score(labels, p)), 4),
        "test_roc_auc_ci95": [round(boot["roc_auc"]["low"], 4), round(boot["roc_auc"]["high"], 4)],
        "test_tpr10": round(tpr_at_max_fp(labels, p, 9), 4),  # as evaluate: < 10 false positives
        "test_accuracy": round(float(np.mean((p >= threshold) == labels)), 4),
        "threshold": threshold,
    }


def _platform_side(cfg: Config, root: str, dataset_uri: str, test, epochs: int) -> dict[str, Any]:
    """The default pipeline (tune, ensemble, evaluate) into its own storage root and MLflow store;
    the champion's figures on the test arrays (p >= 0.5 like the baseline, and its own threshold)."""
    from lensmill.bench.train import bench_config
    from lensmill.ensemble import build_ensemble
    from lensmill.evaluate import evaluate
    from lensmill.tune import tune_architectures

    bench = bench_config(cfg, root, dataset_uri, epochs)
    log.info(
        "bench accuracy: the default pipeline (tune %s, ensemble, evaluate), train.seed %d",
        list(bench.tune.models), bench.train.seed,
    )  # fmt: skip
    tuned = tune_architectures(bench)
    ens = build_ensemble(bench)
    ev = evaluate(bench)
    with tempfile.TemporaryDirectory() as dl:
        predictor = tracking.load_ensemble(bench, Path(dl)).predictor
        p_lens = predictor.predict(test[0])["p_lens"]
    return _figures(test[1], p_lens, 0.5, cfg.evaluate.seed) | {
        "seed": bench.train.seed,
        "test_accuracy_at_threshold": round(float(np.mean((p_lens >= predictor.threshold) == test[1])), 4),
        "threshold_from_validation": predictor.threshold,
        "evaluate_roc_auc": round(float(ev["metrics"]["roc_auc"]), 4),
        "members": [mb["name"] for mb in ens["members"]],
        "weights": ens["ensemble_weights"],
        "trials": [
            {"model": t.model, "val_auc": t.summary.val_auc if t.summary else None} for t in tuned.trials
        ],
    }


def _side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    aucs = [r["test_roc_auc"] for r in runs]
    return {"mean_test_roc_auc": round(float(np.mean(aucs)), 4), "test_roc_auc": aucs, "runs": runs}


def run_accuracy_bench(
    cfg: Config, input_dir: Path | None = None, n_images: int = 2000, epochs: int = 10, seeds: int = 1
) -> dict[str, Any]:
    """Baseline and platform test figures on one foreign set, JSON-ready; with ``seeds`` > 1 each
    side runs that many times (``train.seed`` + 0, 1, ...: initialisation and data order), since at
    10 epochs on ~2,000 cutouts one run's AUC moves by several hundredths with the seed alone.
    Needs Ray (the CLI starts it)."""
    from lensmill.bench.foreign import write_foreign_set
    from lensmill.importer import import_cutouts

    with tempfile.TemporaryDirectory(prefix="lensmill-bench-accuracy-") as root:
        src = input_dir
        if src is None:
            src = Path(root) / "foreign"
            log.info("bench accuracy: writing %d foreign-style 8-bit PNG cutouts to %s", n_images, src)
            write_foreign_set(src, n_images, seed=cfg.sim.seed)
        dataset_uri, manifest = import_cutouts(src, None, cfg.storage.model_copy(update={"root": root}))
        train, test = (load_split(dataset_uri, s, cfg.storage)[:2] for s in ("train", "test"))
        baseline, platform = [], []
        for k in range(seeds):
            seed = cfg.train.seed + k
            log.info(
                "bench accuracy: plain loop, %d epochs on %d images, seed %d", epochs, len(train[1]), seed
            )
            p = run_plain_loop(train, test, epochs, seed)
            baseline.append(_figures(test[1], p, 0.5, cfg.evaluate.seed) | {"seed": seed})
            seeded = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
            platform.append(_platform_side(seeded, f"{root}/seed-{seed}", dataset_uri, test, epochs))
    base, plat = _side(baseline), _side(platform)
    return {
        "bench": "accuracy",
        "dataset": {"source": str(input_dir or "lensmill.bench.foreign"), "images": manifest.total_rows,
                    "image_shape": list(manifest.image_shape), "splits": manifest.splits},
        "epochs": epochs,
        "seeds": seeds,
        "baseline": base,
        "platform": plat,
        "auc_difference": round(plat["mean_test_roc_auc"] - base["mean_test_roc_auc"], 4),
        "machine": machine(),
        "versions": versions(),
        "date": today(),
    }  # fmt: skip
