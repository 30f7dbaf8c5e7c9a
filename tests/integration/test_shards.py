"""Ray Data shards end to end: write, read back, determinism, resume, missing manifest, S3 (moto)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lensmill.config import Config, load_config
from lensmill.layout import MANIFEST_FILE
from lensmill.records import DatasetManifest
from lensmill.shards import (
    DatasetError,
    dataset_id_for,
    dataset_uri_for,
    decode_images,
    load_split,
    read_manifest,
    read_shards,
    write_shards,
)

# Ray workers inherit the environment of the head, which the session starts after collection: the
# credentials moto accepts must be in place before then (pyarrow resolves them in every worker).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

TINY = ["sim.n_train=40", "sim.n_val=20", "sim.n_test=20", "sim.rows_per_shard=10", "sim.image_size_px=32"]


def tiny_config(root: str, *extra: str) -> Config:
    return load_config(None, [*TINY, f"storage.root={root}", *extra])


@pytest.fixture(scope="module")
def written(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, DatasetManifest]:
    cfg = tiny_config(str(tmp_path_factory.mktemp("shards-a")))
    return cfg, write_shards(cfg)


def shard_files(cfg: Config) -> dict[str, Path]:
    root = Path(dataset_uri_for(cfg))
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.parquet"))}


def test_write_then_read_back(written: tuple[Config, DatasetManifest]) -> None:
    cfg, manifest = written
    uri = dataset_uri_for(cfg)
    assert uri.endswith(f"/datasets/{dataset_id_for(cfg.sim)}")
    assert manifest.dataset_id == dataset_id_for(cfg.sim)
    assert manifest.image_shape == (1, 32, 32)
    assert {s: c.model_dump() for s, c in manifest.splits.items()} == {
        "train": {"rows": 40, "positives": 20, "negatives": 20, "class_counts": (20, 20)},
        "val": {"rows": 20, "positives": 10, "negatives": 10, "class_counts": (10, 10)},
        "test": {"rows": 20, "positives": 10, "negatives": 10, "class_counts": (10, 10)},
    }
    assert manifest.classes == ("non-lens", "lens")
    assert set(manifest.versions) >= {"lensmill", "lenstronomy", "ray", "pyarrow"}
    assert manifest.config["n_train"] == 40
    assert read_manifest(uri, cfg.storage) == manifest

    # The manifest lists every shard with the checksum of its bytes, and nothing else is there.
    files = shard_files(cfg)
    assert sorted(f.path for f in manifest.files) == sorted(files)
    assert len(files) == 4 + 2 + 2
    for f in manifest.files:
        assert hashlib.sha256(files[f.path].read_bytes()).hexdigest() == f.sha256

    for split, counts in manifest.splits.items():
        ds = read_shards(uri, split, cfg.storage)
        assert ds.count() == counts.rows
    batch = read_shards(uri, "train", cfg.storage).take_batch(40, batch_format="numpy")
    assert sorted(batch["row_id"].tolist()) == list(range(40))
    assert int(batch["label"].sum()) == 20
    assert set(batch["split"].tolist()) == {"train"}
    images = decode_images(batch["image"], (1, 32, 32))
    assert images.shape == (40, 1, 32, 32) and images.dtype == np.float32 and np.isfinite(images).all()
    # Positives carry a source; negatives have NaN source parameters and no arc.
    pos = batch["label"] == 1
    assert np.all(batch["arc_snr"][pos] > 0) and np.all(batch["arc_snr"][~pos] == 0)
    assert np.all(np.isnan(batch["source_mag"][~pos]))

    images, labels, table = load_split(uri, "val", cfg.storage)
    assert images.shape == (20, 1, 32, 32) and labels.dtype == np.int64
    assert labels.sum() == 10
    assert (
        table.num_rows == 20 and "theta_e_arcsec" in table.column_names and "image" not in table.column_names
    )
    assert table.column("row_id").to_pylist() == list(range(20))

    with pytest.raises(DatasetError, match="no split 'holdout'"):
        read_shards(uri, "holdout", cfg.storage)


def test_same_config_in_two_roots_is_bit_identical(
    written: tuple[Config, DatasetManifest], tmp_path: Path
) -> None:
    cfg_a, manifest_a = written
    cfg_b = tiny_config(str(tmp_path))
    manifest_b = write_shards(cfg_b)
    assert manifest_b.dataset_id == manifest_a.dataset_id
    assert [f.sha256 for f in manifest_b.files] == [f.sha256 for f in manifest_a.files]
    images_a, labels_a, _ = load_split(dataset_uri_for(cfg_a), "train", cfg_a.storage)
    images_b, labels_b, _ = load_split(dataset_uri_for(cfg_b), "train", cfg_b.storage)
    assert images_a.tobytes() == images_b.tobytes()
    assert np.array_equal(labels_a, labels_b)


def test_resume_renders_only_missing_or_broken_shards(
    written: tuple[Config, DatasetManifest], tmp_path: Path
) -> None:
    cfg_a, manifest_a = written
    cfg = tiny_config(str(tmp_path))
    shutil.copytree(Path(dataset_uri_for(cfg_a)), Path(dataset_uri_for(cfg)))
    files = shard_files(cfg)
    (Path(dataset_uri_for(cfg)) / MANIFEST_FILE).unlink()
    redone = ("train/part-00002.parquet", "test/part-00001.parquet")
    files[redone[0]].unlink()
    # A damaged shard (one byte flipped inside the image pages) is caught by its page checksums.
    damaged = bytearray(files[redone[1]].read_bytes())
    damaged[len(damaged) // 3] ^= 0xFF
    files[redone[1]].write_bytes(bytes(damaged))
    kept = {k: p.stat().st_mtime_ns for k, p in files.items() if k not in redone}
    assert len(kept) == 6

    with pytest.raises(DatasetError, match=f"incomplete dataset: no manifest.json at {dataset_uri_for(cfg)}"):
        read_shards(dataset_uri_for(cfg), "train", cfg.storage)

    manifest = write_shards(cfg)
    assert {k: files[k].stat().st_mtime_ns for k in kept} == kept
    for k in redone:
        digest = hashlib.sha256(files[k].read_bytes()).hexdigest()
        assert digest == next(f.sha256 for f in manifest_a.files if f.path == k)
    assert manifest.files == manifest_a.files
    assert manifest.splits == manifest_a.splits

    # A complete dataset is returned as is: no file is touched, the manifest is not rewritten.
    before = {p: p.stat().st_mtime_ns for p in Path(dataset_uri_for(cfg)).rglob("*")}
    assert write_shards(cfg) == manifest
    assert {p: p.stat().st_mtime_ns for p in Path(dataset_uri_for(cfg)).rglob("*")} == before


def test_dataset_without_manifest_is_never_read(ray_session: str, tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path))
    uri = dataset_uri_for(cfg)
    (Path(uri) / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"incomplete dataset: no manifest.json at {uri}"):
        read_shards(uri, "train", cfg.storage)
    with pytest.raises(DatasetError, match="incomplete dataset"):
        load_split(uri, "val", cfg.storage)


def test_s3_round_trip(ray_session: str, s3_endpoint: str) -> None:
    import boto3

    bucket = "lensmill-shards"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    cfg = tiny_config(f"s3://{bucket}/prefix", f"storage.s3_endpoint_url={s3_endpoint}", "sim.n_train=20")
    manifest = write_shards(cfg)
    uri = dataset_uri_for(cfg)
    assert uri == f"s3://{bucket}/prefix/datasets/{manifest.dataset_id}"
    assert read_manifest(uri, cfg.storage) == manifest
    assert read_shards(uri, "train", cfg.storage).count() == 20
    images, labels, table = load_split(uri, "test", cfg.storage)
    assert images.shape == (20, 1, 32, 32) and labels.sum() == 10 and table.num_rows == 20
    keys = {
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(
            Bucket=bucket
        )["Contents"]
    }
    assert f"prefix/datasets/{manifest.dataset_id}/{MANIFEST_FILE}" in keys
    assert not any(".tmp" in k for k in keys)

    # Resume on S3: a lost shard object and no manifest -> only that shard is rendered again.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    prefix = f"prefix/datasets/{manifest.dataset_id}"
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/val/part-00001.parquet")
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST_FILE}")
    with pytest.raises(DatasetError, match="incomplete dataset"):
        read_shards(uri, "val", cfg.storage)
    before = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    resumed = write_shards(cfg)
    after = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert resumed.files == manifest.files and resumed.splits == manifest.splits
    assert {k: after[k] for k in before} == before  # intact shards kept as they were
    assert set(after) - set(before) == {f"{prefix}/val/part-00001.parquet", f"{prefix}/{MANIFEST_FILE}"}


def test_worker_and_block_counts_do_not_change_a_single_pixel(
    written: tuple[Config, DatasetManifest], tmp_path: Path
) -> None:
    """One actor instead of one per CPU gives the same bytes; other shard sizes the same images."""
    cfg_a, manifest_a = written
    one_actor = tiny_config(str(tmp_path / "one"), "sim.pool.max_actors=1")
    # The pool is where shards are rendered, not what they hold: same dataset id, same bytes.
    assert dataset_id_for(one_actor.sim) == dataset_id_for(cfg_a.sim)
    manifest_one = write_shards(one_actor)
    assert [f.sha256 for f in manifest_one.files] == [f.sha256 for f in manifest_a.files]
    assert "pool" not in manifest_one.config
    # 40-row shards instead of 10: another dataset id and other files, the same rows.
    big_blocks = tiny_config(str(tmp_path / "big"), "sim.rows_per_shard=40", "sim.pool.min_actors=2")
    write_shards(big_blocks)
    for split in ("train", "val", "test"):
        images_a, labels_a, table_a = load_split(dataset_uri_for(cfg_a), split, cfg_a.storage)
        images_b, labels_b, table_b = load_split(dataset_uri_for(big_blocks), split, big_blocks.storage)
        assert images_a.tobytes() == images_b.tobytes()
        assert np.array_equal(labels_a, labels_b)
        assert table_a.column("theta_e_arcsec").equals(table_b.column("theta_e_arcsec"))


def test_unreachable_or_unwritable_uri_fails_fast_naming_it_and_leaves_nothing(
    ray_session: str, s3_endpoint: str, tmp_path: Path
) -> None:
    from lensmill.storage import StorageError
    from tests.conftest import free_port

    # Nothing listens on this loopback port: an S3 endpoint that cannot be reached.
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = tiny_config("s3://lensmill-nowhere/data", f"storage.s3_endpoint_url={dead}")
    with pytest.raises(StorageError, match="s3://lensmill-nowhere/data"):
        write_shards(cfg)  # bounded: connect timeout x retry attempts

    # A bucket that does not exist on a live S3 server.
    cfg = tiny_config("s3://no-such-bucket/data", f"storage.s3_endpoint_url={s3_endpoint}")
    with pytest.raises(StorageError, match="s3://no-such-bucket/data"):
        write_shards(cfg)

    # A local root below a file: refused before any rendering, nothing written anywhere.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tiny_config(str(blocker / "sub"))
    with pytest.raises(StorageError, match=f"cannot write {blocker}/sub"):
        write_shards(cfg)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file"]
