"""Ray Train: one architecture, DDP over N workers, shards streamed from Ray Data.

``fit(cfg)`` runs a ``TorchTrainer`` whose workers run ``train_fn_per_worker``: a checkpoint every
epoch under ``{storage.root}/runs/{run_name}``, the best K kept by validation AUC (plus the latest,
which resume needs), metrics to MLflow from rank 0, optional early stopping on validation AUC.
Rerunning the same config (same run name) resumes from the last checkpoint; a finished run returns
its recorded summary without training again. A worker group that fails is restarted by Ray Train
(``train.max_failures``) and resumes from the last checkpoint; each epoch's history entry says which
attempt ran it and which checkpoint that attempt resumed from (``attempts.json`` lists the attempts).

Data path: every epoch streams the worker's shard through Ray Data, unless the shard is small enough
to keep in memory (``TRAIN_CACHE_MAX_BYTES``): then the first epoch streams it once, keeping the
decoded tensors, and later epochs shuffle and slice those in the worker with no Ray Data work at all.
On a 2-core machine that removes the per-epoch read/shuffle/collate tasks that competed with the
training threads.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from lensmill import tracking
from lensmill.config import Config, StorageConfig, TrainConfig
from lensmill.layout import (
    ATTEMPTS_FILE,
    CHECKPOINT_PREFIX,
    MEMBER_FILE,
    METRICS_FILE,
    RUN_INFO_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    checkpoint_dir_name,
    run_name_for,
    run_uri_for,
    runs_uri,
)
from lensmill.metrics import CLASS_NAMES, roc_auc, tpr_at_max_fp
from lensmill.models import LensClassifier, class_logits, load_state, read_state_dict, save_classifier
from lensmill.records import DatasetManifest, RunInfo, RunSummary, read_record, write_record
from lensmill.shards import dataset_uri_for, decode_images, read_manifest, read_shards
from lensmill.storage import (
    StorageError,
    download_dir,
    is_s3,
    join_uri,
    list_files,
    locate,
    read_json,
    write_json,
)

log = logging.getLogger(__name__)
Scheduler = torch.optim.lr_scheduler.LRScheduler
NORM_SAMPLE_ROWS = 4096
# A worker keeps its decoded train + val shards in memory when they take at most this many bytes.
TRAIN_CACHE_MAX_BYTES = 4 * 2**30


class ImageCollate(NumpyBatchCollateFn):
    """Decode the binary ``image`` column straight into a (N, C, H, W) float32 tensor."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = decode_images(batch["image"], self.shape)
        return {
            "image": torch.from_numpy(images),
            "label": torch.as_tensor(batch["label"], dtype=torch.int64),  # class indices
        }


class ShardBatches:
    """One worker's shard of a split as (images (B, C, H, W), labels (B,)) batches.

    Streams from Ray Data (``iter_torch_batches``, a local shuffle buffer when shuffling). With
    ``cache`` the first complete pass also keeps the decoded tensors; every later pass is a seeded
    permutation (or plain slices) of those, in this process. The cache holds the rows this worker
    received on its first pass, so each rank then trains on a fixed partition (as with PyTorch's
    DistributedSampler without reshuffling across ranks). Callers must not modify batches in place.
    """

    def __init__(
        self,
        shard: Any,
        shape: tuple[int, int, int],
        batch_size: int,
        cache: bool,
        shuffle_buffer_rows: int | None = None,
        seed: int = 0,
    ) -> None:
        self.shard = shard
        self.collate = ImageCollate(shape)
        self.batch_size = batch_size
        self.cache = cache
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.seed = seed
        self.images: torch.Tensor | None = None  # (N, C, H, W) once cached
        self.labels: torch.Tensor | None = None  # (N,)

    @property
    def cached(self) -> bool:
        return self.images is not None

    def epoch(self, epoch: int, shuffle: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        if self.images is not None and self.labels is not None:
            n = len(self.labels)
            if not shuffle:
                for s in range(0, n, bs):
                    yield self.images[s : s + bs], self.labels[s : s + bs]
                return
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 7919 * epoch))
            for s in range(0, n, bs):
                idx = order[s : s + bs]
                yield self.images[idx], self.labels[idx]
            return
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in self.shard.iter_torch_batches(
            batch_size=bs,
            collate_fn=self.collate,
            local_shuffle_buffer_size=self.shuffle_buffer_rows if shuffle else None,
            local_shuffle_seed=self.seed + 7919 * epoch if shuffle else None,
            prefetch_batches=2,
        ):
            if self.cache:
                kept.append((batch["image"], batch["label"]))
            yield batch["image"], batch["label"]
        if self.cache and kept:  # only a complete pass becomes the cache
            self.images = torch.cat([x for x, _ in kept])
            self.labels = torch.cat([y for _, y in kept])


