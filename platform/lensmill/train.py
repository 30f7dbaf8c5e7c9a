"""Ray Train: one architecture, DDP over N workers, shards streamed from Ray Data.

``fit(cfg)`` runs a ``TorchTrainer`` whose workers run ``train_fn_per_worker``: a checkpoint every
epoch under ``{storage.root}/runs/{run_name}``, the best K kept by validation AUC, metrics to MLflow
from rank 0. Rerunning the same config (same run name) resumes from the last checkpoint; a finished
run returns its recorded summary without training again.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from lensmill import tracking
from lensmill.config import Config
from lensmill.models import LensClassifier, save_classifier
from lensmill.shards import dataset_uri_for, decode_images, read_manifest, read_shards
from lensmill.storage import (
    StorageError,
    absolute_uri,
    is_s3,
    join_uri,
    list_files,
    locate,
    read_json,
    write_json,
)

MEMBER_FILE = "model.pt"
STATE_FILE = "state.pt"
SUMMARY_FILE = "lensmill_result.json"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.json"
NORM_SAMPLE_ROWS = 4096


class ImageCollate(NumpyBatchCollateFn):
    """Decode the binary ``image`` column straight into a (N, C, H, W) float32 tensor."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = decode_images(batch["image"], self.shape)
        return {
            "image": torch.from_numpy(images),
            "label": torch.as_tensor(batch["label"], dtype=torch.float32),
        }


def dihedral_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip + 90-degree rotation per image: lensing is invariant to the dihedral group D4."""
    n = x.shape[0]
    k = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    out = x.clone()
    for r in range(1, 4):
        idx = (k == r).nonzero(as_tuple=True)[0].to(x.device)
        if idx.numel():
            out[idx] = torch.rot90(x[idx], r, dims=(-2, -1))
    return out


def _roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")


def _gather(arr: np.ndarray) -> np.ndarray:
    """Concatenate a per-rank array across the DDP group (validation shards are split)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return arr
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, arr)
    return np.concatenate(parts)


def _validate(model: torch.nn.Module, it, collate: ImageCollate, batch_size: int, device) -> dict[str, float]:
    model.eval()
    probs, labels = [], []
    with torch.inference_mode():
        for batch in it.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
            logits = model(batch["image"].to(device)).float()
            probs.append(torch.sigmoid(logits).cpu().numpy())
            labels.append(batch["label"].numpy())
    p = _gather(np.concatenate(probs) if probs else np.zeros(0, np.float32))
    y = _gather(np.concatenate(labels) if labels else np.zeros(0, np.float32))
    eps = 1e-7
    loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))) if len(y) else float("nan")
    return {"val_auc": _roc_auc(y, p), "val_loss": loss, "val_accuracy": float(np.mean((p >= 0.5) == y))}


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train V2): resume, train, validate, checkpoint, report, every epoch."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # Ray sets OMP_NUM_THREADS to the worker's CPU reservation (1 when fractional): be explicit.
    torch.set_num_threads(config["torch_threads"] or max(1, int(config["cpus_per_worker"])))
    torch.manual_seed(config["seed"])  # same init on every rank (DDP also broadcasts rank 0's weights)
    shape = tuple(config["image_shape"])
    model = LensClassifier(
        config["model"], shape[0], config["norm_mean"], config["norm_std"], config["norm_scale"]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"])
    start_epoch, history = 0, []

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]

    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    use_bf16 = device.type == "cuda"
    generator = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    collate = ImageCollate(shape)
    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val")
    bce = torch.nn.BCEWithLogitsLoss()

    for epoch in range(start_epoch, config["epochs"]):
        if config.get("fail_at_epoch") == epoch and not checkpoint:
            raise RuntimeError(f"injected failure at epoch {epoch} (fail_at_epoch)")
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        batches = train_it.iter_torch_batches(
            batch_size=config["batch_size"],
            collate_fn=collate,
            local_shuffle_buffer_size=config["shuffle_buffer_rows"],
            local_shuffle_seed=config["seed"] + 7919 * epoch + rank,
            prefetch_batches=2,
        )
        for batch in batches:
            x, y = batch["image"], batch["label"]
            if config["augment"]:
                x = dihedral_augment(x, generator)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(x)
            loss = bce(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
            loss_sum += float(loss) * len(y)
        scheduler.step()
        train_s = time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_images_per_s": seen * ctx.get_world_size() / max(train_s, 1e-9),
            "lr": scheduler.get_last_lr()[0],
            **_validate(model, val_it, collate, config["batch_size"], device),
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                inner = getattr(model, "module", model)
                save_classifier(
                    inner, Path(tmp) / MEMBER_FILE, {"epoch": epoch, "val_auc": metrics["val_auc"]}
                )
                state = {
                    "model": inner.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "history": history,
                }
                torch.save(state, Path(tmp) / STATE_FILE)
                (Path(tmp) / METRICS_FILE).write_text(json.dumps({"metrics": metrics, "history": history}))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                if config.get("mlflow_run_id"):
                    cfg = Config.model_validate(config["cfg"])
                    tracking.log_metrics(cfg, config["mlflow_run_id"], metrics, step=epoch)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:04d}")


