"""The lenstronomy boundary: sample lens-system parameters, render noisy multi-band images.

A positive (label 1) is an SIE or EPL lens with external shear, one or two Sersic light components
(bulge + disc/envelope), and a Sersic source (optionally with compact star-forming clumps) placed
inside the caustic region, so that arcs or rings form. A negative (label 0) is the same kind of lens
galaxy, drawn from the same distributions, with no lensed source. Both classes draw the same
companions (unlensed line-of-sight galaxies anywhere in the cutout), the same seeing and the same noise
model. With ``hard_negatives`` a negative also holds an unlensed interloper near the lens: the source it
would have had, magnified isotropically by the magnification its arc would have had, so it carries the
arc's flux and surface brightness with source colours, and total flux does not give the label away.

Rendering: one band-independent lenstronomy ``ImageModel`` (built once) ray-shoots and evaluates the
light unconvolved, in reference-band flux units, grouped by colour (lens-coloured, source-coloured,
lensed source). Each band is then a weighted sum of those groups (colour and zero point) convolved
with that band's Gaussian PSF exactly as lenstronomy's ``MultiGaussianConvolution`` does
(``ndimage.gaussian_filter``, mode "nearest", truncation 5 sigma): the same pixels as a per-band
``ImageModel``, with one ray-shooting per image instead of one per band, and a seeing that can change
from image to image at no cost. Noise: Poisson on the astrophysical counts (Gaussian approximation)
plus the sky + read-noise background of lenstronomy's ``SingleBand``.

Images are in e-/s per pixel, sky-subtracted, float32 (C, H, W), one channel per band. Magnitudes in
the parameter dict are AB in the reference band (``REFERENCE_BAND``); fluxes in e-/s are in the first
band of ``SimConfig.bands``.

With ``task: substructure`` (DeepLense "Model II" style) every image is a lens of the kind above, and the
class is its dark-matter substructure: none (``no_sub``, label 0), a population of point-mass subhalos
around the Einstein ring (``cdm``, 1), or a vortex: a line of equal point masses through the ring
(``vortex``, 2). Every class draws both the subhalos and the vortex (after the lens, source, companions
and seeing, before the noise), and shows at most one of them, so row k of each class has the same
nuisances. The lens model holds a fixed number of ``POINT_MASS`` slots (zero mass when dark), so one
``ImageModel`` serves every class.

Everything random comes from the ``numpy.random.Generator`` passed in (lenstronomy's noise helpers use
numpy's global state, so they are not used). Every distribution costs exactly one uniform draw, and
both labels draw the same sequence, so the lens, companions, seeing and noise of row k line up between
a positive and a negative. ``row_rng`` seeds one generator per row, so a dataset does not depend on how
many workers or blocks rendered it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from lenstronomy.SimulationAPI.observation_api import SingleBand
from lenstronomy.SimulationAPI.sim_api import SimAPI
from scipy import ndimage
from scipy.stats import poisson

from lensmill.config import TASK_CLASSES, Dist, SimConfig

# Magnitudes and colours are quoted in this band.
REFERENCE_BAND = "r"

SPLIT_CODE: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# Every recorded parameter and its unit, in column order. NaN marks "does not apply" (the source of a
# negative, the interloper of a positive, the second light component of a one-component lens).
PARAM_UNITS: dict[str, str] = {
    "theta_e_arcsec": "arcsec",
    "lens_x_arcsec": "arcsec",
    "lens_y_arcsec": "arcsec",
    "lens_e1": "",
    "lens_e2": "",
    "gamma1": "",
    "gamma2": "",
    "lens_mag": "mag (AB, r)",
    "lens_r_sersic_arcsec": "arcsec",
    "lens_n_sersic": "",
    "source_mag": "mag (AB, r)",
    "source_x_arcsec": "arcsec",
    "source_y_arcsec": "arcsec",
    "source_offset_frac": "",  # of theta_E
    "source_e1": "",
    "source_e2": "",
    "source_r_sersic_arcsec": "arcsec",
    "source_n_sersic": "",
    "magnification": "",
    "arc_snr": "",
    "lens_flux_e_per_s": "e-/s",
    "source_flux_e_per_s": "e-/s",
    "lens_gamma": "",  # power-law slope, 2 = isothermal
    "lens2_flux_frac": "",  # share of the lens light in the second component
    "lens2_r_sersic_arcsec": "arcsec",
    "lens2_n_sersic": "",
    "n_source_clumps": "count",
    "source_clump_flux_frac": "",
    "n_companions": "count",
    "companion_flux_e_per_s": "e-/s",
    "interloper_mag": "mag (AB, r)",
    "interloper_offset_arcsec": "arcsec",
    "interloper_r_sersic_arcsec": "arcsec",
    "interloper_flux_e_per_s": "e-/s",
    "psf_fwhm_arcsec": "arcsec",  # first band, this image
}
PARAM_KEYS: tuple[str, ...] = tuple(PARAM_UNITS)

# The substructure task's extra columns (after ``PARAM_KEYS``). Mass fractions are of the main lens's
# mass inside theta_E; a point mass's is (theta_E_sub / theta_E)^2. Subhalo keys are 0 / NaN on rows
# without subhalos, vortex keys NaN on rows without a vortex. Each shown point mass is also in the
# ``subhalos`` list column (``SUBHALO_FIELDS``).
SUBSTRUCTURE_UNITS: dict[str, str] = {
    "n_subhalos": "count",  # shown CDM subhalos
    "subhalo_mass_fraction": "",  # their total
    "subhalo_theta_e_max_arcsec": "arcsec",  # the heaviest one's Einstein radius
    "n_vortex_masses": "count",
    "vortex_mass_fraction": "",  # all the vortex's masses together
    "vortex_length_arcsec": "arcsec",
    "vortex_angle_rad": "rad",  # orientation of the line, [0, pi), from the x axis
    "vortex_x_arcsec": "arcsec",  # centre of the line
    "vortex_y_arcsec": "arcsec",
}
SUBSTRUCTURE_KEYS: tuple[str, ...] = tuple(SUBSTRUCTURE_UNITS)
# Fields of one entry of the ``subhalos`` list column: position and Einstein radius of a point mass.
SUBHALO_FIELDS: tuple[str, ...] = ("x_arcsec", "y_arcsec", "theta_e_arcsec")
SUBHALOS_COLUMN = "subhalos"

_SOURCE_KEYS = (
    "source_mag",
    "source_x_arcsec",
    "source_y_arcsec",
    "source_offset_frac",
    "source_e1",
    "source_e2",
    "source_r_sersic_arcsec",
    "source_n_sersic",
    "magnification",
    "n_source_clumps",
    "source_clump_flux_frac",
)
# lenstronomy's Gaussian PSF: sigma = FWHM / (2 sqrt(2 ln 2)), kernel truncated at 5 sigma.
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_PSF_TRUNCATION = 5.0
# Cap on the interloper's half-light radius: a strongly magnified source would otherwise spread a
# large part of its flux beyond the cutout, unlike the arc whose flux it copies.
_MAX_INTERLOPER_R_ARCSEC = 1.5


def param_keys(sim: SimConfig) -> tuple[str, ...]:
    """The recorded parameters of a task, in column order."""
    return PARAM_KEYS + (SUBSTRUCTURE_KEYS if sim.task == "substructure" else ())


def row_rng(seed: int, split: str, row_id: int) -> np.random.Generator:
    """The generator of one row: a function of (seed, split, row_id) only."""
    if split not in SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODE)}")
    if row_id < 0:
        raise ValueError(f"row_id must be >= 0, got {row_id}")
    return np.random.default_rng([seed, SPLIT_CODE[split], row_id])


def n_positives(n_rows: int, positive_fraction: float) -> int:
    """Positives in a split of ``n_rows``: ``round(n_rows * positive_fraction)`` (halves round up)."""
    return math.floor(n_rows * positive_fraction + 0.5)


def label_for(row_id: int, positive_fraction: float) -> int:
    """Label of a row, evenly interleaved over row ids (a Bresenham line of slope ``positive_fraction``).

    ``label_for(k) = g(k + 1) - g(k)`` with ``g(k) = floor(k * frac + 0.5)``: the labels of rows
    ``0..n-1`` telescope to exactly ``n_positives(n, frac)`` positives for every ``n``, every shard
    holds the same mix (0,1,0,1,... at 0.5), and no state or worker count is involved. The pattern is
    periodic in row id, which the model never sees; training loaders shuffle anyway.
    """
    return n_positives(row_id + 1, positive_fraction) - n_positives(row_id, positive_fraction)


def row_label(sim: SimConfig, row_id: int) -> int:
    """Label of a row: ``label_for`` for the lens task; ``row_id % n_classes`` otherwise (classes
    interleaved, so every shard holds the same mix)."""
    if sim.task == "lens":
        return label_for(row_id, sim.positive_fraction)
    return row_id % len(sim.classes)


def class_counts(sim: SimConfig, n_rows: int) -> tuple[int, ...]:
    """Rows of each class among rows ``0..n_rows-1`` of a split, in label order."""
    if sim.task == "lens":
        pos = n_positives(n_rows, sim.positive_fraction)
        return (n_rows - pos, pos)
    k = len(TASK_CLASSES[sim.task])
    return tuple((n_rows - c + k - 1) // k for c in range(k))


def draw(rng: np.random.Generator, dist: Dist) -> float:
    """One sample of ``dist`` by inverse CDF: always exactly one uniform draw from ``rng``, whatever
    the kind, so changing one parameter's distribution does not shift the others' random streams."""
    # rng.random() is k / 2**53; the half step keeps q off 0, where a normal's inverse CDF is -inf.
    q = rng.random() + 2.0**-54
    if isinstance(dist, int | float):
        return float(dist)
    return dist.quantile(q)


def _polar(rng: np.random.Generator, modulus: float) -> tuple[float, float]:
    """(e1, e2) or (gamma1, gamma2) of the given modulus with an isotropic orientation."""
    phi = rng.uniform(0.0, np.pi)
    return float(modulus * np.cos(2 * phi)), float(modulus * np.sin(2 * phi))


def _power_law(q: float, lo: float, hi: float, slope: float) -> float:
    """Inverse CDF at ``q`` of dN/dm ~ m^-slope on [lo, hi]."""
    if slope == 1.0:
        return lo * (hi / lo) ** q
    a = 1.0 - slope
    return (lo**a + q * (hi**a - lo**a)) ** (1.0 / a)


def _ref_flux(mag: float) -> float:
    """Flux in reference units: the reference band at zero point 0 (bands rescale it)."""
    return 10.0 ** (-0.4 * mag)


@dataclass
class LensSystem:
    """One drawn image: recorded parameters plus the lenstronomy keyword lists that render it.

    Light amplitudes are in reference units (``_ref_flux``); ``red`` / ``blue`` index the unlensed
    light components with lens / source colours, ``source_on`` the active source components.
    ``lensed``: the source is shown (lens task: label 1; substructure task: always). ``subhalos``:
    the point masses shown (``SUBHALO_FIELDS`` each), for the ``subhalos`` column.
    """

    label: int
    params: dict[str, float]
    kwargs_lens: list[dict[str, float]]
    kwargs_light: list[dict[str, float]]
    kwargs_source: list[dict[str, float]]
    red: list[int] = field(default_factory=list)
    blue: list[int] = field(default_factory=list)
    source_on: list[int] = field(default_factory=list)
    psf_scale: float = 1.0
    lensed: bool = False
    subhalos: list[dict[str, float]] = field(default_factory=list)


class Simulator:
    """Renders the images of one ``SimConfig``'s classes; lenstronomy objects are built once."""

    def __init__(self, sim: SimConfig) -> None:
        self.sim = sim
        self.param_keys = param_keys(sim)
        # Point-mass slots shared by the subhalos and the vortex (one class shows either).
        self._mass_slots = max(sim.n_subhalos_max, sim.n_vortex_masses) if sim.task == "substructure" else 0
        n_bands = len(sim.bands)
        self.shape: tuple[int, int, int] = (n_bands, sim.image_size_px, sim.image_size_px)
        observing = [sim.observing[b] for b in sim.bands]
        singles = [
            SingleBand(
                **o.single_band_kwargs(sim.pixel_scale_arcsec),
                psf_type="GAUSSIAN",
                truncation=_PSF_TRUNCATION,
                data_count_unit="e-",
            )
            for o in observing
        ]
        # Per band: background sigma (e-/s), total exposure (e-/s -> counts), PSF FWHM, and the factors
        # that turn reference units into e-/s for lens-coloured and source-coloured light.
        self._bkg_sigma = np.array([b.background_noise for b in singles])
        self._exposure_s = np.array([b.exposure_time for b in singles])
        self._fwhm = np.array([o.psf_fwhm_arcsec for o in observing])
        zp = np.array([o.magnitude_zero_point for o in observing])
        self._red_scale = 10.0 ** (-0.4 * (np.array([sim.lens_colors_mag[b] for b in sim.bands]) - zp))
        self._blue_scale = 10.0 ** (-0.4 * (np.array([sim.source_colors_mag[b] for b in sim.bands]) - zp))

        # Unlensed light components: bulge, [disc], companions, [interloper Sersic + its clumps].
        interloper = ["SERSIC_ELLIPSE"] + ["GAUSSIAN"] * sim.source_clumps_max if sim.hard_negatives else []
        light_list = ["SERSIC_ELLIPSE"] * (sim.lens_light_components + sim.n_companions_max) + interloper
        kwargs_model = {
            # lenstronomy's numba EPL: the same deflections as "EPL" (to 1e-15) at ~4x the speed; its
            # one-off compilation (~4 s) is cached on disk.
            "lens_model_list": ["EPL_NUMBA" if sim.lens_mass_model == "EPL" else "SIE", "SHEAR"]
            + ["POINT_MASS"] * self._mass_slots,
            "lens_light_model_list": light_list,
            "source_light_model_list": ["SERSIC_ELLIPSE"] + ["GAUSSIAN"] * sim.source_clumps_max,
        }
        kwargs_band = {
            **observing[0].single_band_kwargs(sim.pixel_scale_arcsec),
            "psf_type": "NONE",  # convolution happens per band, below
            "data_count_unit": "e-",
        }
        api = SimAPI(num_pix=sim.image_size_px, kwargs_single_band=kwargs_band, kwargs_model=kwargs_model)
        # Rebuilding ImageModel (grids, numerics) per image makes rendering ~3x slower.
        self._model = api.image_model_class({"supersampling_factor": sim.supersampling})
        # Sersic normalisation with the conventions of the model's own profiles.
        self._sersic_profile = self._model.LensLightModel.func_list[0]

    # -- sampling --------------------------------------------------------------------------------
    def _sersic(
        self, flux: float, r: float, n: float, e1: float, e2: float, x: float, y: float
    ) -> dict[str, float]:
        """lenstronomy SERSIC_ELLIPSE kwargs whose total flux is ``flux`` (reference units)."""
        norm = self._sersic_profile.total_flux(amp=1.0, R_sersic=r, n_sersic=n, e1=e1, e2=e2)
        return {
            "amp": flux / norm,
            "R_sersic": r,
            "n_sersic": n,
            "e1": e1,
            "e2": e2,
            "center_x": x,
            "center_y": y,
        }

    def sample(self, rng: np.random.Generator, label: int) -> LensSystem:
        """Draw one lens system. Every label makes the same draws (the source of a negative is drawn,
        used for its interloper if any, and NaN'd in the record; the substructure of every class is
        drawn and shown for its class only), so the random streams line up."""
        p: dict[str, float] = dict.fromkeys(self.param_keys, math.nan)
        kwargs_lens, light = self._sample_lens(rng, p)
        red = list(range(len(light)))
        blue: list[int] = []
        self._sample_companions(rng, p, light, red, blue)
        kwargs_source, clumps = self._sample_source(rng, p)
        source_on = list(range(1 + int(p["n_source_clumps"])))
        s = self.sim
        if s.hard_negatives:
            offset = draw(rng, s.interloper_offset_frac) * p["theta_e_arcsec"]
            angle = float(rng.uniform(0.0, 2 * np.pi))
        psf_scale = draw(rng, s.psf_fwhm_scale)
        p["psf_fwhm_arcsec"] = float(self._fwhm[0]) * psf_scale
        lensed = s.task == "substructure" or bool(label)
        system = LensSystem(
            label, p, kwargs_lens, light, kwargs_source, red, blue, source_on, psf_scale, lensed=lensed
        )
        if s.hard_negatives:
            self._add_interloper(system, offset, angle, clumps, show=not lensed)
        if s.task == "substructure":
            self._add_substructure(rng, system)
        if not lensed:
            for key in _SOURCE_KEYS:
                p[key] = math.nan
        return system

    def _sample_lens(
        self, rng: np.random.Generator, p: dict[str, float]
    ) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        """Mass (SIE/EPL + shear) and light (one or two Sersics that follow the mass)."""
        s = self.sim
        theta_e = p["theta_e_arcsec"] = draw(rng, s.theta_e_arcsec)
        lx = p["lens_x_arcsec"] = float(rng.uniform(-s.lens_center_max_arcsec, s.lens_center_max_arcsec))
        ly = p["lens_y_arcsec"] = float(rng.uniform(-s.lens_center_max_arcsec, s.lens_center_max_arcsec))
        e1, e2 = p["lens_e1"], p["lens_e2"] = _polar(rng, draw(rng, s.lens_ellipticity))
        p["lens_gamma"] = draw(rng, s.lens_gamma)
        p["gamma1"], p["gamma2"] = _polar(rng, draw(rng, s.shear_strength))
        mass = {"theta_E": theta_e, "e1": e1, "e2": e2, "center_x": lx, "center_y": ly}
        if s.lens_mass_model == "EPL":
            mass["gamma"] = p["lens_gamma"]
        kwargs_lens = [mass, {"gamma1": p["gamma1"], "gamma2": p["gamma2"], "ra_0": lx, "dec_0": ly}]

        p["lens_mag"] = draw(rng, s.lens_mag)
        p["lens_r_sersic_arcsec"] = draw(rng, s.lens_r_sersic_arcsec)
        p["lens_n_sersic"] = draw(rng, s.lens_n_sersic)
        lens_flux = _ref_flux(p["lens_mag"])
        parts = [(1.0, p["lens_r_sersic_arcsec"], p["lens_n_sersic"])]
        if s.lens_light_components == 2:
            f2 = p["lens2_flux_frac"] = draw(rng, s.lens2_flux_frac)
            r2 = p["lens2_r_sersic_arcsec"] = draw(rng, s.lens2_r_sersic_arcsec)
            n2 = p["lens2_n_sersic"] = draw(rng, s.lens2_n_sersic)
            parts = [(1.0 - f2, parts[0][1], parts[0][2]), (f2, r2, n2)]
        light = [self._sersic(frac * lens_flux, r, n, e1, e2, lx, ly) for frac, r, n in parts]
        p["lens_flux_e_per_s"] = lens_flux * float(self._red_scale[0])
        return kwargs_lens, light

    def _sample_companions(
        self,
        rng: np.random.Generator,
        p: dict[str, float],
        light: list[dict[str, float]],
        red: list[int],
        blue: list[int],
    ) -> None:
        """0..n_companions_max unlensed galaxies anywhere in the cutout, lens- or source-coloured.
        Every slot is drawn (a fixed stream length); the first n are shown."""
        s = self.sim
        n_comp = int(rng.integers(0, s.n_companions_max + 1)) if s.n_companions_max else 0
        half = s.image_size_px * s.pixel_scale_arcsec / 2
        flux_first_band = 0.0
        for i in range(s.n_companions_max):
            cx, cy = (float(v) for v in rng.uniform(-half, half, size=2))
            flux = _ref_flux(draw(rng, s.companion_mag))
            r = draw(rng, s.companion_r_sersic_arcsec)
            n = draw(rng, s.companion_n_sersic)
            ce1, ce2 = _polar(rng, draw(rng, s.companion_ellipticity))
            is_red = bool(rng.random() < s.companion_red_fraction)
            shown = i < n_comp
            light.append(self._sersic(flux if shown else 0.0, r, n, ce1, ce2, cx, cy))
            if shown:
                (red if is_red else blue).append(len(light) - 1)
                flux_first_band += flux * float((self._red_scale if is_red else self._blue_scale)[0])
        p["n_companions"] = float(n_comp)
        p["companion_flux_e_per_s"] = flux_first_band

    def _sample_source(
        self, rng: np.random.Generator, p: dict[str, float]
    ) -> tuple[list[dict[str, float]], list[tuple[float, float, float, float]]]:
        """Sersic source + 0..source_clumps_max Gaussian clumps; returns the source components and
        the clumps as (dx, dy, sigma, flux) relative to the source centre (every slot drawn)."""
        s = self.sim
        theta_e, lx, ly = p["theta_e_arcsec"], p["lens_x_arcsec"], p["lens_y_arcsec"]
        p["source_mag"] = draw(rng, s.source_mag)
        src_flux = _ref_flux(p["source_mag"])
        # Uniform over the disc of radius frac_max * theta_E around the lens centre: inside the
        # multiple-imaging region (radial caustic ~ theta_E), so the source forms arcs or rings.
        frac = p["source_offset_frac"] = s.source_offset_max_frac * math.sqrt(rng.random())
        phi = rng.uniform(0.0, 2 * np.pi)
        sx = p["source_x_arcsec"] = lx + frac * theta_e * math.cos(phi)
        sy = p["source_y_arcsec"] = ly + frac * theta_e * math.sin(phi)
        se1, se2 = p["source_e1"], p["source_e2"] = _polar(rng, draw(rng, s.source_ellipticity))
        sr = p["source_r_sersic_arcsec"] = draw(rng, s.source_r_sersic_arcsec)
        sn = p["source_n_sersic"] = draw(rng, s.source_n_sersic)

        n_clumps = int(rng.integers(0, s.source_clumps_max + 1)) if s.source_clumps_max else 0
        clump_frac = draw(rng, s.source_clump_flux_frac) if s.source_clumps_max else 0.0
        slots = []
        for _ in range(s.source_clumps_max):
            dx, dy = (float(v) for v in rng.standard_normal(2) * s.source_clump_spread * sr)
            slots.append((dx, dy, draw(rng, s.source_clump_sigma_arcsec), float(rng.random()) + 1e-3))
        clump_frac = clump_frac if n_clumps else 0.0
        weights = sum(w for *_, w in slots[:n_clumps])
        clumps = [
            (dx, dy, sigma, clump_frac * src_flux * w / weights if i < n_clumps else 0.0)
            for i, (dx, dy, sigma, w) in enumerate(slots)
        ]
        p["n_source_clumps"] = float(n_clumps)
        p["source_clump_flux_frac"] = clump_frac
        source = [self._sersic((1.0 - clump_frac) * src_flux, sr, sn, se1, se2, sx, sy)]
        source += [
            {"amp": f, "sigma": sigma, "center_x": sx + dx, "center_y": sy + dy}
            for dx, dy, sigma, f in clumps
        ]
        return source, clumps

    def _add_interloper(
        self,
        system: LensSystem,
        offset: float,
        angle: float,
        clumps: list[tuple[float, float, float, float]],
        show: bool,
    ) -> None:
        """The hard negative's interloper: the drawn source, unlensed, scaled up isotropically by the
        magnification its arc would have had (flux x mu, sizes x sqrt(mu): surface brightness is
        conserved, as in lensing), ``offset`` arcsec from the lens centre. A positive gets the same
        components dark (``show=False``), so both labels have the same component list."""
        p = system.params
        src_flux = _ref_flux(p["source_mag"])
        mu = 1.0
        if show:
            arc = self._model.source_surface_brightness(
                system.kwargs_source, system.kwargs_lens, unconvolved=True, k=system.source_on
            )
            mu = max(float(arc.sum()) / src_flux, 1e-3)
        sr = p["source_r_sersic_arcsec"]
        scale = min(math.sqrt(mu), _MAX_INTERLOPER_R_ARCSEC / sr)
        ix = p["lens_x_arcsec"] + offset * math.cos(angle)
        iy = p["lens_y_arcsec"] + offset * math.sin(angle)
        src = system.kwargs_source[0]
        flux = (1.0 - p["source_clump_flux_frac"]) * src_flux * mu if show else 0.0
        light = system.kwargs_light
        first = len(light)
        light.append(self._sersic(flux, sr * scale, src["n_sersic"], src["e1"], src["e2"], ix, iy))
        for dx, dy, sigma, f in clumps:
            amp = f * mu if show else 0.0
            light.append(
                {"amp": amp, "sigma": sigma * scale, "center_x": ix + dx * scale, "center_y": iy + dy * scale}
            )
        if not show:
            return
        # The Sersic and the clumps the source shows, in source colours.
        system.blue += [first] + [first + 1 + i for i in range(int(p["n_source_clumps"]))]
        p["interloper_mag"] = p["source_mag"] - 2.5 * math.log10(mu)
        p["interloper_offset_arcsec"] = offset
        p["interloper_r_sersic_arcsec"] = sr * scale
        p["interloper_flux_e_per_s"] = src_flux * mu * float(self._blue_scale[0])

    def _add_substructure(self, rng: np.random.Generator, system: LensSystem) -> None:
        """Subhalos and a vortex as ``POINT_MASS`` lens components, both drawn for every class (a fixed
        stream length: 1 + 3 n_subhalos_max + 5 uniforms); the class shows the subhalos (cdm), the
        vortex (vortex) or neither (no_sub). Dark slots get theta_E = 0: no deflection at all."""
        s, p = self.sim, system.params
        theta_e, lx, ly = p["theta_e_arcsec"], p["lens_x_arcsec"], p["lens_y_arcsec"]
        n_sub = min(int(poisson.ppf(rng.random() + 2.0**-54, s.n_subhalos_mean)), s.n_subhalos_max)
        r2_min, r2_max = s.subhalo_radius_min_frac**2, s.subhalo_radius_max_frac**2
        m_min, m_max, slope = s.subhalo_mass_min_frac, s.subhalo_mass_max_frac, s.subhalo_mass_slope
        subhalos = []  # (x, y, mass fraction) of every slot
        for _ in range(s.n_subhalos_max):
            # Uniform in area over the annulus around the lens centre.
            r = theta_e * math.sqrt(r2_min + rng.random() * (r2_max - r2_min))
            phi = 2 * math.pi * rng.random()
            m = _power_law(rng.random(), m_min, m_max, slope)
            subhalos.append((lx + r * math.cos(phi), ly + r * math.sin(phi), m))

        offset = draw(rng, s.vortex_offset_frac) * theta_e
        direction = 2 * math.pi * rng.random()
        angle = math.pi * rng.random()
        length = draw(rng, s.vortex_length_arcsec)
        vortex_mass = draw(rng, s.vortex_mass_fraction)
        vx, vy = lx + offset * math.cos(direction), ly + offset * math.sin(direction)
        n_v = s.n_vortex_masses
        # Evenly spaced along the segment, ends included: (n_v,) offsets from the centre in arcsec.
        t = (np.arange(n_v) / (n_v - 1) - 0.5) * length
        vortex = [(vx + ti * math.cos(angle), vy + ti * math.sin(angle), vortex_mass / n_v) for ti in t]

        cls = s.classes[system.label]
        shown = subhalos[:n_sub] if cls == "cdm" else vortex if cls == "vortex" else []
        slots = [{"theta_E": theta_e * math.sqrt(m), "center_x": x, "center_y": y} for x, y, m in shown]
        dark = self._mass_slots - len(shown)
        slots += [{"theta_E": 0.0, "center_x": lx, "center_y": ly} for _ in range(dark)]
        system.kwargs_lens += slots
        system.subhalos = [
            dict(zip(SUBHALO_FIELDS, (kw["center_x"], kw["center_y"], kw["theta_E"]), strict=True))
            for kw in slots[: len(shown)]
        ]
        cdm = subhalos[:n_sub] if cls == "cdm" else []
        p["n_subhalos"] = float(len(cdm))
        p["subhalo_mass_fraction"] = float(sum(m for *_, m in cdm))
        if cdm:
            p["subhalo_theta_e_max_arcsec"] = theta_e * math.sqrt(max(m for *_, m in cdm))
        if cls == "vortex":
            p["n_vortex_masses"] = float(n_v)
            p["vortex_mass_fraction"] = vortex_mass
            p["vortex_length_arcsec"] = length
            p["vortex_angle_rad"] = angle
            p["vortex_x_arcsec"], p["vortex_y_arcsec"] = vx, vy

    def sample_params(self, rng: np.random.Generator, label: int) -> dict[str, float]:
        """The recorded parameters of one draw (NaN where a key does not apply; fluxes and S/N, which
        need the rendered image, are filled in by ``render``)."""
        return self.sample(rng, label).params

    # -- rendering -------------------------------------------------------------------------------
    def render_components(self, system: LensSystem) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free (unlensed light, lensed source) images, each float64 (C, H, W) in e-/s per pixel.

        Unlensed light is the lens galaxy, the companions and any interloper; the source image is all
        zeros for a negative (an image that is not ``lensed``).
        """
        m = self._model
        red = m.lens_surface_brightness(system.kwargs_light, unconvolved=True, k=system.red)
        blue = (
            m.lens_surface_brightness(system.kwargs_light, unconvolved=True, k=system.blue)
            if system.blue
            else None
        )
        arc = (
            m.source_surface_brightness(
                system.kwargs_source, system.kwargs_lens, unconvolved=True, k=system.source_on
            )
            if system.lensed
            else None
        )
        sigma_px = self._fwhm * system.psf_scale * _FWHM_TO_SIGMA / self.sim.pixel_scale_arcsec
        lens = np.empty(self.shape)
        source = np.zeros(self.shape)
        for c in range(self.shape[0]):
            unlensed = red * self._red_scale[c]
            if blue is not None:
                unlensed = unlensed + blue * self._blue_scale[c]
            lens[c] = self._convolve(unlensed, sigma_px[c])
            if arc is not None:
                source[c] = self._convolve(arc * self._blue_scale[c], sigma_px[c])
        return lens, source

    @staticmethod
    def _convolve(image: np.ndarray, sigma_px: float) -> np.ndarray:
        """lenstronomy's Gaussian PSF convolution at pixel scale (``MultiGaussianConvolution``)."""
        return ndimage.gaussian_filter(image, sigma_px, mode="nearest", truncate=_PSF_TRUNCATION)

    def variance(self, model: np.ndarray) -> np.ndarray:
        """Expected per-pixel variance of a noisy image of ``model``, in (e-/s)^2: Poisson variance
        of the model's counts plus the background (sky counts + read noise) of ``SingleBand``."""
        t = self._exposure_s[:, None, None]
        return self._bkg_sigma[:, None, None] ** 2 + np.clip(model, 0.0, None) / t

    def add_noise(
        self, rng: np.random.Generator, model: np.ndarray, variance: np.ndarray | None = None
    ) -> np.ndarray:
        """Model + one Gaussian draw with the Poisson + sky + read-noise variance, sky subtracted.

        The Poisson part is the Gaussian approximation lenstronomy itself uses (``flux_noise``): it is
        accurate here, where every pixel holds many sky counts, and one normal draw costs a fifth of
        ``rng.poisson`` on top of it.
        """
        var = self.variance(model) if variance is None else variance
        return model + rng.standard_normal(model.shape) * np.sqrt(var)

    def render(
        self, rng: np.random.Generator, label: int, *, noise: bool = True
    ) -> tuple[np.ndarray, dict[str, float]]:
        """One image, float32 (C, H, W), and the dict of its parameters (keys: ``self.param_keys``).

        ``noise=False`` returns the noise-free model (for previews and tests); the parameters and
        their random draws are the same either way.
        """
        image, system = self.render_system(rng, label, noise=noise)
        return image, {k: float(system.params[k]) for k in self.param_keys}

    def render_system(
        self, rng: np.random.Generator, label: int, *, noise: bool = True
    ) -> tuple[np.ndarray, LensSystem]:
        """``render``, returning the drawn system itself (parameters measured on the image filled in,
        and its ``subhalos``)."""
        system = self.sample(rng, label)
        lens, source = self.render_components(system)
        model = lens + source
        var = self.variance(model)
        p = system.params
        if system.lensed:
            arc_flux = float(source[0].sum())
            p["source_flux_e_per_s"] = arc_flux
            p["magnification"] = arc_flux / (_ref_flux(p["source_mag"]) * float(self._blue_scale[0]))
            p["arc_snr"] = float(np.sqrt(np.sum(source**2 / var)))
        else:
            p["source_flux_e_per_s"] = 0.0
            p["arc_snr"] = 0.0
        image = self.add_noise(rng, model, var) if noise else model
        return image.astype(np.float32), system