def dihedral_augment(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random flip + 90-degree rotation per image: lensing is invariant to the dihedral group D4.

    ``strength``: the share of images transformed (the rest keep their orientation); at 1 every image
    gets a uniformly drawn element of D4 (identity included).
    """
    n = x.shape[0]
    k = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    if strength < 1.0:
        keep = torch.rand(n, generator=generator) >= strength
        k, flip = k.masked_fill(keep, 0), flip & ~keep
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    out = x.clone()
    for r in range(1, 4):
        idx = (k == r).nonzero(as_tuple=True)[0].to(x.device)
        if idx.numel():
            out[idx] = torch.rot90(x[idx], r, dims=(-2, -1))
    return out


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    generator: torch.Generator | None,
    augment_strength: float = 1.0,
    label_smoothing: float = 0.0,
    objective: str = "classify",
    reconstruction_weight: float = 1.0,
) -> float:
    """One optimizer step on a batch: (B, C, H, W) images, (B,) class indices; the batch's mean loss.

    ``objective`` (``train.objective``): classify, the cross-entropy of the (B, K) class logits
    (``models.class_logits``; a binary model's one logit z is [0, z], so this is the binary
    cross-entropy of z); reconstruct, the mean squared error between the decoder's image and the
    normalised input (labels unused); multitask, cross-entropy + ``reconstruction_weight`` x that.
    ``generator``: dihedral augmentation with it (None = none) of ``augment_strength`` of the images.
    ``label_smoothing`` s: targets (1 - s) onehot + s / K (for two classes y (1 - s) + s / 2). bf16
    autocast on CUDA; the loss and its gradient in float32. Reading the loss back is a device sync
    on GPU, once per step.
    """
    if generator is not None and augment_strength > 0:
        x = dihedral_augment(x, generator, augment_strength)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = _objective_loss(model, x, y, objective, reconstruction_weight, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def _objective_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, objective: str, weight: float, smoothing: float
) -> torch.Tensor:
    """The training loss of one batch for ``train.objective`` (float32)."""
    if objective == "classify":
        return torch.nn.functional.cross_entropy(class_logits(model(x)).float(), y, label_smoothing=smoothing)
    logits, target, recon = model(x, reconstruct=True)  # through DDP's forward: gradients sync
    mse = torch.nn.functional.mse_loss(recon.float(), target.float())
    if objective == "reconstruct":
        return mse
    ce = torch.nn.functional.cross_entropy(class_logits(logits).float(), y, label_smoothing=smoothing)
    return ce + weight * mse


def _gather(arr: np.ndarray) -> np.ndarray:
    """Concatenate a per-rank array across the DDP group (validation shards are split)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return arr
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, arr)
    return np.concatenate(parts)


