"""Batch scoring with Ray Data against the same predictor the endpoint uses."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from lensmill.config import load_config
from lensmill.models import LensClassifier
from lensmill.predict import EnsemblePredictor, Member
from lensmill.scoring import score_dataset
from lensmill.shards import load_split, write_shards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("scoring")
    cfg = load_config(
        None,
        [f"storage.root={root}", "sim.n_train=8", "sim.n_val=8", "sim.n_test=40", "sim.image_size_px=32",
         "sim.rows_per_shard=16"],
    )  # fmt: skip
    write_shards(cfg)
    members = [
        Member(f"tiny-{i}", LensClassifier("tiny", 1, mean=[0.0], std=[1.0], scale=[0.3]), w)
        for i, w in enumerate((0.7, 0.3))
    ]
    predictor = EnsemblePredictor(members, (1, 32, 32), 0.5, {"dataset_id": "test"})
    predictor.save(root / "ensemble")
    return cfg, root


def test_scores_every_row_like_the_predictor(tiny):
    cfg, root = tiny
    out = score_dataset(cfg, "test", model_dir=root / "ensemble")
    assert out["rows"] == 40
    table = pq.read_table(out["out_uri"]).sort_by("row_id")
    images, labels, params = load_split(out["dataset_uri"], "test", cfg.storage)
    order = np.argsort(params.column("row_id").to_numpy())
    expected = EnsemblePredictor.load(root / "ensemble").predict(images[order])
    np.testing.assert_allclose(table.column("p_lens").to_numpy(), expected["p_lens"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels[order])
    assert {"predicted_label", "spread", "p_member_0", "p_member_1"} <= set(table.column_names)
    assert "image" not in table.column_names


def test_rerun_overwrites_instead_of_appending(tiny):
    cfg, root = tiny
    first = score_dataset(cfg, "test", model_dir=root / "ensemble")
    second = score_dataset(cfg, "test", model_dir=root / "ensemble")
    assert second["rows"] == first["rows"] == 40


def test_model_that_does_not_fit_the_data_is_refused(tiny, tmp_path):
    cfg, _ = tiny
    wrong = EnsemblePredictor(
        [Member("m", LensClassifier("tiny", 3, [0.0] * 3, [1.0] * 3), 1.0)], (3, 32, 32)
    )
    wrong.save(tmp_path / "wrong")
    with pytest.raises(Exception, match=r"model takes images \(3, 32, 32\), dataset has \(1, 32, 32\)"):
        score_dataset(cfg, "test", model_dir=tmp_path / "wrong")
