"""The smoke pipeline submitted with `ray job submit` to an autoscaling cluster, storage on S3 (moto)
and tracking on an `mlflow server` whose artifacts go to the same S3: the path users take on AWS."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from lensmill.config import load_config
from tests.cluster.conftest import (
    BUCKET,
    FakeCluster,
    git_sha,
    job_runtime_env,
    print_tail,
    s3_keys,
)
from tests.conftest import free_port

PREFIX = "e2e"


def last_json(logs: str) -> dict:
    """The job's one JSON line (the command's summary), wherever Ray's log lines put it."""
    for line in reversed(logs.splitlines()):
        start = line.find('{"')
        if start >= 0:
            try:
                return json.loads(line[start:])
            except json.JSONDecodeError:
                continue
    pytest.fail(f"no JSON summary in the job's logs:\n{logs[-3000:]}")


def job_overrides(s3: str, mlflow_uri: str, prefix: str) -> list[str]:
    return [
        f"storage.root=s3://{BUCKET}/{prefix}",
        f"storage.s3_endpoint_url={s3}",
        f"tracking.tracking_uri={mlflow_uri}",
        # One experiment per test module: the fault tests leave killed drivers' runs RUNNING.
        f"tracking.experiment=lensmill-{prefix}",
        # The fake nodes share this machine's ports: one HTTP proxy, on the head.
        "serve.proxy_location=HeadOnly",
        f"serve.port={free_port()}",
    ]


@pytest.fixture(scope="module")
def submitted(fake_cluster: FakeCluster, cluster_s3: str, cluster_mlflow: str) -> dict:
    overrides = job_overrides(cluster_s3, cluster_mlflow, PREFIX)
    # Shards rendered by actors of a whole worker node each (2 CPUs): 2+ actors need 2+ nodes.
    job_id = fake_cluster.submit(
        "python", "jobs/pipeline.py", "--config", "jobs/configs/smoke.yaml", *overrides,
        "sim.pool.min_actors=2", "sim.pool.cpus_per_actor=2", "--queries", "4",
        runtime_env=job_runtime_env(),
    )  # fmt: skip
    status, logs = fake_cluster.wait_job(job_id, timeout_s=900)
    if status != "SUCCEEDED":
        print_tail(logs, 12000)
        print_tail(fake_cluster.autoscaler_events(), 4000)
    assert status == "SUCCEEDED", logs[-3000:]
    summary = last_json(logs)
    return {"job_id": job_id, "logs": logs, "summary": summary, "overrides": overrides}


def test_autoscaler_launched_workers_and_stages_ran_on_them(
    submitted: dict, fake_cluster: FakeCluster
) -> None:
    events = fake_cluster.autoscaler_events()
    assert "Adding" in events and "ray.worker.cpu" in events, events[-2000:]
    head = fake_cluster.head_node_id()
    writers = [a for a in fake_cluster.actors() if "ShardWriter" in (a.get("repr_name") or a["class_name"])]
    assert len(writers) >= 2, [a["class_name"] for a in fake_cluster.actors()]
    assert len({a["node_id"] for a in writers}) >= 2
    assert head not in {a["node_id"] for a in writers}
    train_workers = [a for a in fake_cluster.actors() if a["class_name"] == "RayTrainWorker"]
    assert train_workers and head not in {a["node_id"] for a in train_workers}


def test_everything_is_on_s3(submitted: dict, cluster_s3: str) -> None:
    keys = s3_keys(cluster_s3, "")
    dataset = submitted["summary"]["dataset_uri"]
    assert dataset.startswith(f"s3://{BUCKET}/{PREFIX}/datasets/")
    ds_prefix = dataset.removeprefix(f"s3://{BUCKET}/")
    assert f"{ds_prefix}/manifest.json" in keys
    assert sum(k.startswith(f"{ds_prefix}/train/") and k.endswith(".parquet") for k in keys) == 3
    assert any(k.startswith(f"{PREFIX}/runs/") and "checkpoint" in k for k in keys), keys[:50]
    artifacts = [k for k in keys if k.startswith("mlartifacts/")]
    assert any(k.endswith("ensemble.json") for k in artifacts), artifacts[:50]
    assert any(k.endswith(".png") for k in artifacts)


def test_champion_loads_on_the_driver_machine_and_runs_carry_the_commit(
    submitted: dict, cluster_mlflow: str, cluster_s3: str
) -> None:
    import mlflow
    import numpy as np

    from lensmill.tracking import load_ensemble

    cfg = load_config(Path("jobs/configs/smoke.yaml"), submitted["overrides"])
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_ensemble(cfg, Path(tmp))
        out = loaded.predictor.predict(np.zeros((2, 1, 32, 32), np.float32))
    assert loaded.source == "mlflow" and out["p_lens"].shape == (2,)
    client = mlflow.MlflowClient(cluster_mlflow)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 5  # tune parent, 2 trials, ensemble, evaluation
    assert {r.data.tags.get("git_sha") for r in runs} == {git_sha()}
    assert all(r.info.status == "FINISHED" for r in runs)
    served = submitted["summary"]["served"]
    assert len(served) == 4
