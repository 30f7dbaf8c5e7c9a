"""Which errors are the user's (exit 2, one line) and which are bugs (exit 1, traceback kept); MLflow
runs end FAILED when their stage raises."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import typer

from lensmill import tracking
from lensmill.cli import run_command
from lensmill.config import load_config
from lensmill.errors import ConfigError, DatasetError, LensmillError, RecordError, StorageError, TrackingError


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_every_user_error_derives_from_lensmill_error() -> None:
    for cls in (ConfigError, StorageError, DatasetError, RecordError, TrackingError):
        assert issubclass(cls, LensmillError)
    assert not issubclass(TrackingError, RuntimeError)  # handlers need not catch RuntimeError
    assert issubclass(StorageError, OSError) and issubclass(ConfigError, ValueError)


def test_a_user_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def stage(cfg):
        raise StorageError("cannot read s3://bucket/x.json: connection refused")

    with pytest.raises(typer.Exit) as info:
        run_command(None, [], stage, ray=False)
    assert info.value.exit_code == 2
    out, err = capsys.readouterr()
    assert last_json(out) == {"ok": False, "error": "cannot read s3://bucket/x.json: connection refused"}
    assert "lensmill: error: cannot read s3://bucket/x.json" in err and "Traceback" not in err


def test_a_file_not_found_deep_in_a_stage_is_a_bug_with_its_traceback(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    def stage(cfg):
        Path("/nonexistent/lensmill/checkpoint.pt").read_bytes()

    with caplog.at_level(logging.ERROR, logger="lensmill"), pytest.raises(typer.Exit) as info:
        run_command(None, [], stage, ray=False)
    assert info.value.exit_code == 1
    out, _ = capsys.readouterr()
    assert last_json(out)["error"].startswith("FileNotFoundError: ")
    record = next(r for r in caplog.records if "unexpected error" in r.getMessage())
    assert record.exc_info is not None and record.exc_info[0] is FileNotFoundError


def test_tracking_run_ends_failed_on_an_exception_and_finished_otherwise(tmp_path: Path) -> None:
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    with pytest.raises(ZeroDivisionError), tracking.run(cfg, "boom", "test") as failed:
        tracking.log_metrics(cfg, failed, {"x": 1.0})
        1 / 0  # noqa: B018
    with tracking.run(cfg, "fine", "test", dataset_id="ds") as fine:
        pass
    c = tracking.client(cfg)
    assert c is tracking.client(cfg)  # one client per tracking URI
    assert c.get_run(failed).info.status == "FAILED"
    run = c.get_run(fine)
    assert run.info.status == "FINISHED" and run.data.tags["dataset_id"] == "ds"
    assert run.data.tags["config_hash"] == cfg.hash() and run.data.params["train.model"] == cfg.train.model
