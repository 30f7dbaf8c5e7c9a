"""Ray Tune: search over architecture x learning rate, each trial a Ray Train run (``fit``).

A trial is a small driver function that builds a ``TorchTrainer`` whose reports reach Tune through
``TuneReportCallback``; ASHA stops weak trials early. Finished trials are the ensemble's candidates.

A trial's summary is written the moment Tune ends it (``_SummaryCallback``), not after the sweep:
ASHA stops every trial at its last epoch too, often before the trial's own ``fit`` has written its
summary, and a sweep whose driver dies must find those trials finished when it is resubmitted.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from lensmill import tracking
from lensmill.config import Config
from lensmill.layout import (
    TUNE_FILE,
    run_name_for,
    runs_uri,
    stage_run_name,
    tune_experiment_name,
    tune_results_uri,
)
from lensmill.records import BestTrial, RunSummary, TrialResult, TuneResults, read_record, write_record
from lensmill.shards import dataset_uri_for, read_manifest
from lensmill.storage import StorageError, is_s3, locate
from lensmill.train import fit, read_run_info, read_summary, summarize_run

log = logging.getLogger(__name__)


def trial_config(base: Config, model: str, lr: float) -> Config:
    """The base config with one trial's architecture and learning rate."""
    tree = base.model_dump(mode="json")
    tree["train"].update(model=model, lr=lr)
    return Config.model_validate(tree)


def _trial(params: dict[str, Any], base: dict[str, Any], parent_run_id: str) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(Config.model_validate(base), params["trial"]["model"], params["trial"]["lr"])
    fit(cfg, callbacks=[TuneReportCallback()], parent_run_id=parent_run_id)


def trial_run_name(cfg: Config, pair: dict[str, Any]) -> str:
    return run_name_for(trial_config(cfg, pair["model"], pair["lr"]))


def summarize_stopped_trial(cfg: Config, run_name: str) -> RunSummary:
    """Summary of a trial Tune ended (its process may be gone), from its checkpoints; ends its MLflow
    run. ``RuntimeError`` / ``StorageError`` when it never checkpointed."""
    with tracking.ending(cfg, read_run_info(cfg, run_name).mlflow_run_id):
        return summarize_run(cfg, run_name, stopped_early=True)


