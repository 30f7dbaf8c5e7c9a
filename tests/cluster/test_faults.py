"""Faults on the autoscaling cluster, each caused from outside the code it hits: a worker node's
processes killed mid-training, the job driver killed mid-tune and the job submitted again, a node
lost mid-simulation. Storage on S3 (moto), as on AWS."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import boto3
import pytest

from lensmill.config import Config, load_config
from lensmill.layout import ATTEMPTS_FILE, SUMMARY_FILE, run_name_for
from lensmill.records import DatasetManifest
from lensmill.shards import dataset_uri_for, read_manifest, render_shard, shard_specs
from lensmill.simulate import Simulator
from lensmill.storage import join_uri, read_bytes, read_json
from lensmill.tune import trial_run_name
from tests.cluster.conftest import BUCKET, FakeCluster, job_runtime_env, print_tail, s3_keys
from tests.cluster.test_job_submit import job_overrides, last_json
from tests.conftest import wait_for

PREFIX = "faults"
SMOKE = Path("jobs/configs/smoke.yaml")


def submit_stage(cluster: FakeCluster, script: str, overrides: list[str]) -> str:
    return cluster.submit(
        "python", f"jobs/{script}.py", "--config", str(SMOKE), *overrides, runtime_env=job_runtime_env()
    )


def succeeded(cluster: FakeCluster, job_id: str, timeout_s: float = 600) -> str:
    status, logs = cluster.wait_job(job_id, timeout_s)
    if status != "SUCCEEDED":
        print_tail(logs, 10000)
    assert status == "SUCCEEDED", logs[-3000:]
    return logs


def last_modified(s3: str, key: str) -> float:
    head = boto3.client("s3", endpoint_url=s3, region_name="us-east-1").head_object(Bucket=BUCKET, Key=key)
    return head["LastModified"].timestamp()


def key_of(uri: str) -> str:
    return uri.removeprefix(f"s3://{BUCKET}/")


@pytest.fixture(scope="module")
def base(fake_cluster: FakeCluster, cluster_s3: str, cluster_mlflow: str) -> list[str]:
    """The smoke dataset under the faults prefix, written by a simulate job; overrides pointing at it."""
    overrides = job_overrides(cluster_s3, cluster_mlflow, PREFIX)
    succeeded(fake_cluster, submit_stage(fake_cluster, "simulate", overrides))
    return overrides


def test_worker_node_killed_mid_training_resumes_on_another_node(
    fake_cluster: FakeCluster, base: list[str], cluster_s3: str
) -> None:
    # Epochs long enough to kill the node between two of them; one restart allowed.
    extra = ["name=fault-node", "train.model=timm:resnet10t", "train.epochs=5", "train.max_failures=2"]
    cfg = load_config(SMOKE, [*base, *extra])
    run = key_of(join_uri(f"{cfg.storage.root}/runs", run_name_for(cfg)))
    job_id = submit_stage(fake_cluster, "train", [*base, *extra])

    def epoch_0_registered() -> bool:
        # Ray Train writes this file when its controller registers a checkpoint: from then on a
        # restart is handed it. (A checkpoint uploaded but not yet registered is not: killed in that
        # window, the run restarts from scratch.)
        return f"{run}/checkpoint_manager_snapshot.json" in s3_keys(cluster_s3, run)

    wait_for(epoch_0_registered, "the epoch-0 checkpoint registered on S3", timeout_s=300, interval_s=0.5)
    [worker] = [a for a in fake_cluster.actors(class_name="RayTrainWorker") if a["state"] == "ALIVE"]
    killed = worker["node_id"]
    assert killed != fake_cluster.head_node_id()
    assert fake_cluster.kill_node(killed) >= 2  # the raylet and the worker under it, at least

    succeeded(fake_cluster, job_id)
    attempts = read_json(f"s3://{BUCKET}/{run}/{ATTEMPTS_FILE}", cfg.storage)
    summary = read_json(f"s3://{BUCKET}/{run}/{SUMMARY_FILE}", cfg.storage)
    assert len(attempts) >= 2 and attempts[0]["node_id"] == killed, attempts
    # The last attempt resumed from a checkpoint on S3, on a node the autoscaler added (not the lost one).
    assert attempts[-1]["resumed_from_epoch"] is not None and attempts[-1]["node_id"] != killed, attempts
    epochs = [h["epoch"] for h in summary["history"]]
    assert epochs == list(range(5))
    assert {h["attempt"] for h in summary["history"]} == set(range(len(attempts)))
    resumed = attempts[-1]["resumed_from_epoch"]
    assert [h["attempt"] for h in summary["history"]][resumed + 1] == len(attempts) - 1
    alive = {n["node_id"] for n in fake_cluster.nodes()}
    assert killed not in alive


def test_driver_killed_mid_tune_then_resubmitted_does_not_retrain_finished_trials(
    fake_cluster: FakeCluster, base: list[str], cluster_s3: str, cluster_mlflow: str
) -> None:
    # Trials one at a time, six epochs each (no early stop): the driver is killed once the first
    # has its result and the second its first checkpoint, with five epochs still to train.
    extra = ["name=fault-tune", "tune.max_concurrent_trials=1", "train.epochs=6"]
    extra.append("tune.grace_period_epochs=6")
    cfg = load_config(SMOKE, [*base, *extra])
    runs = f"{cfg.storage.root}/runs"
    names = [trial_run_name(cfg, {"model": m, "lr": lr}) for m in cfg.tune.models for lr in cfg.tune.lrs]
    summaries = {n: key_of(join_uri(join_uri(runs, n), SUMMARY_FILE)) for n in names}

    def finished(keys: set[str]) -> list[str]:
        return [n for n, k in summaries.items() if k in keys]

    job_id = submit_stage(fake_cluster, "tune", [*base, *extra])
    # Not tests.conftest.wait_for: a job that ends before the kill must fail the test at once, with
    # its logs, and the trials counted as done must come from the listing that allowed the kill.
    deadline, done = time.monotonic() + 400, None
    while done is None:
        status = fake_cluster.job_details(job_id).status
        if status.is_terminal():
            print_tail(fake_cluster.job_logs(job_id), 10000)
            pytest.fail(f"the tune job ended ({status.value}) before its driver could be killed")
        keys = set(s3_keys(cluster_s3, key_of(runs)))
        first = finished(keys)
        training = [n for n in names if n not in first and any(f"/{n}/epoch-" in f"/{k}" for k in keys)]
        if first and training:
            done = first
        elif time.monotonic() > deadline:
            print_tail(fake_cluster.job_logs(job_id), 10000)
            pytest.fail(f"no finished trial next to a training one after 400 s; finished: {first}")
        else:
            time.sleep(0.5)
    driver = fake_cluster.job_details(job_id).driver_info
    os.kill(int(driver.pid), signal.SIGKILL)  # the driver machine's process: no clean-up runs
    status, logs = fake_cluster.wait_job(job_id, timeout_s=120)
    assert status == "FAILED", logs[-3000:]
    stamps = {n: last_modified(cluster_s3, summaries[n]) for n in done}

    logs = succeeded(fake_cluster, submit_stage(fake_cluster, "tune", [*base, *extra]))
    assert set(finished(set(s3_keys(cluster_s3, key_of(runs))))) == set(names)
    # Trials that had finished were read back, not trained again.
    assert {n: last_modified(cluster_s3, summaries[n]) for n in done} == stamps, logs[-3000:]
    result = last_json(logs)
    assert {t["run_name"] for t in result["trials"]} == set(names)
    from mlflow import MlflowClient

    client = MlflowClient(cluster_mlflow)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    for name in done:
        runs_named = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
        assert [r.info.status for r in runs_named] == ["FINISHED"], name


def test_node_lost_mid_simulation_then_rerun_renders_only_missing_shards(
    fake_cluster: FakeCluster, cluster_s3: str, cluster_mlflow: str
) -> None:
    # Slow shards (supersampled 64x64) on two actors of a whole node each; several shards per actor.
    extra = [
        "name=fault-sim", "sim.image_size_px=64", "sim.supersampling=3", "sim.rows_per_shard=40",
        "sim.n_train=480", "sim.n_val=40", "sim.n_test=40",
        "sim.pool.min_actors=2", "sim.pool.max_actors=2", "sim.pool.cpus_per_actor=2",
    ]  # fmt: skip
    overrides = [*job_overrides(cluster_s3, cluster_mlflow, PREFIX + "-sim"), *extra]
    cfg = load_config(SMOKE, overrides)
    dataset = key_of(dataset_uri_for(cfg))
    job_id = submit_stage(fake_cluster, "simulate", overrides)

    def shards() -> list[str]:
        return [k for k in s3_keys(cluster_s3, dataset) if k.endswith(".parquet")]

    wait_for(lambda: len(shards()) >= 2, "two shards on S3", timeout_s=300, interval_s=0.5)
    writers = [a for a in fake_cluster.actors() if "ShardWriter" in (a.get("repr_name") or "")]
    victim = next(a["node_id"] for a in writers if a["state"] == "ALIVE")
    fake_cluster.kill_node(victim)
    fake_cluster.stop_job(job_id)  # the interruption: the run is not left to finish
    fake_cluster.wait_job(job_id, timeout_s=120)
    before = {k: last_modified(cluster_s3, k) for k in shards()}
    total = len(shard_specs(cfg.sim))
    assert 2 <= len(before) < total and f"{dataset}/manifest.json" not in s3_keys(cluster_s3, dataset)

    logs = succeeded(fake_cluster, submit_stage(fake_cluster, "simulate", overrides))
    assert f"{total - len(before)} to render, {len(before)} to check" in logs
    # Shards written before the interruption were checked, not rewritten.
    assert {k: last_modified(cluster_s3, k) for k in before} == before
    manifest = read_manifest(dataset_uri_for(cfg), cfg.storage)
    assert len(manifest.files) == total
    assert_shard_matches_a_fresh_render(cfg, manifest)


def assert_shard_matches_a_fresh_render(cfg: Config, manifest: DatasetManifest) -> None:
    """The last shard (rendered after the interruption) holds what one process renders."""
    import io

    import pyarrow.parquet as pq

    spec = shard_specs(cfg.sim)[-1]
    fresh = render_shard(Simulator(cfg.sim), spec["split"], spec["row_start"], spec["rows"])
    written = pq.read_table(io.BytesIO(read_bytes(join_uri(dataset_uri_for(cfg), spec["path"]), cfg.storage)))
    assert written.column("image").equals(fresh.column("image"))
    assert written.column("label").equals(fresh.column("label"))
    assert spec["path"] in {f.path for f in manifest.files}
