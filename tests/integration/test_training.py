"""Ray Train for real: DDP over two workers on a tiny dataset, a failure injected mid-run and resumed
from the last checkpoint, a finished run returned without retraining, early stopping.

Two workers with half a CPU each exercise DDP (gloo) on a 2-core machine; the test Ray head has
4 logical CPUs, so the Ray Data readers fit beside them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lensmill.config import load_config
from lensmill.layout import ATTEMPTS_FILE, SUMMARY_FILE, run_name_for, runs_uri
from lensmill.shards import write_shards
from lensmill.storage import join_uri, list_files, read_json
from lensmill.train import fit, should_stop_early

# 4 validation images (2 lenses): AUC takes at most 9 values, so early stopping with patience 1
# must fire within 9 epochs (no strictly rising run is longer).
BASE = [
    "sim.n_train=96", "sim.n_val=4", "sim.n_test=4", "sim.rows_per_shard=32", "sim.image_size_px=32",
    "train.model=tiny", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=16",
    "train.epochs=3", "train.lr=0.003",
]  # fmt: skip


@pytest.fixture(scope="module")
def overrides(tmp_path_factory: pytest.TempPathFactory, ray_session: str, mlflow_uri: str) -> list[str]:
    """The tiny dataset, written once; the overrides that point a config at it."""
    root = tmp_path_factory.mktemp("training")
    out = [*BASE, f"storage.root={root}", f"tracking.tracking_uri={mlflow_uri}"]
    write_shards(load_config(None, out))
    return out


def test_injected_failure_resumes_from_the_last_checkpoint_and_a_rerun_does_not_retrain(
    overrides: list[str], mlflow_uri: str
) -> None:
    extra = ["name=fault", "train.fail_at_epoch=1", "train.max_failures=1", "train.keep_checkpoints=1"]
    cfg = load_config(None, [*overrides, *extra])
    # Streaming every epoch (no in-memory cache): the restarted workers read through Ray Data again.
    summary = fit(cfg, cache_in_memory=False)
    history = summary.history
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # Epoch 0 ran in the first attempt; the failure at epoch 1 restarted the workers, which resumed
    # from the epoch-0 checkpoint.
    assert [h["attempt"] for h in history] == [0, 1, 1]
    assert [h["resumed_from_epoch"] for h in history] == [None, 0, 0]
    assert not any(h["data_from_cache"] for h in history)
    assert summary.attempts == 2 and summary.epochs_run == 3 and not summary.stopped_early
    run_uri = join_uri(runs_uri(cfg), run_name_for(cfg))
    attempts = read_json(join_uri(run_uri, ATTEMPTS_FILE), cfg.storage)
    assert [a["inject_failure_at"] for a in attempts] == [1, None]
    assert [a["resumed_from_epoch"] for a in attempts] == [None, 0]
    # The best checkpoint by val AUC and the latest (epoch 2) are kept.
    assert Path(summary.checkpoint_uri, "model.pt").is_file()
    kept = {u.rsplit("/", 2)[-2] for u in list_files(run_uri, cfg.storage) if u.endswith("/model.pt")}
    assert "epoch-0002" in kept and len(kept) <= 2

    # MLflow has one val_auc per epoch, across both attempts.
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_uri)
    steps = [m.step for m in c.get_metric_history(summary.mlflow_run_id, "val_auc")]
    assert sorted(steps) == [0, 1, 2]

    # The same run again: the recorded summary comes back, nothing is trained or recorded again.
    files_before = list_files(run_uri, cfg.storage)
    again = fit(cfg, cache_in_memory=False)
    assert again == summary
    assert read_json(join_uri(run_uri, ATTEMPTS_FILE), cfg.storage) == attempts
    assert list_files(run_uri, cfg.storage) == files_before

    # The last checkpoint written but no summary (a driver killed in between): the next fit trains
    # nothing, reports the last epoch again (Tune needs the metric) and writes the summary.
    Path(run_uri, SUMMARY_FILE).unlink()
    third = fit(cfg, cache_in_memory=False)
    assert (third.val_auc, third.best_epoch, third.epochs_run) == (summary.val_auc, summary.best_epoch, 3)
    assert [h["epoch"] for h in third.history] == [0, 1, 2]
    latest = read_json(join_uri(run_uri, ATTEMPTS_FILE), cfg.storage)[-1]
    assert latest["start_epoch"] == 3 and latest["resumed_from_epoch"] == 2
    assert {u for u in list_files(run_uri, cfg.storage) if "/epoch-" in u} == {
        u for u in files_before if "/epoch-" in u
    }


def test_early_stopping_stops_every_rank_before_the_last_epoch(overrides: list[str]) -> None:
    extra = ["name=early", "train.epochs=10", "train.early_stopping_patience=1"]
    cfg = load_config(None, [*overrides, *extra])
    summary = fit(cfg)  # small split: cached in the workers after the first epoch
    history = summary.history
    assert summary.epochs_run == len(history) < 10
    assert summary.stopped_early and summary.stop_reason == "early_stopping"
    assert [h["early_stop"] for h in history] == [False] * (len(history) - 1) + [True]
    assert should_stop_early(history, 1) and not should_stop_early(history[:-1], 1)
    # Epoch 0 streams through Ray Data and fills the cache; later epochs read the cache.
    assert [h["data_from_cache"] for h in history] == [False] + [True] * (len(history) - 1)
    assert summary.attempts == 1 and all(h["attempt"] == 0 for h in history)


def test_a_trial_tune_ends_before_its_fit_returns_is_summarised_at_once(
    overrides: list[str], mlflow_uri: str
) -> None:
    """ASHA stops a trial right after its last report, often before the trial's ``fit`` writes the
    summary: the sweep's callback writes it then (not after the sweep), and ends the MLflow run."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from lensmill.train import read_summary
    from lensmill.tune import _summary_callback, trial_run_name

    cfg = load_config(None, [*overrides, "name=ended", "train.epochs=2"])
    pair = {"model": cfg.train.model, "lr": cfg.train.lr}
    name = trial_run_name(cfg, pair)
    summary = fit(cfg, run_name=name)
    # As Tune leaves it: checkpoints on storage, no summary, the MLflow run still RUNNING.
    Path(runs_uri(cfg), name, SUMMARY_FILE).unlink()
    client = MlflowClient(tracking_uri=mlflow_uri)
    client.update_run(summary.mlflow_run_id, status="RUNNING")
    assert read_summary(cfg, name) is None

    _summary_callback(cfg).on_trial_complete(
        iteration=1, trials=[], trial=SimpleNamespace(config={"trial": pair})
    )
    again = read_summary(cfg, name)
    assert again is not None and (again.val_auc, again.best_epoch, again.epochs_run) == (
        summary.val_auc, summary.best_epoch, 2,
    )  # fmt: skip
    # Stopped by the scheduler at its last epoch: not an early stop.
    assert not again.stopped_early and again.stop_reason is None
    assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"
    # A trial that never checkpointed is left to the sweep's end, without raising here.
    missing = SimpleNamespace(config={"trial": {"model": "tiny", "lr": 0.5}})
    _summary_callback(cfg).on_trial_complete(iteration=1, trials=[], trial=missing)


def test_the_same_config_trains_to_the_same_metrics(overrides: list[str]) -> None:
    """Data order and initialisation follow ``train.seed``: two runs of one config (under two names)
    stream the same batches and give the same losses and AUCs (one worker, CPU); another seed does not."""
    one = ["train.num_workers=1", "train.cpus_per_worker=1", "train.epochs=2"]

    def history(name: str, seed: int) -> list[float]:
        cfg = load_config(None, [*overrides, *one, f"name={name}", f"train.seed={seed}"])
        summary = fit(cfg, cache_in_memory=False)  # streaming through Ray Data in both epochs
        return [v for h in summary.history for v in (h["train_loss"], h["val_loss"])]

    first, second = history("repro-a", 0), history("repro-b", 0)
    assert first == pytest.approx(second, rel=1e-5, abs=1e-7)
    assert history("repro-c", 1) != pytest.approx(first, rel=1e-5, abs=1e-7)
