"""Ensemble members: where they come from, and their validation probabilities.

A member comes from the best trials of this config's tune results, from a named training run
(``run:<run name>``), or from a registered ensemble version (``models:/<name>/<version>`` or
``models:/<name>@<alias>``: each of its members). Each is one saved ``LensClassifier`` file, which
carries its normalisation and input scale, so members trained at different scales sit side by side.
Their probabilities on the validation split are computed once, with Ray Data batch inference: one
actor pool per member, each actor scoring at that member's own scale.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensmill import tracking
from lensmill.config import Config
from lensmill.errors import ConfigError, TrackingError
from lensmill.layout import runs_uri
from lensmill.models import load_classifier
from lensmill.predict import MANIFEST, EnsemblePredictor, Member
from lensmill.records import EnsembleManifest, RunSummary, parse_record
from lensmill.runtime import actor_pool_options
from lensmill.shards import dataset_uri_for, decode_images, read_manifest, read_shards
from lensmill.storage import download_dir, is_s3
from lensmill.train import read_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberSource:
    """One member to weigh: its saved classifier (a local file) and where it came from."""

    name: str
    file: Path
    source: str  # "run:<run name>" or "models:/<name>/<version>#<member index>"
    model: str
    lr: float | None = None
    mlflow_run_id: str | None = None
    dataset_uri: str | None = None  # the data it was trained on, when known

    def load(self) -> Member:
        """The member, ready to score, with its origin in the metadata ``ensemble.json`` keeps."""
        model, meta = load_classifier(self.file)
        meta = {k: v for k, v in meta.items() if k not in ("epoch",)}
        return Member(self.name, model, 1.0, meta | {"source": self.source, "lr": self.lr})


def _from_summary(cfg: Config, s: RunSummary, dst: Path) -> MemberSource:
    local = (
        download_dir(s.checkpoint_uri, dst, cfg.storage)
        if is_s3(s.checkpoint_uri)
        else Path(s.checkpoint_uri)
    )
    return MemberSource(
        name=f"{s.model}@lr{s.lr:g}",
        file=local / s.member_file,
        source=f"run:{s.run_name}",
        model=s.model,
        lr=s.lr,
        mlflow_run_id=s.mlflow_run_id,
        dataset_uri=s.dataset_uri,
    )


def trial_sources(cfg: Config, summaries: list[RunSummary], dst: Path) -> list[MemberSource]:
    """Members from tune trials (already chosen), their checkpoints fetched into ``dst``."""
    return [_from_summary(cfg, s, dst / f"member-{i}") for i, s in enumerate(summaries)]


def _run_source(cfg: Config, index: int, name: str, dst: Path) -> list[MemberSource]:
    summary = read_summary(cfg, name)
    if summary is None:
        raise ConfigError(
            f"ensemble.members[{index}]: no finished run {name!r} under {runs_uri(cfg)} "
            "(the run name `lensmill train` prints and MLflow shows)"
        )
    return [_from_summary(cfg, summary, dst)]


def _registry_source(cfg: Config, index: int, uri: str, dst: Path) -> list[MemberSource]:
    try:
        name, ref = tracking.parse_model_uri(uri)
        got = tracking.download_version(cfg, name, ref, dst)
    except TrackingError as exc:
        raise ConfigError(f"ensemble.members[{index}]: {exc}") from None
    path = Path(got["path"]) / MANIFEST
    manifest = parse_record(EnsembleManifest, path.read_bytes(), str(path))
    version = f"models:/{name}/{got['version']}"
    return [
        MemberSource(
            name=entry.name,
            file=Path(got["path"]) / entry.file,
            source=f"{version}#{j}",
            model=str(entry.meta.get("model", "?")),
            lr=entry.meta.get("lr"),
            mlflow_run_id=entry.meta.get("mlflow_run_id"),
        )
        for j, entry in enumerate(manifest.members)
    ]


def named_sources(cfg: Config, dst: Path) -> list[MemberSource]:
    """Members from ``ensemble.members`` (run names and registered versions), fetched into ``dst``."""
    out: list[MemberSource] = []
    for i, source in enumerate(cfg.ensemble.members):
        where = dst / f"source-{i}"
        if source.startswith("run:"):
            out += _run_source(cfg, i, source[len("run:") :], where)
        else:
            out += _registry_source(cfg, i, source, where)
    return _unique_names(out)


def _unique_names(sources: list[MemberSource]) -> list[MemberSource]:
    """Members keep their names; a repeated one gets ``#2``, ``#3``, ... (the registry shows names)."""
    seen: dict[str, int] = {}
    out = []
    for s in sources:
        seen[s.name] = seen.get(s.name, 0) + 1
        n = seen[s.name]
        out.append(s if n == 1 else MemberSource(**{**s.__dict__, "name": f"{s.name}#{n}"}))
    return out


