"""The whole pipeline on jobs/configs/smoke.yaml, run as a user runs it: the `lensmill` CLI against a
real Ray head, a real MLflow server, and the Serve endpoint queried over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, free_port

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout_s: int = 900) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [str(VENV_BIN / "lensmill"), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, f"no stdout; stderr tail:\n{proc.stderr[-4000:]}"
    try:
        summary = json.loads(lines[-1])
    except json.JSONDecodeError:
        pytest.fail(f"last stdout line is not JSON: {lines[-1]!r}\nstderr tail:\n{proc.stderr[-4000:]}")
    return proc, summary


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, ray_address, mlflow_uri):
    root = tmp_path_factory.mktemp("smoke")
    overrides = [
        f"storage.root={root}",
        f"tracking.tracking_uri={mlflow_uri}",
        f"ray.address={ray_address}",
        f"serve.port={free_port()}",
    ]
    proc, summary = run_cli("pipeline", "--config", "jobs/configs/smoke.yaml", *overrides, "--queries", "6")
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-8000:])
    assert proc.returncode == 0, summary
    return {"root": root, "summary": summary, "overrides": overrides, "mlflow_uri": mlflow_uri}


def test_pipeline_summary_has_every_stage(smoke):
    s = smoke["summary"]
    assert s["n_images"] == 160 + 64 + 64
    assert Path(s["dataset_uri"], "manifest.json").is_file()
    assert {m["model"] for m in s["members"]} == {"tiny", "timm:resnet10t"}, s["trials"]
    assert all(0.0 <= m["val_auc"] <= 1.0 for m in s["members"])
    assert sum(s["ensemble_weights"]) == pytest.approx(1.0)
    # The weight search never trails equal weights or the best member on validation.
    vs = s["ensemble_vs"]
    assert vs["objective"] == "roc_auc"
    assert vs["val_objective"] >= max(vs["equal_weights_val_objective"], vs["best_member_val_objective"])
    # The threshold was chosen on validation: at most 1% false positives there (the default).
    op = s["operating_point"]
    assert op["kind"] == "fpr" and op["val_fpr"] <= 0.01 and 0 < op["threshold"] < 1
    assert s["test_metrics"]["threshold"] == pytest.approx(op["threshold"])
    # The results table: each member alone, then the ensemble, with bootstrap intervals.
    rows = s["test_results"]
    assert [r["name"] for r in rows][-1] == "ensemble" and len(rows) == 3
    assert rows[-1]["roc_auc"] == pytest.approx(s["test_metrics"]["roc_auc"])
    assert all(r["roc_auc_ci95"][0] <= r["roc_auc"] <= r["roc_auc_ci95"][1] for r in rows)
    for key in ("accuracy", "roc_auc", "precision", "recall", "f1"):
        assert 0.0 <= s["test_metrics"][key] <= 1.0
    # Purity at survey prevalence (1 lens in 1,000): the test split re-weighted, never above the
    # purity the test split's own mix gives at the same threshold.
    survey = s["test_metrics"]["survey"]
    assert survey["prevalence"] == 1e-3 and 0 < survey["n_negatives"] < 64
    assert survey["purity_at_threshold_conservative"] <= survey["purity_at_threshold"]
    assert survey["purity_at_threshold"] <= s["test_metrics"]["precision"] + 1e-9
    assert s["model_uri"] == "models:/lens-ensemble@champion"
    assert s["endpoint"].startswith("http://127.0.0.1:")
    assert len(s["served"]) == 6
    for answer in s["served"]:
        assert 0.0 <= answer["p_lens"] <= 1.0
        assert answer["label"] == int(answer["p_lens"] >= op["threshold"])
        assert answer["true_label"] in (0, 1)
    assert {a["true_label"] for a in s["served"]} == {0, 1}


def test_champion_is_registered_with_its_lineage(smoke):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=smoke["mlflow_uri"], registry_uri=smoke["mlflow_uri"])
    mv = c.get_model_version_by_alias("lens-ensemble", "champion")
    assert mv.version == str(smoke["summary"]["model_version"])
    run = c.get_run(mv.run_id)
    assert run.data.tags["dataset_id"] == smoke["summary"]["dataset_id"]
    assert run.data.tags["config_hash"] and run.data.tags["git_sha"]
    assert run.data.metrics["val_auc"] == pytest.approx(smoke["summary"]["ensemble_val_auc"])
    # What a reviewer reads in the registry: a description and the lineage as version tags.
    assert mv.description.startswith("Ensemble of 2 members on dataset " + smoke["summary"]["dataset_id"])
    assert "Promotion:" in mv.description and "threshold" in mv.description
    # The evaluation's test figures, added by the evaluate stage (the pipeline evaluates this version).
    assert "\nTest (" in mv.description and "ROC AUC" in mv.description.split("\nTest (")[1]
    assert mv.tags["dataset_id"] == smoke["summary"]["dataset_id"] and mv.tags["config_hash"]
    # The sweep's parent run holds its results table.
    tune_runs = c.search_runs([run.info.experiment_id], "tags.`lensmill.stage` = 'tune'")
    parents = [
        r for r in tune_runs if {a.path for a in c.list_artifacts(r.info.run_id)} >= {"tune_results.md"}
    ]
    assert parents, "no tune run with tune_results.md"
    table = c.download_artifacts(parents[0].info.run_id, "tune_results.csv")
    assert Path(table).read_text().splitlines()[0].startswith("trial,model,lr,epochs_run")
    # The Dataset column: every stage's run names its dataset, digested by the dataset id.
    inputs = run.inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [smoke["summary"]["dataset_id"]]
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "ensemble"
    # Each member's training run logged one val_auc per epoch.
    # (The MLflow server is shared by the session's tests: pick this pipeline's runs by name.)
    names = {t["run_name"] for t in smoke["summary"]["trials"]}
    train_runs = c.search_runs([run.info.experiment_id], "tags.`lensmill.stage` = 'train'")
    member_runs = [r for r in train_runs if r.info.run_name in names]
    assert len(member_runs) == 2 == len(names)
    # Tune stops a trial right after its last epoch: its run still ends FINISHED, not FAILED/KILLED.
    assert [r.info.status for r in member_runs] == ["FINISHED"] * 2
    for r in member_runs:
        history = c.get_metric_history(r.info.run_id, "val_auc")
        assert [m.step for m in history] == [0, 1]


def test_rerun_reuses_data_and_finished_trials(smoke):
    """The same config again: nothing is simulated or trained twice; a new ensemble version is registered."""
    proc, summary = run_cli(
        "pipeline", "--config", "jobs/configs/smoke.yaml", *smoke["overrides"], "--queries", "2"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert summary["dataset_id"] == smoke["summary"]["dataset_id"]
    assert summary["members"] == smoke["summary"]["members"]
    assert int(summary["model_version"]) == int(smoke["summary"]["model_version"]) + 1
    # The same members, the same weights: no better than the champion, so it is only @challenger.
    assert summary["promotion"].startswith("does not beat champion version"), summary["promotion"]
    assert summary["model_uri"] == "models:/lens-ensemble@challenger"
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=smoke["mlflow_uri"], registry_uri=smoke["mlflow_uri"])
    assert c.get_model_version_by_alias("lens-ensemble", "champion").version == str(
        smoke["summary"]["model_version"]
    )
    assert c.get_model_version_by_alias("lens-ensemble", "challenger").version == str(
        summary["model_version"]
    )


def test_user_mistakes_get_one_clear_line_and_no_traceback(smoke):
    proc, summary = run_cli("train", "--config", "jobs/configs/smoke.yaml", "train.epochz=3")
    assert proc.returncode == 2
    assert "train.epochz" in summary["error"] and "Traceback" not in proc.stderr
    proc, summary = run_cli(
        "evaluate", "--config", "jobs/configs/smoke.yaml", f"storage.root={smoke['root']}/empty",
        f"tracking.tracking_uri={smoke['mlflow_uri']}", "tracking.registered_model=no-such-model",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no-such-model" in summary["error"] and "Traceback" not in proc.stderr
