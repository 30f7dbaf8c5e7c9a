"""``lensmill validate``: check a dataset's integrity and audit it for shortcuts, in-process on pyarrow.

Checks (each reported with name, ok, detail):

- ``checksums``: every file the manifest lists exists and its sha256 and size match the manifest.
- ``schema``: required columns, ``image`` byte length = C x H x W x 4, ``split`` and row counts and
  class counts per file as the manifest says.
- ``finite_images``: no NaN or inf pixel.
- ``value_ranges``: labels in range(len(classes)) (the manifest's ``classes``; binary when absent);
  physical parameters finite where they apply (lens parameters on every row, source parameters on
  lensed rows, subhalo and vortex summaries on the classes that have them; columns that are all NaN,
  as in imports, are skipped), sampled parameters inside the ranges of the manifest's config, and the
  ``subhalos`` list consistent with its summaries (count, mass fraction).
- ``class_balance``: per split, majority / minority class count <= ``max_imbalance`` over all classes.
- ``shortcut``: a logistic regression on per-image nuisance statistics (total flux over pixels and
  bands, peak pixel, background std in the outer frame, PSF width) predicts the label with 5-fold
  cross-validation on up to ``shortcut_rows`` training rows; its ROC AUC (``shortcut_auc``: the
  binary AUC for two classes, the macro one-vs-rest AUC for more) must stay <= ``max_shortcut_auc``,
  and so must each statistic's own AUC (one class against the rest, read both ways, the worst
  class), the lens-light flux (``lens_flux_e_per_s``) included. A network would find any such
  shortcut before the arcs.

  The lens-light flux is audited on its own and left out of the joint model by default: it is the
  noise-free truth, so "total flux - lens flux" is the arc's flux itself, the signal rather than a
  shortcut, and a linear model that gets both finds it (AUC ~0.96 on the demo data even when every
  observable statistic were matched). ``shortcut_features`` puts it back in when wanted.

Files are read one at a time, so memory stays at one shard plus a few numbers per image.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lensmill.config import ConfigError, StorageConfig
from lensmill.layout import shard_uri
from lensmill.metrics import roc_auc
from lensmill.records import DatasetManifest, ShardFile
from lensmill.shards import SPLITS, read_manifest
from lensmill.simulate import SUBHALOS_COLUMN
from lensmill.storage import StorageError, absolute_uri, read_bytes

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("image", "label", "split")
# Width of the image border whose pixels estimate the background (arcs and lens light sit inside).
FRAME_PX = 4
# Parameters a simulated row must have finite: every row (the lens, the seeing) ...
LENS_KEYS: tuple[str, ...] = (
    "theta_e_arcsec", "lens_x_arcsec", "lens_y_arcsec", "lens_e1", "lens_e2", "gamma1", "gamma2",
    "lens_mag", "lens_r_sersic_arcsec", "lens_n_sersic", "arc_snr", "lens_flux_e_per_s",
    "source_flux_e_per_s", "psf_fwhm_arcsec",
)  # fmt: skip
# ... and every lens (the source). Other parameters may be NaN by design (a second light component,
# an interloper): for them only inf is an error.
SOURCE_KEYS: tuple[str, ...] = (
    "source_mag", "source_x_arcsec", "source_y_arcsec", "source_offset_frac", "source_e1", "source_e2",
    "source_r_sersic_arcsec", "source_n_sersic", "magnification",
)  # fmt: skip
# Parameters sampled from a config Range: they must lie inside it.
RANGED_KEYS: tuple[str, ...] = (
    "theta_e_arcsec", "lens_mag", "lens_r_sersic_arcsec", "lens_n_sersic", "source_mag",
    "source_r_sersic_arcsec", "source_n_sersic",
)  # fmt: skip
# Substructure summaries and the classes on which a simulation has them finite.
SUBSTRUCTURE_APPLIES: dict[str, tuple[str, ...]] = {
    "n_subhalos": ("no_sub", "cdm", "vortex"),
    "subhalo_mass_fraction": ("no_sub", "cdm", "vortex"),
    "n_vortex_masses": ("vortex",),
    "vortex_mass_fraction": ("vortex",),
    "vortex_length_arcsec": ("vortex",),
    "vortex_angle_rad": ("vortex",),
    "vortex_x_arcsec": ("vortex",),
    "vortex_y_arcsec": ("vortex",),
}
# Class names of a lens-free class (no lensed source: source parameters NaN).
UNLENSED_CLASSES: tuple[str, ...] = ("non-lens",)
FEATURES: tuple[str, ...] = ("total_flux", "peak_pixel", "background_std", "psf_fwhm_arcsec", "lens_flux")
# Observables only (see the module docstring for why lens_flux is audited on its own).
DEFAULT_SHORTCUT_FEATURES: tuple[str, ...] = FEATURES[:4]


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail}


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Nuisance statistics per image of (N, C, H, W): total flux over pixels and bands, peak pixel,
    std of the outer ``FRAME_PX``-pixel frame (all bands)."""
    n, _, h, w = images.shape
    frame = np.ones((h, w), bool)
    k = min(FRAME_PX, h // 4, w // 4)
    frame[k : h - k, k : w - k] = False
    with np.errstate(invalid="ignore", over="ignore"):
        return {
            "total_flux": images.reshape(n, -1).sum(axis=1, dtype=np.float64),
            "peak_pixel": images.reshape(n, -1).max(axis=1).astype(np.float64),
            "background_std": images[:, :, frame].reshape(n, -1).std(axis=1, dtype=np.float64),
        }


def shortcut_auc(features: np.ndarray, labels: np.ndarray, seed: int = 0, folds: int = 5) -> float:
    """``metrics.roc_auc`` (binary, or macro one-vs-rest for more classes) of out-of-fold
    logistic-regression probabilities (standardised features, stratified seeded folds). 0.5 = the
    features say nothing about the label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, features, labels, cv=cv, method="predict_proba")
    return roc_auc(labels, proba)


def _univariate_auc(x: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """AUC of one statistic for one class against the rest, the class farthest from 0.5 (as is, not
    flipped). Two classes: class 1's (class 0's is its mirror image)."""
    from sklearn.metrics import roc_auc_score

    targets = range(1, 2) if n_classes == 2 else range(n_classes)
    aucs = [float(roc_auc_score(y == c, x)) for c in targets]
    return max(aucs, key=lambda a: abs(a - 0.5))


class _Audit:
    """Accumulates findings file by file."""

    def __init__(self, manifest: DatasetManifest) -> None:
        self.manifest = manifest
        self.shape = manifest.image_shape
        self.config = manifest.config
        self.classes = manifest.class_names
        self.lensed = [i for i, c in enumerate(self.classes) if c not in UNLENSED_CLASSES]
        self.checksum_errors: list[str] = []
        self.schema_errors: list[str] = []
        self.nonfinite: list[str] = []
        self.nonfinite_images = 0
        self.range_errors: list[str] = []
        self.counts: dict[str, list[int]] = {}  # split -> rows of each class, in label order
        self.train_stats: list[dict[str, np.ndarray]] = []
        self.rows_read = 0

    def file(self, entry: ShardFile, data: bytes) -> None:
        path = entry.path
        if entry.sha256 is not None and hashlib.sha256(data).hexdigest() != entry.sha256:
            self.checksum_errors.append(f"{path}: sha256 differs from the manifest")
        elif entry.bytes is not None and len(data) != entry.bytes:
            self.checksum_errors.append(f"{path}: {len(data)} bytes, manifest says {entry.bytes}")
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError, ValueError) as exc:
            self.schema_errors.append(f"{path}: not a readable Parquet file ({exc})")
            return
        missing = [
            c for c in (*REQUIRED_COLUMNS, *(self.manifest.columns or ())) if c not in table.schema.names
        ]
        if missing:
            self.schema_errors.append(f"{path}: missing columns {missing}")
            if any(c in missing for c in REQUIRED_COLUMNS):
                return
        self.rows_read += table.num_rows
        if entry.rows is not None and table.num_rows != entry.rows:
            self.schema_errors.append(f"{path}: {table.num_rows} rows, manifest says {entry.rows}")
        splits = set(table.column("split").to_pylist())
        if splits != {entry.split}:
            self.schema_errors.append(
                f"{path}: split column holds {sorted(map(str, splits))}, not {entry.split}"
            )

        labels = table.column("label").to_numpy(zero_copy_only=False)
        k = len(self.classes)
        bad_labels = np.setdiff1d(np.unique(labels), np.arange(k))
        if bad_labels.size:
            expected = "0 or 1" if k == 2 else f"0..{k - 1}"
            self.range_errors.append(f"{path}: labels {bad_labels.tolist()} (expected {expected})")
        counts = [int((labels == c).sum()) for c in range(k)]
        positives = int((labels != 0).sum())
        if entry.positives is not None and positives != entry.positives:
            self.schema_errors.append(f"{path}: {positives} positives, manifest says {entry.positives}")
        if entry.class_counts is not None and list(entry.class_counts) != counts:
            self.schema_errors.append(
                f"{path}: class counts {counts}, manifest says {list(entry.class_counts)}"
            )
        c = self.counts.setdefault(entry.split, [0] * k)
        for i, n in enumerate(counts):
            c[i] += n

        images = self._images(table.column("image"), path)
        if images is None:
            return
        finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        if not finite.all():
            self.nonfinite_images += int((~finite).sum())
            rows = table.column("row_id").to_pylist() if "row_id" in table.schema.names else None
            first = int(np.flatnonzero(~finite)[0])
            self.nonfinite.append(f"{path} row {rows[first] if rows else first}")
        self._ranges(table, labels, path)
        if entry.split == "train":
            stats = image_statistics(images)
            stats["label"] = labels.astype(np.int64)
            for key, col in (("psf_fwhm_arcsec", "psf_fwhm_arcsec"), ("lens_flux", "lens_flux_e_per_s")):
                values = None
                if col in table.schema.names:
                    values = table.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
                if values is not None and not np.isnan(values).all():
                    stats[key] = values
                elif key == "psf_fwhm_arcsec" and isinstance(self.config.get(key), int | float):
                    stats[key] = np.full(len(labels), float(self.config["psf_fwhm_arcsec"]))
            self.train_stats.append(stats)

    def _images(self, column: pa.ChunkedArray, path: str) -> np.ndarray | None:
        expected = math.prod(self.shape) * 4
        if not pa.types.is_binary(column.type) and not pa.types.is_large_binary(column.type):
            self.schema_errors.append(f"{path}: image column is {column.type}, expected binary")
            return None
        lengths = pc.binary_length(column).to_numpy(zero_copy_only=False)
        if lengths.size and (lengths != expected).any():
            bad = int(np.flatnonzero(lengths != expected)[0])
            self.schema_errors.append(
                f"{path}: image of row {bad} has {int(lengths[bad])} bytes; "
                f"shape {list(self.shape)} float32 needs {expected}"
            )
            return None
        buf = b"".join(column.to_pylist())
        return np.frombuffer(buf, np.float32).reshape(-1, *self.shape)

    def _ranges(self, table: pa.Table, labels: np.ndarray, path: str) -> None:
        # Every float column is a physical parameter (the simulator's set grows; imports add none).
        for key in [f.name for f in table.schema if pa.types.is_floating(f.type)]:
            values = table.column(key).to_numpy(zero_copy_only=False).astype(np.float64)
            if np.isnan(values).all():  # not provided (imports): nothing to check
                continue
            if np.isinf(values).any():
                self.range_errors.append(f"{path}: {key} holds inf")
            # Imports may know a parameter for some rows only; simulations know it wherever it applies.
            applies = self._applies(key, labels)
            if self.manifest.source != "import" and applies is not None:
                n = int((~np.isfinite(values[applies])).sum())
                if n:
                    self.range_errors.append(f"{path}: {key} is not finite on {n} rows where it applies")
            bounds = self.config.get(key)
            if key in RANGED_KEYS and isinstance(bounds, dict):
                lo, hi = bounds.get("min"), bounds.get("max")
                lo = -math.inf if not isinstance(lo, int | float) else float(lo)
                hi = math.inf if not isinstance(hi, int | float) else float(hi)
                v = values[np.isfinite(values)]
                # A hair of slack: parameters went through float64 arithmetic and back.
                tol = 1e-9 * max(
                    1.0, abs(lo) if math.isfinite(lo) else 1.0, abs(hi) if math.isfinite(hi) else 1.0
                )
                if v.size and (v.min() < lo - tol or v.max() > hi + tol):
                    self.range_errors.append(
                        f"{path}: {key} spans [{v.min():.4g}, {v.max():.4g}], outside [{lo:g}, {hi:g}]"
                    )
        if "arc_snr" in table.schema.names:
            snr = table.column("arc_snr").to_numpy(zero_copy_only=False)
            if (snr[np.isfinite(snr)] < 0).any():
                self.range_errors.append(f"{path}: negative arc_snr")
        if SUBHALOS_COLUMN in table.schema.names:
            self._substructure(table, path)

    def _applies(self, key: str, labels: np.ndarray) -> np.ndarray | None:
        """Rows on which a simulation has ``key`` finite; None for a key that may be NaN anywhere."""
        if key in LENS_KEYS:
            return np.ones(labels.size, bool)
        if key in SOURCE_KEYS:
            return np.isin(labels, self.lensed)
        if key in SUBSTRUCTURE_APPLIES:
            return np.isin(labels, [i for i, c in enumerate(self.classes) if c in SUBSTRUCTURE_APPLIES[key]])
        return None

    def _substructure(self, table: pa.Table, path: str) -> None:
        """The ``subhalos`` list against its summaries and the config's bounds."""
        cfg = self.config

        def col(name: str) -> np.ndarray:
            if name not in table.schema.names:
                return np.full(table.num_rows, np.nan)
            return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

        lists = table.column(SUBHALOS_COLUMN).to_pylist()
        # (rows,) point masses listed, and their sum of theta_E^2.
        n_listed = np.array([len(v or ()) for v in lists], np.float64)
        theta2 = np.array([sum(s["theta_e_arcsec"] ** 2 for s in v or ()) for v in lists])
        n_sub, n_vortex = col("n_subhalos"), np.nan_to_num(col("n_vortex_masses"))
        if not np.array_equal(n_listed, n_sub + n_vortex):
            self.range_errors.append(
                f"{path}: subhalos lists do not hold n_subhalos + n_vortex_masses entries"
            )
        # Mass fractions: (theta_E_sub / theta_E)^2 summed over the list.
        mass = theta2 / col("theta_e_arcsec") ** 2
        recorded = col("subhalo_mass_fraction") + np.nan_to_num(col("vortex_mass_fraction"))
        if not np.allclose(mass, recorded, rtol=1e-6, atol=1e-12, equal_nan=True):
            self.range_errors.append(f"{path}: subhalos lists do not add up to the recorded mass fractions")
        bounds = {
            "n_subhalos": (0.0, cfg.get("n_subhalos_max", math.inf)),
            "subhalo_mass_fraction": (0.0, n_sub * cfg.get("subhalo_mass_max_frac", 1.0)),
            "vortex_angle_rad": (0.0, math.pi),
        }
        for key, (lo, hi) in bounds.items():
            v = col(key)
            ok = np.isnan(v) | ((v >= lo - 1e-9) & (v <= np.asarray(hi) + 1e-9))
            if not ok.all():
                self.range_errors.append(
                    f"{path}: {key} outside [{lo:g}, {np.max(hi):g}] on {int((~ok).sum())} rows"
                )


