"""Import labelled cutouts (PNG, FITS, NPY files) into lensmill's shard format.

Inputs are either class folders under one directory (``lens/`` and ``nonlens/``, or ``1/`` and
``0/``; names matched case-insensitively) or a CSV of ``path,label`` rows (paths relative to the
directory). Each image becomes one row of the same Parquet shards that ``shards.write_shards`` writes
(``image`` float32 C x H x W bytes, ``label``, ``split``, ``row_id``, ``seed``, every ``PARAM_KEYS``
column) plus ``source_path``; a CSV may carry ``PARAM_KEYS`` columns (e.g. ``theta_e_arcsec``), the
rest are NaN. ``shards.read_manifest`` / ``load_split`` / ``read_shards`` read the result unchanged.

Files are decoded by ``lensmill.images``, as the serving endpoint decodes uploads, so a file gives the
same array at import and at serving time. Pixel values are kept as stored (a PNG's 0-255 counts become
0.0-255.0): no rescaling, so the pixels read back are the pixels imported. Array layouts: PNG grayscale
-> 1 channel, colour (RGB, RGBA, palette) -> 3 (alpha dropped); FITS (first image HDU with data) and
NPY: 2-D (H, W) -> 1 channel, 3-D is (C, H, W).

Splits are drawn per class with a seeded shuffle, so every split keeps the class mix and the same
inputs and options give the same dataset, byte for byte (the dataset id is a hash of the relative
paths, labels and file checksums, and of the split options).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from lensmill.config import StorageConfig, stable_hash
from lensmill.images import SUFFIXES, ImageDecodeError, UnsupportedImageType, decode_image, image_kind
from lensmill.layout import dataset_uri, manifest_uri, shard_path, shard_uri
from lensmill.records import SHARD_FORMAT_VERSION, DatasetManifest, ImportInputs, ShardFile, SplitCounts
from lensmill.shards import (
    SPLITS,
    DatasetError,
    read_manifest,
    shard_to_bytes,
    software_versions,
    write_manifest,
)
from lensmill.simulate import PARAM_KEYS
from lensmill.storage import absolute_uri, ensure_writable, exists, write_bytes

log = logging.getLogger(__name__)

# Class folder names (lower case) -> label.
CLASS_NAMES: dict[str, int] = {
    "1": 1, "lens": 1, "lenses": 1, "positive": 1, "positives": 1,
    "0": 0, "nonlens": 0, "nonlenses": 0, "non-lens": 0, "non-lenses": 0, "non_lens": 0,
    "non_lenses": 0, "negative": 0, "negatives": 0,
}  # fmt: skip


class CutoutImportError(DatasetError):
    """Input files that cannot be imported; the message names the file or folder."""


@dataclass(frozen=True)
class Item:
    """One input image: its path relative to the import directory, absolute path, label, CSV params."""

    rel: str
    path: Path
    label: int
    params: tuple[tuple[str, float], ...] = ()


# -- reading one file -----------------------------------------------------------------------------


def _kind(path: Path) -> str:
    """An input file's format by its suffix; an unsupported one is refused, naming the path."""
    try:
        return image_kind(str(path))
    except UnsupportedImageType as exc:
        raise CutoutImportError(str(exc)) from None


def read_image(path: Path, data: bytes | None = None) -> np.ndarray:
    """One cutout file -> float32 (C, H, W) with its stored pixel values (``lensmill.images`` rules)."""
    if data is None:
        _kind(path)  # refused by its name before it is read
        data = path.read_bytes()
    try:
        return decode_image(data, str(path))
    except ImageDecodeError as exc:
        raise CutoutImportError(str(exc)) from None


# -- finding the inputs ---------------------------------------------------------------------------


def _label_of(name: str) -> int | None:
    return CLASS_NAMES.get(name.strip().lower())


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def items_from_folders(src: Path) -> list[Item]:
    """Every image under class folders of ``src`` (recursively); unknown folders are an error."""
    folders = sorted(p for p in src.iterdir() if p.is_dir() and _visible(p))
    unknown = [p.name for p in folders if _label_of(p.name) is None]
    if unknown:
        raise CutoutImportError(
            f"{src}: unknown class folder(s) {unknown}; use lens/ and nonlens/ (or 1/ and 0/), "
            "or give --labels-csv"
        )
    if not folders:
        raise CutoutImportError(f"{src}: no class folders (lens/, nonlens/ or 1/, 0/) and no --labels-csv")
    items = []
    for folder in folders:
        label = _label_of(folder.name)
        assert label is not None
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(src).parts):
                continue
            _kind(path)
            items.append(Item(path.relative_to(src).as_posix(), path, label))
    return items


