"""The typed records stages hand each other: round trips, NaN, unknown keys, errors naming the field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lensmill.config import StorageConfig
from lensmill.records import (
    DatasetManifest,
    EnsembleManifest,
    RecordError,
    RunSummary,
    ShardFile,
    SplitCounts,
    TrialResult,
    parse_record,
    read_record,
    write_record,
)
from lensmill.storage import StorageError

ST = StorageConfig(root="/tmp")


def summary(val_auc: float = 0.9) -> RunSummary:
    return RunSummary(
        run_name="r", model="tiny", lr=1e-3, dataset_uri="/d", dataset_id="d", mlflow_run_id="m",
        image_shape=(1, 8, 8), in_chans=1, cache_in_memory=False, val_auc=val_auc, best_epoch=1,
        epochs_run=2, stopped_early=False, attempts=1, checkpoint_uri="/d/epoch-0001", member_file="model.pt",
        history=({"epoch": 0, "val_auc": 0.5}, {"epoch": 1, "val_auc": val_auc}),
    )  # fmt: skip


def test_run_summary_round_trip_keeps_nan(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.json")
    s = summary(math.nan)
    write_record(uri, s, ST)
    assert "NaN" in (tmp_path / "s.json").read_text()
    back = read_record(uri, RunSummary, ST)
    assert math.isnan(back.val_auc) and back.model_dump(exclude={"val_auc", "history"}) == s.model_dump(
        exclude={"val_auc", "history"}
    )
    fine = summary(0.75)
    write_record(uri, fine, ST)
    assert read_record(uri, RunSummary, ST) == fine


def test_trial_result_usable_only_with_a_summary() -> None:
    ok = TrialResult(model="tiny", lr=1e-3, run_name="r", summary=summary(0.8))
    failed = TrialResult(model="tiny", lr=1e-2, run_name="q", error="boom")
    assert ok.usable and ok.val_auc == 0.8
    assert not failed.usable and math.isnan(failed.val_auc)


def test_our_records_refuse_unknown_keys_naming_field_and_uri(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    tree = json.loads(summary().model_dump_json())
    tree["val_acu"] = 0.9
    path.write_text(json.dumps(tree))
    with pytest.raises(RecordError, match=rf"{path}: val_acu: Extra inputs are not permitted"):
        read_record(str(path), RunSummary, ST)
    del tree["val_acu"], tree["epochs_run"]
    path.write_text(json.dumps(tree))
    with pytest.raises(RecordError, match="epochs_run: Field required"):
        read_record(str(path), RunSummary, ST)
    path.write_text("{half")
    with pytest.raises(RecordError, match=rf"{path} is not valid JSON"):
        read_record(str(path), RunSummary, ST)
    with pytest.raises(StorageError, match="not found"):
        read_record(str(tmp_path / "absent.json"), RunSummary, ST)


def test_manifest_keeps_what_other_tools_add(tmp_path: Path) -> None:
    tree = {
        "dataset_id": "x",
        "image_shape": [2, 16, 16],
        "splits": {"train": {"rows": 3, "positives": 1}},  # negatives left out: the rest
        "files": [{"path": "train/a.parquet", "split": "train", "telescope": "HST"}],
        "survey": "COSMOS",
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(tree))
    m = read_record(str(path), DatasetManifest, ST)
    assert m.image_shape == (2, 16, 16) and m.splits["train"] == SplitCounts(rows=3, positives=1, negatives=2)
    assert m.source == "simulate" and m.files[0].sha256 is None
    assert m.model_extra == {"survey": "COSMOS"} and m.files[0].model_extra == {"telescope": "HST"}
    write_record(str(path), m, ST)
    assert read_record(str(path), DatasetManifest, ST) == m
    assert m.split_files("train") == [ShardFile(path="train/a.parquet", split="train", telescope="HST")]
    bad = {**tree, "image_shape": [2, 0, 16]}
    path.write_text(json.dumps(bad))
    with pytest.raises(RecordError, match=r"image_shape\.1: Input should be greater than 0"):
        read_record(str(path), DatasetManifest, ST)


def test_ensemble_manifest_defaults_and_metadata() -> None:
    tree = {"format_version": 1, "image_shape": [1, 8, 8], "dataset_id": "d",
            "members": [{"name": "a", "weight": 1, "file": "m.pt", "val_auc": 0.9}]}  # fmt: skip
    m = EnsembleManifest.model_validate(tree)
    assert m.temperature == 1.0 and m.threshold == 0.5  # artifacts from before calibration
    assert m.info == {"dataset_id": "d"} and m.members[0].meta == {"val_auc": 0.9}
    for key, value, pattern in [
        ("threshold", 1.0, "threshold: Input should be less than 1"),
        ("temperature", float("inf"), "temperature must be a finite number"),
        ("temperature", True, "temperature must be a finite number"),
        ("members", [], "members: .*at least 1"),
    ]:
        with pytest.raises(RecordError, match=pattern):
            parse_record(EnsembleManifest, json.dumps({**tree, key: value}), "ensemble.json")
