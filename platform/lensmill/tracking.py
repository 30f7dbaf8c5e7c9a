"""The only MLflow caller: runs, metrics, artifacts, and the model registry.

Every call takes the run's ``Config``; the tracking URI is ``cfg.tracking.tracking_uri`` (a server)
or, when unset, a sqlite store beside the data under a local ``storage.root``. Functions address runs
by id through ``MlflowClient`` rather than MLflow's global "active run", so they work the same in a
driver, a Tune trial or a Ray Train worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from lensmill import __version__
from lensmill.config import Config
from lensmill.errors import TrackingError
from lensmill.layout import dataset_uri, mlflow_artifacts_path, mlflow_db_path
from lensmill.storage import is_s3

if TYPE_CHECKING:
    from lensmill.predict import EnsemblePredictor
    from lensmill.records import EnsembleManifest

PIP_REQUIREMENTS = ["lensmill", "torch", "torchvision", "timm", "numpy"]


def tracking_uri_for(cfg: Config) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if is_s3(cfg.storage.root):
        raise TrackingError(
            "tracking.tracking_uri must be set when storage.root is on S3 "
            "(a sqlite store cannot live in a bucket); point it at your MLflow server"
        )
    db = Path(mlflow_db_path(cfg))
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


@cache
def _client_for(uri: str):  # -> mlflow.MlflowClient (import kept lazy: mlflow is slow to import)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client(cfg: Config):  # -> mlflow.MlflowClient
    """One client per tracking URI and process (MlflowClient builds its stores on creation)."""
    return _client_for(tracking_uri_for(cfg))


GIT_SHA_ENV = "LENSMILL_GIT_SHA"


@cache
def git_sha() -> str:
    """The commit this code runs from: $LENSMILL_GIT_SHA when set (a Ray job's working_dir has no
    .git: the submitter passes it in the runtime env), else ``git rev-parse HEAD``, else "unknown"."""
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(cfg: Config) -> str:
    """Get or create the experiment; a local store keeps its artifacts under the storage root."""
    c = client(cfg)
    try:
        exp = c.get_experiment_by_name(cfg.tracking.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if not cfg.tracking.tracking_uri:
            location = Path(mlflow_artifacts_path(cfg)).as_uri()
        return c.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except Exception as exc:  # MlflowException, connection errors: one clear message
        if "already exists" in str(exc):  # another process created it meanwhile
            return c.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        raise TrackingError(f"cannot reach MLflow at {tracking_uri_for(cfg)}: {exc}") from exc


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


@contextmanager
def run(
    cfg: Config,
    run_name: str,
    stage: str,
    dataset_id: str | None = None,
    params: dict[str, Any] | None = None,
) -> Iterator[str]:
    """``with tracking.run(cfg, name, stage) as run_id:`` — the one way a stage opens an MLflow run.

    The run carries the full config, its hash, the dataset id and the git sha; it ends FINISHED when
    the block completes and FAILED when it raises (KILLED on Ctrl-C), never left RUNNING.
    """
    from mlflow.entities import Param

    c = client(cfg)
    tags = {
        "mlflow.runName": run_name,
        "lensmill.stage": stage,
        "lensmill.version": __version__,
        "config_hash": cfg.hash(),
        "git_sha": git_sha(),
        "mlflow.source.git.commit": git_sha(),
        # The UI's Source column: which lensmill command ran, as a job.
        "mlflow.source.name": f"lensmill {stage}",
        "mlflow.source.type": "JOB",
    }
    if dataset_id:
        tags["dataset_id"] = dataset_id
    run_id = c.create_run(experiment_id(cfg), run_name=run_name, tags=tags).info.run_id
    with ending(cfg, run_id):
        if dataset_id:
            log_dataset(cfg, run_id, dataset_id, stage)
        flat = _flatten(cfg.model_dump(mode="json"))
        flat.update({k: str(v) for k, v in (params or {}).items()})
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            c.log_batch(run_id, params=items[i : i + 100])
        log_dict(cfg, run_id, cfg.model_dump(mode="json"), "config.yaml")
        yield run_id


def log_dataset(cfg: Config, run_id: str, dataset_id: str, context: str) -> None:
    """The run's dataset, shown in the MLflow UI's Dataset column: named and digested by the
    manifest's dataset id (a content address), sourced at its URI."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = cfg.dataset_uri or dataset_uri(cfg.storage.root, dataset_id)
    dataset = Dataset(
        name=f"lensmill-{dataset_id}",
        digest=dataset_id[:36],
        source_type="lensmill",
        source=json.dumps({"uri": source, "dataset_id": dataset_id}),
    )
    client(cfg).log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


@contextmanager
def ending(cfg: Config, run_id: str) -> Iterator[str]:
    """End an existing run when the block leaves: FINISHED, FAILED on an exception (re-raised), KILLED
    on Ctrl-C. For runs whose process went away mid-block (a trial Tune stopped) and that a later
    step completes."""
    try:
        yield run_id
    except KeyboardInterrupt:
        client(cfg).set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client(cfg).set_terminated(run_id, "FAILED")
        raise
    client(cfg).set_terminated(run_id, "FINISHED")


