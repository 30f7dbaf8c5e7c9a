"""The typed records that stages hand each other through storage, each a frozen pydantic model.

Each record has one writer and one reader:

- ``DatasetManifest`` (``manifest.json``): ``shards.write_manifest`` (used by the simulator and the
  importer) / ``shards.read_manifest``.
- ``RunInfo`` (``run_info.json``): ``train.fit`` / ``train.summarize_run``.
- ``RunSummary`` (``lensmill_result.json``): ``train.summarize_run`` / ``train.read_summary``.
- ``TuneResults`` of ``TrialResult`` (``tune_results.json``): ``tune.tune_architectures`` /
  ``tune.load_tune_results``.
- ``SweepTrial`` (``{name}-tune/trials-{key}/{run_name}.json``, one per sampled trial): the sweep's
  callback as Tune starts the trial / ``tune.recorded_trials`` when a sweep resumes.
- ``EnsembleManifest`` (``ensemble.json``): ``EnsemblePredictor.save`` / ``EnsemblePredictor.load``.

``write_record`` / ``read_record`` are the only JSON I/O for them: a file that does not parse or does
not match its model raises ``RecordError`` naming the URI and the field. NaN (a validation AUC on a
single-class split) is written as the JSON constant ``NaN``, which Python's json and pydantic read.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from lensmill.config import TASK_CLASSES, StorageConfig
from lensmill.errors import RecordError
from lensmill.storage import read_bytes, write_bytes

SHARD_FORMAT_VERSION = 1
ENSEMBLE_FORMAT_VERSION = 1

PositiveInt = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]


class _Record(BaseModel):
    # Our own records: a key we do not know is a bug or a version mismatch, not something to keep.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class _OpenRecord(_Record):
    # Records other tools write too (a manifest) or that carry free metadata (ensemble.json): keep
    # unknown keys, so a round trip loses nothing.
    model_config = ConfigDict(frozen=True, extra="allow", ser_json_inf_nan="constants")


R = TypeVar("R", bound=BaseModel)


def _describe(exc: ValidationError) -> str:
    """Each problem as ``field.path: message (got value)``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float | bool | None) else ""
        parts.append(f"{loc}: {err['msg']}{shown}" if err["type"] != "missing" else f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_record(model: type[R], data: bytes | str, where: str) -> R:
    """``data`` (JSON) as a ``model``; ``RecordError`` naming ``where`` and the bad field."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise RecordError(f"{where} is not valid JSON: {exc.errors()[0]['msg']}") from None
        raise RecordError(f"{where}: {_describe(exc)}") from None


def write_record(uri: str, record: BaseModel, storage: StorageConfig) -> None:
    """Write a record atomically as indented JSON (``storage.write_bytes``)."""
    write_bytes(uri, record.model_dump_json(indent=2).encode(), storage)


def read_record(uri: str, model: type[R], storage: StorageConfig) -> R:
    """Read a record; ``StorageError`` when the file is missing, ``RecordError`` when it is not one."""
    return parse_record(model, read_bytes(uri, storage), uri)


# -- datasets -----------------------------------------------------------------------------------


class SplitCounts(_Record):
    """Rows and classes of one split. Counts are read as written: whether they agree with each other
    and with the files is ``lensmill validate``'s to report, not a reason to refuse the manifest.

    ``positives``: rows whose label is not 0; ``negatives``: label 0. ``class_counts``: rows of each
    class in label order (None in manifests written before classes: [negatives, positives]).
    """

    rows: Count
    positives: Count
    negatives: Count | None = None
    class_counts: tuple[Count, ...] | None = None

    @model_validator(mode="after")
    def _negatives(self) -> SplitCounts:
        if self.negatives is None:  # optional for other tools: the rest of the rows
            object.__setattr__(self, "negatives", self.rows - self.positives)
        return self

    @model_serializer(mode="wrap")
    def _without_unknown_class_counts(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Counts without class counts (imports) serialise as before there were any.
        data = handler(self)
        if data.get("class_counts") is None:
            data.pop("class_counts", None)
        return data


class ShardFile(_OpenRecord):
    """One Parquet file of a dataset: ``path`` relative to the dataset folder."""

    path: str
    split: str
    rows: Count | None = None
    positives: Count | None = None
    class_counts: tuple[Count, ...] | None = None
    bytes: Count | None = None
    sha256: str | None = None


class ImportInputs(_Record):
    """What ``lensmill import`` read: file count, a checksum over the files' checksums, file kinds."""

    count: Count
    sha256: str
    kinds: tuple[str, ...]


class DatasetManifest(_OpenRecord):
    """``manifest.json``, written last: a dataset without one is incomplete and never read.

    Readers need ``dataset_id``, ``image_shape``, ``splits`` and ``files``; the rest describes the
    dataset for people and for ``lensmill validate``.
    """

    format_version: int = SHARD_FORMAT_VERSION
    dataset_id: str
    source: Literal["simulate", "import"] | str = "simulate"
    created_at: str | None = None
    image_shape: tuple[PositiveInt, PositiveInt, PositiveInt]
    image_dtype: Literal["float32"] = "float32"
    image_unit: str | None = None
    bands: tuple[str, ...] | None = None
    pixel_scale_arcsec: float | None = None
    columns: tuple[str, ...] | None = None
    # Class names in label order; None: the binary ("non-lens", "lens") of manifests before classes.
    classes: tuple[str, ...] | None = None
    splits: dict[str, SplitCounts]
    files: tuple[ShardFile, ...]
    config: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    inputs: ImportInputs | None = None

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.splits.values())

    @property
    def class_names(self) -> tuple[str, ...]:
        """``classes``, or the binary lens task's when the manifest does not say."""
        return self.classes or TASK_CLASSES["lens"]

    def split_files(self, split: str) -> list[ShardFile]:
        """The files of one split, in manifest order."""
        return [f for f in self.files if f.split == split]