def _summary_callback(cfg: Config) -> Any:
    """A Tune callback (driver side) that writes each ended trial's summary at once."""
    from ray.tune import Callback

    class _SummaryCallback(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name = trial_run_name(cfg, trial.config["trial"])
            try:
                if read_summary(cfg, name) is None:
                    summarize_stopped_trial(cfg, name)
            except (StorageError, RuntimeError) as exc:  # no checkpoint yet: the sweep's end decides
                log.warning("trial %s ended without a summary: %s", name, exc)

    return _SummaryCallback()


def tune_architectures(cfg: Config) -> TuneResults:
    """Run the search; every trial's result. A trial ASHA stopped early still counts, with its best
    checkpoint so far (``stopped_early``); only trials that never checkpointed are left out of the
    ensemble's candidates."""
    # Fails here, naming the URI, when the dataset is missing, rather than inside every trial.
    manifest = read_manifest(dataset_uri_for(cfg), cfg.storage)
    with tracking.run(cfg, stage_run_name(cfg, "tune"), "tune", manifest.dataset_id) as parent:
        out = _search(cfg, parent)
    write_record(tune_results_uri(cfg), out, cfg.storage)
    return out


def _search(cfg: Config, parent: str) -> TuneResults:
    """The trials (those finished before are not run again), then every trial's result."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t = cfg.tune
    pairs = [{"model": m, "lr": lr} for m in t.models for lr in t.lrs]
    done = {i: read_summary(cfg, trial_run_name(cfg, p)) for i, p in enumerate(pairs)}
    # Runs finished before (same config) are not trained again: the search resumes where it stopped.
    todo = [p for i, p in enumerate(pairs) if done[i] is None]
    errors: dict[tuple[str, float], str] = {}
    if todo:
        runs = locate(runs_uri(cfg), cfg.storage)
        scheduler = ASHAScheduler(
            max_t=cfg.train.epochs,
            grace_period=min(t.grace_period_epochs, cfg.train.epochs),
            reduction_factor=2,
        )
        tuner = tune.Tuner(
            # The trial itself only drives the Train controller and workers: a sliver of a CPU.
            tune.with_resources(
                tune.with_parameters(_trial, base=cfg.model_dump(mode="json"), parent_run_id=parent),
                {"cpu": 0.1},
            ),
            param_space={"trial": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode="max" if t.metric == "val_auc" else "min",
                scheduler=scheduler,
                max_concurrent_trials=t.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=tune_experiment_name(cfg),
                storage_path=runs.path,
                storage_filesystem=runs.filesystem if is_s3(runs.uri) else None,
                callbacks=[_summary_callback(cfg)],
            ),
        )
        for result in tuner.fit():
            if result.error:
                p = result.config["trial"]
                errors[(p["model"], p["lr"])] = str(result.error)
    trials: list[TrialResult] = []
    for i, p in enumerate(pairs):
        name = trial_run_name(cfg, p)
        summary = done[i] or read_summary(cfg, name)
        error = None
        if summary is None:
            try:  # stopped, and the callback could not summarise it then
                summary = summarize_stopped_trial(cfg, name)
            except (StorageError, RuntimeError) as exc:  # failed before its first checkpoint
                error = errors.get((p["model"], p["lr"]), str(exc))
        if summary is not None and tracking.mark_finished(cfg, summary.mlflow_run_id):
            # Tune stopped the trial's process after its summary was written (it ends its run FAILED).
            log.info("trial %s: MLflow run %s marked FINISHED", name, summary.mlflow_run_id)
        trials.append(TrialResult(model=p["model"], lr=p["lr"], run_name=name, summary=summary, error=error))
    usable = [x for x in trials if x.usable]
    if not usable:
        raise RuntimeError(f"no tune trial produced a checkpoint: {[x.error for x in trials]}")
    best = max(usable, key=lambda x: x.val_auc)
    tracking.log_metrics(cfg, parent, {"best_val_auc": best.val_auc, "trials_usable": len(usable)})
    out = TuneResults(
        trials=tuple(trials),
        best=BestTrial(model=best.model, lr=best.lr, val_auc=best.val_auc),
        mlflow_run_id=parent,
    )
    tracking.log_dict(cfg, parent, out.model_dump(mode="json"), TUNE_FILE)
    _log_trials_table(cfg, parent, trials)
    return out


TRIALS_TABLE_COLUMNS = (
    "trial",
    "model",
    "lr",
    "epochs_run",
    "best_epoch",
    "val_auc",
    "stopped_early",
    "stop_reason",
    "error",
)


def trials_table(trials: tuple[TrialResult, ...] | list[TrialResult]) -> list[dict[str, Any]]:
    """The sweep's results, one row per trial, best validation AUC first (failed trials last)."""
    rows = []
    for t in trials:
        s = t.summary
        rows.append(
            {
                "trial": t.run_name,
                "model": t.model,
                "lr": t.lr,
                "epochs_run": s.epochs_run if s else None,
                "best_epoch": s.best_epoch if s else None,
                "val_auc": s.val_auc if s else None,
                "stopped_early": s.stopped_early if s else None,
                "stop_reason": s.stop_reason if s else None,
                "error": t.error,
            }
        )
    return sorted(rows, key=lambda r: -(r["val_auc"] if r["val_auc"] is not None else -math.inf))


def trials_markdown(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        return (
            f"{v:.4f}" if isinstance(v, float) and not isinstance(v, bool) else str(v).replace("|", "/")[:120]
        )

    head = "| " + " | ".join(TRIALS_TABLE_COLUMNS) + " |"
    rule = "|" + "---|" * len(TRIALS_TABLE_COLUMNS)
    body = ["| " + " | ".join(cell(r[c]) for c in TRIALS_TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def _log_trials_table(cfg: Config, parent: str, trials: list[TrialResult]) -> None:
    """The sweep's results table on its parent MLflow run, as CSV and Markdown."""
    import csv
    import tempfile
    from pathlib import Path

    rows = trials_table(trials)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, md_path = Path(tmp) / "tune_results.csv", Path(tmp) / "tune_results.md"
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TRIALS_TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        md_path.write_text(trials_markdown(rows))
        tracking.log_artifacts(cfg, parent, [csv_path, md_path])


def load_tune_results(cfg: Config) -> TuneResults:
    try:
        return read_record(tune_results_uri(cfg), TuneResults, cfg.storage)
    except StorageError as exc:
        raise StorageError(
            f"no tune results for config name {cfg.name!r} (run `lensmill tune` first): {exc}"
        ) from exc
