"""The dataset audit: integrity checks and the nuisance-statistics shortcut classifier."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lensmill.audit import image_statistics, validate_dataset
from lensmill.config import StorageConfig
from lensmill.layout import MANIFEST_FILE
from lensmill.shards import DatasetError, shard_to_bytes
from lensmill.simulate import PARAM_KEYS

SHAPE = (1, 16, 16)
ST = StorageConfig(root="/tmp/unused")


def make_dataset(
    root: Path,
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    params: dict[str, dict[str, np.ndarray]] | None = None,
    rows_per_shard: int = 100,
) -> Path:
    """A dataset in lensmill's shard format, written without Ray (as shards.py lays it out)."""
    files, splits = [], {}
    for split, imgs in images.items():
        y = labels[split]
        splits[split] = {"rows": len(y), "positives": int(y.sum()), "negatives": int((y == 0).sum())}
        for index, start in enumerate(range(0, len(y), rows_per_shard)):
            sl = slice(start, start + rows_per_shard)
            n = len(y[sl])
            cols = {
                "image": pa.array([im.astype(np.float32).tobytes() for im in imgs[sl]], pa.binary()),
                "label": pa.array(y[sl].astype(np.int64)),
                "split": pa.array([split] * n),
                "row_id": pa.array(np.arange(start, start + n, dtype=np.int64)),
                "seed": pa.array(np.zeros(n, np.int64)),
            }
            extra = (params or {}).get(split, {})
            for k in PARAM_KEYS:
                cols[k] = pa.array(
                    np.asarray(extra[k][sl], np.float64) if k in extra else np.full(n, math.nan)
                )
            data = shard_to_bytes(pa.table(cols), {"split": split, "index": index})
            path = f"{split}/part-{index:05d}.parquet"
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
            files.append(
                {"path": path, "split": split, "rows": n, "positives": int(y[sl].sum()), "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}
            )  # fmt: skip
    manifest = {
        "dataset_id": "test",
        "image_shape": list(SHAPE),
        "splits": splits,
        "files": files,
        "columns": ["image", "label", "split", "row_id", "seed", *PARAM_KEYS],
        "config": {"psf_fwhm_arcsec": 0.7, "theta_e_arcsec": {"min": 0.8, "max": 2.0}},
    }
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    return root


def balanced(rng: np.random.Generator, n: int, flux_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Noise images with a centred blob of random brightness; lenses get ``flux_shift`` more."""
    labels = np.arange(n) % 2
    images = rng.normal(0.0, 1.0, size=(n, *SHAPE))
    yy, xx = np.mgrid[:16, :16]
    blob = np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / 8.0)
    amp = rng.uniform(5, 15, size=n) + flux_shift * labels
    images += amp[:, None, None, None] * blob
    return images.astype(np.float32), labels


def dataset(tmp_path: Path, flux_shift: float = 0.0, n_train: int = 400, **kw) -> Path:
    rng = np.random.default_rng(0)
    parts = {s: balanced(rng, n, flux_shift) for s, n in (("train", n_train), ("val", 40))}
    return make_dataset(tmp_path / "ds", {s: p[0] for s, p in parts.items()},
                        {s: p[1] for s, p in parts.items()}, **kw)  # fmt: skip


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_balanced_dataset_passes(tmp_path: Path) -> None:
    report = validate_dataset(str(dataset(tmp_path)), ST)
    assert report["ok"], report["checks"]
    assert set(by_name(report)) == {
        "checksums", "schema", "finite_images", "value_ranges", "class_balance", "shortcut",
    }  # fmt: skip
    assert report["shortcut_auc"] < 0.62
    assert report["shortcut_rows"] == 400
    # PSF width comes from the manifest config; lens flux is all NaN here and is left out.
    assert report["shortcut_features"] == ["total_flux", "peak_pixel", "background_std", "psf_fwhm_arcsec"]
    assert report["rows"] == 440 and report["failed"] == []


def test_flux_shortcut_is_flagged(tmp_path: Path) -> None:
    report = validate_dataset(str(dataset(tmp_path, flux_shift=8.0)), ST, shortcut_rows=300)
    assert not report["ok"]
    assert report["failed"] == ["shortcut"]
    assert report["shortcut_auc"] > 0.85 and report["shortcut_rows"] == 300
    assert report["shortcut_feature_auc"]["total_flux"] > 0.8
    # A looser threshold lets the same dataset through.
    assert validate_dataset(str(dataset(tmp_path / "b", flux_shift=8.0)), ST, max_shortcut_auc=0.99)["ok"]


def test_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    root = dataset(tmp_path)
    shard = root / "train/part-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the image pages: the file still parses
    shard.write_bytes(bytes(data))
    report = validate_dataset(str(root), ST)
    assert not report["ok"] and "checksums" in report["failed"]
    assert "train/part-00002.parquet: sha256 differs" in by_name(report)["checksums"]["detail"]

    shard.unlink()
    report = validate_dataset(str(root), ST)
    assert "train/part-00002.parquet: missing" in by_name(report)["checksums"]["detail"]


def test_nan_pixel_and_bad_values_are_detected(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images, labels = balanced(rng, 200)
    images[17, 0, 3, 4] = np.nan
    theta = rng.uniform(0.8, 2.0, size=200)
    theta[5] = 7.0  # outside the config range
    labels = labels.copy()
    labels[9] = 2
    root = make_dataset(tmp_path / "ds", {"train": images}, {"train": labels},
                        params={"train": {"theta_e_arcsec": theta}})  # fmt: skip
    report = validate_dataset(str(root), ST)
    checks = by_name(report)
    assert not checks["finite_images"]["ok"]
    assert checks["finite_images"]["detail"].startswith(
        "1 images hold NaN or inf, first: train/part-00000.parquet row 17"
    )
    assert not checks["value_ranges"]["ok"]
    assert (
        "labels [2]" in checks["value_ranges"]["detail"]
        and "theta_e_arcsec spans" in checks["value_ranges"]["detail"]
    )
    # The NaN image is left out of the shortcut audit rather than breaking it.
    assert report["shortcut_auc"] is not None and report["shortcut_rows"] <= 199


def test_imbalance_and_image_size_are_checked(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images, _ = balanced(rng, 80)
    labels = (np.arange(80) % 4 == 0).astype(int)  # 1 lens : 3 non-lenses
    root = make_dataset(tmp_path / "ds", {"train": images}, {"train": labels})
    report = validate_dataset(str(root), ST, max_imbalance=2.0)
    assert report["failed"] == ["class_balance"]
    assert report["class_counts"]["train"] == {"positives": 20, "negatives": 60, "ratio": 3.0}
    assert validate_dataset(str(root), ST, max_imbalance=3.0)["ok"]

    manifest = json.loads((root / MANIFEST_FILE).read_text())
    manifest["image_shape"] = [1, 16, 15]
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    detail = by_name(validate_dataset(str(root), ST))["schema"]["detail"]
    assert "image of row 0 has 1024 bytes; shape [1, 16, 15] float32 needs 960" in detail


def test_statistics_and_missing_manifest(tmp_path: Path) -> None:
    images = np.zeros((2, 2, 16, 16), np.float32)
    images[0, :, 8, 8] = 5.0
    images[1, 0, 0, :] = 1.0  # a line in the outer frame
    s = image_statistics(images)
    assert s["total_flux"].tolist() == [10.0, 16.0]
    assert s["peak_pixel"].tolist() == [5.0, 1.0]
    assert s["background_std"][0] == 0.0 and s["background_std"][1] > 0
    with pytest.raises(DatasetError, match="no manifest.json"):
        validate_dataset(str(tmp_path), ST)


def test_lens_light_is_audited_on_its_own(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images, labels = balanced(rng, 300)
    # Lenses drawn from brighter lens galaxies than non-lenses: a nuisance that gives the label away.
    lens_flux = rng.uniform(100, 200, size=300) + 60 * labels
    root = make_dataset(tmp_path / "ds", {"train": images}, {"train": labels},
                        params={"train": {"lens_flux_e_per_s": lens_flux}})  # fmt: skip
    report = validate_dataset(str(root), ST)
    assert "lens_flux" not in report["shortcut_features"]  # not in the joint model by default ...
    assert report["shortcut_auc"] < 0.65
    assert report["shortcut_feature_auc"]["lens_flux"] > 0.75  # ... but audited alone
    assert report["failed"] == ["shortcut"]
    assert "gives the label away alone: lens_flux" in by_name(report)["shortcut"]["detail"]

    joint = validate_dataset(str(root), ST, shortcut_features=("total_flux", "lens_flux"))
    assert joint["shortcut_features"] == ["total_flux", "lens_flux"] and joint["shortcut_auc"] > 0.75
