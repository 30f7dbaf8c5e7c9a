"""Batch scoring with Ray Data: the champion ensemble over every image of a dataset split.

The same ``EnsemblePredictor`` that serves HTTP requests runs here in an actor pool (each actor loads
the model once), streaming shards in and writing one Parquet row per image out: ``row_id``, the true
``label`` when the dataset has one, ``p_lens``, ``predicted_label``, the members' spread and each
member's probability.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lensmill.catalog import score_columns
from lensmill.config import Config
from lensmill.layout import predictions_uri
from lensmill.runtime import actor_pool_options
from lensmill.shards import dataset_uri_for, decode_images, read_manifest, read_shards
from lensmill.storage import is_s3, locate
from lensmill.tracking import load_ensemble

KEEP_COLUMNS = ("row_id", "split", "label", "theta_e_arcsec", "arc_snr")


class EnsembleScorer:
    """A Ray Data callable class: loads the ensemble once per actor, scores (N, C, H, W) batches."""

    def __init__(self, config: dict[str, Any], model_dir: str | None, image_shape: list[int]) -> None:
        import torch

        cfg = Config.model_validate(config)
        torch.set_num_threads(cfg.scoring.threads)  # Ray sets OMP_NUM_THREADS=1 for a fractional CPU
        self._tmp = tempfile.TemporaryDirectory(prefix="lensmill-scorer-")  # the champion's files
        on_gpu = cfg.scoring.gpus_per_actor > 0
        self.predictor = load_ensemble(cfg, Path(self._tmp.name), model_dir).predictor.to(
            "cuda" if on_gpu else "cpu"
        )
        self.shape = tuple(image_shape)
        if tuple(self.predictor.image_shape) != self.shape:
            raise ValueError(f"model takes images {self.predictor.image_shape}, dataset has {self.shape}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.predictor
        out = p.predict(decode_images(batch["image"], self.shape))
        scored = {k: batch[k] for k in KEEP_COLUMNS if k in batch}
        scored |= {"predicted_label": out["label"], "spread": out["spread"]}
        # Member names may hold ':' or '@': columns are indexed (``catalog.score_columns``).
        class_columns, member_columns = score_columns(p.classes, p.member_names)
        first = len(p.classes) - len(class_columns)  # lens finding shows p(lens) only
        scored |= {c: out["probs"][:, first + k] for k, c in enumerate(class_columns)}
        flat = out["member_class_probs"][:, :, first:].reshape(len(out["label"]), -1)  # member-major
        scored |= {c: flat[:, k] for k, c in enumerate(member_columns)}
        return scored


def score_dataset(
    cfg: Config,
    split: str = "test",
    dataset_uri: str | None = None,
    out_uri: str | None = None,
    model_dir: Path | None = None,
) -> dict[str, Any]:
    """Score one split with the champion (or ``model_dir``); Parquet predictions under ``out_uri``."""
    sc = cfg.scoring
    dataset_uri = dataset_uri or dataset_uri_for(cfg)
    manifest = read_manifest(dataset_uri, cfg.storage)
    out_uri = out_uri or predictions_uri(cfg, manifest.dataset_id, split)
    scored = read_shards(dataset_uri, split, cfg.storage).map_batches(
        EnsembleScorer,
        fn_constructor_kwargs={
            "config": cfg.model_dump(mode="json"),
            "model_dir": str(model_dir.resolve()) if model_dir else None,
            "image_shape": list(manifest.image_shape),
        },
        batch_size=sc.batch_size,
        **actor_pool_options(sc),
        num_gpus=sc.gpus_per_actor,
    )
    out = locate(out_uri, cfg.storage)
    scored.write_parquet(out.path, filesystem=out.filesystem if is_s3(out.uri) else None, mode="overwrite")
    table = _read_predictions(out_uri, cfg)
    predicted = table.column("predicted_label").to_numpy()
    summary = {"dataset_uri": dataset_uri, "split": split, "out_uri": out_uri, "rows": table.num_rows}
    if "p_lens" not in table.column_names:  # C classes: how many of each were predicted
        classes = [
            c.removeprefix("p_") for c in table.column_names if c.startswith("p_") and "member" not in c
        ]
        return summary | {
            "predicted_per_class": {c: int((predicted == k).sum()) for k, c in enumerate(classes)}
        }
    p = table.column("p_lens").to_numpy()
    return summary | {
        "predicted_lenses": int((predicted == 1).sum()),
        "p_lens_quantiles": dict(
            zip(["p05", "p50", "p95"], np.quantile(p, [0.05, 0.5, 0.95]).tolist(), strict=True)
        ),
    }


def _read_predictions(out_uri: str, cfg: Config):  # -> pyarrow.Table
    import pyarrow.parquet as pq

    loc = locate(out_uri, cfg.storage)
    return pq.read_table(loc.path, filesystem=loc.filesystem)
