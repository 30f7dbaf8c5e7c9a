"""Ray Tune: a grid over architecture x learning rate, or a sweep sampled by Optuna's TPE from a
search space over train settings; each trial a Ray Train run (``fit``), stopped early by ASHA.

A trial is a small driver function that builds a ``TorchTrainer`` whose reports reach Tune through
``TuneReportCallback``. Finished trials are the ensemble's candidates.

A trial's summary is written the moment Tune ends it (``_SummaryCallback``), not after the sweep:
ASHA stops every trial at its last epoch too, often before the trial's own ``fit`` has written its
summary, and a sweep whose driver dies must find those trials finished when it is resubmitted. A
sweep also records each trial as Tune starts it (``SweepTrial``): resubmitted, it tells the search
algorithm the finished trials' results, runs the unfinished ones again (they resume from their
checkpoints) and samples only the trials still missing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from pydantic import BaseModel

from lensmill import tracking
from lensmill.config import Choice, Config, LogUniform, TuneConfig
from lensmill.errors import ConfigError, ModelError
from lensmill.layout import (
    TUNE_FILE,
    run_name_for,
    runs_uri,
    stage_run_name,
    sweep_trials_uri,
    tune_experiment_name,
    tune_results_uri,
)
from lensmill.models import check_model_name
from lensmill.records import (
    BestTrial,
    RunSummary,
    SweepTrial,
    TrialResult,
    TuneResults,
    read_record,
    write_record,
)
from lensmill.shards import dataset_uri_for, read_manifest
from lensmill.storage import StorageError, is_s3, join_uri, list_files, locate
from lensmill.train import fit, read_run_info, read_summary, summarize_run

log = logging.getLogger(__name__)

# A trial's own process only drives the Train controller and workers: a sliver of a CPU.
TRIAL_DRIVER_CPUS = 0.1


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with one trial's train settings (``{"model": ..., "lr": ..., ...}``)."""
    tree = base.model_dump(mode="json")
    tree["train"].update(params)
    return Config.model_validate(tree)


def trial_run_name(cfg: Config, params: dict[str, Any]) -> str:
    return run_name_for(trial_config(cfg, params))


def _trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's train settings from its Tune config (the grid nests them under ``trial``)."""
    return dict(config["trial"]) if "trial" in config else dict(config)


def _trial(config: dict[str, Any], base: dict[str, Any], parent_run_id: str) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(Config.model_validate(base), _trial_params(config))
    fit(cfg, callbacks=[TuneReportCallback()], parent_run_id=parent_run_id)


# -- the search space ---------------------------------------------------------------------------


def sweep_base(cfg: Config) -> Config:
    """The config every trial of a sweep starts from: the space's fixed settings in ``train``."""
    fixed = {k: v for k, v in cfg.tune.space().items() if not isinstance(v, BaseModel)}
    return trial_config(cfg, fixed)


def tune_domain(dist: Any) -> Any:
    """Ray Tune's domain for one of our distributions."""
    from ray import tune

    if isinstance(dist, Choice):
        return tune.choice(list(dist.values))
    if isinstance(dist, LogUniform):
        return tune.loguniform(dist.min, dist.max)
    return tune.uniform(dist.min, dist.max)


def search_domains(t: TuneConfig) -> dict[str, Any]:
    """The sampled settings of a sweep as Ray Tune domains (flat: ``{"lr": ..., "model": ...}``)."""
    return {k: tune_domain(v) for k, v in t.space().items() if isinstance(v, BaseModel)}


def check_architectures(t: TuneConfig) -> None:
    """``ConfigError`` naming the field when an architecture is not a registered model."""
    sampled = t.search_space is not None and "model" in t.search_space
    field = "tune.search_space.model" if sampled else "tune.models"
    for name in t.architectures:
        try:
            check_model_name(name)
        except ModelError as exc:
            raise ConfigError(f"{field}: {exc}") from None