def _validate(
    model: torch.nn.Module, data: ShardBatches, device: torch.device, objective: str = "classify"
) -> dict[str, float]:
    """Validation metrics over the whole split (gathered from every rank: identical on all ranks).

    ``val_auc`` is the ROC AUC (two classes) or the macro one-vs-rest ROC AUC (more); an objective
    that reconstructs adds ``val_recon_mse``. ``val_score`` is what checkpoints and early stopping
    rank by: ``val_auc``, or ``-val_recon_mse`` for pure reconstruction.
    """
    model.eval()
    probs, labels, sq_err, values = [], [], 0.0, 0
    with torch.inference_mode():
        for x, y in data.epoch(0, shuffle=False):
            x = x.to(device)
            if objective == "classify":
                out = model(x)
            else:
                out, target, recon = model(x, reconstruct=True)
                sq_err += float(((recon.float() - target.float()) ** 2).sum())
                values += target.numel()
            logits = class_logits(out).float()  # (B, K)
            probs.append(torch.softmax(logits, dim=1).double().cpu().numpy())
            labels.append(y.numpy())
    n_cls = getattr(model, "module", model).num_classes
    p = _gather(np.concatenate(probs) if probs else np.zeros((0, n_cls)))  # (N, K)
    y = _gather(np.concatenate(labels) if labels else np.zeros(0, np.int64)).astype(np.int64)
    if not len(y):
        return {"val_auc": math.nan, "val_loss": math.nan, "val_accuracy": math.nan, "val_tpr10": math.nan,
                "val_score": math.nan}  # fmt: skip
    eps = 1e-7
    binary = p.shape[1] == 2
    metrics = {
        "val_auc": roc_auc(y, p),
        "val_loss": float(-np.mean(np.log(p[np.arange(len(y)), y] + eps))),
        "val_accuracy": float(np.mean(p.argmax(axis=1) == y)),
        # Lenses found before the tenth false positive: what a survey search lives on.
        "val_tpr10": tpr_at_max_fp(y, p[:, 1], 9) if binary and len(np.unique(y)) == 2 else math.nan,
    }
    if objective != "classify":
        totals = _gather(np.array([sq_err, values], np.float64)).reshape(-1, 2).sum(axis=0)
        metrics["val_recon_mse"] = float(totals[0] / max(totals[1], 1.0))
    metrics["val_score"] = -metrics["val_recon_mse"] if objective == "reconstruct" else metrics["val_auc"]
    return metrics


def score_of(metrics: dict[str, Any]) -> float:
    """What a run's epochs are ranked by (``val_score``; ``val_auc`` in runs recorded before it), NaN
    counted as the worst."""
    value = metrics.get("val_score", metrics.get("val_auc"))
    return -math.inf if value is None or math.isnan(value) else float(value)


def should_stop_early(history: list[dict[str, Any]], patience: int | None) -> bool:
    """True when the validation score (``score_of``: the AUC, or the reconstruction error for an
    autoencoder) has not improved for ``patience`` epochs (ties are no improvement; NaN counts as
    the worst). Depends only on the history, so a resumed run decides the same."""
    if patience is None or not history:
        return False
    best = int(np.argmax([score_of(h) for h in history]))  # the first of equal maxima
    return len(history) - 1 - best >= patience


def plan_attempt(
    previous: list[dict[str, Any]], fail_at_epoch: int | None, start_epoch: int, resumed_from: int | None
) -> dict[str, Any]:
    """This start of the training function, given the earlier ones of the same run.

    The fault drill (``fail_at_epoch``) is planned at most once per run: by the first attempt that
    will reach that epoch. Deciding from the recorded attempts (not from "is there a checkpoint")
    also holds for ``fail_at_epoch=0``, where the restart has no checkpoint either.
    """
    drilled = any(a.get("inject_failure_at") is not None for a in previous)
    inject = (
        fail_at_epoch if fail_at_epoch is not None and not drilled and start_epoch <= fail_at_epoch else None
    )
    return {
        "attempt": len(previous),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "start_epoch": start_epoch,
        "resumed_from_epoch": resumed_from,
        "inject_failure_at": inject,
    }


def _record_attempt(
    run_uri: str,
    storage: StorageConfig,
    fail_at_epoch: int | None,
    start_epoch: int,
    resumed_from: int | None,
) -> dict[str, Any]:
    """Rank 0: append this attempt to ``attempts.json`` in the run folder; returns its entry."""
    uri = join_uri(run_uri, ATTEMPTS_FILE)
    try:
        previous = read_json(uri, storage)
    except StorageError:
        previous = []
    entry = plan_attempt(previous, fail_at_epoch, start_epoch, resumed_from)
    # Where rank 0 ran: after a lost node (a spot reclaim) the next attempt names another one.
    entry["node_id"] = ray.get_runtime_context().get_node_id()
    write_json(uri, [*previous, entry], storage)
    return entry