# -- training runs ------------------------------------------------------------------------------


class RunInfo(_Record):
    """What a training run was started with (``run_info.json``, written before training)."""

    run_name: str
    model: str
    lr: float
    dataset_uri: str
    dataset_id: str
    mlflow_run_id: str
    image_shape: tuple[PositiveInt, PositiveInt, PositiveInt]
    in_chans: PositiveInt
    pretrained_uri: str | None = None
    cache_in_memory: bool
    objective: Literal["classify", "reconstruct", "multitask"] = "classify"


class RunSummary(RunInfo):
    """A run's result (``lensmill_result.json``), rebuilt from its checkpoints alone."""

    val_auc: float  # of the best checkpoint; NaN when validation held one class
    best_epoch: Count
    epochs_run: Count
    stopped_early: bool
    stop_reason: Literal["early_stopping", "scheduler"] | None = None
    attempts: Count
    checkpoint_uri: str  # the best checkpoint's folder
    member_file: str  # the weights inside it
    history: tuple[dict[str, Any], ...]  # one entry per epoch (train.train_fn_per_worker's metrics)
    # A reconstruct / multitask run's encoder, registered in MLflow (models:/<name>/<version>).
    encoder_uri: str | None = None

    def at_best_epoch(self, key: str) -> float:
        """A metric of the best epoch (NaN when the history does not hold it)."""
        row = next((h for h in self.history if h.get("epoch") == self.best_epoch), {})
        value = row.get(key)
        return math.nan if value is None else float(value)


# -- tuning -------------------------------------------------------------------------------------


class SweepTrial(_Record):
    """A trial a sweep's search algorithm proposed: its run name and the train settings it samples."""

    run_name: str
    params: dict[str, str | bool | int | float]


class TrialResult(_Record):
    """One trial of the search; ``summary`` is None for a trial that failed before its first
    checkpoint (then ``error`` says why). ``params``: the train settings the trial set (the grid's
    model and lr, or a sweep's sampled ones)."""

    model: str
    lr: float
    run_name: str
    params: dict[str, str | bool | int | float] = Field(default_factory=dict)
    summary: RunSummary | None = None
    error: str | None = None

    @property
    def usable(self) -> bool:
        """Has a checkpoint: an ensemble candidate."""
        return self.summary is not None

    @property
    def val_auc(self) -> float:
        return self.summary.val_auc if self.summary is not None else math.nan


class BestTrial(_Record):
    model: str
    lr: float
    val_auc: float


class TuneResults(_Record):
    """``tune_results.json``: every trial of the search, the best one and the parent MLflow run."""

    trials: tuple[TrialResult, ...]
    best: BestTrial
    mlflow_run_id: str


# -- ensembles ----------------------------------------------------------------------------------


def _finite_number(value: Any, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return value


class EnsembleMemberEntry(_OpenRecord):
    """One member of ``ensemble.json``; other keys (``model``, ``val_auc``, …) are kept as metadata."""

    name: str
    weight: Annotated[float, Field(ge=0)]
    file: str

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_is_a_number(cls, v: Any) -> Any:
        return _finite_number(v, "weight")

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EnsembleManifest(_OpenRecord):
    """``ensemble.json``: the contract between the ensemble stage, MLflow and serving.

    ``temperature`` is 1.0 when absent (artifacts written before calibration). Other top-level keys
    (``dataset_id``, ``config_hash``, …) are kept and become ``EnsemblePredictor.info``.
    """

    format_version: Literal[ENSEMBLE_FORMAT_VERSION]
    image_shape: tuple[PositiveInt, PositiveInt, PositiveInt]
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    temperature: Annotated[float, Field(gt=0)] = 1.0
    # Dihedral test-time augmentation: each member scores the 8 rotations/flips of an image, averaged.
    tta: bool = False
    # The class names in label order; None (files written before classes): lens finding's two.
    classes: tuple[str, ...] | None = None
    members: Annotated[tuple[EnsembleMemberEntry, ...], Field(min_length=1)]

    @field_validator("temperature", "threshold", mode="before")
    @classmethod
    def _numbers(cls, v: Any, info: Any) -> Any:
        return _finite_number(v, info.field_name)

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.model_extra or {})
