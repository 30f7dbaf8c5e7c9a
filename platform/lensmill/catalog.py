"""Catalog scoring: the champion over a survey's cutouts, with no labels, into resumable Parquet.

Inputs (``read_catalog``), local or on S3:

- a folder: every ``.png`` / ``.fits`` / ``.npy`` below it; ``object_id`` is the path relative to it;
- a list file (``.txt`` / ``.lst``): one image path per line (``#`` comments), relative to the list;
- a catalog (``.csv`` / ``.parquet``): ``object_id`` (or ``id``), optional ``ra`` and ``dec`` in
  degrees, and either one ``path`` column (a file holding every band) or one ``path_<band>`` column per
  band (single-band files, stacked in column order into (C, H, W): a survey's per-band FITS cutouts).
  Relative paths are relative to the catalog's folder.

Every file is decoded by ``lensmill.images``, as at import and in serving. Ray Data decodes in tasks and
scores in an actor pool that grows with the cluster (``scoring.*``; GPU actors when
``scoring.gpus_per_actor`` > 0); the driver writes the results one part (``scoring.rows_per_part`` rows,
in input order) at a time, each atomically, so an interrupted run resumes by scoring only the parts
not written. Output, under ``--output``: ``part-00000.parquet`` ... with ``object_id``, ``ra``,
``dec``, the path columns, ``p_lens``, ``label`` (at the model's stored threshold), ``spread``,
``p_member_<j>`` and ``error``; and ``_catalog.json`` (inputs, model, member names, parts, counts).
A cutout that cannot be read or has the wrong shape gets its reason in ``error`` and null scores: it
is never fatal and never dropped.

The catalog's rows pass through the driver (ids, paths and scores, not pixels): one run handles
~10^7-10^8 cutouts; a larger survey is scored as one catalog per tile or field.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lensmill import tracking
from lensmill.config import Config, StorageConfig
from lensmill.errors import LensmillError
from lensmill.images import SUFFIXES, ImageDecodeError, decode_image
from lensmill.metrics import CLASS_NAMES
from lensmill.runtime import actor_pool_options
from lensmill.storage import (
    StorageError,
    absolute_uri,
    exists,
    is_s3,
    join_uri,
    list_files,
    locate,
    read_bytes,
    read_json,
    write_bytes,
    write_json,
)

log = logging.getLogger(__name__)

# Leading underscore: pyarrow, pandas and Spark skip it when they read the folder as a dataset.
CATALOG_RECORD = "_catalog.json"
FORMAT_VERSION = 1
LIST_SUFFIXES = (".txt", ".lst")
TABLE_SUFFIXES = (".csv", ".parquet")
# Rows per Ray Data input block: small enough that decoding spreads over the cluster's CPUs.
BLOCK_ROWS = 512


class CatalogError(LensmillError):
    """A catalog that cannot be scored as given; the message names the input or output URI."""


@dataclass(frozen=True)
class Catalog:
    """What is to be scored: one row per object (``object_id``, ``ra``, ``dec``, path columns)."""

    uri: str
    table: pa.Table
    path_columns: tuple[str, ...]

    @property
    def sha256(self) -> str:
        """Of the ids and paths in order: a rerun resumes only into the output of the same inputs."""
        h = hashlib.sha256()
        for name in ("object_id", *self.path_columns):
            for value in self.table.column(name).to_pylist():
                h.update(str(value).encode() + b"\0")
        return h.hexdigest()


def _resolve(path: str, base_uri: str) -> str:
    if is_s3(path) or PurePosixPath(path).is_absolute():
        return path
    return join_uri(base_uri, path)


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def _image_files(uri: str, storage: StorageConfig) -> list[str]:
    return [f for f in list_files(uri, storage) if PurePosixPath(f).suffix.lower() in SUFFIXES]


def _read_table(uri: str, storage: StorageConfig) -> pa.Table:
    loc = locate(uri, storage)
    try:
        if uri.lower().endswith(".csv"):
            with loc.filesystem.open_input_stream(loc.path) as f:
                # Ids stay strings (leading zeros, survey designations); ra/dec parse as numbers.
                opts = pacsv.ConvertOptions(column_types={"object_id": pa.string(), "id": pa.string()})
                return pacsv.read_csv(f, convert_options=opts)
        return pq.read_table(loc.path, filesystem=loc.filesystem)
    except FileNotFoundError as exc:
        raise CatalogError(f"catalog not found: {uri}") from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise CatalogError(f"{uri}: not a readable catalog: {exc}") from exc


def _from_table(uri: str, table: pa.Table, base: str | None = None) -> Catalog:
    """A catalog table (ids, optional ra/dec, path columns relative to ``base``, default the
    table's folder) -> ``Catalog``, or ``CatalogError`` naming what is missing."""
    names = table.column_names
    id_col = "object_id" if "object_id" in names else "id" if "id" in names else None
    if id_col is None:
        raise CatalogError(f"{uri}: no object_id (or id) column; columns are {names}")
    band_cols = [c for c in names if c.startswith("path_")]
    path_cols = ["path"] if "path" in names else band_cols
    if "path" in names and band_cols:
        raise CatalogError(f"{uri}: both a path column and per-band {band_cols}: give one or the other")
    if not path_cols:
        raise CatalogError(f"{uri}: no image column: give path (one file) or path_<band> (one per band)")
    base = base or _parent(uri)
    columns: dict[str, pa.Array] = {"object_id": pa.array([str(v) for v in table.column(id_col).to_pylist()])}
    for coord in ("ra", "dec"):
        if coord in names:
            try:
                columns[coord] = table.column(coord).cast(pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise CatalogError(f"{uri}: column {coord} is not numeric (degrees): {exc}") from None
        else:
            columns[coord] = pa.nulls(table.num_rows, pa.float64())
    for col in path_cols:
        values = table.column(col).to_pylist()
        missing = [i for i, v in enumerate(values) if not v]
        if missing:
            raise CatalogError(f"{uri}: row {missing[0]} has no {col}")
        columns[col] = pa.array([_resolve(str(v), base) for v in values], pa.string())
    if len(set(columns["object_id"].to_pylist())) < table.num_rows:
        raise CatalogError(f"{uri}: object ids repeat; each row needs its own object_id")
    return Catalog(uri, pa.table(columns), tuple(path_cols))


def read_catalog(input_uri: str, storage: StorageConfig) -> Catalog:
    """The objects under ``input_uri``: a folder of image files, a list file or a CSV/Parquet catalog."""
    uri = absolute_uri(input_uri)
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return _from_table(uri, _read_table(uri, storage))
    if suffix in LIST_SUFFIXES:
        try:
            lines = read_bytes(uri, storage).decode().splitlines()
        except UnicodeDecodeError:
            raise CatalogError(f"{uri}: a list file must be text, one path per line") from None
        paths = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        table = pa.table({"object_id": paths, "path": paths})
    else:
        files = _image_files(uri, storage)
        if not files:
            if not exists(uri, storage):
                raise CatalogError(f"input not found: {input_uri}")
            raise CatalogError(f"{uri}: no image files ({', '.join(SUFFIXES)}) below it")
        base = locate(uri, storage).path.rstrip("/") + "/"
        rel = [locate(f, storage).path[len(base) :] for f in files]
        table = pa.table({"object_id": rel, "path": rel})
        return _from_table(uri, table, base=uri)
    if table.num_rows == 0:
        raise CatalogError(f"{uri}: no paths listed")
    return _from_table(uri, table)


# -- Ray Data stages -------------------------------------------------------------------------------


def decode_cutout(
    paths: list[str], storage: StorageConfig, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """One object's files (one, or one per band) -> (C, H, W) float32, or ``ImageDecodeError``
    naming the file and the reason (also when the shape is not ``shape``)."""
    arrays = []
    for path in paths:
        try:
            data = read_bytes(path, storage)
        except StorageError as exc:
            raise ImageDecodeError(path, str(exc)) from None
        arrays.append(decode_image(data, path))
    image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    if len(arrays) > 1 and any(a.shape[0] != 1 for a in arrays):
        raise ImageDecodeError(
            paths[0], f"per-band files must hold one band each, got {[a.shape for a in arrays]}"
        )
    if shape is not None and image.shape != shape:
        raise ImageDecodeError(
            paths[0], f"image shape {list(image.shape)} differs from the model's {list(shape)}"
        )
    return image


def decode_batch(
    batch: dict[str, np.ndarray], path_columns: list[str], shape: list[int], storage: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Ray Data task: each row's files -> ``image`` (float32 (C, H, W) bytes; empty on failure) and
    ``error`` (empty when the cutout was read)."""
    store = StorageConfig.model_validate(storage)
    images, errors = [], []
    for i in range(len(batch["object_id"])):
        try:
            paths = [str(batch[c][i]) for c in path_columns]
            images.append(decode_cutout(paths, store, tuple(shape)).tobytes())
            errors.append("")
        except ImageDecodeError as exc:
            images.append(b"")
            errors.append(str(exc))
    return {**batch, "image": np.array(images, dtype=object), "error": np.array(errors, dtype=object)}


class CatalogScorer:
    """Ray Data callable class: the ensemble (its files from the object store) on each batch."""

    def __init__(self, files_ref: list[Any], device: str, torch_threads: int) -> None:
        import ray
        import torch

        from lensmill.predict import EnsemblePredictor

        torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=1 for a fractional CPU

        self._tmp = tempfile.TemporaryDirectory(prefix="lensmill-catalog-")
        files = ray.get(files_ref[0])  # in a list: Ray Data passes it on unresolved
        for name, data in files.items():
            (Path(self._tmp.name) / name).write_bytes(data)
        self.predictor = EnsemblePredictor.load(Path(self._tmp.name)).to(device)
        self.shape = tuple(self.predictor.image_shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["object_id"])
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        p = self.predictor
        n_cls, names = len(p.classes), p.member_names
        probs, spread = np.full((n, n_cls), np.nan), np.full(n, np.nan)
        label, members = np.full(n, -1, np.int64), np.full((n, len(names), n_cls), np.nan)
        if ok.any():
            images = np.stack([np.frombuffer(b, np.float32) for b in batch["image"][ok]])
            out = p.predict(images.reshape(-1, *self.shape))
            probs[ok], label[ok], spread[ok] = out["probs"], out["label"], out["spread"]
            members[ok] = out["member_class_probs"]
        class_columns, member_columns = score_columns(p.classes, names)
        scored = {k: v for k, v in batch.items() if k != "image"}
        scored |= {"label": label, "spread": spread}
        # Two classes: p(lens) only; more: one column per class (and per member and class).
        first = n_cls - len(class_columns)
        scored |= {c: probs[:, first + k] for k, c in enumerate(class_columns)}
        flat = members[:, :, first:].reshape(n, -1)  # (n, M * classes shown), member-major
        scored |= {c: flat[:, k] for k, c in enumerate(member_columns)}
        return scored


def score_columns(classes: tuple[str, ...], member_names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The probability columns of a scoring run's output: for lens finding ``p_lens`` and one
    ``p_member_<j>`` per member; for C classes ``p_<class>`` each and ``p_member_<j>_<class>``.
    Returned: the class columns, and each member column with what it holds."""
    if len(classes) == 2:
        return ["p_lens"], {f"p_member_{j}": n for j, n in enumerate(member_names)}
    members = {f"p_member_{j}_{c}": f"{n}: p({c})" for j, n in enumerate(member_names) for c in classes}
    return [f"p_{c}" for c in classes], members


# -- the driver ------------------------------------------------------------------------------------


def _part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _part_table(rows: list[dict[str, np.ndarray]], columns: list[str]) -> pa.Table:
    """The scored rows of one part, in input order; an unreadable cutout's scores are null."""
    merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    order = np.argsort(merged["_row"], kind="stable")
    failed = np.array([bool(e) for e in merged["error"][order]])
    out: dict[str, pa.Array] = {}
    for name in columns:
        values = merged[name][order]
        if name == "label":
            out[name] = pa.array(values, pa.int64(), mask=failed)
        elif name == "spread" or name.startswith("p_"):
            out[name] = pa.array(values.astype(np.float64), mask=failed)
        elif name in ("ra", "dec"):
            out[name] = pa.array(values.astype(np.float64), mask=np.isnan(values.astype(np.float64)))
        else:
            out[name] = pa.array([str(v) for v in values], pa.string())
    return pa.table(out)


def _check_output(record_uri: str, expected: dict[str, Any], storage: StorageConfig) -> None:
    """An output already holding another input's or model's scores is refused, not mixed."""
    if not exists(record_uri, storage):
        return
    old = read_json(record_uri, storage)
    for key in ("input_sha256", "model", "rows_per_part"):
        if old.get(key) != expected[key]:
            raise CatalogError(
                f"{record_uri} holds scores of another {key.split('_')[0]} ({old.get(key)!r}, not "
                f"{expected[key]!r}); choose another --output"
            )


def score_catalog(
    cfg: Config, input_uri: str, output_uri: str, model_dir: Path | None = None
) -> dict[str, Any]:
    """Score every object of ``input_uri`` with the champion (or ``model_dir``) into ``output_uri``;
    parts written before (same inputs, same model) are kept, not scored again."""
    sc = cfg.scoring
    catalog = read_catalog(input_uri, cfg.storage)
    out_uri = absolute_uri(output_uri)
    n = catalog.table.num_rows
    n_parts = math.ceil(n / sc.rows_per_part)
    with tempfile.TemporaryDirectory(prefix="lensmill-catalog-model-") as tmp:
        # The driver resolves the alias once; every actor gets these bytes (no registry or shared
        # disk needed on the workers, and no other version mixed in if the alias moves meanwhile).
        loaded = tracking.load_ensemble(cfg, Path(tmp), model_dir)
        manifest = loaded.manifest  # the weights load in the actors, not here
        missing = [m.file for m in manifest.members if not (loaded.path / m.file).is_file()]
        if missing:
            raise CatalogError(f"ensemble {loaded.path} lacks its member file(s) {missing}")
        files = {p.name: p.read_bytes() for p in loaded.path.iterdir() if p.is_file()}
    classes = tuple(manifest.classes or CLASS_NAMES)
    class_columns, member_columns = score_columns(classes, [m.name for m in manifest.members])
    record = {
        "format_version": FORMAT_VERSION,
        "input_uri": catalog.uri,
        "input_sha256": catalog.sha256,
        "rows": n,
        "rows_per_part": sc.rows_per_part,
        "parts": n_parts,
        "path_columns": list(catalog.path_columns),
        "model": loaded.ref,
        "threshold": manifest.threshold,
        "classes": list(classes),
        "score_columns": class_columns,
        "members": member_columns,
    }
    record_uri = join_uri(out_uri, CATALOG_RECORD)
    _check_output(record_uri, record, cfg.storage)
    done = {PurePosixPath(f).name for f in list_files(out_uri, cfg.storage)}
    todo = [k for k in range(n_parts) if _part_name(k) not in done]
    write_json(record_uri, record, cfg.storage)  # before any part: a resume checks against it
    log.info(
        "catalog %s: %d objects in %d parts, %d written before, %d to score with %s",
        catalog.uri, n, n_parts, n_parts - len(todo), len(todo), loaded.ref,
    )  # fmt: skip
    written: list[int] = []
    if todo:
        columns = ["object_id", "ra", "dec", *catalog.path_columns, *class_columns, "label", "spread"]
        columns += [*record["members"], "error"]
        for index, table in _scored_parts(cfg, catalog, todo, tuple(manifest.image_shape), files, columns):
            write_bytes(join_uri(out_uri, _part_name(index)), _parquet_bytes(table), cfg.storage)
            written.append(index)
            unreadable = sum(1 for e in table.column("error").to_pylist() if e)
            log.info(
                "catalog: part %d written, %d rows (%d unreadable); %d of %d parts done",
                index, table.num_rows, unreadable, n_parts - len(todo) + len(written), n_parts,
            )  # fmt: skip
            if sc.fail_after_parts is not None and len(written) >= sc.fail_after_parts:
                raise RuntimeError(f"scoring.fail_after_parts={sc.fail_after_parts}: drill interruption")
    return {
        **_summarise(out_uri, cfg.storage, record),
        "output_uri": out_uri,
        "parts_scored_now": len(written),
        "parts_reused": n_parts - len(todo),
    }


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _scored_parts(
    cfg: Config,
    catalog: Catalog,
    todo: list[int],
    shape: tuple[int, ...],
    files: dict[str, bytes],
    columns: list[str],
) -> Iterator[tuple[int, pa.Table]]:
    """Ray Data over the parts in ``todo``; yields each part's table once all its rows are scored."""
    import ray

    sc = cfg.scoring
    rows_per_part = sc.rows_per_part
    table = catalog.table.append_column("_row", pa.array(np.arange(catalog.table.num_rows, dtype=np.int64)))
    blocks = []
    for k in todo:
        part = table.slice(k * rows_per_part, rows_per_part)
        blocks += [part.slice(s, BLOCK_ROWS) for s in range(0, part.num_rows, BLOCK_ROWS)]
    expected = {k: min(rows_per_part, table.num_rows - k * rows_per_part) for k in todo}
    files_ref = ray.put(files)
    ds = ray.data.from_arrow(blocks).map_batches(
        decode_batch,
        fn_kwargs={
            "path_columns": list(catalog.path_columns),
            "shape": list(shape),
            "storage": cfg.storage.model_dump(mode="json"),
        },
        batch_size=BLOCK_ROWS,
        batch_format="numpy",
    )
    scored = ds.map_batches(
        CatalogScorer,
        fn_constructor_kwargs={
            "files_ref": [files_ref],
            "device": "cuda" if sc.gpus_per_actor > 0 else "cpu",
            "torch_threads": sc.threads,
        },
        batch_size=sc.batch_size,
        batch_format="numpy",
        **actor_pool_options(sc),
        num_gpus=sc.gpus_per_actor,
    )
    pending: dict[int, list[dict[str, np.ndarray]]] = {}
    have: dict[int, int] = {}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        part_of = batch["_row"] // rows_per_part
        for k in np.unique(part_of):
            sel = part_of == k
            pending.setdefault(int(k), []).append({c: v[sel] for c, v in batch.items()})
            have[int(k)] = have.get(int(k), 0) + int(sel.sum())
            if have[int(k)] == expected[int(k)]:
                yield int(k), _part_table(pending.pop(int(k)), columns)


def _summarise(out_uri: str, storage: StorageConfig, record: dict[str, Any]) -> dict[str, Any]:
    """Counts over every part written (this run's and earlier ones')."""
    loc = locate(out_uri, storage)
    parts = [f for f in list_files(out_uri, storage) if f.endswith(".parquet")]
    rows = unreadable = 0
    classes = record.get("classes") or list(CLASS_NAMES)
    per_class = dict.fromkeys(classes, 0)
    for f in parts:
        t = pq.read_table(locate(f, storage).path, filesystem=loc.filesystem, columns=["label", "error"])
        rows += t.num_rows
        unreadable += sum(1 for e in t.column("error").to_pylist() if e)
        for v in t.column("label").to_pylist():
            if v is not None and v >= 0:
                per_class[classes[v]] += 1
    counts = (
        {"predicted_lenses": per_class[classes[1]]}
        if len(classes) == 2
        else {"predicted_per_class": per_class}
    )
    return {
        "input_uri": record["input_uri"],
        "model": record["model"],
        "rows": rows,
        "parts": len(parts),
        "complete": len(parts) == record["parts"],
        "unreadable": unreadable,
        **counts,
    }
