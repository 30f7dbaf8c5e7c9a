"""The one home of lensmill's settings and their defaults.

A run is described by one frozen pydantic tree, loaded from YAML (or the embedded defaults) with
``key=value`` overrides such as ``train.lr=3e-4`` or ``tune.models=[resnet18,timm:resnet10t]``.
Unknown keys, wrong types and impossible ranges fail with an error that names the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names what was wrong."""


def _absolute_local(uri: str) -> str:
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Frozen):
    """A closed interval sampled uniformly."""

    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class StorageConfig(_Frozen):
    """Where everything lives: a local folder or ``s3://bucket/prefix``."""

    root: str = Field("./lensmill-data", validate_default=True)
    # S3-compatible endpoint (MinIO, moto, ...); None means AWS itself.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"

    @field_validator("root")
    @classmethod
    def _absolute(cls, root: str) -> str:
        # Ray workers and Tune trials run in other folders: pin local paths where the config was loaded.
        return _absolute_local(root)


class SimConfig(_Frozen):
    """lenstronomy simulation: SIE + shear lens, Sersic lens light, lensed Sersic source."""

    n_train: int = Field(3000, ge=2)
    n_val: int = Field(600, ge=2)
    n_test: int = Field(600, ge=2)
    positive_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    seed: int = 0
    rows_per_shard: int = Field(500, ge=1)
    bands: tuple[str, ...] = ("r",)

    image_size_px: int = Field(64, ge=16, le=512)
    pixel_scale_arcsec: float = Field(0.2, gt=0)
    psf_fwhm_arcsec: float = Field(0.7, gt=0)
    exposure_time_s: float = Field(900.0, gt=0)
    sky_brightness_mag_arcsec2: float = 21.2
    magnitude_zero_point: float = 28.0
    read_noise_e: float = Field(10.0, ge=0)
    ccd_gain: float = Field(2.3, gt=0)
    supersampling: int = Field(1, ge=1, le=8)

    theta_e_arcsec: Range = Range(min=0.8, max=2.0)
    lens_e_max: float = Field(0.3, ge=0, lt=1)
    shear_max: float = Field(0.08, ge=0, lt=0.5)
    lens_mag: Range = Range(min=18.5, max=20.5)
    lens_r_sersic_arcsec: Range = Range(min=0.5, max=1.5)
    lens_n_sersic: Range = Range(min=2.5, max=4.5)
    source_mag: Range = Range(min=22.0, max=24.5)
    source_r_sersic_arcsec: Range = Range(min=0.1, max=0.4)
    source_n_sersic: Range = Range(min=0.8, max=2.0)
    source_e_max: float = Field(0.4, ge=0, lt=1)
    # Source offset from the lens centre, as a fraction of theta_E (inside the caustic -> arcs).
    source_offset_max_frac: float = Field(0.6, ge=0)
    # Lens centre jitter around the image centre (uniform in a square of this half-width).
    lens_center_max_arcsec: float = Field(0.1, ge=0)
    # Colours: magnitude in a band minus the r-band magnitude that lens_mag / source_mag give.
    # Lens: a red early-type galaxy at z~0.5; source: a blue star-forming galaxy at z~1-2.
    lens_colors_mag: dict[str, float] = {"u": 2.8, "g": 1.4, "r": 0.0, "i": -0.5, "z": -0.8, "y": -1.0}
    source_colors_mag: dict[str, float] = {"u": 0.5, "g": 0.2, "r": 0.0, "i": -0.1, "z": -0.2, "y": -0.3}

    @model_validator(mode="after")
    def _bands_known(self) -> SimConfig:
        if not self.bands:
            raise ValueError("bands must name at least one band")
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"bands must be distinct, got {list(self.bands)}")
        for band in self.bands:
            for name in ("lens_colors_mag", "source_colors_mag"):
                if band not in getattr(self, name):
                    raise ValueError(f"band {band!r} has no entry in {name}")
        return self


