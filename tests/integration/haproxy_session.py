"""`lensmill serve` with ``serve.ingress=haproxy``, driven from inside a network namespace of its own.

Run by ``test_serve_process.py`` as ``unshare -n sh -c 'ip link set lo up && exec python THIS DIR'``:
HAProxy opens its stats page and metrics on all interfaces, and a namespace with nothing but its own
loopback keeps those (and the local Ray the command starts) off the machine's network. Starts the
command, checks the endpoint over HTTP (open /healthz, the API key, answers equal to the predictor's,
a malformed body and a chunked body over the limit), stops it with SIGTERM, and prints one JSON line
of what it saw for the test to assert on.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from lensmill.models import LensClassifier
from lensmill.predict import EnsemblePredictor, Member

SHAPE = (1, 32, 32)
KEY_ENV = "LENSMILL_TEST_HAPROXY_KEY"
KEY = "haproxy-test-key"


def _npy_b64(images: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, images)
    return base64.b64encode(buf.getvalue()).decode()


def main(work: Path) -> dict:
    members = []
    for i, weight in enumerate((0.6, 0.4)):
        torch.manual_seed(30 + i)
        members.append(Member(f"tiny-{i}", LensClassifier("tiny", 1, [0.5], [2.0]), weight))
    reference = EnsemblePredictor(members, SHAPE, threshold=0.5)
    model_dir = reference.save(work / "ens")
    # The namespace's ports are all free: the defaults (HAProxy's 8404 and 9101 too) cannot collide,
    # where ports picked free beforehand could be taken by the local Ray meanwhile.
    port = 8000
    cmd = [str(Path(sys.executable).parent / "lensmill"), "serve", "--model-dir", str(model_dir),
           "serve.ingress=haproxy", f"serve.port={port}", "serve.cpus_per_replica=0.25",
           f"serve.api_key_env={KEY_ENV}", "ray.num_cpus=2"]  # fmt: skip
    # A Ray of its own in the namespace: "local" keeps ray.init from joining a head that `ray start`
    # left on the machine (it finds one through the process table, unreachable from here).
    env = os.environ | {"RAY_ADDRESS": "local", KEY_ENV: KEY}
    err_path = work / "serve-stderr.txt"
    seen: dict = {}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        first = proc.stdout.readline()  # the command's JSON line, once the endpoint is up
        if not first:
            proc.wait(timeout=30)
            return {"error": "no endpoint line", "stderr": err_path.read_text()[-3000:]}
        seen["endpoint"] = json.loads(first)["endpoint"]
        url = f"http://127.0.0.1:{port}"
        images = np.random.default_rng(5).normal(0.5, 2.0, (3, *SHAPE)).astype(np.float32)
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, timeout=60.0) as http:
            seen["healthz"] = http.get("/healthz").status_code
            # HAProxy's own stats page (serve.haproxy_stats_port's default): HAProxy is what answers.
            seen["haproxy_stats"] = httpx.get("http://127.0.0.1:8404/stats", timeout=10.0).status_code
            r = http.post("/v1/predict", json={"npy_b64": _npy_b64(images)})
            seen["no_key"] = [r.status_code, r.json()]
            r = http.post("/v1/predict", json={"npy_b64": _npy_b64(images)}, headers=auth)
            seen["predict_status"] = r.status_code
            seen["p_lens"] = [p["p_lens"] for p in r.json()["predictions"]]
            r = http.post(
                "/v1/predict", content=b"{not json", headers=auth | {"content-type": "application/json"}
            )
            seen["malformed"] = [r.status_code, r.json()]

            def chunks():  # no Content-Length: the limit must hold while the body streams in
                for _ in range(64):
                    yield b"x" * (1 << 20)

            r = http.post(
                "/v1/predict", content=chunks(), headers=auth | {"content-type": "application/json"}
            )
            seen["chunked_over_limit"] = [r.status_code, r.json()]
            seen["healthz_after"] = http.get("/healthz").status_code
        seen["expected_p_lens"] = reference.predict(images)["p_lens"].tolist()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        seen["returncode"] = proc.returncode
        seen["last_line"] = json.loads(out.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err_path.read_text()
    seen["shutting_down_lines"] = stderr.count("shutting Serve down")
    seen["traceback"] = "Traceback" in stderr
    seen["stderr_tail"] = stderr[-2000:]
    return seen


if __name__ == "__main__":
    started = time.monotonic()
    result = main(Path(sys.argv[1]))
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))
