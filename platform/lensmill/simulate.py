"""The lenstronomy boundary: sample lens-system parameters, render noisy images.

A positive (label 1) is an SIE + external-shear lens with an elliptical Sersic lens light and an
elliptical Sersic source placed inside the caustic region, so that arcs or rings form. A negative
(label 0) is the same kind of lens galaxy, sampled from the same distributions, with no lensed source.
Both get the same Gaussian PSF and the same noise model: Poisson noise on the astrophysical counts
(Gaussian approximation) plus the background (sky + read noise) that lenstronomy's ``SingleBand`` derives.

Images are in lenstronomy's data units, electrons per second per pixel, sky-subtracted, float32 with
shape (C, H, W), one channel per band. Magnitudes in the parameter dict are in the reference band
(``REFERENCE_BAND``); the other bands follow from ``SimConfig.lens_colors_mag`` / ``source_colors_mag``.

Everything random comes from the ``numpy.random.Generator`` passed in: lenstronomy's own noise helpers
draw from numpy's global state, so they are not used. ``row_rng`` seeds one generator per row, so a
dataset does not depend on how many workers or blocks rendered it.
"""

from __future__ import annotations

import math

import numpy as np
from lenstronomy.SimulationAPI.sim_api import SimAPI

from lensmill.config import SimConfig

# Magnitudes and colours are quoted in this band.
REFERENCE_BAND = "r"

SPLIT_CODE: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# Every key of the parameter dict, in column order. NaN marks "does not apply" (source of a negative).
PARAM_KEYS: tuple[str, ...] = (
    "theta_e_arcsec",
    "lens_x_arcsec",
    "lens_y_arcsec",
    "lens_e1",
    "lens_e2",
    "gamma1",
    "gamma2",
    "lens_mag",
    "lens_r_sersic_arcsec",
    "lens_n_sersic",
    "source_mag",
    "source_x_arcsec",
    "source_y_arcsec",
    "source_offset_frac",
    "source_e1",
    "source_e2",
    "source_r_sersic_arcsec",
    "source_n_sersic",
    "magnification",
    "arc_snr",
    "lens_flux_e_per_s",
    "source_flux_e_per_s",
)

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
)


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


def _ellipticity(rng: np.random.Generator, e_max: float) -> tuple[float, float]:
    """(e1, e2) with modulus uniform in [0, e_max] and an isotropic orientation."""
    e = rng.uniform(0.0, e_max)
    phi = rng.uniform(0.0, np.pi)
    return float(e * np.cos(2 * phi)), float(e * np.sin(2 * phi))