class TrainConfig(_Frozen):
    """One Ray Train run of one architecture."""

    model: str = "resnet18"
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    num_workers: int = Field(1, ge=1)
    # CPUs Ray reserves per worker; torch uses that many threads (Ray pins OMP_NUM_THREADS to it).
    cpus_per_worker: float = Field(2.0, gt=0)
    # None = use GPUs when the cluster has them.
    use_gpu: bool | None = None
    # torch intra-op threads per worker; 0 = one per reserved CPU.
    torch_threads: int = Field(0, ge=0)
    augment: bool = True
    max_failures: int = Field(1, ge=-1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    # Fault drill: raise in the workers at this epoch (first attempt only) to exercise resume.
    fail_at_epoch: int | None = Field(None, ge=0)
    # Stop when validation AUC has not improved for this many epochs; None = train all epochs.
    early_stopping_patience: int | None = Field(None, ge=1)
    # Backbone weights from a local path or storage URI (no hub downloads); None = random init.
    pretrained_uri: str | None = None


class TuneConfig(_Frozen):
    """Ray Tune search over architecture x learning rate; each trial is a Ray Train run."""

    models: tuple[str, ...] = ("resnet18", "timm:resnet10t")
    lrs: tuple[float, ...] = (1e-3,)
    max_concurrent_trials: int = Field(1, ge=1)
    # ASHA stops weak trials early; grace period in epochs.
    grace_period_epochs: int = Field(2, ge=1)
    metric: Literal["val_auc", "val_loss"] = "val_auc"


class EnsembleConfig(_Frozen):
    """Member selection and weight search on validation data."""

    max_members: int = Field(3, ge=1)
    # Weights are searched on a simplex grid with this step.
    weight_step: float = Field(0.05, gt=0, le=0.5)
    threshold: float = Field(0.5, gt=0, lt=1)


class EvaluateConfig(_Frozen):
    """Test-split evaluation: uncertainty and calibration settings."""

    bootstrap_samples: int = Field(1000, ge=0)
    calibration_bins: int = Field(15, ge=2)
    # Completeness is reported in this many bins of Einstein radius and of arc S/N.
    completeness_bins: int = Field(6, ge=1)
    seed: int = 0


class TrackingConfig(_Frozen):
    """MLflow: a server URI, or None for a sqlite store under the storage root."""

    tracking_uri: str | None = None
    experiment: str = "lensmill"
    registered_model: str = "lens-ensemble"
    alias: str = "champion"


class ServeConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(0.5, gt=0)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_images_per_request: int = Field(256, ge=1)


class RayConfig(_Frozen):
    # None = start a local Ray in-process; "auto" or "ray://..." = join a cluster.
    address: str | None = None
    # Logical CPUs for a local Ray: more than the cores, so that a Tune trial, its Train workers and
    # the Ray Data readers can all be scheduled on a 2-core machine.
    num_cpus: int | None = 4


class Config(_Frozen):
    name: str = "demo"
    # A factory: the storage root is resolved against the working folder when the config is made.
    storage: StorageConfig = Field(default_factory=StorageConfig)
    sim: SimConfig = SimConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()
    # Set to reuse an existing dataset instead of the one this config's sim section describes.
    dataset_uri: str | None = None

    @field_validator("dataset_uri")
    @classmethod
    def _absolute(cls, uri: str | None) -> str | None:
        return None if uri is None else _absolute_local(uri)

    def hash(self) -> str:
        """A short stable hash of the whole config (for MLflow tags and run names)."""
        return stable_hash(self.model_dump(mode="json"))


def stable_hash(obj: Any, length: int = 12) -> str:
    """sha256 of the canonical JSON of ``obj``, shortened."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    # YAML parses numbers, booleans, null and [lists] the way a user types them.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" else ""))
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config from YAML (or the embedded defaults when ``path`` is None) plus overrides."""
    tree: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = loaded
    for item in overrides:
        keys, value = _parse_override(item)
        _set_path(tree, keys, value)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