def _parse_label(raw: str, where: str) -> int:
    label = _label_of(raw)
    if label is None:
        raise CutoutImportError(f"{where}: label {raw!r} is not one of 0/1 or lens/nonlens")
    return label


def items_from_csv(src: Path, csv_path: Path) -> list[Item]:
    """Rows ``path,label`` (a header is optional; more columns named like ``PARAM_KEYS`` are kept)."""
    if not csv_path.is_file():
        raise CutoutImportError(f"labels CSV not found: {csv_path}")
    with csv_path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    if not rows:
        raise CutoutImportError(f"{csv_path}: no rows")
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header and "label" in header:
        rows = rows[1:]
    elif len(header) >= 2 and _label_of(header[1]) is not None:
        header = ["path", "label", *(f"col{i}" for i in range(2, len(header)))]
    else:
        raise CutoutImportError(f"{csv_path}: expected columns path,label (got {rows[0]!r})")
    i_path, i_label = header.index("path"), header.index("label")
    extra = [(i, name) for i, name in enumerate(header) if name in PARAM_KEYS]
    items, seen = [], set()
    for n, row in enumerate(rows, start=2 if header[0] == "path" else 1):
        where = f"{csv_path}:{n}"
        if len(row) < len(header):
            raise CutoutImportError(f"{where}: expected {len(header)} columns, got {len(row)}")
        rel = row[i_path].strip()
        path = (src / rel) if not Path(rel).is_absolute() else Path(rel)
        if not path.is_file():
            raise CutoutImportError(f"{where}: no such file {path}")
        if rel in seen:
            raise CutoutImportError(f"{where}: {rel} is listed twice")
        seen.add(rel)
        params = []
        for i, name in extra:
            try:
                params.append((name, float(row[i]) if row[i].strip() else math.nan))
            except ValueError:
                raise CutoutImportError(f"{where}: {name} = {row[i]!r} is not a number") from None
        items.append(Item(rel, path, _parse_label(row[i_label], where), tuple(params)))
    return items


# -- splits and shards ----------------------------------------------------------------------------


def assign_splits(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Split name per item: per class, a seeded shuffle cut into test, val and train (stratified)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise CutoutImportError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )
    rng = np.random.default_rng([seed, 0x1A8E])
    out = np.full(labels.size, "train", dtype=object)
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(idx.size)]
        n_test = math.floor(idx.size * test_fraction + 0.5)
        n_val = math.floor(idx.size * val_fraction + 0.5)
        out[idx[:n_test]] = "test"
        out[idx[n_test : n_test + n_val]] = "val"
    return out


def _table(items: list[Item], images: list[np.ndarray], split: str, row_start: int, seed: int) -> pa.Table:
    n = len(items)
    columns: dict[str, pa.Array] = {
        "image": pa.array([img.tobytes() for img in images], pa.binary()),
        "label": pa.array(np.array([it.label for it in items], np.int64)),
        "split": pa.array([split] * n, pa.string()),
        "row_id": pa.array(np.arange(row_start, row_start + n, dtype=np.int64)),
        "seed": pa.array(np.full(n, seed, np.int64)),
    }
    for key in PARAM_KEYS:
        values = [dict(it.params).get(key, math.nan) for it in items]
        columns[key] = pa.array(np.asarray(values, np.float64))
    columns["source_path"] = pa.array([it.rel for it in items], pa.string())
    return pa.table(columns)


def _default_bands(items: list[Item], channels: int) -> list[str]:
    """PNG colour channels are R, G, B (reddest first); other files' channels are numbered."""
    if channels == 3 and all(_kind(it.path) == "png" for it in items):
        return ["R", "G", "B"]
    return [f"band{c}" for c in range(channels)]


