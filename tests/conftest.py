"""Shared fixtures: real servers on 127.0.0.1 only, each started by the test session itself.

- ``ray_address``: a real Ray head (``ray start --head --block``) in its own process group, killed
  as a group at the end (never ``ray stop``: it would kill every Ray process on the machine).
- ``ray_session``: this test process connected to that head.
- ``mlflow_uri``: a real ``mlflow server`` with a sqlite backend and proxied artifacts.
- ``s3_endpoint``: moto's S3-compatible server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

# Same auth mode for every Ray client and server the tests start (Ray >= 2.59 defaults differ).
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """``ray start`` flags giving a head every port it opens, each chosen free: Ray's defaults
    (52365 for the dashboard agent, for one) collide with any other Ray on the machine."""
    return [
        f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]


def wait_for(check, what: str, timeout_s: float = 90.0, interval_s: float = 0.5) -> None:
    """Poll ``check()`` until it is truthy; a bounded loop in count and time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s")


def stop_group(proc: subprocess.Popen) -> None:
    """Terminate a process started with start_new_session=True, with all its children."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            # Children (raylet, gcs_server, workers) may outlive the leader: sweep the group again.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    # Ray's unix socket paths must stay short: a temp dir under /tmp with a short name.
    temp_dir = Path(f"/tmp/lm-ray-{port}")
    log = tmp_path_factory.mktemp("ray") / "head.log"
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        f"--node-ip-address={LOOPBACK}", f"--port={port}",
        # Logical CPUs above the 2 cores: a Tune trial + Train workers + Ray Data readers must fit.
        # The dashboard serves the State API that Ray Train's placement-group cleaner polls. 8 logical
        # CPUs: under load that cleaner can miss a trial Tune stopped, leaving its worker group's CPUs
        # reserved; headroom keeps the next trial from waiting on them forever.
        "--num-cpus=8", "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
        f"--temp-dir={temp_dir}", *node_ports(),
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"{LOOPBACK}:{port}"
    try:
        wait_for(lambda: "Ray runtime started" in log.read_text(), "ray head", timeout_s=120)
        yield address
    finally:
        stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(ray_address: str) -> Iterator[str]:
    import ray

    ray.init(address=ray_address, log_to_driver=False)
    try:
        yield ray_address
    finally:
        ray.shutdown()


@contextmanager
def mlflow_server(root: Path, artifacts_destination: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real ``mlflow server`` (sqlite backend, proxied artifacts) on a free loopback port; its URI."""
    port = free_port()
    cmd = [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", artifacts_destination,
        "--host", LOOPBACK, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # MLflow's job runner (five huey consumer processes) serves features lensmill does not use and
    # takes CPU from the tests on a 2-core machine.
    env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://{LOOPBACK}:{port}"
    try:
        wait_for(lambda: httpx.get(f"{uri}/health", timeout=2).status_code == 200, "mlflow server", 120)
        yield uri
    finally:
        stop_group(proc)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    with mlflow_server(root, str(root / "artifacts")) as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on loopback (AWS itself cannot be reached here)."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
