"""Every pipeline stage has its `ray job submit` entry point, and jobs carry the commit they ran."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lensmill import tracking
from lensmill.config import ConfigError, load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"
STAGES = ("simulate", "train", "tune", "ensemble", "evaluate", "serve", "pipeline", "predict", "probe")


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_a_job_script_running_its_command(stage: str) -> None:
    script = JOBS / f"{stage}.py"
    assert script.is_file(), f"jobs/{stage}.py is missing"
    assert f'app(["{stage}", *sys.argv[1:]])' in script.read_text()
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--config" in out.stdout


def test_git_sha_comes_from_the_runtime_env_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    tracking.git_sha.cache_clear()
    monkeypatch.setenv(tracking.GIT_SHA_ENV, "0123abcd" * 5)
    try:
        assert tracking.git_sha() == "0123abcd" * 5
    finally:
        tracking.git_sha.cache_clear()


def test_gpu_use_is_explicit() -> None:
    assert load_config(None, []).train.use_gpu is False
    assert load_config(None, ["train.use_gpu=true"]).train.use_gpu is True
    with pytest.raises(ConfigError, match="train.use_gpu"):
        load_config(None, ["train.use_gpu=maybe"])