def validate_dataset(
    dataset_uri: str,
    storage: StorageConfig,
    *,
    max_shortcut_auc: float = 0.65,
    max_imbalance: float = 1.5,
    shortcut_rows: int = 4000,
    shortcut_features: tuple[str, ...] = DEFAULT_SHORTCUT_FEATURES,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every check on the dataset at ``dataset_uri``; ``ok`` is True when all pass.

    Raises ``DatasetError`` when there is no readable manifest (then nothing can be checked) and
    ``ConfigError`` for an unknown shortcut feature.
    """
    unknown = sorted(set(shortcut_features) - set(FEATURES))
    if unknown:
        raise ConfigError(f"unknown shortcut features {unknown}; choose from {list(FEATURES)}")
    uri = absolute_uri(dataset_uri)
    manifest = read_manifest(uri, storage)
    audit = _Audit(manifest)
    missing_files = []
    for entry in manifest.files:
        try:
            data = read_bytes(shard_uri(uri, entry.path), storage)
        except StorageError:
            missing_files.append(entry.path)
            continue
        audit.file(entry, data)
    log.info("read %d rows in %d files of %s", audit.rows_read, len(manifest.files), uri)

    checks = []
    problems = [f"{p}: missing" for p in missing_files] + audit.checksum_errors
    checks.append(
        _check(
            "checksums",
            not problems,
            f"{len(manifest.files) - len(problems)}/{len(manifest.files)} files match the manifest"
            + (f"; {_some(problems)}" if problems else ""),
        )
    )

    schema = list(audit.schema_errors)
    classes = audit.classes
    for split, counts in manifest.splits.items():
        got = audit.counts.get(split, [0] * len(classes))
        want = list(counts.class_counts or (counts.negatives, counts.positives))
        if got != want and not missing_files:
            schema.append(f"split {split}: {_counted(got, classes)}, manifest says {_counted(want, classes)}")
    checks.append(
        _check(
            "schema",
            not schema,
            f"columns, image bytes ({'x'.join(map(str, audit.shape))} float32) and counts as in the manifest"
            if not schema
            else _some(schema),
        )
    )
    checks.append(
        _check(
            "finite_images",
            not audit.nonfinite_images,
            f"{audit.nonfinite_images} images hold NaN or inf"
            + (f", first: {_some(audit.nonfinite)}" if audit.nonfinite else ""),
        )
    )
    checks.append(
        _check(
            "value_ranges",
            not audit.range_errors,
            f"labels in {{{', '.join(map(str, range(len(classes))))}}}; parameters finite where they "
            "apply and inside the config ranges"
            if not audit.range_errors
            else _some(audit.range_errors),
        )
    )

    balance, ratios = [], {}
    for split in [s for s in SPLITS if s in audit.counts] + sorted(set(audit.counts) - set(SPLITS)):
        counts = audit.counts[split]
        ratio = math.inf if min(counts) == 0 else max(counts) / min(counts)
        ratios[split] = {
            "positives": sum(counts[1:]),  # label != 0, as in the manifest
            "negatives": counts[0],
            **({"per_class": dict(zip(classes, counts, strict=True))} if len(classes) > 2 else {}),
            "ratio": round(ratio, 3) if ratio < math.inf else None,
        }
        if ratio > max_imbalance:
            balance.append(f"{split}: {_counted(counts, classes)}")
    checks.append(
        _check(
            "class_balance",
            not balance,
            (f"majority/minority > {max_imbalance} in " + "; ".join(balance))
            if balance
            else f"majority/minority <= {max_imbalance} in every split",
        )
    )

    shortcut = _shortcut(audit.train_stats, len(classes), shortcut_rows, tuple(shortcut_features), seed)
    auc = shortcut["shortcut_auc"]
    if auc is None:
        checks.append(_check("shortcut", True, f"skipped: {shortcut['reason']}"))
    else:
        # A single statistic below 0.5 predicts the other class just as well: read AUCs both ways.
        leaks = {
            k: v for k, v in shortcut["shortcut_feature_auc"].items() if max(v, 1 - v) > max_shortcut_auc
        }
        ok_auc = auc <= max_shortcut_auc
        detail = (
            f"classifier on {', '.join(shortcut['shortcut_features'])}: AUC {auc:.3f} on "
            f"{shortcut['shortcut_rows']} train rows ({'<=' if ok_auc else '>'} {max_shortcut_auc}); "
            "per statistic: " + ", ".join(f"{k} {v:.2f}" for k, v in shortcut["shortcut_feature_auc"].items())
        )
        if leaks:
            detail += f"; gives the label away alone: {', '.join(leaks)}"
        checks.append(_check("shortcut", ok_auc and not leaks, detail))
    ok = all(c["ok"] for c in checks)
    return {
        "ok": ok,
        "dataset_uri": uri,
        "dataset_id": manifest.dataset_id,
        "source": manifest.source,
        "image_shape": list(audit.shape),
        "rows": audit.rows_read,
        "classes": list(classes),
        "class_counts": ratios,
        **{k: v for k, v in shortcut.items() if k != "reason"},
        "thresholds": {"max_shortcut_auc": max_shortcut_auc, "max_imbalance": max_imbalance},
        "failed": [c["name"] for c in checks if not c["ok"]],
        "checks": checks,
    }


def _counted(counts: list[int], classes: tuple[str, ...]) -> str:
    """``"3 non-lens / 5 lens"``."""
    return " / ".join(f"{n} {c}" for n, c in zip(counts, classes, strict=True))


def _shortcut(
    stats: list[dict[str, np.ndarray]],
    n_classes: int,
    max_rows: int,
    features: tuple[str, ...],
    seed: int,
) -> dict[str, Any]:
    """The shortcut audit on the train split's statistics; ``shortcut_auc`` None when it cannot run."""
    empty: dict[str, Any] = {"shortcut_auc": None, "shortcut_rows": 0, "shortcut_features": []}
    if not stats:
        return {**empty, "reason": "no train split"}
    merged = {k: np.concatenate([s[k] for s in stats if k in s]) for k in stats[0]}
    labels = merged.pop("label")
    keep = np.isin(labels, np.arange(n_classes))  # other labels are reported by value_ranges
    for k in ("total_flux", "peak_pixel", "background_std"):
        keep &= np.isfinite(merged[k])  # images with NaN pixels are reported by finite_images
    idx = np.flatnonzero(keep)
    if idx.size > max_rows:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_rows, replace=False))
    y = labels[idx]
    minority = int(min((y == c).sum() for c in range(n_classes)))
    if minority < 2:
        return {**empty, "reason": f"{minority} image(s) of the minority class among {idx.size} train rows"}
    # A feature enters only when it is known on every sampled row (lens flux is NaN in imports).
    known = [k for k in FEATURES if k in merged and np.isfinite(merged[k][idx]).all()]
    names = [k for k in features if k in known]
    if not names:
        return {**empty, "reason": f"none of the features {list(features)} is known on every row"}
    x = np.column_stack([merged[k][idx] for k in names])
    auc = shortcut_auc(x, y, seed=seed, folds=min(5, minority))
    feature_auc = {}
    for k in known:
        v = merged[k][idx]
        # Constant features (PSF width of a single-PSF dataset) carry no information: AUC 0.5.
        feature_auc[k] = 0.5 if np.ptp(v) == 0 else round(_univariate_auc(v, y, n_classes), 4)
    return {
        "shortcut_auc": round(auc, 4),
        "shortcut_rows": int(idx.size),
        "shortcut_features": names,
        "shortcut_feature_auc": feature_auc,
        "reason": "",
    }