@dataclass(frozen=True)
class Normalisation:
    """Per-channel input normalisation from the training split, stored with the model: (C,) each."""

    scale: tuple[float, ...] | None  # noise scale of the asinh stretch; None: linear (no stretch)
    mean: tuple[float, ...]  # of the (stretched) pixels
    std: tuple[float, ...]

    def as_params(self) -> dict[str, Any]:
        return {
            "norm_stretch": "asinh" if self.scale is not None else "linear",
            "norm_scale": list(self.scale) if self.scale is not None else None,
            "norm_mean": list(self.mean),
            "norm_std": list(self.std),
        }

    def classifier(
        self, model_name: str, input_size_px: int | None = None, classes: tuple[str, ...] = CLASS_NAMES
    ) -> LensClassifier:
        scale = list(self.scale) if self.scale is not None else None
        return LensClassifier(
            model_name, len(self.mean), list(self.mean), list(self.std), scale, input_size_px, classes
        )


# ``stretch: auto`` takes asinh when at least this share of the sampled training pixels is negative:
# sky-subtracted images have about half their sky pixels below zero, display-stretched ones none.
NEGATIVE_PIXEL_SHARE = 0.01


@dataclass(frozen=True)
class WorkerPlan:
    """What a training worker gets: the config, plus only what the driver derived from the data."""

    cfg: Config
    run_uri: str
    image_shape: tuple[int, int, int]
    norm: Normalisation
    cache_in_memory: bool
    mlflow_run_id: str | None
    classes: tuple[str, ...] = CLASS_NAMES  # the dataset's, in label order
    # train.pretrained_uri's weights, read once by the driver (a path, storage URI or registered
    # encoder) and handed to the workers through the object store: no shared disk needed.
    pretrained: Any = None  # ray.ObjectRef of a state_dict, or None

    @property
    def shuffle_buffer_rows(self) -> int:
        return max(4 * self.cfg.train.batch_size, 1024)


@dataclass(frozen=True)
class Resumed:
    """Where this start of the worker picks up: the epoch to run next and the history so far."""

    start_epoch: int = 0
    history: tuple[dict[str, Any], ...] = ()
    from_epoch: int | None = None  # the checkpoint's epoch; None for a fresh start


def _build(
    plan: WorkerPlan,
) -> tuple[LensClassifier, torch.optim.Optimizer, Scheduler]:
    """Model, AdamW and the cosine schedule, seeded alike on every rank (DDP also broadcasts rank 0's
    weights)."""
    t = plan.cfg.train
    # Ray sets OMP_NUM_THREADS to the worker's CPU reservation (1 when fractional): be explicit.
    torch.set_num_threads(t.torch_threads or max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)
    model = plan.norm.classifier(t.model, t.input_size_px, plan.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    return model, optimizer, scheduler


def _restore(
    model: LensClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    plan: WorkerPlan,
) -> Resumed:
    """Load the latest checkpoint when Ray Train hands one (a restart or a rerun), else the
    pretrained weights when configured; returns where training resumes."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
            # The weights live once per checkpoint, in the member file (state.pt: optimizer & co).
            weights = torch.load(Path(d) / MEMBER_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(weights["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return Resumed(state["epoch"] + 1, tuple(state["history"]), state["epoch"])
    if plan.pretrained is not None:
        load_state(model.backbone, ray.get(plan.pretrained), str(plan.cfg.train.pretrained_uri))
    return Resumed()


def _worker_data(plan: WorkerPlan, rank: int) -> tuple[ShardBatches, ShardBatches]:
    """This rank's train and validation shards as batches (cached in memory when planned)."""
    import ray.train

    t = plan.cfg.train
    train = ShardBatches(
        ray.train.get_dataset_shard("train"), plan.image_shape, t.batch_size, plan.cache_in_memory,
        plan.shuffle_buffer_rows, seed=t.seed + rank,
    )  # fmt: skip
    val = ShardBatches(
        ray.train.get_dataset_shard("val"), plan.image_shape, t.batch_size, plan.cache_in_memory
    )
    return train, val


def _train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ShardBatches,
    epoch: int,
    device: torch.device,
    generator: torch.Generator | None,
    world: int,
    t: TrainConfig,
) -> dict[str, Any]:
    """One pass over this rank's training shard; the epoch's loss and throughput (all ranks)."""
    model.train()
    from_cache = data.cached  # False for the epoch that streams (and fills the cache)
    t0, seen, loss_sum = time.perf_counter(), 0, 0.0
    for x, y in data.epoch(epoch, shuffle=True):
        if len(y) < 2:
            # BatchNorm cannot train on one image; ranks hold equal row counts (Ray Train splits
            # datasets with equal=True), so every rank skips the same step.
            continue
        loss = train_step(
            model, optimizer, x, y, device, generator, t.augment_strength, t.label_smoothing, t.objective,
            t.reconstruction_weight,
        )  # fmt: skip
        seen += len(y)
        loss_sum += loss * len(y)
    train_s = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_images": seen * world,
        "train_seconds": train_s,
        "train_images_per_s": seen * world / max(train_s, 1e-9),
        "data_from_cache": from_cache,
    }


