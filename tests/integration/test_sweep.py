"""A Tune sweep for real: Optuna's TPE samples train settings, ASHA stops weak trials, every trial is
a Ray Train run and an MLflow child run of the sweep's parent run; a sweep interrupted with a trial
unfinished resumes that trial alone, and a finished sweep trains nothing when run again."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from lensmill.config import load_config
from lensmill.layout import ATTEMPTS_FILE, SUMMARY_FILE, run_uri_for, sweep_trials_uri
from lensmill.shards import write_shards
from lensmill.storage import join_uri, read_json
from lensmill.tune import recorded_trials, sweep_base, tune_architectures

EPOCHS = 4
OVERRIDES = [
    "name=sweep", "sim.n_train=96", "sim.n_val=32", "sim.n_test=4", "sim.rows_per_shard=32",
    "sim.image_size_px=32", "train.batch_size=16", f"train.epochs={EPOCHS}", "tune.models=[tiny]",
    "tune.num_samples=3", "tune.grace_period_epochs=1", "tune.max_concurrent_trials=null",
    "tune.search_space={lr: {dist: loguniform, min: 3e-4, max: 3e-2}, weight_decay: 0.0005, "
    "augment_strength: {dist: choice, values: [0.5, 1.0]}, label_smoothing: {min: 0.0, max: 0.1}}",
]  # fmt: skip
SAMPLED = {"lr", "augment_strength", "label_smoothing"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, ray_session: str, mlflow_uri: str) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    cfg = load_config(None, [*OVERRIDES, f"storage.root={root}", f"tracking.tracking_uri={mlflow_uri}"])
    write_shards(cfg)
    return {"cfg": cfg, "result": tune_architectures(cfg)}


def test_every_trial_is_sampled_from_the_space_and_a_child_run_of_the_sweep(sweep: dict) -> None:
    from mlflow import MlflowClient

    cfg, result = sweep["cfg"], sweep["result"]
    assert len(result.trials) == 3 and len({t.run_name for t in result.trials}) == 3
    for t in result.trials:
        assert set(t.params) == SAMPLED and 3e-4 <= t.params["lr"] <= 3e-2
        assert t.params["augment_strength"] in (0.5, 1.0) and 0 <= t.params["label_smoothing"] <= 0.1
        assert t.usable and t.summary.epochs_run <= EPOCHS and t.lr == t.params["lr"]
    # Optuna's draws differ from trial to trial.
    assert len({t.params["lr"] for t in result.trials}) == 3
    # ASHA stopped at least one trial before its last epoch (grace period 1, halving at each rung).
    stopped = [t for t in result.trials if t.summary.stop_reason == "scheduler"]
    assert stopped and all(t.summary.epochs_run < EPOCHS for t in stopped), [
        (t.summary.epochs_run, t.summary.val_auc) for t in result.trials
    ]
    client = MlflowClient(cfg.tracking.tracking_uri)
    for t in result.trials:
        run = client.get_run(t.summary.mlflow_run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.mlflow_run_id
        # The fixed setting reached every trial; the sampled ones are the trial's own.
        assert run.data.params["train.weight_decay"] == "0.0005"
        assert float(run.data.params["train.label_smoothing"]) == pytest.approx(t.params["label_smoothing"])
        assert run.info.status == "FINISHED"
    # The parent run's results table: a row per trial, a column per sampled setting, and the plot.
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"tune_results.csv", "tune_results.md", "tune_parallel_coordinates.png"} <= artifacts
    table = Path(client.download_artifacts(result.mlflow_run_id, "tune_results.csv"))
    rows = list(csv.DictReader(table.open()))
    assert {r["trial"] for r in rows} == {t.run_name for t in result.trials}
    assert {"augment_strength", "label_smoothing", "val_tpr10", "stopped_early"} <= set(rows[0])
    assert float(rows[0]["val_auc"]) == max(t.val_auc for t in result.trials)
    assert {r["stopped_early"] for r in rows} >= {"True"}


def test_an_interrupted_sweep_resumes_only_its_unfinished_trial_and_a_finished_one_trains_nothing(
    sweep: dict,
) -> None:
    cfg, result = sweep["cfg"], sweep["result"]
    base = sweep_base(cfg)
    assert {r.run_name for r in recorded_trials(base)} == {t.run_name for t in result.trials}
    assert sweep_trials_uri(base).startswith(cfg.storage.root)

    def files(name: str) -> dict[str, float]:
        run = run_uri_for(base, name)
        return {f: os.stat(join_uri(run, f)).st_mtime_ns for f in (SUMMARY_FILE, ATTEMPTS_FILE)}

    # The state a driver killed mid-sweep leaves: one trial proposed and checkpointed, no summary.
    victim = max(result.trials, key=lambda t: t.summary.epochs_run)
    others = {t.run_name: files(t.run_name) for t in result.trials if t is not victim}
    Path(run_uri_for(base, victim.run_name), SUMMARY_FILE).unlink()
    again = tune_architectures(cfg)
    assert {t.run_name for t in again.trials} == {t.run_name for t in result.trials}
    assert {t.run_name: files(t.run_name) for t in again.trials if t.run_name != victim.run_name} == others
    resumed = next(t for t in again.trials if t.run_name == victim.run_name)
    # Resumed from its checkpoints: the same epochs, none trained again, one more attempt recorded.
    assert resumed.summary.history == victim.summary.history
    attempts = read_json(join_uri(run_uri_for(base, victim.run_name), ATTEMPTS_FILE), cfg.storage)
    assert len(attempts) == victim.summary.attempts + 1
    # Nothing left: the third run reads every trial back and starts no Tune run at all.
    before = {t.run_name: files(t.run_name) for t in again.trials}
    third = tune_architectures(cfg)
    assert {t.run_name: files(t.run_name) for t in third.trials} == before
    assert [t.summary.val_auc for t in third.trials] == [t.summary.val_auc for t in again.trials]
