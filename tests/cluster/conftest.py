"""A real autoscaling Ray cluster on this machine, shaped like cluster/aws.yaml.

Ray's own autoscaler runs with its ``fake_multinode`` provider (``RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...``): it launches worker nodes on demand as local raylets, the way the AWS
provider launches instances, and removes idle ones. As on AWS the head advertises 0 CPUs, so every
task, actor and job stage's work lands on worker nodes that the autoscaler adds for it.

Every port of the head is chosen free; the provider gives its worker raylets free ports of their
own. Worker raylets bind the machine's own address (the provider sets no node IP for them), never a
port reachable from outside a firewall-less test VM beyond what Ray itself opens. The cluster is one
process group (``ray start --block`` and everything the autoscaler launches), ended with it once the
tests of this folder are done (package scope: it does not idle beside the rest of the suite); never
``ray stop``, which would kill every Ray on the machine.

Quirks of several fake nodes sharing one machine, worked around here and not in the product:
- they share one disk: every node's runtime-env agent unpacked the job's working_dir into the same
  folder, deleting it under the other nodes' processes (the ``[Errno 2]`` this cluster first failed
  with); fake_provider.py gives each node a runtime-env folder of its own. Every artifact is on the
  S3 (moto) server, as on AWS, so that no stage relies on a file another node wrote to the disk;
- they share one set of ports: Serve runs its HTTP proxy on the head only (``serve.proxy_location``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import psutil
import pytest
import yaml

from tests.conftest import LOOPBACK, VENV_BIN, free_port, mlflow_server, node_ports, stop_group, wait_for

REPO = Path(__file__).resolve().parents[2]
WORKER_TYPE = "ray.worker.cpu"
WORKER_CPUS = 2
MAX_WORKERS = 3
BUCKET = "lensmill-cluster"
# Object store per node: small, the nodes share this machine's memory.
OBJECT_STORE_BYTES = 256 * 2**20


def autoscaler_config(gcs_address: str) -> dict[str, Any]:
    """cluster/aws.yaml's shape on one machine: a 0-CPU head, CPU workers added on demand."""
    return {
        "cluster_name": "lensmill-test",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        # Idle workers go after 30 s (10 min on AWS): long enough to survive between two stages.
        "idle_timeout_minutes": 0.5,
        "provider": {
            # Ray's fake_multinode provider, each node with its own runtime-env folder (fake_provider.py)
            "type": "external",
            "module": "fake_provider.SeparateDisksProvider",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {
                "resources": {"CPU": WORKER_CPUS, "object_store_memory": OBJECT_STORE_BYTES},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_WORKERS,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@dataclass
class FakeCluster:
    gcs_address: str
    dashboard_url: str
    temp_dir: Path
    proc: subprocess.Popen
    env: dict[str, str]
    log: Path

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes, from the State API over HTTP (this test process is not a Ray driver)."""
        from ray.util.state import list_nodes

        return [n.__dict__ for n in list_nodes(address=self.dashboard_url, limit=100) if n.state == "ALIVE"]

    def worker_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if not n["is_head_node"]]

    def head_node_id(self) -> str:
        return next(n["node_id"] for n in self.nodes() if n["is_head_node"])

    def actors(self, **filters: str) -> list[dict[str, Any]]:
        from ray.util.state import list_actors

        return [
            a.__dict__
            for a in list_actors(
                address=self.dashboard_url,
                filters=[(k, "=", v) for k, v in filters.items()],
                limit=10_000,
                detail=True,
            )
        ]

    def autoscaler_events(self) -> str:
        """What the autoscaler said (monitor.log: "Adding N node(s) of type ...")."""
        logs = self.temp_dir / "session_latest" / "logs"
        return "".join(p.read_text(errors="replace") for p in logs.glob("monitor*.log"))

    def kill_node(self, node_id: str) -> int:
        """SIGKILL one worker node's raylet and every process under it, as when an instance dies
        (no exception in any loop). Returns how many processes were killed."""
        raylets = [p for p in self._processes() if _is_raylet_of(p, node_id)]
        assert raylets, f"no raylet for node {node_id}"
        victims = []
        for raylet in raylets:
            victims += [raylet, *raylet.children(recursive=True)]
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        return len(victims)

    def _processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def submit(self, *entrypoint: str, runtime_env: dict[str, Any]) -> str:
        """``ray job submit --no-wait`` as a user types it, from the repository root; the job id."""
        job_id = f"lensmill-{int(time.time() * 1000)}"
        cmd = [
            str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--no-wait",
            "--submission-id", job_id, "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
            "--", *entrypoint,
        ]  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"ray job submit failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return job_id

    def wait_job(self, job_id: str, timeout_s: float) -> tuple[str, str]:
        """Poll until the job ends (bounded in time); its status and logs."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url)
        deadline = time.monotonic() + timeout_s
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(2)
            status = client.get_job_status(job_id)
        if not status.is_terminal():
            client.stop_job(job_id)
            status = JobStatus.STOPPED
        return str(status.value), client.get_job_logs(job_id)

    def job_details(self, job_id: str):  # -> ray.job_submission.JobDetails
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url).get_job_info(job_id)

    def job_logs(self, job_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url).get_job_logs(job_id)

    def stop_job(self, job_id: str) -> None:
        from ray.job_submission import JobSubmissionClient

        JobSubmissionClient(self.dashboard_url).stop_job(job_id)


def _is_raylet_of(proc: psutil.Process, node_id: str) -> bool:
    try:
        if proc.name() != "raylet":
            return False
        return any(node_id in arg for arg in proc.cmdline()) or node_id in proc.environ().get(
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING", ""
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@pytest.fixture(scope="package")
def cluster_s3(s3_endpoint: str) -> str:
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return s3_endpoint


@pytest.fixture(scope="package")
def fake_cluster(cluster_s3: str) -> Iterator[FakeCluster]:
    port = free_port()
    temp_dir = Path(f"/tmp/lm-fc-{port}")  # Ray's socket paths must stay short
    temp_dir.mkdir(parents=True, exist_ok=True)
    config = temp_dir / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(autoscaler_config(f"{LOOPBACK}:{port}")))
    ports = node_ports()
    dashboard_port = next(p.split("=")[1] for p in ports if p.startswith("--dashboard-port="))
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
        f"--port={port}", "--num-cpus=0", f"--autoscaling-config={config}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", *ports,
        f"--object-store-memory={OBJECT_STORE_BYTES}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        # The autoscaler looks at demand every second (5 s by default), and takes a node that stopped
        # reporting for dead after 10 s (30 s): a killed node is replaced sooner.
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10",
        # Job drivers run `python` from the PATH of the Ray processes: this venv's.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # Where the autoscaler imports fake_provider from.
        "PYTHONPATH": str(Path(__file__).parent),
        # Storage on moto's S3 server for every process of the cluster (drivers, workers).
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env.pop("RAY_ADDRESS", None)
    log = temp_dir / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    cluster = FakeCluster(
        gcs_address=f"{LOOPBACK}:{port}",
        dashboard_url=f"http://{LOOPBACK}:{dashboard_port}",
        temp_dir=temp_dir,
        proc=proc,
        env=env,
        log=log,
    )
    try:
        wait_for(lambda: "Ray runtime started" in log.read_text(), "fake cluster head", timeout_s=120)
        wait_for(lambda: httpx.get(f"{cluster.dashboard_url}/api/version", timeout=2).is_success, "dashboard")
        yield cluster
    finally:
        stop_group(proc)
        # The autoscaler's raylets are the head's descendants; sweep any that left the group.
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(temp_dir) in a for a in p.info["cmdline"] or []):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="package")
def cluster_mlflow(tmp_path_factory: pytest.TempPathFactory, cluster_s3: str) -> Iterator[str]:
    """``mlflow server`` whose artifacts go to the same S3 (proxied: clients need no S3 access)."""
    env = {
        "MLFLOW_S3_ENDPOINT_URL": cluster_s3,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
    }
    with mlflow_server(tmp_path_factory.mktemp("cluster-mlflow"), f"s3://{BUCKET}/mlartifacts", env) as uri:
        yield uri


def git_sha() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def job_runtime_env() -> dict[str, Any]:
    """jobs/runtime_env.yaml with the commit added, as jobs/runtime_env.yaml tells users to."""
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    env.setdefault("env_vars", {})["LENSMILL_GIT_SHA"] = git_sha()
    return env


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def print_tail(text: str, n: int = 6000) -> None:
    sys.stderr.write(text[-n:])