class Simulator:
    """Renders lens / non-lens images for one ``SimConfig``; lenstronomy objects are built once."""

    def __init__(self, sim: SimConfig) -> None:
        self.sim = sim
        self.shape: tuple[int, int, int] = (len(sim.bands), sim.image_size_px, sim.image_size_px)
        kwargs_model = {
            "lens_model_list": ["SIE", "SHEAR"],
            "lens_light_model_list": ["SERSIC_ELLIPSE"],
            "source_light_model_list": ["SERSIC_ELLIPSE"],
        }
        kwargs_numerics = {"supersampling_factor": sim.supersampling}
        self._apis: list[SimAPI] = []
        self._models = []
        for _band in sim.bands:
            kwargs_band = {
                "pixel_scale": sim.pixel_scale_arcsec,
                "exposure_time": sim.exposure_time_s,
                "magnitude_zero_point": sim.magnitude_zero_point,
                "read_noise": sim.read_noise_e,
                "ccd_gain": sim.ccd_gain,
                "sky_brightness": sim.sky_brightness_mag_arcsec2,
                "seeing": sim.psf_fwhm_arcsec,
                "psf_type": "GAUSSIAN",
                "data_count_unit": "e-",
            }
            api = SimAPI(num_pix=sim.image_size_px, kwargs_single_band=kwargs_band, kwargs_model=kwargs_model)
            self._apis.append(api)
            # Rebuilding ImageModel (grids, PSF kernel, numerics) per image makes rendering ~3x slower.
            self._models.append(api.image_model_class(kwargs_numerics))
        # Per band: background sigma (e-/s) and the exposure that turns e-/s into Poisson counts.
        self._bkg_sigma = np.array([api.background_noise for api in self._apis])
        self._exposure_s = np.array([api.exposure_time for api in self._apis])
        self._lens_color = np.array([sim.lens_colors_mag[b] for b in sim.bands])
        self._source_color = np.array([sim.source_colors_mag[b] for b in sim.bands])

    # -- sampling --------------------------------------------------------------------------------
    def sample_params(self, rng: np.random.Generator, label: int) -> dict[str, float]:
        """Draw every physical parameter. The source is drawn for negatives too (then NaN'd), so the
        random stream, and hence the lens and noise draws, line up between labels."""
        s = self.sim
        p: dict[str, float] = {}
        p["theta_e_arcsec"] = rng.uniform(s.theta_e_arcsec.min, s.theta_e_arcsec.max)
        p["lens_x_arcsec"] = rng.uniform(-s.lens_center_max_arcsec, s.lens_center_max_arcsec)
        p["lens_y_arcsec"] = rng.uniform(-s.lens_center_max_arcsec, s.lens_center_max_arcsec)
        p["lens_e1"], p["lens_e2"] = _ellipticity(rng, s.lens_e_max)
        p["gamma1"], p["gamma2"] = _ellipticity(rng, s.shear_max)
        p["lens_mag"] = rng.uniform(s.lens_mag.min, s.lens_mag.max)
        p["lens_r_sersic_arcsec"] = rng.uniform(s.lens_r_sersic_arcsec.min, s.lens_r_sersic_arcsec.max)
        p["lens_n_sersic"] = rng.uniform(s.lens_n_sersic.min, s.lens_n_sersic.max)

        p["source_mag"] = rng.uniform(s.source_mag.min, s.source_mag.max)
        # Uniform over the disc of radius frac_max * theta_E around the lens centre: inside the SIE's
        # multiple-imaging region (radial caustic ~ theta_E), so the source forms arcs or rings.
        frac = s.source_offset_max_frac * math.sqrt(rng.uniform())
        phi = rng.uniform(0.0, 2 * np.pi)
        p["source_offset_frac"] = frac
        p["source_x_arcsec"] = p["lens_x_arcsec"] + frac * p["theta_e_arcsec"] * math.cos(phi)
        p["source_y_arcsec"] = p["lens_y_arcsec"] + frac * p["theta_e_arcsec"] * math.sin(phi)
        p["source_e1"], p["source_e2"] = _ellipticity(rng, s.source_e_max)
        p["source_r_sersic_arcsec"] = rng.uniform(s.source_r_sersic_arcsec.min, s.source_r_sersic_arcsec.max)
        p["source_n_sersic"] = rng.uniform(s.source_n_sersic.min, s.source_n_sersic.max)
        p["magnification"] = math.nan
        if not label:
            for key in _SOURCE_KEYS:
                p[key] = math.nan
        return {k: float(v) for k, v in p.items()}

    # -- rendering -------------------------------------------------------------------------------
    def render_components(self, params: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free (lens light, lensed source) images, each float64 (C, H, W) in e-/s per pixel.

        The source image is all zeros when ``params['source_mag']`` is NaN (a negative).
        """
        p = params
        kwargs_lens = [
            {
                "theta_E": p["theta_e_arcsec"],
                "e1": p["lens_e1"],
                "e2": p["lens_e2"],
                "center_x": p["lens_x_arcsec"],
                "center_y": p["lens_y_arcsec"],
            },
            {
                "gamma1": p["gamma1"],
                "gamma2": p["gamma2"],
                "ra_0": p["lens_x_arcsec"],
                "dec_0": p["lens_y_arcsec"],
            },
        ]
        has_source = not math.isnan(p["source_mag"])
        lens = np.zeros(self.shape)
        source = np.zeros(self.shape)
        for c, (api, model) in enumerate(zip(self._apis, self._models, strict=True)):
            # Light follows mass: the lens light shares the SIE's centre and ellipticity.
            lens_light_mag = [
                {
                    "magnitude": p["lens_mag"] + self._lens_color[c],
                    "R_sersic": p["lens_r_sersic_arcsec"],
                    "n_sersic": p["lens_n_sersic"],
                    "e1": p["lens_e1"],
                    "e2": p["lens_e2"],
                    "center_x": p["lens_x_arcsec"],
                    "center_y": p["lens_y_arcsec"],
                }
            ]
            source_mag = None
            if has_source:
                source_mag = [
                    {
                        "magnitude": p["source_mag"] + self._source_color[c],
                        "R_sersic": p["source_r_sersic_arcsec"],
                        "n_sersic": p["source_n_sersic"],
                        "e1": p["source_e1"],
                        "e2": p["source_e2"],
                        "center_x": p["source_x_arcsec"],
                        "center_y": p["source_y_arcsec"],
                    }
                ]
            kwargs_lens_light, kwargs_source, _ = api.magnitude2amplitude(lens_light_mag, source_mag)
            lens[c] = model.image(
                kwargs_lens=kwargs_lens, kwargs_lens_light=kwargs_lens_light, source_add=False
            )
            if has_source:
                source[c] = model.image(
                    kwargs_lens=kwargs_lens, kwargs_source=kwargs_source, lens_light_add=False
                )
        return lens, source

    def variance(self, model: np.ndarray) -> np.ndarray:
        """Expected per-pixel variance of a noisy image of ``model``, in (e-/s)^2: Poisson variance
        of the model's counts plus the background (sky counts + read noise) of ``SingleBand``."""
        t = self._exposure_s[:, None, None]
        return self._bkg_sigma[:, None, None] ** 2 + np.clip(model, 0.0, None) / t

    def add_noise(self, rng: np.random.Generator, model: np.ndarray) -> np.ndarray:
        """Model + one Gaussian draw with the Poisson + sky + read-noise variance, sky subtracted.

        The Poisson part is the Gaussian approximation lenstronomy itself uses (``flux_noise``): it is
        accurate here, where every pixel holds ~10^4 sky counts at the default depth, and one
        normal draw costs a fifth of ``rng.poisson`` on top of it (a quarter of a render).
        """
        return model + rng.standard_normal(model.shape) * np.sqrt(self.variance(model))

    def render(
        self, rng: np.random.Generator, label: int, *, noise: bool = True
    ) -> tuple[np.ndarray, dict[str, float]]:
        """One image, float32 (C, H, W), and the dict of its parameters (keys: ``PARAM_KEYS``).

        ``noise=False`` returns the noise-free model (for previews and tests); the parameters and
        their random draws are the same either way.
        """
        params = self.sample_params(rng, label)
        lens, source = self.render_components(params)
        model = lens + source
        params["lens_flux_e_per_s"] = float(lens[0].sum())
        params["source_flux_e_per_s"] = float(source[0].sum())
        if label:
            unlensed = self._apis[0].magnitude2cps(params["source_mag"] + self._source_color[0])
            params["magnification"] = float(source[0].sum() / unlensed)
            params["arc_snr"] = float(np.sqrt(np.sum(source**2 / self.variance(model))))
        else:
            params["arc_snr"] = 0.0
        image = self.add_noise(rng, model) if noise else model
        return image.astype(np.float32), {k: params[k] for k in PARAM_KEYS}