def validation_dataset(cfg: Config, sources: list[MemberSource]) -> str:
    """The dataset the weights are searched on: the trials' own for tune members, else this config's."""
    if not cfg.ensemble.members and sources and sources[0].dataset_uri:
        return sources[0].dataset_uri
    return dataset_uri_for(cfg)


class MemberScorer:
    """A Ray Data callable class: one member, loaded once per actor from the object store, giving
    ``row_id``, ``label`` and ``p0`` ... ``p{C-1}`` (its class probabilities, TTA-averaged when
    asked) per image."""

    def __init__(self, member: Any, image_shape: list[int], tta: bool, on_gpu: bool) -> None:
        import ray

        blob = ray.get(member) if isinstance(member, ray.ObjectRef) else member
        model, _ = load_classifier(io.BytesIO(blob))
        self.shape = tuple(image_shape)
        # One-member predictor: the same scoring (batches, TTA, float64 sigmoid) as serving uses.
        self.predictor = EnsemblePredictor([Member("m", model, 1.0)], self.shape, 0.5, {}, tta=tta)
        self.predictor.to("cuda" if on_gpu else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = decode_images(batch["image"], self.shape)  # (N, C, H, W) at the dataset's size
        p = self.predictor.member_class_probabilities(images)[:, 0]  # (N, C); the member resizes itself
        return {
            "row_id": batch["row_id"],
            "label": batch["label"],
            **{f"p{c}": p[:, c] for c in range(p.shape[1])},
        }


def validation_probabilities(
    cfg: Config, dataset_uri: str, sources: list[MemberSource]
) -> tuple[np.ndarray, np.ndarray]:
    """Each member's class probabilities on the validation split, with Ray Data: (N, M, C) float64
    and the labels (N,), rows in ``row_id`` order."""
    import ray

    manifest = read_manifest(dataset_uri, cfg.storage)
    shape = list(manifest.image_shape)
    sc = cfg.scoring
    columns, labels, row_ids = [], None, None
    classes: set[tuple[str, ...]] = set()
    for j, s in enumerate(sources):
        blob = s.file.read_bytes()  # read once: checked here, scored from the object store
        model, meta = load_classifier(io.BytesIO(blob))
        in_chans = int(meta["in_chans"])
        classes.add(model.classes)
        if len(classes) > 1:
            raise ConfigError(f"the members tell different classes apart: {sorted(classes)}")
        if in_chans != shape[0]:
            raise ConfigError(
                f"member {s.name!r} ({s.source}) takes {in_chans} band(s); dataset {manifest.dataset_id} "
                f"has {shape[0]}"
            )
        log.info("member %d/%d %s: validation probabilities with Ray Data", j + 1, len(sources), s.name)
        scored = read_shards(dataset_uri, "val", cfg.storage).map_batches(
            MemberScorer,
            fn_constructor_kwargs={
                "member": ray.put(blob),
                "image_shape": shape,
                "tta": cfg.ensemble.tta,
                "on_gpu": sc.gpus_per_actor > 0,
            },
            batch_size=sc.batch_size,
            **actor_pool_options(sc),
            num_gpus=sc.gpus_per_actor,
        )
        table = scored.to_arrow_refs()
        rows = _sorted_rows(ray.get(table))
        if row_ids is None:
            row_ids, labels = rows["row_id"], rows["label"]
        elif not np.array_equal(rows["row_id"], row_ids):
            raise RuntimeError(f"member {s.name!r} scored other validation rows than the first member")
        columns.append(rows["p"])
    return np.stack(columns, axis=1), np.asarray(labels, np.int64)


def _sorted_rows(tables: list[Any]) -> dict[str, np.ndarray]:
    """Rows in ``row_id`` order: ``row_id``, ``label`` (N,) and ``p`` (N, C) from the p0.. columns."""
    import pyarrow as pa

    table = pa.concat_tables(tables).sort_by("row_id")
    n_cls = sum(1 for name in table.column_names if name.startswith("p") and name[1:].isdigit())
    p = np.stack([table.column(f"p{c}").to_numpy() for c in range(n_cls)], axis=1)
    return {"row_id": table.column("row_id").to_numpy(), "label": table.column("label").to_numpy(), "p": p}