def _checkpoint_and_report(
    plan: WorkerPlan,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    """Every rank reports the epoch; rank 0 attaches the checkpoint (weights, optimizer state, the
    metrics) and logs the metrics to MLflow."""
    import ray.train

    epoch = metrics["epoch"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            inner = getattr(model, "module", model)
            save_classifier(inner, Path(tmp) / MEMBER_FILE, {"epoch": epoch, "val_auc": metrics["val_auc"]})
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "history": history,
            }
            torch.save(state, Path(tmp) / STATE_FILE)
            (Path(tmp) / METRICS_FILE).write_text(json.dumps({"metrics": metrics, "history": history}))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
            if plan.mlflow_run_id:
                tracking.log_metrics(plan.cfg, plan.mlflow_run_id, metrics, step=epoch)
        # None ("not resumed") stays in the history; Ray's and Tune's loggers get numbers only.
        reported = {k: v for k, v in metrics.items() if v is not None}
        ray.train.report(reported, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(epoch))


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train V2): ``config["plan"]`` is a ``WorkerPlan``. Build, resume,
    record the attempt, then per epoch: train, validate, decide on early stopping, checkpoint, report.

    Every rank calls ``ray.train.report`` once per epoch and stops at the same epoch (early stopping
    decides on gathered, hence identical, validation metrics): DDP collectives stay matched.
    """
    import ray.train
    import ray.train.torch
    from ray.train.collective import broadcast_from_rank_zero

    plan: WorkerPlan = config["plan"]
    t = plan.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, optimizer, scheduler = _build(plan)
    resumed = _restore(model, optimizer, scheduler, plan)
    # Rank 0 records the attempt; the broadcast hands every rank the same plan (and is a barrier).
    attempt = broadcast_from_rank_zero(
        _record_attempt(
            plan.run_uri, plan.cfg.storage, t.fail_at_epoch, resumed.start_epoch, resumed.from_epoch
        )
        if rank == 0
        else None
    )
    history = list(resumed.history)
    if history and (resumed.start_epoch >= t.epochs or history[-1]["early_stop"]):
        # Nothing left to train: the previous attempt (a driver killed after the last checkpoint)
        # ended the run. Report its last epoch again, without a checkpoint, so that Tune and the
        # caller still get the run's metrics; every rank reports, as in the loop.
        ray.train.report({k: v for k, v in history[-1].items() if v is not None})
        return
    # Pure reconstruction leaves the class head without gradients: DDP must be told.
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": t.objective == "reconstruct"}
    )
    device = ray.train.torch.get_device()
    generator = torch.Generator().manual_seed(t.seed * 1000 + rank) if t.augment else None
    train_data, val_data = _worker_data(plan, rank)
    for epoch in range(resumed.start_epoch, t.epochs):
        if attempt["inject_failure_at"] == epoch:
            raise RuntimeError(f"injected failure at epoch {epoch} (train.fail_at_epoch), rank {rank}")
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "attempt": attempt["attempt"],
            "resumed_from_epoch": resumed.from_epoch,
            **_train_epoch(model, optimizer, train_data, epoch, device, generator, world, t),
        }
        scheduler.step()
        metrics |= {"lr": scheduler.get_last_lr()[0], **_validate(model, val_data, device, t.objective)}
        metrics["early_stop"] = should_stop_early([*history, metrics], t.early_stopping_patience)
        history.append(metrics)
        _checkpoint_and_report(plan, rank, model, optimizer, scheduler, metrics, history)
        if metrics["early_stop"]:
            break


def norm_stats(dataset_uri: str, cfg: Config, shape: tuple[int, int, int]) -> Normalisation:
    """Per-channel normalisation from a sample of training blocks (random block order, seeded).

    With the asinh stretch (``train.stretch``; ``auto`` picks it for sky-subtracted pixels, see
    ``NEGATIVE_PIXEL_SHARE``): the noise scale (1.4826 x median absolute deviation: most pixels are
    sky), then the mean and std of the stretched pixels. Linear: the mean and std of the pixels."""
    ds = read_shards(dataset_uri, "train", cfg.storage).randomize_block_order(seed=cfg.train.seed)
    batches = ds.limit(NORM_SAMPLE_ROWS).iter_batches(batch_size=1024, batch_format="numpy")
    x = np.concatenate([decode_images(b["image"], shape) for b in batches])  # (N, C, H, W)
    per_chan = x.transpose(1, 0, 2, 3).reshape(shape[0], -1).astype(np.float64)  # (C, N*H*W)
    return normalisation_of(per_chan, cfg.train.stretch)


def normalisation_of(per_chan: np.ndarray, stretch: str) -> Normalisation:
    """``Normalisation`` of (C, P) sampled pixels for a ``train.stretch`` setting."""
    if stretch == "auto":
        stretch = "asinh" if np.mean(per_chan < 0) >= NEGATIVE_PIXEL_SHARE else "linear"
        log.info("train.stretch auto: %s (%.1f%% of sampled pixels negative)", stretch,
                 100 * np.mean(per_chan < 0))  # fmt: skip
    scale = None
    if stretch == "asinh":
        med = np.median(per_chan, axis=1, keepdims=True)
        scale = np.maximum(1.4826 * np.median(np.abs(per_chan - med), axis=1), 1e-12)
        per_chan = np.arcsinh(per_chan / scale[:, None])
    return Normalisation(
        scale=tuple(scale.tolist()) if scale is not None else None,
        mean=tuple(per_chan.mean(axis=1).tolist()),
        std=tuple(np.maximum(per_chan.std(axis=1), 1e-6).tolist()),
    )


def dataset_classes(manifest: DatasetManifest) -> tuple[str, ...]:
    """A dataset's class names in label order (lens finding's two when its manifest names none)."""
    return tuple(manifest.class_names)


def fits_in_memory(cfg: Config, manifest: DatasetManifest) -> bool:
    """Whether each worker's train + val shards, decoded, fit under ``TRAIN_CACHE_MAX_BYTES``."""
    image_bytes = 4 * int(np.prod(manifest.image_shape))
    rows = sum(manifest.splits[s].rows for s in ("train", "val"))
    return math.ceil(rows / cfg.train.num_workers) * image_bytes <= TRAIN_CACHE_MAX_BYTES