def import_cutouts(
    src_dir: str | Path,
    out_uri: str | None,
    storage: StorageConfig,
    *,
    labels_csv: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    rows_per_shard: int = 500,
    pixel_scale_arcsec: float | None = None,
    bands: list[str] | None = None,
) -> tuple[str, DatasetManifest]:
    """Write the cutouts under ``src_dir`` as shards + manifest at ``out_uri`` (default:
    ``{storage.root}/datasets/{dataset_id}``); returns the dataset URI and its manifest.

    Importing the same inputs again into the same URI is a no-op; a URI that holds another dataset
    is refused rather than mixed with this one.
    """
    src = Path(src_dir).expanduser().resolve()
    if not src.is_dir():
        raise CutoutImportError(f"import directory not found: {src}")
    items = items_from_csv(src, Path(labels_csv).expanduser()) if labels_csv else items_from_folders(src)
    if not items:
        raise CutoutImportError(f"{src}: no image files ({', '.join(sorted(SUFFIXES))}) found")
    items.sort(key=lambda it: it.rel)

    # Pass 1: checksums and shapes (one shape for all, or the first file that differs is named).
    shape: tuple[int, ...] | None = None
    first = ""
    digests = []
    for it in items:
        data = it.path.read_bytes()
        digests.append(hashlib.sha256(data).hexdigest())
        s = read_image(it.path, data).shape
        if shape is None:
            shape, first = s, it.rel
        elif s != shape:
            raise CutoutImportError(
                f"{it.path}: image shape {list(s)} differs from {list(shape)} of {first}; "
                "all images must share one shape"
            )
    assert shape is not None
    if bands is not None and len(bands) != shape[0]:
        raise CutoutImportError(f"{len(bands)} band names given for {shape[0]}-channel images")

    labels = np.array([it.label for it in items], np.int64)
    splits = assign_splits(labels, val_fraction, test_fraction, seed)
    options = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
    dataset_id = stable_hash(
        {
            "inputs": [[it.rel, it.label, d, list(it.params)] for it, d in zip(items, digests, strict=True)],
            "split": options,
            "rows_per_shard": rows_per_shard,
            "format_version": SHARD_FORMAT_VERSION,
        }
    )
    uri = dataset_uri(storage.root, dataset_id) if out_uri is None else absolute_uri(out_uri)
    if exists(manifest_uri(uri), storage):
        old = read_manifest(uri, storage)
        if old.dataset_id == dataset_id:
            log.info("dataset %s already holds this import: nothing to do", uri)
            return uri, old
        raise CutoutImportError(
            f"{uri} already holds dataset {old.dataset_id} (not this import, {dataset_id}); "
            "choose another --out"
        )
    ensure_writable(uri, storage)

    # Rows within a split in a seeded random order, so that every shard mixes the classes.
    rng = np.random.default_rng([seed, 0x5B1F])
    files: list[ShardFile] = []
    counts: dict[str, SplitCounts] = {}
    for split in SPLITS:
        idx = np.flatnonzero(splits == split)
        idx = idx[rng.permutation(idx.size)]
        if idx.size == 0:
            continue
        counts[split] = SplitCounts(rows=int(idx.size), positives=int(labels[idx].sum()))
        for index, start in enumerate(range(0, idx.size, rows_per_shard)):
            chunk = [items[i] for i in idx[start : start + rows_per_shard]]
            images = [read_image(it.path) for it in chunk]  # pass 2: decode only one shard at a time
            table = _table(chunk, images, split, start, seed)
            description = {
                "dataset_id": dataset_id,
                "format_version": SHARD_FORMAT_VERSION,
                "split": split,
                "index": index,
                "row_start": start,
                "rows": len(chunk),
            }
            data = shard_to_bytes(table, description)
            path = shard_path(split, index)
            write_bytes(shard_uri(uri, path), data, storage)
            files.append(
                ShardFile(
                    path=path,
                    split=split,
                    rows=len(chunk),
                    positives=int(sum(it.label for it in chunk)),
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
    manifest = DatasetManifest(
        dataset_id=dataset_id,
        source="import",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        image_shape=shape,
        image_unit="as stored in the input files",
        bands=tuple(bands) if bands else tuple(_default_bands(items, shape[0])),
        pixel_scale_arcsec=pixel_scale_arcsec,
        columns=("image", "label", "split", "row_id", "seed", *PARAM_KEYS, "source_path"),
        splits=counts,
        files=tuple(files),
        config={
            "source_dir": str(src),
            "labels_csv": str(labels_csv) if labels_csv else None,
            "rows_per_shard": rows_per_shard,
            **options,
        },
        inputs=ImportInputs(
            count=len(items),
            sha256=hashlib.sha256("\n".join(digests).encode()).hexdigest(),
            kinds=tuple(sorted({_kind(it.path) for it in items})),
        ),
        versions=software_versions(),
    )
    write_manifest(uri, manifest, storage)
    log.info("imported %d cutouts %s into %s (%d shards)", len(items), list(shape), uri, len(files))
    return uri, manifest
