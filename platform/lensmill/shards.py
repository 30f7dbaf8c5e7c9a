"""Ray Data: seeds -> Simulator -> Parquet shards + manifest; and the readers of such a dataset.

Layout under a dataset URI (``layout.dataset_uri``, unless ``cfg.dataset_uri`` is set)::

    train/part-00000.parquet ... val/... test/...   one row per image
    manifest.json                                   written last: a dataset without it is never read

Each shard is rendered by one actor call, serialised in memory and written atomically, so a shard file
is whole or absent. Rows are seeded per row (``simulate.row_rng``) and labelled per row id
(``simulate.row_label``), so the bytes of a shard do not depend on worker or block counts, and a
rerun renders only the shards that are missing: shards already present are checked (row count,
embedded shard description) and kept.

Columns: ``image`` (binary, float32 C-order bytes of C x H x W), ``label`` (int64), ``split``,
``row_id`` (int64, within the split), ``seed`` (the config seed), then every ``simulate.param_keys``
column (float64, NaN where a parameter does not apply); the substructure task adds ``subhalos``, a
list<struct<x_arcsec, y_arcsec, theta_e_arcsec>> of the point masses each image shows.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import lensmill
from lensmill.config import Config, SimConfig, StorageConfig, stable_hash
from lensmill.errors import DatasetError
from lensmill.layout import MANIFEST_FILE, dataset_uri, manifest_uri, shard_path, shard_uri
from lensmill.records import (
    SHARD_FORMAT_VERSION,
    DatasetManifest,
    RecordError,
    ShardFile,
    SplitCounts,
    read_record,
    write_record,
)
from lensmill.runtime import actor_pool_options
from lensmill.simulate import (
    SUBHALO_FIELDS,
    SUBHALOS_COLUMN,
    Simulator,
    class_counts,
    param_keys,
    row_label,
    row_rng,
)
from lensmill.storage import (
    StorageError,
    absolute_uri,
    ensure_writable,
    exists,
    list_files,
    locate,
    read_bytes,
    write_bytes,
)

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Key of the shard description embedded in each Parquet file's schema metadata.
_SHARD_META_KEY = b"lensmill.shard"
# Row groups of about this size: large enough for fast scans, small enough to stream.
_ROW_GROUP_BYTES = 32 * 2**20


# -- identity and layout ------------------------------------------------------------------------


def software_versions() -> dict[str, str]:
    """Versions of the software that writes a dataset (recorded in its manifest)."""
    import lenstronomy
    import ray

    return {
        "lensmill": lensmill.__version__,
        "lenstronomy": lenstronomy.__version__,
        "ray": ray.__version__,
        "pyarrow": pa.__version__,
    }


def dataset_id_for(sim: SimConfig) -> str:
    """Content address of a dataset: the sim config, the shard format and the versions that render it."""
    import lenstronomy

    return stable_hash(
        {
            "sim": sim.identity(),
            "format_version": SHARD_FORMAT_VERSION,
            # Ray and pyarrow only move bytes around; the pixels depend on these two.
            "versions": {"lensmill": lensmill.__version__, "lenstronomy": lenstronomy.__version__},
        }
    )


def dataset_uri_for(cfg: Config) -> str:
    """``cfg.dataset_uri`` when set, else ``{storage.root}/datasets/{dataset_id}`` (absolute)."""
    if cfg.dataset_uri:
        return absolute_uri(cfg.dataset_uri)
    return dataset_uri(cfg.storage.root, dataset_id_for(cfg.sim))


def split_rows(sim: SimConfig, split: str) -> int:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return {"train": sim.n_train, "val": sim.n_val, "test": sim.n_test}[split]


def shard_specs(sim: SimConfig) -> list[dict[str, Any]]:
    """Every shard of a dataset: split, index, first row id, row count and relative path."""
    specs = []
    for split in SPLITS:
        n = split_rows(sim, split)
        for index, start in enumerate(range(0, n, sim.rows_per_shard)):
            specs.append(
                {
                    "split": split,
                    "index": index,
                    "row_start": start,
                    "rows": min(sim.rows_per_shard, n - start),
                    "path": shard_path(split, index),
                }
            )
    return specs


# -- one shard ----------------------------------------------------------------------------------


# The ``subhalos`` column's type: one struct of float64 per point mass shown.
SUBHALOS_TYPE = pa.list_(pa.struct([(f, pa.float64()) for f in SUBHALO_FIELDS]))


def columns_for(sim: SimConfig) -> tuple[str, ...]:
    """The columns of a simulated dataset, in order."""
    extra = (SUBHALOS_COLUMN,) if sim.task == "substructure" else ()
    return ("image", "label", "split", "row_id", "seed", *param_keys(sim), *extra)


def render_shard(simulator: Simulator, split: str, row_start: int, rows: int) -> pa.Table:
    """Render rows ``row_start .. row_start + rows - 1`` of a split into an Arrow table."""
    sim = simulator.sim
    keys = simulator.param_keys
    # (rows, C, H, W) float32: each image is rendered into its slot, and the ``image`` column is a
    # zero-copy view of this one buffer (fixed-size rows: offsets 0, n, 2n, ...).
    images = np.empty((rows, *simulator.shape), np.float32)
    labels = np.empty(rows, np.int64)
    params = np.empty((len(keys), rows), np.float64)
    subhalos = []
    for i in range(rows):
        row_id = row_start + i
        labels[i] = row_label(sim, row_id)
        images[i], system = simulator.render_system(row_rng(sim.seed, split, row_id), int(labels[i]))
        params[:, i] = [system.params[k] for k in keys]
        subhalos.append(system.subhalos)
    image_bytes = images[0].nbytes if rows else 0
    if images.nbytes >= 2**31:
        raise DatasetError(
            f"a shard of {rows} images of {simulator.shape} float32 is over 2 GiB: lower sim.rows_per_shard"
        )
    offsets = np.arange(0, (rows + 1) * image_bytes, image_bytes or 1, dtype=np.int32)[: rows + 1]
    image_column = pa.BinaryArray.from_buffers(
        pa.binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(images)]
    )
    columns: dict[str, pa.Array] = {
        "image": image_column,
        "label": pa.array(labels, pa.int64()),
        "split": pa.array([split] * rows, pa.string()),
        "row_id": pa.array(np.arange(row_start, row_start + rows, dtype=np.int64)),
        "seed": pa.array(np.full(rows, sim.seed, np.int64)),
    }
    columns |= {k: pa.array(params[j]) for j, k in enumerate(keys)}
    if sim.task == "substructure":
        columns[SUBHALOS_COLUMN] = pa.array(subhalos, SUBHALOS_TYPE)
    return pa.table(columns)


def shard_to_bytes(table: pa.Table, description: dict[str, Any]) -> pa.Buffer:
    """Serialise a shard in memory (uncompressed: noisy float32 barely compresses and reads slower).

    The result is bytes-like (``len``, ``hashlib``, file writes), without the copy into ``bytes``.
    """
    table = table.replace_schema_metadata({_SHARD_META_KEY: json.dumps(description, sort_keys=True).encode()})
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="none",
        row_group_size=max(1, _ROW_GROUP_BYTES // row_bytes),
        # Page CRCs let a resumed run tell a damaged shard from an intact one without a manifest.
        write_page_checksum=True,
    )
    return sink.getvalue()


def _shard_description(dataset_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    keys = ("split", "index", "row_start", "rows")
    return {"dataset_id": dataset_id, "format_version": SHARD_FORMAT_VERSION, **{k: spec[k] for k in keys}}


def _class_counts(column: pa.ChunkedArray, n_classes: int) -> list[int]:
    """Rows of each label 0..n_classes-1 in a ``label`` column."""
    labels = column.to_numpy().astype(np.int64)
    return np.bincount(labels, minlength=n_classes)[:n_classes].tolist()


def _intact_shard(data: bytes, description: dict[str, Any], n_classes: int) -> list[int] | None:
    """Class counts of an existing shard file when it is the shard described and reads back whole
    (footer, page checksums, row count), else None."""
    try:
        pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
        meta = pf.schema_arrow.metadata or {}
        if json.loads(meta.get(_SHARD_META_KEY, b"{}")) != description:
            return None
        table = pf.read()
        if (
            table.num_rows != description["rows"]
            or table.column("row_id")[0].as_py() != description["row_start"]
        ):
            return None
        return _class_counts(table.column("label"), n_classes)
    except (pa.ArrowException, ValueError, OSError, KeyError):
        return None


class ShardWriter:
    """Ray Data actor: builds one Simulator, then renders and writes one shard per call."""

    def __init__(
        self, sim: dict[str, Any], dataset_uri: str, storage: dict[str, Any], dataset_id: str
    ) -> None:
        self.sim = SimConfig.model_validate(sim)
        self.simulator = Simulator(self.sim)
        self.dataset_uri = dataset_uri
        self.storage = StorageConfig.model_validate(storage)
        self.dataset_id = dataset_id

    def write(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Write (or keep, when intact) one shard; its manifest entry."""
        uri = shard_uri(self.dataset_uri, spec["path"])
        description = _shard_description(self.dataset_id, spec)
        n_classes = len(self.sim.classes)
        if spec.get("exists"):
            data = read_bytes(uri, self.storage)
            counts = _intact_shard(data, description, n_classes)
            if counts is not None:
                return self._entry(spec, counts, data, rendered=False)
            log.warning("shard %s is not the expected shard: rendering it again", uri)
        table = render_shard(self.simulator, spec["split"], spec["row_start"], spec["rows"])
        data = shard_to_bytes(table, description)
        write_bytes(uri, data, self.storage)
        return self._entry(spec, _class_counts(table.column("label"), n_classes), data, rendered=True)

    @staticmethod
    def _entry(
        spec: dict[str, Any], counts: list[int], data: bytes | pa.Buffer, rendered: bool
    ) -> dict[str, Any]:
        return {
            "path": spec["path"],
            "split": spec["split"],
            "index": int(spec["index"]),
            "rows": int(spec["rows"]),
            # Rows whose label is not 0 (lenses; substructure: not no_sub), as readers before class
            # counts expect.
            "positives": int(spec["rows"]) - int(counts[0]),
            "class_counts": [int(c) for c in counts],
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "rendered": rendered,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        n = len(batch["path"])
        entries = [self.write({k: _py(v[i]) for k, v in batch.items()}) for i in range(n)]
        return {k: [e[k] for e in entries] for k in entries[0]} if entries else {}


def _py(value: Any) -> Any:
    """numpy scalars and arrays (as Ray Data hands them out) -> Python scalars and lists (JSON,
    pydantic)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


# -- the dataset --------------------------------------------------------------------------------


def write_shards(cfg: Config) -> DatasetManifest:
    """Render the dataset of ``cfg`` with Ray Data (Ray must be initialised); its manifest.

    Resumable: an existing manifest is returned as is; otherwise intact shards are kept and only the
    missing ones are rendered. The manifest is written last. ``sim.pool`` sizes the actor pool (it
    grows with the cluster, the autoscaler adding nodes while shards are queued); the bytes written
    do not depend on it.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("write_shards needs a running Ray: call ray.init() (or use lensmill's CLI) first")
    uri = dataset_uri_for(cfg)
    storage = cfg.storage
    if exists(manifest_uri(uri), storage):
        log.info("dataset %s is complete: nothing to render", uri)
        return read_manifest(uri, storage)

    # Fail in a second, naming the URI, rather than after the actors have rendered the first shards.
    ensure_writable(uri, storage)
    sim = cfg.sim
    dataset_id = dataset_id_for(sim)
    present = set(list_files(uri, storage))
    specs = [{**s, "exists": shard_uri(uri, s["path"]) in present} for s in shard_specs(sim)]
    todo = sum(not s["exists"] for s in specs)
    log.info("dataset %s: %d shards, %d to render, %d to check", uri, len(specs), todo, len(specs) - todo)

    # One block per shard, so that the actor pool spreads shards over its actors.
    ds = ray.data.from_items(specs, override_num_blocks=len(specs)).map_batches(
        ShardWriter,
        fn_constructor_kwargs={
            "sim": sim.model_dump(mode="json"),
            "dataset_uri": uri,
            "storage": storage.model_dump(mode="json"),
            "dataset_id": dataset_id,
        },
        batch_size=1,
        **actor_pool_options(sim.pool, max(1, todo)),
    )
    rows = [{k: _py(v) for k, v in row.items()} for row in ds.take_all()]
    entries = sorted(rows, key=lambda e: (SPLITS.index(e["split"]), e["index"]))
    if len(entries) != len(specs):
        raise DatasetError(f"expected {len(specs)} shards under {uri}, got {len(entries)}")

    manifest = _build_manifest(sim, dataset_id, entries)
    write_manifest(uri, manifest, storage)
    rendered = sum(e["rendered"] for e in entries)
    log.info("dataset %s written: %d shards rendered, %d kept", uri, rendered, len(entries) - rendered)
    return manifest


def _build_manifest(sim: SimConfig, dataset_id: str, entries: list[dict[str, Any]]) -> DatasetManifest:
    splits = {}
    for split in SPLITS:
        mine = [e for e in entries if e["split"] == split]
        rows = sum(e["rows"] for e in mine)
        counts = tuple(int(sum(c)) for c in zip(*(e["class_counts"] for e in mine), strict=True))
        if rows != split_rows(sim, split) or counts != class_counts(sim, rows):
            raise DatasetError(
                f"split {split}: {rows} rows, class counts {list(counts)} "
                f"({', '.join(sim.classes)}) do not match the config"
            )
        splits[split] = SplitCounts(
            rows=rows, positives=rows - counts[0], negatives=counts[0], class_counts=counts
        )
    keys = ("path", "split", "rows", "positives", "class_counts", "bytes", "sha256")
    return DatasetManifest(
        dataset_id=dataset_id,
        source="simulate",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        image_shape=(len(sim.bands), sim.image_size_px, sim.image_size_px),
        image_unit="e-/s per pixel, sky subtracted",
        bands=tuple(sim.bands),
        pixel_scale_arcsec=sim.pixel_scale_arcsec,
        columns=columns_for(sim),
        classes=sim.classes,
        splits=splits,
        files=tuple(ShardFile(**{k: e[k] for k in keys}) for e in entries),
        config=sim.identity(),
        versions=software_versions(),
    )


def write_manifest(dataset_uri: str, manifest: DatasetManifest, storage: StorageConfig) -> None:
    """The one writer of ``manifest.json`` (simulated and imported datasets): last, atomically."""
    write_record(manifest_uri(dataset_uri), manifest, storage)


def read_manifest(dataset_uri: str, storage: StorageConfig) -> DatasetManifest:
    """The manifest of a complete dataset; ``DatasetError`` when there is none (incomplete dataset)
    or it is not a manifest (the message names the URI and the field)."""
    uri = manifest_uri(dataset_uri)
    try:
        if not exists(uri, storage):
            raise DatasetError(f"incomplete dataset: no {MANIFEST_FILE} at {absolute_uri(dataset_uri)}")
        return read_record(uri, DatasetManifest, storage)
    except StorageError as exc:
        raise DatasetError(f"cannot read the manifest of {dataset_uri}: {exc}") from exc
    except RecordError as exc:
        raise DatasetError(f"corrupt {MANIFEST_FILE}: {exc}") from exc


def split_files(manifest: DatasetManifest, dataset_uri: str, split: str) -> list[ShardFile]:
    """The files of ``split``; ``DatasetError`` naming the splits there are when it has none."""
    if split not in manifest.splits:
        raise DatasetError(f"dataset {dataset_uri} has no split {split!r}; it has {list(manifest.splits)}")
    return manifest.split_files(split)


def read_shards(dataset_uri: str, split: str, storage: StorageConfig) -> Any:
    """A ``ray.data.Dataset`` over exactly the files the manifest lists for ``split`` (in order)."""
    import ray

    manifest = read_manifest(dataset_uri, storage)
    files = split_files(manifest, dataset_uri, split)
    locs = [locate(shard_uri(dataset_uri, f.path), storage) for f in files]
    return ray.data.read_parquet([loc.path for loc in locs], filesystem=locs[0].filesystem)


def decode_images(column: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """A batch's ``image`` column (bytes objects, or an Arrow binary array) -> writable (N, C, H, W)."""
    if isinstance(column, pa.ChunkedArray | pa.Array):
        column = column.to_numpy(zero_copy_only=False)
    n = len(column)
    expected = int(np.prod(shape)) * 4
    # bytearray.join: one copy into a writable buffer (torch.from_numpy wants writable arrays).
    buf = bytearray().join(column)
    if len(buf) != n * expected:
        raise DatasetError(
            f"image bytes do not match shape {tuple(shape)} float32: {len(buf)} bytes for {n} images"
        )
    return np.frombuffer(buf, np.float32).reshape(n, *shape)


def iter_split(
    dataset_uri: str,
    manifest: DatasetManifest,
    split: str,
    storage: StorageConfig,
    order: Sequence[int] | None = None,
) -> Iterator[pa.Table]:
    """The one in-process reader of a split's files: each listed file as a table, its checksum checked
    against the manifest, in manifest order or in ``order`` (indices into the split's files)."""
    files = split_files(manifest, dataset_uri, split)
    for i in range(len(files)) if order is None else order:
        f = files[i]
        uri = shard_uri(dataset_uri, f.path)
        data = read_bytes(uri, storage)
        if f.sha256 is not None and hashlib.sha256(data).hexdigest() != f.sha256:
            raise DatasetError(f"{uri} does not match the checksum in its manifest")
        yield pq.read_table(io.BytesIO(data)).replace_schema_metadata(None)


def load_split(
    dataset_uri: str, split: str, storage: StorageConfig
) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """In-process read of one split: images (N, C, H, W) float32, labels (N,) int64, other columns."""
    manifest = read_manifest(dataset_uri, storage)
    table = pa.concat_tables(iter_split(dataset_uri, manifest, split, storage))
    images = decode_images(table.column("image"), manifest.image_shape)
    labels = table.column("label").to_numpy().astype(np.int64)
    return images, labels, table.drop_columns(["image", "label"])