def fit(
    cfg: Config,
    run_name: str | None = None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
    cache_in_memory: bool | None = None,
) -> RunSummary:
    """Train ``cfg.train.model`` on the dataset ``cfg`` describes; returns the run's summary.

    ``cache_in_memory``: keep each worker's decoded shards in memory after the first epoch; None
    decides by size (``fits_in_memory``).
    """
    run_name = run_name or run_name_for(cfg)
    run_uri = run_uri_for(cfg, run_name)
    finished = read_summary(cfg, run_name)
    if finished is not None:  # finished before: nothing to do
        return finished

    dataset_uri = dataset_uri_for(cfg)
    manifest = read_manifest(dataset_uri, cfg.storage)
    shape = manifest.image_shape
    norm = norm_stats(dataset_uri, cfg, shape)
    if cache_in_memory is None:
        cache_in_memory = fits_in_memory(cfg, manifest)
    params = {**norm.as_params(), "cache_in_memory": cache_in_memory}
    with tracking.run(cfg, run_name, "train", manifest.dataset_id, params) as run_id:
        if parent_run_id:
            tracking.client(cfg).set_tag(run_id, "mlflow.parentRunId", parent_run_id)
        t = cfg.train
        info = RunInfo(
            run_name=run_name, model=t.model, lr=t.lr, dataset_uri=dataset_uri,
            dataset_id=manifest.dataset_id, mlflow_run_id=run_id, image_shape=shape, in_chans=shape[0],
            pretrained_uri=t.pretrained_uri, cache_in_memory=cache_in_memory, objective=t.objective,
        )  # fmt: skip
        write_record(join_uri(run_uri, RUN_INFO_FILE), info, cfg.storage)
        pretrained = ray.put(read_pretrained(cfg)) if t.pretrained_uri else None
        plan = WorkerPlan(
            cfg, run_uri, shape, norm, cache_in_memory, run_id, dataset_classes(manifest), pretrained
        )
        _trainer(plan, run_name, dataset_uri, callbacks).fit()
        summary = summarize_run(cfg, run_name)
        if t.objective != "classify":
            summary = _register_encoder(cfg, summary)
        return summary


