"""Importing cutouts: class folders and CSV, PNG / FITS / NPY -> shards that load_split reads back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from lensmill.config import StorageConfig
from lensmill.importer import CutoutImportError, assign_splits, import_cutouts, read_image
from lensmill.shards import load_split, read_manifest


def storage(tmp_path: Path) -> StorageConfig:
    return StorageConfig(root=str(tmp_path / "root"))


def write_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def write_fits(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # An empty primary HDU first: the reader must take the first HDU that holds data.
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(array.astype(">f4"))]).writeto(path)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def all_rows(uri: str, st: StorageConfig) -> dict[str, tuple[np.ndarray, int]]:
    """source_path -> (image, label) over every split of a dataset."""
    out = {}
    for split in read_manifest(uri, st).splits:
        images, labels, table = load_split(uri, split, st)
        assert set(table.column("split").to_pylist()) == {split}
        for img, label, rel in zip(images, labels, table.column("source_path").to_pylist(), strict=True):
            out[rel] = (img, int(label))
    return out


def test_class_folders_fits_and_npy_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "cutouts"
    expected = {}
    for i in range(6):
        lens = rng.normal(size=(2, 12, 12)).astype(np.float32)
        non = rng.normal(size=(2, 12, 12)).astype(np.float32)
        write_fits(src / "Lens" / f"l{i}.fits", lens)  # folder names match case-insensitively
        write_npy(src / "nonlens" / f"n{i}.npy", non)
        expected[f"Lens/l{i}.fits"] = (lens, 1)
        expected[f"nonlens/n{i}.npy"] = (non, 0)
    st = storage(tmp_path)
    uri, m = import_cutouts(src, None, st, val_fraction=0.25, test_fraction=0.25, seed=3, rows_per_shard=2)
    assert uri.endswith(f"/datasets/{m.dataset_id}")
    assert m.source == "import" and m.image_shape == (2, 12, 12)
    # Stratified: 6 per class -> 2 test, 2 val (rounded 1.5 up), 2 train per class.
    splits = {s: c.model_dump() for s, c in m.splits.items()}
    assert splits == {s: {"rows": 4, "positives": 2, "negatives": 2} for s in ("train", "val", "test")}
    assert sum(f.rows for f in m.files) == 12 and len(m.files) == 6
    assert all(len(f.sha256) == 64 for f in m.files)
    assert read_manifest(uri, st) == m  # what was written reads back as the same record

    got = all_rows(uri, st)
    assert set(got) == set(expected)
    for rel, (img, label) in expected.items():
        assert got[rel][1] == label
        assert np.array_equal(got[rel][0], img)

    # Same inputs and options: the same dataset id; another seed: another id (other split).
    _, again = import_cutouts(src, str(tmp_path / "b"), st, val_fraction=0.25, test_fraction=0.25, seed=3,
                              rows_per_shard=2)  # fmt: skip
    assert again.dataset_id == m.dataset_id
    assert [f.sha256 for f in again.files] == [f.sha256 for f in m.files]
    _, other = import_cutouts(src, str(tmp_path / "c"), st, val_fraction=0.25, test_fraction=0.25, seed=4)
    assert other.dataset_id != m.dataset_id
    with pytest.raises(CutoutImportError, match="already holds dataset"):
        import_cutouts(src, str(tmp_path / "b"), st, seed=5)


def test_csv_with_png_rgb_and_grayscale(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "pngs"
    rows = ["path,label,theta_e_arcsec"]
    expected = {}
    for i in range(4):
        rgb = rng.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)
        write_png(src / f"img{i}.png", rgb)
        label = i % 2
        rows.append(f"img{i}.png,{'lens' if label else 'nonlens'},{1.5 if label else ''}")
        expected[f"img{i}.png"] = (rgb.transpose(2, 0, 1).astype(np.float32), label)
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    st = storage(tmp_path)
    uri, m = import_cutouts(src, str(tmp_path / "out"), st, labels_csv=csv, val_fraction=0, test_fraction=0)
    assert m.image_shape == (3, 10, 10) and m.bands == ("R", "G", "B")
    assert list(m.splits) == ["train"]
    images, labels, table = load_split(uri, "train", st)
    for img, label, rel, theta in zip(
        images, labels, table.column("source_path").to_pylist(), table.column("theta_e_arcsec").to_pylist(),
        strict=True,
    ):  # fmt: skip
        assert np.array_equal(img, expected[rel][0]) and label == expected[rel][1]
        assert theta == 1.5 if label else np.isnan(theta)

    gray = rng.integers(0, 256, size=(7, 9), dtype=np.uint8)
    write_png(tmp_path / "g.png", gray)
    assert np.array_equal(read_image(tmp_path / "g.png"), gray[None].astype(np.float32))


def test_mixed_shapes_name_the_first_file_that_differs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_npy(src / "1" / "a.npy", np.zeros((8, 8), np.float32))
    write_npy(src / "0" / "b.npy", np.zeros((8, 8), np.float32))
    write_npy(src / "0" / "c.npy", np.zeros((1, 9, 8), np.float32))
    with pytest.raises(CutoutImportError, match=r"c\.npy: image shape \[1, 9, 8\] differs from \[1, 8, 8\]"):
        import_cutouts(src, None, storage(tmp_path))


def test_unknown_class_folder_and_bad_files_are_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_npy(src / "lens" / "a.npy", np.zeros((8, 8), np.float32))
    write_npy(src / "maybe" / "b.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(CutoutImportError, match=r"unknown class folder\(s\) \['maybe'\]"):
        import_cutouts(src, None, storage(tmp_path))

    (src / "maybe" / "b.npy").unlink()
    (src / "maybe").rmdir()
    (src / "lens" / "notes.txt").write_text("hi")
    with pytest.raises(CutoutImportError, match=r"notes\.txt: unsupported file type"):
        import_cutouts(src, None, storage(tmp_path))

    (src / "lens" / "notes.txt").unlink()
    (src / "lens" / "broken.fits").write_bytes(b"not a fits file")
    with pytest.raises(CutoutImportError, match=r"broken\.fits"):
        import_cutouts(src, None, storage(tmp_path))

    csv = tmp_path / "l.csv"
    csv.write_text("path,label\nlens/a.npy,maybe\n")
    with pytest.raises(CutoutImportError, match=r"l\.csv:2: label 'maybe'"):
        import_cutouts(src, None, storage(tmp_path), labels_csv=csv)

    write_npy(tmp_path / "hwc.npy", np.zeros((32, 32, 3), np.float32))
    with pytest.raises(CutoutImportError, match=r"looks like \(H, W, C\)"):
        read_image(tmp_path / "hwc.npy")


def test_splits_are_seeded_and_stratified() -> None:
    labels = np.array([0] * 50 + [1] * 30)
    a = assign_splits(labels, 0.2, 0.1, seed=7)
    assert np.array_equal(a, assign_splits(labels, 0.2, 0.1, seed=7))
    assert not np.array_equal(a, assign_splits(labels, 0.2, 0.1, seed=8))
    assert [(a[labels == c] == "val").sum() for c in (0, 1)] == [10, 6]
    assert [(a[labels == c] == "test").sum() for c in (0, 1)] == [5, 3]
    with pytest.raises(CutoutImportError, match="sum to less than 1"):
        assign_splits(labels, 0.6, 0.5, seed=0)
