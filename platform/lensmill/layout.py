"""Where everything lives under ``storage.root``: the one home of every path lensmill writes.

    {root}/datasets/{dataset_id}/manifest.json              the dataset's manifest (written last)
    {root}/datasets/{dataset_id}/{split}/part-00000.parquet  its shards
    {root}/runs/{run_name}/                                one training run (Ray Train's folder)
        run_info.json  attempts.json  lensmill_result.json  (the run's summary, once finished)
        epoch-0003/model.pt state.pt metrics.json          a checkpoint
    {root}/runs/{name}-tune/tune_results.json              the tune stage's trials
    {root}/runs/{name}-tune/trials-{hash8}/{run_name}.json  a sweep's proposed trials (resume)
    {root}/runs/{name}-tune-{hash8}/                       Ray Tune's own experiment folder
    {root}/runs/{name}-ensemble/ensemble_result.json       the ensemble stage's result
    {root}/runs/{name}-evaluate/                           metrics.json, plots, detailed_predictions.csv
    {root}/runs/{name}-predictions/{dataset_id}/{split}/   batch-scoring output (Parquet)
    {root}/mlflow.db  {root}/mlartifacts/                  the local MLflow store (local roots only)

``{name}`` is ``cfg.name``; a run name is :func:`run_name_for`. Functions return absolute URIs (local
paths are resolved, because Ray workers and Tune trials run in other folders). ``cfg.dataset_uri``,
when set, replaces the dataset's location (``shards.dataset_uri_for``).
"""

from __future__ import annotations

from lensmill.config import Config
from lensmill.storage import absolute_uri, join_uri

# Inside a dataset folder.
MANIFEST_FILE = "manifest.json"
# Inside a run folder.
RUN_INFO_FILE = "run_info.json"
ATTEMPTS_FILE = "attempts.json"
SUMMARY_FILE = "lensmill_result.json"
# Inside a checkpoint folder: the member's weights, the optimizer/scheduler state, the epoch's metrics.
MEMBER_FILE = "model.pt"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_PREFIX = "epoch-"
# Stage result files.
TUNE_FILE = "tune_results.json"
ENSEMBLE_FILE = "ensemble_result.json"


# -- datasets -------------------------------------------------------------------------------------


def dataset_uri(root: str, dataset_id: str) -> str:
    """``{root}/datasets/{dataset_id}``."""
    return join_uri(absolute_uri(root), "datasets", dataset_id)


def manifest_uri(dataset_uri: str) -> str:
    return join_uri(absolute_uri(dataset_uri), MANIFEST_FILE)


def shard_path(split: str, index: int) -> str:
    """A shard's path relative to its dataset folder (as the manifest lists it)."""
    return f"{split}/part-{index:05d}.parquet"


def shard_uri(dataset_uri: str, path: str) -> str:
    """The URI of a file the manifest lists (``path`` relative to the dataset folder)."""
    return join_uri(absolute_uri(dataset_uri), path)


# -- training runs --------------------------------------------------------------------------------


def runs_uri(cfg: Config) -> str:
    """``{root}/runs``: Ray Train's and Ray Tune's ``storage_path``."""
    return join_uri(absolute_uri(cfg.storage.root), "runs")


def run_name_for(cfg: Config) -> str:
    """One training run's name: config name, architecture, learning rate and the config's hash."""
    model = cfg.train.model.replace("timm:", "timm-").replace("/", "-")
    return f"{cfg.name}-{model}-lr{cfg.train.lr:g}-{cfg.hash()[:8]}"


def run_uri_for(cfg: Config, run_name: str) -> str:
    return join_uri(runs_uri(cfg), run_name)


def checkpoint_dir_name(epoch: int) -> str:
    """The folder Ray Train gives an epoch's checkpoint inside the run folder."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


# -- stage results --------------------------------------------------------------------------------


def stage_run_name(cfg: Config, stage: str) -> str:
    """The MLflow run name and result folder of a stage that runs once per config (tune, ensemble,
    evaluate, predictions): ``{cfg.name}-{stage}``."""
    return f"{cfg.name}-{stage}"


def stage_uri(cfg: Config, stage: str) -> str:
    return join_uri(runs_uri(cfg), stage_run_name(cfg, stage))


def tune_experiment_name(cfg: Config) -> str:
    """Ray Tune's experiment folder under :func:`runs_uri` (one per config)."""
    return f"{stage_run_name(cfg, 'tune')}-{cfg.hash()[:8]}"


def sweep_trials_uri(cfg: Config) -> str:
    """The trials a sweep's search algorithm proposed (one record each), per config."""
    return join_uri(stage_uri(cfg, "tune"), f"trials-{cfg.hash()[:8]}")


def tune_results_uri(cfg: Config) -> str:
    return join_uri(stage_uri(cfg, "tune"), TUNE_FILE)


def ensemble_result_uri(cfg: Config) -> str:
    return join_uri(stage_uri(cfg, "ensemble"), ENSEMBLE_FILE)


def evaluation_uri(cfg: Config) -> str:
    """The evaluation stage's files (metrics.json, plots, detailed_predictions.csv)."""
    return stage_uri(cfg, "evaluate")


def predictions_uri(cfg: Config, dataset_id: str, split: str) -> str:
    """Default output of batch scoring for one split of one dataset."""
    return join_uri(stage_uri(cfg, "predictions"), dataset_id, split)


# -- the local MLflow store -------------------------------------------------------------------------


def mlflow_db_path(cfg: Config) -> str:
    """The sqlite file of the local MLflow store (only for a local storage root)."""
    return join_uri(absolute_uri(cfg.storage.root), "mlflow.db")


def mlflow_artifacts_path(cfg: Config) -> str:
    return join_uri(absolute_uri(cfg.storage.root), "mlartifacts")