def read_pretrained(cfg: Config) -> dict[str, torch.Tensor]:
    """``train.pretrained_uri``'s state_dict: a local path, a storage URI or a registered encoder
    (``models:/<name>/<version>`` or ``@<alias>``, fetched from the MLflow registry)."""
    uri = str(cfg.train.pretrained_uri)
    if not uri.startswith("models:/"):
        return read_state_dict(uri, cfg.storage)
    with tempfile.TemporaryDirectory() as tmp:
        return read_state_dict(tracking.download_encoder(cfg, uri, Path(tmp)))


def _register_encoder(cfg: Config, summary: RunSummary) -> RunSummary:
    """Register the best checkpoint's encoder of a reconstruct / multitask run in MLflow
    (``tracking.encoder_model``); the summary records its ``models:/`` URI."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        if is_s3(summary.checkpoint_uri):
            local = download_dir(summary.checkpoint_uri, local, cfg.storage)
        else:
            local = Path(summary.checkpoint_uri)
        best = summary.at_best_epoch("val_recon_mse")
        description = (
            f"Encoder of run {summary.run_name} ({summary.model}, train.objective {cfg.train.objective}) on "
            f"dataset {summary.dataset_id}: best epoch {summary.best_epoch}, validation reconstruction MSE "
            f"{best:.4g}" + (f", ROC AUC {summary.val_auc:.4f}." if not math.isnan(summary.val_auc) else ".")
        )
        tags = {
            "dataset_id": summary.dataset_id,
            "run_name": summary.run_name,
            "objective": cfg.train.objective,
        }
        got = tracking.register_encoder(
            cfg, summary.mlflow_run_id, local / summary.member_file, description, tags
        )
    log.info("encoder of %s registered as %s", summary.run_name, got["version_uri"])
    summary = summary.model_copy(update={"encoder_uri": got["version_uri"]})
    write_record(join_uri(run_uri_for(cfg, summary.run_name), SUMMARY_FILE), summary, cfg.storage)
    return summary


def _trainer(plan: WorkerPlan, run_name: str, dataset_uri: str, callbacks: list | None) -> Any:
    """The ``TorchTrainer`` of one run: workers, checkpoints under the runs folder, the two splits."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, t = plan.cfg, plan.cfg.train
    runs = locate(runs_uri(cfg), cfg.storage)
    resources = {**t.resources_per_worker, "CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    # Only the two columns training reads: Ray Data pushes the projection down into the Parquet scan.
    columns = ["image", "label"]
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        # NCCL between GPU workers, gloo between CPU workers.
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=runs.path,
            storage_filesystem=runs.filesystem if is_s3(runs.uri) else None,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute="val_score",
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
        ),
        datasets={
            # Block order from train.seed (the same in every epoch; the seeded local shuffle varies
            # the order within each epoch), and blocks delivered in that order (``preserve_order``):
            # a rerun of the same config sees the same batches (one worker; several workers share
            # the blocks out dynamically).
            "train": read_shards(dataset_uri, "train", cfg.storage)
            .select_columns(columns)
            .randomize_block_order(seed=t.seed),
            "val": read_shards(dataset_uri, "val", cfg.storage).select_columns(columns),
        },
        dataset_config=DataConfig(execution_options=_ordered_ingest()),
    )