def trial_concurrency(cfg: Config, cluster: dict[str, float]) -> int:
    """How many trials run at once: as many as ``cluster`` (Ray's resources) holds whole worker
    groups plus the trials' own CPU, at most ``tune.max_concurrent_trials`` and the trial count."""
    tr = cfg.train
    need = {"CPU": tr.num_workers * tr.cpus_per_worker + TRIAL_DRIVER_CPUS}
    if tr.use_gpu:
        need["GPU"] = float(tr.num_workers)
    for name, amount in tr.resources_per_worker.items():
        need[name] = need.get(name, 0.0) + tr.num_workers * amount
    fits = min(int(cluster.get(name, 0.0) // amount) for name, amount in need.items() if amount > 0)
    cap = cfg.tune.max_concurrent_trials or cfg.tune.trial_count
    return max(1, min(fits, cap, cfg.tune.trial_count))


def recorded_trials(cfg: Config) -> list[SweepTrial]:
    """The trials this sweep (same config) proposed before, in the order they were recorded."""
    base = sweep_trials_uri(cfg)
    try:
        uris = [u for u in list_files(base, cfg.storage) if u.endswith(".json")]
    except StorageError:
        return []
    records = [read_record(u, SweepTrial, cfg.storage) for u in uris]
    return sorted(records, key=lambda r: r.run_name)


def _objective(cfg: Config, summary: RunSummary) -> float:
    """A finished trial's value of ``tune.metric``, as the search algorithm is told it."""
    if cfg.tune.metric == "val_auc":
        return summary.val_auc
    return min((h["val_loss"] for h in summary.history if h.get("val_loss") is not None), default=math.nan)


def summarize_stopped_trial(cfg: Config, run_name: str) -> RunSummary:
    """Summary of a trial Tune ended (its process may be gone), from its checkpoints; ends its MLflow
    run. ``RuntimeError`` / ``StorageError`` when it never checkpointed."""
    with tracking.ending(cfg, read_run_info(cfg, run_name).mlflow_run_id):
        return summarize_run(cfg, run_name, stopped_early=True)


def _summary_callback(cfg: Config, sweep: bool = False) -> Any:
    """A Tune callback (driver side) that records each sweep trial as it starts and writes each
    ended trial's summary at once. ``cfg``: the config trials start from."""
    from ray.tune import Callback

    class _SummaryCallback(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if sweep:
                params = _trial_params(trial.config)
                record = SweepTrial(run_name=trial_run_name(cfg, params), params=params)
                write_record(join_uri(sweep_trials_uri(cfg), f"{record.run_name}.json"), record, cfg.storage)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name = trial_run_name(cfg, _trial_params(trial.config))
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
    check_architectures(cfg.tune)
    # Fails here, naming the URI, when the dataset is missing, rather than inside every trial.
    manifest = read_manifest(dataset_uri_for(cfg), cfg.storage)
    with tracking.run(cfg, stage_run_name(cfg, "tune"), "tune", manifest.dataset_id) as parent:
        out = _search(cfg, parent)
    write_record(tune_results_uri(cfg), out, cfg.storage)
    return out


def _tuner(
    cfg: Config, base: Config, parent: str, sweep: bool, param_space: dict | None = None, **tune_config: Any
) -> Any:
    """A Tuner over ``_trial`` with ASHA; ``tune_config``: the grid's or the sweep's own options."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t = cfg.tune
    runs = locate(runs_uri(cfg), cfg.storage)
    scheduler = ASHAScheduler(
        metric=t.metric,
        mode="max" if t.metric == "val_auc" else "min",
        max_t=base.train.epochs,
        grace_period=min(t.grace_period_epochs, base.train.epochs),
        reduction_factor=t.reduction_factor,
    )
    trainable = tune.with_parameters(_trial, base=base.model_dump(mode="json"), parent_run_id=parent)
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPUS}),
        param_space=param_space,
        tune_config=tune.TuneConfig(scheduler=scheduler, **tune_config),
        run_config=tune.RunConfig(
            name=tune_experiment_name(cfg),
            storage_path=runs.path,
            storage_filesystem=runs.filesystem if is_s3(runs.uri) else None,
            callbacks=[_summary_callback(base, sweep)],
        ),
    )


def _errors(results: Any) -> dict[str, str]:
    """The errors of the trials that failed, keyed by their train settings (``_key``)."""
    return {_key(_trial_params(r.config)): str(r.error) for r in results if r.error}


def _key(params: dict[str, Any]) -> str:
    return repr(sorted(params.items()))


def _run_grid(cfg: Config, parent: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The grid's trials (those finished before are not run again): their settings, and errors."""
    from ray import tune

    t = cfg.tune
    grid = [{"model": m, "lr": lr} for m in t.models for lr in t.lrs]
    # Runs finished before (same config) are not trained again: the search resumes where it stopped.
    todo = [p for p in grid if read_summary(cfg, trial_run_name(cfg, p)) is None]
    if not todo:
        return grid, {}
    tuner = _tuner(
        cfg,
        cfg,
        parent,
        sweep=False,
        param_space={"trial": tune.grid_search(todo)},
        max_concurrent_trials=t.max_concurrent_trials,
    )
    return grid, _errors(tuner.fit())


def cover_architectures(
    t: TuneConfig, finished: list[tuple[dict[str, Any], float]], pending: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """First points for the architectures of a sampled ``model`` no trial has tried yet, when
    ``num_samples`` has room for all of them: TPE starts with random points, and six random draws
    over three architectures miss one a third of the time."""
    dist = t.space().get("model")
    if not isinstance(dist, Choice) or len(dist.values) > t.num_samples:
        return []
    tried = {p.get("model") for p, _ in finished} | {p.get("model") for p in pending}
    others = {k: d for k, d in search_domains(t).items() if k != "model"}
    points = []
    for i, m in enumerate(v for v in dist.values if v not in tried):
        # Ray wants whole points: the other settings drawn at random (seeded), as TPE's start-up would.
        rng = np.random.default_rng([t.seed, i])
        points.append({"model": m} | {k: _plain(d.sample(random_state=rng)) for k, d in others.items()})
    return points


def _plain(value: Any) -> Any:
    """A numpy scalar from a domain's sample as a Python value (records and configs are JSON)."""
    return value.item() if isinstance(value, np.generic) else value


def make_searcher(
    t: TuneConfig, finished: list[tuple[dict[str, Any], float]], pending: list[dict[str, Any]]
) -> Any:
    """Optuna's TPE over the sweep's space, told the ``(settings, value)`` of trials finished before
    (NaN: failed), proposing the ``pending`` settings first, then each architecture not tried yet."""
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        space=OptunaSearch.convert_search_space(search_domains(t)),
        metric=t.metric,
        mode="max" if t.metric == "val_auc" else "min",
        # A resubmitted sweep draws other random start-up points than the one it continues.
        seed=t.seed + len(finished) + len(pending),
        points_to_evaluate=[dict(p) for p in pending] + cover_architectures(t, finished, pending) or None,
    )
    for params, value in finished:
        searcher.add_evaluated_point(dict(params), value, error=math.isnan(value))
    return searcher


def _run_sweep(cfg: Config, parent: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The sweep's trials: Optuna's TPE proposes ``num_samples`` settings, told first of the trials
    this config finished before; proposed trials left unfinished are run again first."""
    import ray
    from ray.tune.search import ConcurrencyLimiter

    t, base = cfg.tune, sweep_base(cfg)
    recorded = recorded_trials(base)
    summaries = {r.run_name: read_summary(base, r.run_name) for r in recorded}
    finished = [(r.params, _objective(cfg, s)) for r in recorded if (s := summaries[r.run_name]) is not None]
    left = max(t.num_samples - len(finished), 0)
    pending = [r.params for r in recorded if summaries[r.run_name] is None][:left]
    errors: dict[str, str] = {}
    if left > 0:
        at_once = trial_concurrency(base, ray.cluster_resources())
        log.info(
            "sweep: %d trials finished before, %d to resume, %d to sample; %d at once",
            len(finished), len(pending), left - len(pending), at_once,
        )  # fmt: skip
        tuner = _tuner(
            cfg,
            base,
            parent,
            sweep=True,
            search_alg=ConcurrencyLimiter(make_searcher(t, finished, pending), max_concurrent=at_once),
            num_samples=left,
            max_concurrent_trials=at_once,
        )
        errors = _errors(tuner.fit())
    return [dict(r.params) for r in recorded_trials(base)], errors


def _search(cfg: Config, parent: str) -> TuneResults:
    """The trials (those finished before are not run again), then every trial's result."""
    sweep = cfg.tune.search_space is not None
    settings, errors = (_run_sweep if sweep else _run_grid)(cfg, parent)
    base = sweep_base(cfg) if sweep else cfg
    trials = [_trial_result(trial_config(base, p), p, errors.get(_key(p))) for p in settings]
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
    _log_trials_table(cfg, parent, trials, sorted({k for p in settings for k in p} - {"model", "lr"}))
    return out


def _trial_result(cfg: Config, params: dict[str, Any], error: str | None) -> TrialResult:
    """One trial's result from its summary; a trial Tune stopped before it wrote one is summarised
    now from its checkpoints (``error`` when it has none)."""
    name = run_name_for(cfg)
    summary = read_summary(cfg, name)
    if summary is None:
        try:  # stopped, and the callback could not summarise it then
            summary = summarize_stopped_trial(cfg, name)
        except (StorageError, RuntimeError) as exc:  # failed before its first checkpoint
            error = error or str(exc)
    if summary is not None and tracking.mark_finished(cfg, summary.mlflow_run_id):
        # Tune stopped the trial's process after its summary was written (it ends its run FAILED).
        log.info("trial %s: MLflow run %s marked FINISHED", name, summary.mlflow_run_id)
    return TrialResult(
        model=cfg.train.model,
        lr=cfg.train.lr,
        run_name=name,
        params=params,
        summary=summary,
        error=None if summary is not None else error,
    )


# The results table: these columns, with a sweep's other sampled settings after ``lr``.
TRIALS_TABLE_COLUMNS = (
    "trial",
    "model",
    "lr",
    "epochs_run",
    "best_epoch",
    "val_auc",
    "val_tpr10",
    "stopped_early",
    "stop_reason",
    "error",
)


def table_columns(params: list[str]) -> tuple[str, ...]:
    """The results table's columns for a sweep that also samples ``params``."""
    i = TRIALS_TABLE_COLUMNS.index("lr") + 1
    return (*TRIALS_TABLE_COLUMNS[:i], *params, *TRIALS_TABLE_COLUMNS[i:])


def trials_table(
    trials: tuple[TrialResult, ...] | list[TrialResult], params: list[str] = ()
) -> list[dict[str, Any]]:
    """The sweep's results, one row per trial, best validation AUC first (failed trials last)."""
    rows = []
    for t in trials:
        s = t.summary
        rows.append(
            {
                "trial": t.run_name,
                "model": t.model,
                "lr": t.lr,
                **{k: t.params.get(k) for k in params},
                "epochs_run": s.epochs_run if s else None,
                "best_epoch": s.best_epoch if s else None,
                "val_auc": s.val_auc if s else None,
                "val_tpr10": s.at_best_epoch("val_tpr10") if s else None,
                "stopped_early": s.stopped_early if s else None,
                "stop_reason": s.stop_reason if s else None,
                "error": t.error,
            }
        )
    return sorted(rows, key=lambda r: -(r["val_auc"] if r["val_auc"] is not None else -math.inf))


def trials_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] = TRIALS_TABLE_COLUMNS) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e-2 and v else f"{v:.4f}"
        return str(v).replace("|", "/")[:120]

    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def _log_trials_table(cfg: Config, parent: str, trials: list[TrialResult], params: list[str]) -> None:
    """The sweep's results table on its parent MLflow run, as CSV and Markdown, and the sweep as a
    parallel-coordinates plot (architecture, learning rate, the sampled settings -> val AUC)."""
    import csv
    import tempfile
    from pathlib import Path

    from lensmill.plots import plot_parallel_coordinates

    rows, columns = trials_table(trials, params), table_columns(params)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, md_path = Path(tmp) / "tune_results.csv", Path(tmp) / "tune_results.md"
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        md_path.write_text(trials_markdown(rows, columns))
        png = plot_parallel_coordinates(
            rows, ["model", "lr", *params], "val_auc", Path(tmp) / "tune_parallel_coordinates.png"
        )
        tracking.log_artifacts(cfg, parent, [csv_path, md_path, png])


def load_tune_results(cfg: Config) -> TuneResults:
    try:
        return read_record(tune_results_uri(cfg), TuneResults, cfg.storage)
    except StorageError as exc:
        raise StorageError(
            f"no tune results for config name {cfg.name!r} (run `lensmill tune` first): {exc}"
        ) from exc