def norm_stats(dataset_uri: str, cfg: Config, shape: tuple[int, int, int]) -> dict[str, list[float]]:
    """Per-channel normalisation from a sample of training blocks (random block order, seeded):
    the noise scale (1.4826 x median absolute deviation: most pixels are sky) for the asinh stretch,
    then the mean and std of the stretched pixels."""
    ds = read_shards(dataset_uri, "train", cfg.storage).randomize_block_order(seed=cfg.train.seed)
    batches = ds.limit(NORM_SAMPLE_ROWS).iter_batches(batch_size=1024, batch_format="numpy")
    x = np.concatenate([decode_images(b["image"], shape) for b in batches])  # (N, C, H, W)
    per_chan = x.transpose(1, 0, 2, 3).reshape(shape[0], -1).astype(np.float64)  # (C, N*H*W)
    med = np.median(per_chan, axis=1, keepdims=True)
    scale = np.maximum(1.4826 * np.median(np.abs(per_chan - med), axis=1), 1e-12)
    stretched = np.arcsinh(per_chan / scale[:, None])
    return {
        "norm_scale": scale.tolist(),
        "norm_mean": stretched.mean(axis=1).tolist(),
        "norm_std": np.maximum(stretched.std(axis=1), 1e-6).tolist(),
    }


def run_name_for(cfg: Config) -> str:
    model = cfg.train.model.replace("timm:", "timm-").replace("/", "-")
    return f"{cfg.name}-{model}-lr{cfg.train.lr:g}-{cfg.hash()[:8]}"


def runs_uri(cfg: Config) -> str:
    return join_uri(absolute_uri(cfg.storage.root), "runs")


def fit(
    cfg: Config, run_name: str | None = None, callbacks: list | None = None, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Train ``cfg.train.model`` on the dataset ``cfg`` describes; returns the run's summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_name = run_name or run_name_for(cfg)
    summary_uri = join_uri(runs_uri(cfg), run_name, SUMMARY_FILE)
    try:
        return read_json(summary_uri, cfg.storage)  # finished before: nothing to do
    except StorageError:
        pass

    dataset_uri = dataset_uri_for(cfg)
    manifest = read_manifest(dataset_uri, cfg.storage)
    shape = tuple(manifest["image_shape"])
    norm = norm_stats(dataset_uri, cfg, shape)
    run_id = tracking.start_run(cfg, run_name, "train", manifest["dataset_id"], params=norm)
    if parent_run_id:
        tracking.client(cfg).set_tag(run_id, "mlflow.parentRunId", parent_run_id)
    t = cfg.train
    use_gpu = _gpus_available() if t.use_gpu is None else t.use_gpu
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "model": t.model,
        "image_shape": list(shape),
        **norm,
        "epochs": t.epochs,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "batch_size": t.batch_size,
        "augment": t.augment,
        "seed": t.seed,
        "torch_threads": t.torch_threads,
        "cpus_per_worker": t.cpus_per_worker,
        "shuffle_buffer_rows": max(4 * t.batch_size, 1024),
        "mlflow_run_id": run_id,
        "fail_at_epoch": t.fail_at_epoch,
    }
    write_json(
        join_uri(runs_uri(cfg), run_name, RUN_INFO_FILE),
        {"run_name": run_name, "model": t.model, "lr": t.lr, "dataset_uri": dataset_uri,
         "dataset_id": manifest["dataset_id"], "mlflow_run_id": run_id, "image_shape": list(shape),
         "in_chans": shape[0]},
        cfg.storage,
    )  # fmt: skip
    runs = locate(runs_uri(cfg), cfg.storage)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=runs.path,
            storage_filesystem=runs.filesystem if is_s3(runs.uri) else None,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute="val_auc",
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
        ),
        datasets={
            "train": read_shards(dataset_uri, "train", cfg.storage).randomize_block_order(),
            "val": read_shards(dataset_uri, "val", cfg.storage),
        },
    )
    try:
        trainer.fit()
    except Exception:
        tracking.end_run(cfg, run_id, ok=False)
        raise
    return summarize_run(cfg, run_name)


def summarize_run(cfg: Config, run_name: str, stopped_early: bool = False) -> dict[str, Any]:
    """The run's summary, rebuilt from what is in storage alone (so it also works for a trial that
    Tune stopped mid-run); written next to the checkpoints and closing the run's MLflow record."""
    run_uri = join_uri(runs_uri(cfg), run_name)
    info = read_json(join_uri(run_uri, RUN_INFO_FILE), cfg.storage)
    reports = [
        (uri.rsplit("/", 2)[-2], read_json(uri, cfg.storage))
        for uri in list_files(run_uri, cfg.storage)
        if uri.endswith(f"/{METRICS_FILE}") and uri.rsplit("/", 2)[-2].startswith("epoch-")
    ]
    if not reports:
        raise RuntimeError(f"run {run_name} has no checkpoint under {run_uri}")

    def score(r: tuple[str, dict]) -> float:
        auc = r[1]["metrics"]["val_auc"]
        return -math.inf if math.isnan(auc) else auc

    best_dir, best = max(reports, key=score)
    latest = max(reports, key=lambda r: r[1]["metrics"]["epoch"])[1]
    summary = {
        **info,
        "val_auc": best["metrics"]["val_auc"],
        "best_epoch": best["metrics"]["epoch"],
        "epochs_run": len(latest["history"]),
        "stopped_early": stopped_early,
        "checkpoint_uri": join_uri(run_uri, best_dir),
        "member_file": MEMBER_FILE,
        "history": latest["history"],
    }
    run_id = info["mlflow_run_id"]
    tracking.log_metrics(
        cfg, run_id, {"best_val_auc": summary["val_auc"], "best_epoch": summary["best_epoch"]}
    )
    tracking.log_dict(cfg, run_id, latest["history"], "history.json")
    if stopped_early:
        tracking.client(cfg).set_tag(run_id, "lensmill.stopped_early", "true")
    tracking.end_run(cfg, run_id)
    write_json(join_uri(run_uri, SUMMARY_FILE), summary, cfg.storage)
    return summary


def _gpus_available() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