def _ordered_ingest() -> Any:
    """Ray Train's default ingest options, with blocks kept in dataset order."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()  # a fresh object each call
    options.preserve_order = True
    return options


def read_run_info(cfg: Config, run_name: str) -> RunInfo:
    """What the run was started with; ``StorageError`` when it never started."""
    return read_record(join_uri(run_uri_for(cfg, run_name), RUN_INFO_FILE), RunInfo, cfg.storage)


def read_summary(cfg: Config, run_name: str) -> RunSummary | None:
    """The summary of a finished run, or None when the run has not finished (or never started)."""
    try:
        return read_record(join_uri(run_uri_for(cfg, run_name), SUMMARY_FILE), RunSummary, cfg.storage)
    except StorageError:
        return None


def summarize_run(cfg: Config, run_name: str, stopped_early: bool = False) -> RunSummary:
    """The run's summary, rebuilt from what is in storage alone (so it also works for a trial that
    Tune stopped mid-run); written next to the checkpoints and logged to the run's MLflow record
    (which the caller ends: ``fit``'s ``tracking.run``, or ``tracking.ending`` for a stopped trial).

    ``stopped_early``: Tune's scheduler stopped the run; it counts only when epochs were left.
    ``stop_reason`` tells that apart from early stopping on validation AUC
    (``train.early_stopping_patience``).
    """
    run_uri = run_uri_for(cfg, run_name)
    info = read_run_info(cfg, run_name)
    reports = [
        (uri.rsplit("/", 2)[-2], read_json(uri, cfg.storage))
        for uri in list_files(run_uri, cfg.storage)
        if uri.endswith(f"/{METRICS_FILE}") and uri.rsplit("/", 2)[-2].startswith(CHECKPOINT_PREFIX)
    ]
    if not reports:
        raise RuntimeError(f"run {run_name} has no checkpoint under {run_uri}")
    try:
        attempts = read_json(join_uri(run_uri, ATTEMPTS_FILE), cfg.storage)
    except StorageError:
        attempts = []

    best_dir, best = max(reports, key=lambda r: score_of(r[1]["metrics"]))
    # Ray Train always keeps the latest checkpoint (besides the best K): its history is complete.
    latest = max(reports, key=lambda r: r[1]["metrics"]["epoch"])[1]
    patience_stop = bool(latest["metrics"].get("early_stop"))
    epochs_run = len(latest["history"])
    # ASHA also "stops" a trial right after its last epoch at the top rung: not an early stop.
    scheduler_stop = stopped_early and not patience_stop and epochs_run < cfg.train.epochs
    summary = RunSummary(
        **info.model_dump(),
        val_auc=best["metrics"]["val_auc"],
        best_epoch=best["metrics"]["epoch"],
        epochs_run=epochs_run,
        stopped_early=scheduler_stop or patience_stop,
        stop_reason="early_stopping" if patience_stop else ("scheduler" if scheduler_stop else None),
        attempts=len(attempts),
        checkpoint_uri=join_uri(run_uri, best_dir),
        member_file=MEMBER_FILE,
        history=tuple(latest["history"]),
    )
    run_id = info.mlflow_run_id
    tracking.log_metrics(
        cfg,
        run_id,
        {"best_val_auc": summary.val_auc, "best_epoch": summary.best_epoch, "attempts": summary.attempts},
    )
    tracking.log_dict(cfg, run_id, latest["history"], "history.json")
    if summary.stop_reason:
        tracking.client(cfg).set_tag(run_id, "lensmill.stopped_early", summary.stop_reason)
    write_record(join_uri(run_uri, SUMMARY_FILE), summary, cfg.storage)
    return summary
