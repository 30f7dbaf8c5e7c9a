"""What a reviewer sees in the MLflow UI, checked in a real browser: headless Chromium renders the
UI of a real ``mlflow server`` and the rendered page (the DOM after its scripts ran) must show the
run's dataset, its source and commit, and the registered version's description and tags.

Needs Debian's Chromium (``apt-get install chromium``); skipped where it is not installed, as on a
bare CI machine. The README's "What a reviewer sees in MLflow" holds the screenshots of a real run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lensmill import tracking
from lensmill.config import load_config
from lensmill.models import LensClassifier
from lensmill.predict import EnsemblePredictor, Member

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
# No sandbox (root in a container); no calls home, which this closed network refuses.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1800,1000", "--virtual-time-budget=20000",
]  # fmt: skip


def render(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The DOM of ``url`` once its scripts have run (and a PNG of it, when asked)."""
    args = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def test_the_runs_table_and_the_registry_show_dataset_source_and_description(mlflow_uri, tmp_path):
    cfg = load_config(
        None,
        [f"storage.root={tmp_path}", f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment=ui-check",
         "tracking.registered_model=ui-check-model"],
    )  # fmt: skip
    dataset_id = "a1b2c3d4e5f6"
    with tracking.run(cfg, "ui-check-ensemble", "ensemble", dataset_id) as run_id:
        member = Member("tiny@lr0.001", LensClassifier("tiny", 1, mean=[0.0], std=[1.0]), 1.0)
        EnsemblePredictor([member], (1, 32, 32)).save(tmp_path / "ensemble")
        description = "Ensemble of 1 member on dataset a1b2c3d4e5f6: tiny@lr0.001 weight 1.000"
        tags = {"dataset_id": dataset_id, "config_hash": cfg.hash()}
        version = tracking.register_ensemble(cfg, run_id, tmp_path / "ensemble", None, description, tags)
    experiment = tracking.experiment_id(cfg)

    runs_page = f"{mlflow_uri}/#/experiments/{experiment}/runs?viewMode=TABLE&workflowType=machine_learning"
    dom = render(runs_page, tmp_path / "profile")
    assert "ui-check-ensemble" in dom
    assert f"lensmill-{dataset_id} ({dataset_id})" in dom  # the Dataset column: name (digest)
    assert "lensmill ensemble" in dom  # the Source column

    run_page = f"{mlflow_uri}/#/experiments/{experiment}/runs/{run_id}"
    dom = render(run_page, tmp_path / "profile")
    assert tracking.git_sha()[:7] in dom  # the run's source commit

    version_page = f"{mlflow_uri}/#/models/ui-check-model/versions/{version['version']}"
    dom = render(version_page, tmp_path / "profile")
    assert "Ensemble of 1 member on dataset a1b2c3d4e5f6" in dom
    assert "config_hash" in dom and cfg.hash() in dom

    png = tmp_path / "runs.png"
    render(runs_page, tmp_path / "profile", screenshot=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