def mark_finished(cfg: Config, run_id: str) -> bool:
    """End a run FINISHED when it is not (a trial whose summary is written, but whose process was
    stopped after that and ended its run FAILED or KILLED, or left it RUNNING); whether it changed."""
    c = client(cfg)
    if c.get_run(run_id).info.status == "FINISHED":
        return False
    c.set_terminated(run_id, "FINISHED")
    return True


def log_metrics(cfg: Config, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step or 0)
        for k, v in metrics.items()
        if isinstance(v, int | float | np.floating | np.integer) and np.isfinite(v)
    ]
    if items:
        client(cfg).log_batch(run_id, metrics=items)


def log_dict(cfg: Config, run_id: str, obj: Any, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / artifact_file
        text = yaml.safe_dump(obj, sort_keys=False) if artifact_file.endswith((".yaml", ".yml")) else None
        path.write_text(text if text is not None else json.dumps(obj, indent=2, default=float))
        client(cfg).log_artifact(run_id, str(path))


def log_artifacts(cfg: Config, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    c = client(cfg)
    for p in paths:
        c.log_artifact(run_id, str(p), artifact_path)


def _pyfunc_model():  # defined lazily so that importing lensmill does not import mlflow
    import mlflow.pyfunc

    class LensEnsembleModel(mlflow.pyfunc.PythonModel):
        """``mlflow.pyfunc.load_model(uri).predict(images)`` for images (N, C, H, W): p(lens) (N,) for
        lens finding, the (N, classes) calibrated probabilities for more classes."""

        def load_context(self, context) -> None:
            from lensmill.predict import EnsemblePredictor

            self.predictor = EnsemblePredictor.load(Path(context.artifacts["ensemble"]))

        def predict(self, context, model_input, params=None):
            out = self.predictor.predict(np.asarray(model_input, dtype=np.float32))
            return out["p_lens"] if self.predictor.binary else out["probs"]

    return LensEnsembleModel()


def register_ensemble(
    cfg: Config,
    run_id: str,
    ensemble_dir: Path,
    alias: str | None = None,
    description: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log the ensemble directory as a pyfunc model in ``run_id``, register it with ``description``
    and ``tags`` (what a reviewer reads in the registry), point ``alias`` (default
    ``tracking.alias``, the champion) at it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri_for(cfg))
    mlflow.set_registry_uri(tracking_uri_for(cfg))
    name = cfg.tracking.registered_model
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="ensemble",
            python_model=_pyfunc_model(),
            artifacts={"ensemble": str(ensemble_dir)},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    alias = alias or cfg.tracking.alias
    c = client(cfg)
    if description:
        c.update_model_version(name, version, description=description)
    for key, value in (tags or {}).items():
        c.set_model_version_tag(name, version, key, value)
    c.set_registered_model_alias(name, alias, version)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "model_uri": f"models:/{name}@{alias}",
        "version_uri": f"models:/{name}/{version}",
    }


# The file of a registered encoder: a ``models.save_classifier`` file (normalisation and weights of
# an encoder backbone, decoder and head included), read by ``models.load_pretrained``.
ENCODER_FILE = "encoder.pt"


def _pyfunc_encoder():  # lazily, as _pyfunc_model
    import mlflow.pyfunc

    class EncoderModel(mlflow.pyfunc.PythonModel):
        """``mlflow.pyfunc.load_model(uri).predict(images)`` -> the encoder's features (N, F) of
        raw images (N, C, H, W), normalised as in training."""

        def load_context(self, context) -> None:
            from lensmill.models import load_classifier

            self.model = load_classifier(Path(context.artifacts["encoder"]) / ENCODER_FILE)[0]

        def predict(self, context, model_input, params=None):
            import torch

            with torch.inference_mode():
                x = torch.from_numpy(np.asarray(model_input, dtype=np.float32))
                return self.model.features(x).numpy()

    return EncoderModel()


def register_encoder(
    cfg: Config, run_id: str, member_file: Path, description: str, tags: dict[str, str]
) -> dict[str, Any]:
    """Log a trained encoder (a ``conv_ae`` / ``conv_encoder`` member file) as a pyfunc model in
    ``run_id`` and register it as ``tracking.encoder_model``; ``train.pretrained_uri`` takes the
    returned ``version_uri`` (``models:/<name>/<version>``)."""
    import shutil
    import tempfile

    import mlflow

    mlflow.set_tracking_uri(tracking_uri_for(cfg))
    mlflow.set_registry_uri(tracking_uri_for(cfg))
    name = cfg.tracking.encoder_model
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        shutil.copyfile(member_file, Path(tmp) / ENCODER_FILE)
        info = mlflow.pyfunc.log_model(
            name="encoder",
            python_model=_pyfunc_encoder(),
            artifacts={"encoder": tmp},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    c = client(cfg)
    c.update_model_version(name, version, description=description)
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    return {"name": name, "version": version, "version_uri": f"models:/{name}/{version}"}


def download_encoder(cfg: Config, uri: str, dst_dir: Path) -> Path:
    """The local file of a registered encoder, ``uri`` ``models:/<name>/<version>`` or
    ``models:/<name>@<alias>``."""
    name, ref = parse_model_uri(uri)
    got = download_version(cfg, name, ref, dst_dir, marker=ENCODER_FILE)
    return Path(got["path"]) / ENCODER_FILE


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/<name>/<version>`` -> (name, version); ``models:/<name>@<alias>`` -> (name,
    "@alias"); ``TrackingError`` when no version or alias is named."""
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        ref = "@" + alias
    else:
        name, _, ref = rest.rpartition("/")
    if not name or ref in ("", "@"):
        raise TrackingError(f"{uri!r} names no version (models:/<name>/<version> or models:/<name>@<alias>)")
    return name, ref


TEST_LINE_PREFIX = "Test ("


def describe_test_figures(cfg: Config, name: str, version: str, line: str) -> None:
    """Put the evaluation's test figures in a registered version's description (replacing those of
    an earlier evaluation), so the registry page shows validation and test figures together."""
    c = client(cfg)
    kept = [ln for ln in (c.get_model_version(name, version).description or "").split("\n")]
    kept = [ln for ln in kept if not ln.startswith(TEST_LINE_PREFIX)]
    while kept and not kept[-1].strip():
        kept.pop()
    c.update_model_version(name, version, description="\n".join([*kept, "", line]))


def alias_version(cfg: Config) -> str:
    """The version ``models:/<name>@<alias>`` names now."""
    mv = client(cfg).get_model_version_by_alias(cfg.tracking.registered_model, cfg.tracking.alias)
    return str(mv.version)


def download_champion(cfg: Config, dst_dir: Path) -> dict[str, Any]:
    """Fetch the ensemble behind ``models:/<name>@<alias>``; returns its local path, name and version."""
    return download_version(cfg, cfg.tracking.registered_model, f"@{cfg.tracking.alias}", dst_dir)


def download_version(
    cfg: Config, name: str, ref: str, dst_dir: Path, marker: str | None = None
) -> dict[str, Any]:
    """Fetch a registered ensemble (or, with ``marker`` ``ENCODER_FILE``, an encoder), ``ref`` a
    version number or ``@alias``: the local folder holding ``marker``, name, version and the run
    that logged it."""
    import mlflow

    from lensmill.predict import MANIFEST

    marker = marker or MANIFEST
    try:
        c = client(cfg)
        mv = (
            c.get_model_version_by_alias(name, ref[1:])
            if ref.startswith("@")
            else c.get_model_version(name, ref)
        )
    except Exception as exc:
        what = f"{name}{ref}" if ref.startswith("@") else f"{name}/{ref}"
        raise TrackingError(
            f"no model {what} in the registry at {tracking_uri_for(cfg)} "
            f"(run `lensmill ensemble` first): {exc}"
        ) from exc
    # models:/ URIs resolve through the process-global registry URI: set it for this process.
    mlflow.set_tracking_uri(tracking_uri_for(cfg))
    mlflow.set_registry_uri(tracking_uri_for(cfg))
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst_dir), tracking_uri=tracking_uri_for(cfg)
    )
    found = sorted(Path(local).rglob(marker))
    if not found:
        raise TrackingError(f"model {name}/{mv.version} holds no {marker}")
    return {"path": found[0].parent, "name": name, "version": str(mv.version), "run_id": mv.run_id}


@dataclass(frozen=True)
class LoadedEnsemble:
    """An ensemble ready to score, and where it came from. Its weights are loaded on first use of
    ``predictor``: a driver that only hands the files on reads just ``manifest``."""

    name: str
    version: str  # the registry version, or "local" for a folder
    source: str  # "mlflow" or "local"
    path: Path  # the ensemble's folder (ensemble.json and the member files)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    @cached_property
    def manifest(self) -> EnsembleManifest:
        from lensmill.predict import read_ensemble_manifest

        return read_ensemble_manifest(self.path)

    @cached_property
    def predictor(self) -> EnsemblePredictor:
        from lensmill.predict import EnsemblePredictor

        return EnsemblePredictor.load(self.path)


def load_ensemble(cfg: Config, download_dir: Path, model_dir: str | Path | None = None) -> LoadedEnsemble:
    """The one way a stage gets the ensemble it scores with: the local ensemble folder ``model_dir``
    when given, else ``models:/<name>@<alias>`` downloaded into ``download_dir`` (which the caller
    keeps while it scores). The manifest is checked here; the weights load on first use."""
    if model_dir is not None:
        local = LoadedEnsemble(cfg.tracking.registered_model, "local", "local", Path(model_dir))
        info = local.manifest.info
        name = str(info.get("name") or cfg.tracking.registered_model)
        return LoadedEnsemble(name, str(info.get("version") or "local"), "local", Path(model_dir))
    champ = download_champion(cfg, download_dir)
    loaded = LoadedEnsemble(champ["name"], champ["version"], "mlflow", Path(champ["path"]))
    loaded.manifest  # noqa: B018 - a damaged artifact fails here, naming the file
    return loaded
