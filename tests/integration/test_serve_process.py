"""`lensmill serve` as a process manager runs it: stopped with SIGTERM, it shuts Serve down and exits 0
with one log line (Ray's own handler would print a stack dump and abort, exit 134).

Its own module, after test_serve.py: the process joins the session's Ray head and shuts Serve down
on that cluster when it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lensmill.models import LensClassifier
from lensmill.predict import EnsemblePredictor, Member

try:
    from tests.conftest import free_port
except ImportError:
    from conftest import free_port  # type: ignore[no-redef]

LENSMILL = Path(sys.executable).parent / "lensmill"


@pytest.mark.parametrize("when", ["serving", "starting"])
def test_sigterm_stops_the_server_cleanly_with_exit_code_0(
    ray_address: str, tmp_path: Path, when: str
) -> None:
    EnsemblePredictor([Member("m", LensClassifier("tiny", 1, [0.0], [1.0]), 1.0)], (1, 32, 32)).save(
        tmp_path / "ens"
    )
    cmd = [str(LENSMILL), "serve", "--model-dir", str(tmp_path / "ens"), f"ray.address={ray_address}",
           f"serve.port={free_port()}", "serve.cpus_per_replica=0.25"]  # fmt: skip
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ.copy())
    # "serving": once the endpoint is up; "starting": while Serve adds the replica.
    mark = "serving on" if when == "serving" else "Adding 1 replica"
    deadline = time.monotonic() + 180
    while mark not in err_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, err_path.read_text()[-2000:]
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stderr = err_path.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["stopped"] is True
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr
    assert stderr.count("shutting Serve down") == 1


def _own_network_namespace() -> bool:
    """Whether this process may run commands in a network namespace of their own (root, unshare)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _own_network_namespace(), reason="needs `unshare -n` (root) for HAProxy's ports")
def test_haproxy_ingress_answers_like_the_proxy_and_stops_cleanly(tmp_path: Path) -> None:
    """serve.ingress=haproxy: Serve's HAProxy in front of replicas that serve HTTP themselves. The
    command runs with its own local Ray inside a network namespace with nothing but loopback, since
    HAProxy opens its stats and metrics ports on all interfaces (tests keep servers on loopback)."""
    helper = Path(__file__).with_name("haproxy_session.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$1" "$2"',
         sys.executable, str(helper), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    tail = seen.get("stderr_tail", "")
    assert seen["healthz"] == 200 and seen["haproxy_stats"] == 200, tail
    assert seen["no_key"][0] == 401 and "API key" in seen["no_key"][1]["error"]
    assert seen["predict_status"] == 200
    assert seen["p_lens"] == pytest.approx(seen["expected_p_lens"], abs=1e-6)
    assert seen["malformed"][0] == 400 and "not valid JSON" in seen["malformed"][1]["error"]
    assert seen["chunked_over_limit"][0] == 413 and "exceeds" in seen["chunked_over_limit"][1]["error"]
    assert seen["healthz_after"] == 200
    assert seen["returncode"] == 0 and seen["last_line"]["stopped"] is True, tail
    assert seen["shutting_down_lines"] == 1 and not seen["traceback"], tail
