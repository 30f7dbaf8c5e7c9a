"""Training throughput: a plain PyTorch loop versus lensmill's Ray Train + Ray Data loop.

In one run, on one config and one dataset (the one ``cfg`` describes; rendered first if missing):

(a) baseline: the train split loaded into this process's memory, then a plain single-process loop
    with the platform's model (``LensClassifier``: same architecture, asinh + standardisation from
    the same ``norm_stats``), optimizer (AdamW, cosine LR), batch size, torch threads, dihedral
    augmentation and loss. No Ray, no validation, no checkpoints.
(b) platform: ``lensmill.train.fit`` on the same dataset (Ray Train workers fed by Ray Data, a
    checkpoint and validation every epoch), into a temporary storage root and MLflow store. Its
    default data path is used (for a split that fits in memory: streamed through Ray Data in the
    first epoch and kept decoded in the worker, see ``lensmill.train``); the same run with the
    cache switched off is reported as ``platform_streaming_images_per_s``.

Timed, identically in both: the training pass of each epoch, from asking for the first batch to the
last optimizer step (data loading, augmentation, forward, backward, step). Validation and
checkpointing fall outside it, in (b) as well. Steady state: epoch 0 (warm-up: allocator, oneDNN
kernels, Ray Data start-up, cache filling) is excluded, and images/s is the total images over the
total time of epochs 1..E-1. The baseline runs first and again last, around the platform runs:
``baseline_images_per_s`` is their combined rate (total images / total seconds), so a machine
whose speed drifts during the run (other load, disk writeback) moves both sides of the ratio alike;
``baseline_drift`` (last / first - 1) says how far it drifted, and with it how far to trust the ratio.
Ray must be initialised by the caller (the CLI does it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import torch

from lensmill.bench import machine, today, versions
from lensmill.config import Config
from lensmill.shards import dataset_uri_for, load_split, write_shards
from lensmill.train import Normalisation, fit, fits_in_memory, norm_stats, train_step

log = logging.getLogger(__name__)

# Epoch 0 is warm-up in both loops; at least this many epochs are run so one is timed.
_MIN_EPOCHS = 2


def _steady(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """Images/s over epochs 1.. (epoch 0 is warm-up), from per-epoch images and seconds."""
    timed = [e for e in epochs if e["epoch"] >= 1]
    images = sum(e["images"] for e in timed)
    seconds = sum(e["seconds"] for e in timed)
    return {
        "images_per_s": images / seconds if seconds else float("nan"),
        "timed_epochs": [e["epoch"] for e in timed],
        "timed_images": images,
        "timed_seconds": round(seconds, 3),
        "per_epoch_images_per_s": [round(e["images"] / e["seconds"], 1) for e in epochs],
    }


def run_baseline(
    cfg: Config,
    images: np.ndarray,
    labels: np.ndarray,
    norm: Normalisation,
    epochs: int,
    threads: int,
) -> list[dict[str, Any]]:
    """The plain loop over in-memory (N, C, H, W) images; per epoch: images trained and seconds."""
    t = cfg.train
    device = torch.device("cuda" if t.use_gpu else "cpu")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(t.seed)
        model = norm.classifier(t.model).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        x_all = torch.from_numpy(images)  # (N, C, H, W) float32
        y_all = torch.as_tensor(labels, dtype=torch.float32)  # (N,)
        generator = torch.Generator().manual_seed(t.seed * 1000)
        out = []
        for epoch in range(epochs):
            model.train()
            t0, seen = time.perf_counter(), 0
            order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(t.seed + 7919 * epoch))
            for s in range(0, len(order), t.batch_size):
                idx = order[s : s + t.batch_size]
                if len(idx) < 2:  # as the platform: BatchNorm cannot train on one image
                    continue
                g = generator if t.augment else None
                train_step(
                    model, optimizer, x_all[idx], y_all[idx], device, g, t.augment_strength, t.label_smoothing
                )
                seen += len(idx)
            scheduler.step()
            out.append({"epoch": epoch, "images": seen, "seconds": time.perf_counter() - t0})
            log.info("baseline epoch %d: %.1f images/s", epoch, seen / out[-1]["seconds"])
        return out
    finally:
        torch.set_num_threads(old_threads)


def bench_config(cfg: Config, root: str, dataset_uri: str, epochs: int) -> Config:
    """The run's config with a throwaway storage root and MLflow store, and no fault drill, early
    stopping or retries (they would change what is timed)."""
    tree = cfg.model_dump(mode="json")
    tree["name"] = "bench"
    tree["storage"]["root"] = root
    tree["dataset_uri"] = dataset_uri
    tree["tracking"]["tracking_uri"] = None  # a sqlite store under the temporary root
    tree["train"].update(
        epochs=epochs, early_stopping_patience=None, fail_at_epoch=None, max_failures=0, keep_checkpoints=1
    )
    return Config.model_validate(tree)


def _platform(cfg: Config, cache_in_memory: bool | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary = fit(cfg, run_name=f"bench-{uuid.uuid4().hex[:8]}", cache_in_memory=cache_in_memory)
    wall = time.perf_counter() - t0
    epochs = [
        {"epoch": h["epoch"], "images": h["train_images"], "seconds": h["train_seconds"]}
        for h in summary.history
    ]
    return {
        **_steady(epochs),
        "fit_wall_s": round(wall, 1),
        "data_from_cache": [bool(h.get("data_from_cache")) for h in summary.history],
    }


def run_train_bench(cfg: Config) -> dict[str, Any]:
    """Baseline (plain PyTorch) and platform (Ray Train + Ray Data) images/s in one run; JSON-ready.

    ``ratio = platform_images_per_s / baseline_images_per_s`` (goal on CPU: >= 0.90), the baseline
    being the two baseline runs (before and after the platform's) together.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("run_train_bench needs a running Ray: call ray.init() (or use lensmill's CLI)")
    t = cfg.train
    epochs = max(t.epochs, _MIN_EPOCHS)
    threads = t.torch_threads or max(1, int(t.cpus_per_worker))
    load_before = os.getloadavg()
    manifest = write_shards(cfg)  # the dataset cfg describes; kept as is when already complete
    dataset_uri = dataset_uri_for(cfg)
    images, labels, _ = load_split(dataset_uri, "train", cfg.storage)
    shape = tuple(int(s) for s in images.shape[1:])
    norm = norm_stats(dataset_uri, cfg, shape)

    log.info("bench train: baseline, %d epochs of %d images", epochs, len(labels))
    baseline = _steady(run_baseline(cfg, images, labels, norm, epochs, threads * t.num_workers))

    with tempfile.TemporaryDirectory(prefix="lensmill-bench-train-") as root:
        bench_cfg = bench_config(cfg, root, dataset_uri, epochs)
        log.info("bench train: platform (default data path)")
        platform = _platform(bench_cfg, None)
        log.info("bench train: platform with Ray Data streaming every epoch")
        streaming = _platform(bench_cfg, False)

    # The baseline again: if the machine's speed drifted (other load), the two baselines disagree.
    log.info("bench train: baseline again (drift check)")
    baseline_after = _steady(run_baseline(cfg, images, labels, norm, epochs, threads * t.num_workers))
    both = [baseline, baseline_after]
    base_rate = sum(b["timed_images"] for b in both) / sum(b["timed_seconds"] for b in both)
    return {
        "bench": "train",
        "baseline_images_per_s": round(base_rate, 1),
        "platform_images_per_s": round(platform["images_per_s"], 1),
        "ratio": round(platform["images_per_s"] / base_rate, 3),
        "baseline_before_images_per_s": round(baseline["images_per_s"], 1),
        "baseline_after_images_per_s": round(baseline_after["images_per_s"], 1),
        "baseline_drift": round(baseline_after["images_per_s"] / baseline["images_per_s"] - 1.0, 3),
        "platform_streaming_images_per_s": round(streaming["images_per_s"], 1),
        "streaming_ratio": round(streaming["images_per_s"] / base_rate, 3),
        "platform_cache_in_memory": fits_in_memory(bench_cfg, manifest),
        "model": t.model,
        "batch_size": t.batch_size,
        "image_shape": list(shape),
        "n_train": int(len(labels)),
        "epochs": epochs,
        "timed": "training pass of epochs 1..E-1 (epoch 0 = warm-up excluded); validation and "
        "checkpoints outside the timer in both",
        "num_workers": t.num_workers,
        "cpus_per_worker": t.cpus_per_worker,
        "torch_threads_per_worker": threads,
        "baseline_torch_threads": threads * t.num_workers,
        "augment": t.augment,
        "baseline": baseline,
        "baseline_after": baseline_after,
        "platform": platform,
        "platform_streaming": streaming,
        "date": today(),
        # load_avg_1min far above the worker's CPUs: other work shared the cores, figures are uneven.
        "machine": {
            **machine(),
            "load_avg_1min_start": round(load_before[0], 2),
            "ray_cpus": ray.cluster_resources().get("CPU"),
        },
        "versions": versions(),
    }
