"""lensmill cost: the arithmetic checked by hand, the data files, and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lensmill.cli import app
from lensmill.config import load_config
from lensmill.cost import (
    estimate_cost,
    load_prices,
    load_throughputs,
    read_cluster,
)
from lensmill.errors import LensmillError

REPO = Path(__file__).resolve().parents[2]
AWS_YAML = REPO / "cluster" / "aws.yaml"


def _small_cluster(
    tmp_path: Path, cpu_nodes: int = 2, gpu_nodes: int = 2, gpu_type: str = "g6.xlarge"
) -> Path:
    """A launcher file with one head, one CPU and one GPU worker type (on-demand), few nodes."""
    worker = {"min_workers": 0, "node_config": {}}
    cluster = {
        "max_workers": 10,
        "idle_timeout_minutes": 6,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "node_config": {"InstanceType": "m7i.2xlarge"}},
            "cpu": {**worker, "max_workers": cpu_nodes, "resources": {"CPU": 32},
                    "node_config": {"InstanceType": "c7i.8xlarge"}},
            "gpu": {**worker, "max_workers": gpu_nodes, "resources": {"CPU": 4, "GPU": 1},
                    "node_config": {"InstanceType": gpu_type}},
        },
    }  # fmt: skip
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster))
    return path


def test_simulate_node_hours_are_images_over_rate_times_nodes(tmp_path: Path) -> None:
    # Demo physics (1 band, 64 px): the measured 1,142 images/s per core. 64 shards of 100 images on
    # 2 c7i.8xlarge (32 actors each, 16 physical cores each): one wave, every core busy.
    cfg = load_config(None, ["sim.n_train=4800", "sim.n_val=800", "sim.n_test=800", "sim.rows_per_shard=100"])
    tp = load_throughputs()
    rate = tp.simulate.references["demo"].value
    assert rate == 1142
    est = estimate_cost(cfg, _small_cluster(tmp_path), stages=["simulate"])
    (sim,) = est.stages
    nodes, cores_per_node = 2, 16
    wall_s = 6400 / (rate * cores_per_node * nodes)
    assert sim.nodes == nodes and sim.images == 6400
    assert sim.node_hours == pytest.approx(nodes * wall_s / 3600)
    assert sim.node_hours == pytest.approx(6400 / (rate * cores_per_node) / 3600)
    startup_h = tp.node_startup_minutes.value / 60
    assert sim.wall_hours == pytest.approx(wall_s / 3600 + startup_h)
    assert sim.overhead_node_hours == pytest.approx(nodes * (startup_h + 6 / 60))
    prices = load_prices()
    ebs = 0.0  # the small cluster has no BlockDeviceMappings
    on_demand = prices.instance_types["c7i.8xlarge"].on_demand_usd_per_hour + ebs
    assert sim.cost_usd["on_demand"] == pytest.approx((sim.node_hours + sim.overhead_node_hours) * on_demand)
    assert sim.figures["simulate"].kind == "measured"


def test_train_arithmetic_on_gpu_and_cpu(tmp_path: Path) -> None:
    base = [
        "sim.n_train=60000",
        "sim.n_val=6000",
        "train.epochs=2",
        "tune.models=[resnet18]",
        "tune.lrs=[0.001]",
    ]
    tp = load_throughputs()
    val = 2 * (60000 + 6000 * tp.train.validation_cost.value)
    gpu = estimate_cost(load_config(None, [*base, "train.use_gpu=true", "train.cpus_per_worker=3"]),
                        _small_cluster(tmp_path), stages=["train"]).stages[0]  # fmt: skip
    assert gpu.instance_type == "g6.xlarge" and gpu.nodes == 1
    assert gpu.node_hours == pytest.approx(val / tp.train.gpu["L4"].value / 3600)
    assert gpu.gpu_hours == pytest.approx(gpu.node_hours)
    assert gpu.figures["train"].kind == "estimate" and "no GPU lent" in gpu.figures["train"].source
    # CPU: 2 logical CPUs = 1 physical core of a c7i.8xlarge, at the measured per-core rate.
    cpu = estimate_cost(load_config(None, base), _small_cluster(tmp_path), stages=["train"]).stages[0]
    assert cpu.instance_type == "c7i.8xlarge" and cpu.gpu_hours == 0
    assert cpu.node_hours == pytest.approx(val / (tp.train.cpu_per_core.value * 1.0) / 3600)
    assert cpu.figures["train"].kind == "measured"


def test_train_trials_run_as_many_at_once_as_the_gpus_allow(tmp_path: Path) -> None:
    over = [
        "sim.n_train=60000", "train.use_gpu=true", "train.cpus_per_worker=3", "train.num_workers=2",
        "tune.models=[resnet18,resnet34]", "tune.lrs=[0.001,0.0003]", "tune.max_concurrent_trials=4",
    ]  # fmt: skip
    est = estimate_cost(load_config(None, over), _small_cluster(tmp_path, gpu_nodes=4), stages=["train"])
    (train,) = est.stages
    assert train.nodes == 4  # two trials of two workers at once
    assert "4 trials, 2 at once" in " ".join(train.notes)
    with pytest.raises(LensmillError, match="train.num_workers=8 needs 8 g6.xlarge nodes"):
        estimate_cost(
            load_config(None, [*over, "train.num_workers=8"]), _small_cluster(tmp_path), stages=["train"]
        )


def test_score_uses_the_test_split_or_the_given_catalog(tmp_path: Path) -> None:
    over = ["tune.models=[resnet18]", "sim.n_test=1000", "scoring.max_actors=32", "scoring.batch_size=10"]
    tp = load_throughputs()
    test = estimate_cost(load_config(None, over), _small_cluster(tmp_path), stages=["score"]).stages[0]
    assert test.images == 1000 and test.nodes == 1
    assert test.node_hours == pytest.approx(1000 / (tp.score.cpu_per_core.value * 16) / 3600)
    catalog = estimate_cost(
        load_config(None, over), _small_cluster(tmp_path), ["score"], images=10**6
    ).stages[0]
    assert catalog.node_hours == pytest.approx(test.node_hours * 1000)
    gpu = estimate_cost(load_config(None, [*over, "scoring.gpus_per_actor=1", "scoring.cpus_per_actor=2"]),
                        _small_cluster(tmp_path), stages=["score"]).stages[0]  # fmt: skip
    assert gpu.instance_type == "g6.xlarge" and gpu.nodes == 2  # one actor per GPU node, both nodes


def test_spot_is_cheaper_than_on_demand_and_the_head_is_counted() -> None:
    est = estimate_cost(load_config(REPO / "jobs" / "configs" / "realistic.yaml"), AWS_YAML)
    for stage in est.stages:
        assert 0 < stage.cost_usd["spot"] < stage.cost_usd["on_demand"], stage.stage
    assert est.head.instance_type == "m7i.2xlarge"
    assert est.head.node_hours == pytest.approx(sum(s.wall_hours for s in est.stages))
    assert est.total["cost_usd"]["spot"] < est.total["cost_usd"]["on_demand"]
    assert est.total["wall_hours"] == pytest.approx(est.head.node_hours)


def test_gpu_training_selects_the_gpu_type_and_cpu_training_the_cpu_type() -> None:
    cfg = load_config(REPO / "jobs" / "configs" / "comprehensive.yaml")
    (gpu,) = estimate_cost(cfg, AWS_YAML, stages=["train"]).stages
    assert gpu.instance_type == "g6.xlarge" and gpu.gpu_hours > 0
    assert set(gpu.node_types) == {"ray.worker.gpu", "ray.worker.gpu.spot"}
    cpu_cfg = load_config(REPO / "jobs" / "configs" / "comprehensive.yaml", ["train.use_gpu=false"])
    (cpu,) = estimate_cost(cpu_cfg, AWS_YAML, stages=["train"]).stages
    assert cpu.instance_type == "c7i.8xlarge" and cpu.gpu_hours == 0


def test_a_missing_instance_type_in_the_price_file_is_named(tmp_path: Path) -> None:
    path = _small_cluster(tmp_path, gpu_type="p5.48xlarge")
    with pytest.raises(LensmillError, match=r"instance type p5\.48xlarge .*node type gpu.* has no price"):
        read_cluster(path, load_prices())


def test_every_instance_type_in_cluster_aws_yaml_has_a_price() -> None:
    prices = load_prices()
    types = yaml.safe_load(AWS_YAML.read_text())["available_node_types"]
    for name, node_type in types.items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in prices.instance_types, f"{name}: {instance} has no price"
    assert prices.region == yaml.safe_load(AWS_YAML.read_text())["provider"]["region"]
    assert "approximate" in prices.source and prices.as_of in prices.source


def test_every_throughput_says_where_it_came_from() -> None:
    tp = load_throughputs()
    gpu_figures = [*tp.train.gpu.values(), *tp.score.gpu.values()]
    assert gpu_figures and all(
        f.kind == "estimate" and "not measured: no GPU lent" in f.source for f in gpu_figures
    )
    for f in tp.simulate.references.values():
        assert f.kind == "measured" and "2026-11-21" in f.source
    assert tp.train.cpu_per_core.kind == "measured" and "bench train" in tp.train.cpu_per_core.source


def test_unknown_stage_and_missing_cluster_file_are_the_users_mistakes(tmp_path: Path) -> None:
    cfg = load_config(None)
    with pytest.raises(LensmillError, match="unknown stage"):
        estimate_cost(cfg, AWS_YAML, stages=["simulate", "tune"])
    with pytest.raises(LensmillError, match="cluster file not found"):
        estimate_cost(cfg, tmp_path / "nope.yaml")


def test_cli_prints_one_json_line_and_exits_0() -> None:
    result = CliRunner().invoke(
        app,
        ["cost", "--cluster", str(AWS_YAML), "--stage", "score", "--images", "300000000", "sim.n_test=100"],
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert [s["stage"] for s in out["stages"]] == ["score"]
    assert out["stages"][0]["images"] == 300_000_000
    assert math.isfinite(out["total"]["cost_usd"]["on_demand"])
    assert out["stages"][0]["figures"]["score"]["source"]


def test_cli_user_mistake_exits_2() -> None:
    result = CliRunner().invoke(app, ["cost", "--cluster", "no/such/cluster.yaml"])
    assert result.exit_code == 2
    assert "cluster file not found" in result.stdout


def test_pipeline_logs_the_estimate_of_a_large_run_and_never_fails_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from lensmill.pipeline import log_cost_estimate

    caplog.set_level("INFO", logger="lensmill")
    monkeypatch.chdir(REPO)
    log_cost_estimate(load_config(REPO / "jobs" / "configs" / "smoke.yaml"))
    assert not caplog.records  # small: no estimate
    log_cost_estimate(load_config(REPO / "jobs" / "configs" / "comprehensive.yaml"))
    assert any("cost estimate for comprehensive" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.chdir(tmp_path)  # no cluster/aws.yaml here
    log_cost_estimate(load_config(REPO / "jobs" / "configs" / "comprehensive.yaml"))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "cluster file not found" in caplog.records[0].getMessage()


def test_scoring_actors_never_outnumber_the_batches(tmp_path: Path) -> None:
    cfg = load_config(None, ["tune.models=[resnet18]", "sim.n_test=1000", "scoring.batch_size=250"])
    (score,) = estimate_cost(cfg, _small_cluster(tmp_path), stages=["score"]).stages
    assert score.nodes == 1 and "4 actors on 1 node(s)" in score.notes[0]
