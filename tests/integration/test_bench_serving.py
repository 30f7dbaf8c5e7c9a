"""`lensmill bench serve` and `lensmill bench predict` end to end through the real CLI, on the test
session's Ray: both sides run, agree on the scores, and report figures that add up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lensmill.models import LensClassifier
from lensmill.predict import EnsemblePredictor, Member
from tests.conftest import free_port
from tests.integration.test_data_tools import cli

SHAPE = (1, 32, 32)


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    members = [Member(f"tiny-{i}", LensClassifier("tiny", 1, [0.0], [1.0], [0.3]), 1.0 + i) for i in range(2)]
    return EnsemblePredictor(members, SHAPE, threshold=0.5).save(tmp_path_factory.mktemp("bench-ensemble"))


def test_bench_serve_measures_both_servers_on_the_same_requests(ray_address: str, ensemble_dir: Path) -> None:
    code, out, err = cli(
        "bench", "serve", f"ray.address={ray_address}", f"serve.port={free_port()}",
        "serve.cpus_per_replica=0.5", "--model-dir", str(ensemble_dir),
        "--requests-c1", "10", "--requests-c32", "64", "--max-seconds", "60",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert out["benchmark"] == "serve" and out["image_shape"] == list(SHAPE)
    assert out["members"] == ["tiny-0", "tiny-1"]
    # The baseline ran before the platform and after it: its figures pool both runs.
    for side, runs in (("baseline", 2), ("platform", 1)):
        c1, c32 = out[side]["c1"], out[side]["c32"]
        assert (c1["requests"], c1["errors"], c1["concurrency"]) == (10 * runs, 0, 1), side
        assert (c32["requests"], c32["errors"], c32["concurrency"]) == (64 * runs, 0, 32), side
        assert 0 < c1["p50_ms"] <= c1["p99_ms"] and c32["requests_per_s"] > 0
    b, p = out["baseline"], out["platform"]
    assert out["throughput_ratio_c32"] == pytest.approx(
        p["c32"]["requests_per_s"] / b["c32"]["requests_per_s"], rel=0.01
    )
    assert out["p50_overhead_ms_c1"] == pytest.approx(p["c1"]["p50_ms"] - b["c1"]["p50_ms"], abs=0.02)
    assert set(out["baseline_drift"]) == {"c1", "c32"}
    assert out["serve"]["batch_wait_timeout_s"] == 0.0 and out["machine"]["cpu_count"] >= 1


def test_bench_predict_scores_the_same_files_both_ways(ray_address: str, ensemble_dir: Path) -> None:
    code, out, err = cli(
        "bench", "predict", f"ray.address={ray_address}", "scoring.rows_per_part=16", "scoring.max_actors=1",
        "scoring.batch_size=8", "--model-dir", str(ensemble_dir), "--images", "40",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert out["benchmark"] == "predict" and out["cutouts"] == 40 and out["image_shape"] == list(SHAPE)
    assert out["max_abs_p_lens_difference"] <= 1e-4
    first, last = out["baseline_seconds"]["all"]
    assert out["baseline_images_per_s"] == pytest.approx(80 / (first + last), rel=0.01)
    assert out["platform_images_per_s"] == pytest.approx(40 / out["platform_seconds"]["all"], rel=0.01)
    # Each side also scored the first 10 files: the rates per image once started.
    quarter = out["platform_seconds"]["quarter"]
    if out["platform_steady_images_per_s"] is not None:
        assert out["platform_steady_images_per_s"] == pytest.approx(
            30 / (out["platform_seconds"]["all"] - quarter), rel=0.02
        )
    assert out["ratio"] == pytest.approx(
        out["platform_images_per_s"] / out["baseline_images_per_s"], rel=0.01, abs=1e-3
    )
    assert out["scoring"]["batch_size"] == 8
