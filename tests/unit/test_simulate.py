"""The lenstronomy boundary: distributions, instruments, physics, hard negatives, determinism, records."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pytest
from lenstronomy.SimulationAPI.sim_api import SimAPI
from scipy import stats

from lensmill.config import (
    SURVEY_PRESETS,
    ConfigError,
    LogUniform,
    Normal,
    SimConfig,
    Uniform,
    load_config,
)
from lensmill.simulate import (
    PARAM_KEYS,
    PARAM_UNITS,
    LensSystem,
    Simulator,
    draw,
    label_for,
    n_positives,
    row_rng,
)

REPO = Path(__file__).resolve().parents[2]
# Hard negatives off: a negative is then exactly its positive twin without the arc.
SIM = SimConfig(image_size_px=32, hard_negatives=False)
SOURCE_KEYS = [k for k in PARAM_KEYS if k.startswith("source_") and k != "source_flux_e_per_s"]
INTERLOPER_KEYS = [k for k in PARAM_KEYS if k.startswith("interloper_")]
# Everything on: three LSST bands, EPL, bulge + disc, clumps, companions, hard negatives, seeing.
FULL = SimConfig(
    image_size_px=32,
    bands=("g", "r", "i"),
    instrument="lsst",
    lens_mass_model="EPL",
    lens_gamma=Uniform(min=1.8, max=2.2),
    lens_light_components=2,
    source_clumps_max=4,
    n_companions_max=3,
    hard_negatives=True,
    psf_fwhm_scale=Uniform(min=0.8, max=1.3),
)


@pytest.fixture(scope="module")
def simulator() -> Simulator:
    return Simulator(SIM)


@pytest.fixture(scope="module")
def full() -> Simulator:
    return Simulator(FULL)


# -- distributions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dist", "lo", "hi", "reference"),
    [
        (Uniform(min=1.0, max=3.0), 1.0, 3.0, stats.uniform(1.0, 2.0)),
        (Normal(dist="normal", mean=2.0, std=0.5), -math.inf, math.inf, stats.norm(2.0, 0.5)),
        (
            Normal(dist="normal", mean=2.0, std=0.5, min=1.8, max=3.0),
            1.8,
            3.0,
            stats.truncnorm(-0.4, 2.0, loc=2.0, scale=0.5),
        ),
        # Far in the upper tail, where ndtr(a) rounds towards 1: still inside, right moments.
        (Normal(dist="normal", mean=0.0, std=1.0, min=9.0, max=9.5), 9.0, 9.5, stats.truncnorm(9.0, 9.5)),
        (LogUniform(dist="loguniform", min=0.1, max=10.0), 0.1, 10.0, stats.loguniform(0.1, 10.0)),
        (1.5, 1.5, 1.5, None),
    ],
    ids=["uniform", "normal", "truncated-normal", "far-tail", "loguniform", "fixed"],
)
def test_distributions_sample_within_bounds_with_the_right_moments(dist, lo, hi, reference) -> None:
    rng = np.random.default_rng(0)
    x = np.array([draw(rng, dist) for _ in range(20000)])
    assert np.isfinite(x).all()
    assert x.min() >= lo and x.max() <= hi
    if reference is None:
        assert set(x.tolist()) == {1.5}
        return
    assert abs(x.mean() - reference.mean()) < 5 * reference.std() / math.sqrt(len(x))
    assert x.std() == pytest.approx(reference.std(), rel=0.03)


def test_every_distribution_costs_one_uniform_draw() -> None:
    for dist in (
        2.0,
        Uniform(min=0, max=1),
        Normal(dist="normal", mean=0, std=1, min=-1),
        LogUniform(dist="loguniform", min=1, max=2),
    ):
        rng = np.random.default_rng(5)
        draw(rng, dist)
        assert rng.random() == np.random.default_rng(5).random(2)[1]


def test_distribution_syntax_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "sim:\n"
        "  theta_e_arcsec: {dist: normal, mean: 1.2, std: 0.3, min: 0.5, max: 2.5}\n"
        "  lens_mag: {min: 18, max: 20}\n"
        "  source_r_sersic_arcsec: {dist: loguniform, min: 0.05, max: 0.5}\n"
        "  lens_n_sersic: 4\n"
        "  lens_mass_model: EPL\n"
        "  lens_gamma: {dist: uniform, min: 1.8, max: 2.2}\n"
    )
    sim = load_config(path).sim
    assert sim.theta_e_arcsec == Normal(dist="normal", mean=1.2, std=0.3, min=0.5, max=2.5)
    assert sim.lens_mag == Uniform(min=18, max=20)  # {min, max} still means uniform
    assert sim.source_r_sersic_arcsec == LogUniform(dist="loguniform", min=0.05, max=0.5)
    assert sim.lens_n_sersic == 4.0
    # A dumped config (a manifest's) loads back to the same config.
    assert SimConfig.model_validate(sim.model_dump(mode="json")) == sim


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("sim.theta_e_arcsec={min: 3, max: 1}", ["sim.theta_e_arcsec", "must not exceed"]),
        ("sim.source_mag={dist: normal, mean: 23, std: 0}", ["sim.source_mag", "std", "greater than 0"]),
        ("sim.lens_mag={dist: normal, mean: 19, std: -1}", ["sim.lens_mag", "std"]),
        (
            "sim.source_r_sersic_arcsec={dist: loguniform, min: 0, max: 1}",
            ["sim.source_r_sersic_arcsec", "min"],
        ),
        (
            "sim.lens_mag={dist: normal, mean: 19, std: 0.1, min: 30, max: 31}",
            ["sim.lens_mag", "no probability"],
        ),
        ("sim.lens_mag={dist: gamma, min: 1, max: 2}", ["sim.lens_mag", "gamma"]),
        ("sim.theta_e_arcsec={dist: normal, mean: 1, std: 0.3}", ["theta_e_arcsec", "truncate it"]),
        ("sim.lens_n_sersic={min: 0, max: 4}", ["lens_n_sersic", "must lie in"]),
        ("sim.lens_gamma=1.9", ["lens_gamma", "EPL only"]),
    ],
)
def test_bad_distributions_name_the_field(override: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for name in names:
        assert name in str(err.value)


def test_epl_slope_must_stay_in_its_valid_range() -> None:
    with pytest.raises(ConfigError, match="lens_gamma: values must lie in"):
        load_config(None, ["sim.lens_mass_model=EPL", "sim.lens_gamma={min: 1.5, max: 3.0}"])


# -- rendering and physics ---------------------------------------------------------------------------


@pytest.mark.parametrize("label", [0, 1])
def test_image_shape_dtype_finite(simulator: Simulator, label: int) -> None:
    image, params = simulator.render(row_rng(0, "train", 3), label)
    assert image.shape == (1, 32, 32)
    assert image.dtype == np.float32
    assert np.isfinite(image).all()
    # A lens galaxy is there in both classes: the centre is far above the background noise.
    assert image[0, 14:18, 14:18].mean() > 20 * simulator._bkg_sigma[0]
    assert list(params) == list(PARAM_KEYS)


def test_multiband_shape_and_colours() -> None:
    sim = SimConfig(image_size_px=24, bands=("g", "r", "i"))
    image, _ = Simulator(sim).render(row_rng(1, "val", 0), 0, noise=False)
    assert image.shape == (3, 24, 24)
    # A red lens galaxy: brighter in i than in r than in g.
    flux = image.sum(axis=(1, 2))
    assert flux[0] < flux[1] < flux[2]


def test_unknown_band_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="band 'w' has no entry in lens_colors_mag"):
        load_config(None, ["sim.bands=[r,w]"])


def _reference_image(sim: SimConfig, simulator: Simulator, system: LensSystem) -> np.ndarray:
    """The same system rendered the plain way: one lenstronomy ImageModel per band with its own PSF."""
    m = simulator._model
    kwargs_model = {
        "lens_model_list": m.LensModel.lens_model_list,
        "lens_light_model_list": m.LensLightModel.profile_type_list,
        "source_light_model_list": m.SourceModel.profile_type_list,
    }
    out = []
    for c, band in enumerate(sim.bands):
        o = sim.observing[band]
        kwargs_band = {
            **o.single_band_kwargs(sim.pixel_scale_arcsec),
            "seeing": o.psf_fwhm_arcsec * system.psf_scale,
            "psf_type": "GAUSSIAN",
            "data_count_unit": "e-",
        }
        model = SimAPI(sim.image_size_px, kwargs_band, kwargs_model).image_model_class(
            {"supersampling_factor": sim.supersampling}
        )
        red, blue = simulator._red_scale[c], simulator._blue_scale[c]
        colour = [
            red if i in system.red else blue if i in system.blue else 0.0
            for i in range(len(system.kwargs_light))
        ]
        light = [dict(kw, amp=kw["amp"] * f) for kw, f in zip(system.kwargs_light, colour, strict=True)]
        source = [
            dict(kw, amp=kw["amp"] * blue * (i in system.source_on))
            for i, kw in enumerate(system.kwargs_source)
        ]
        out.append(
            model.image(
                kwargs_lens=system.kwargs_lens,
                kwargs_source=source,
                kwargs_lens_light=light,
                source_add=bool(system.label),
            )
        )
    return np.array(out)


@pytest.mark.parametrize("label", [0, 1])
def test_one_ray_shooting_for_all_bands_matches_per_band_image_models(full: Simulator, label: int) -> None:
    # The fast path (band-independent light, per-band colour and Gaussian PSF) is lenstronomy's own
    # per-band rendering, pixel for pixel; supersampling included.
    sim = FULL.model_copy(update={"supersampling": 2})
    fast = Simulator(sim)
    for row in range(2):
        system = fast.sample(row_rng(4, "train", row), label)
        lens, source = fast.render_components(system)
        reference = _reference_image(sim, fast, system)
        np.testing.assert_allclose(lens + source, reference, rtol=1e-9, atol=1e-9 * reference.max())


@pytest.mark.parametrize("config", [SIM, FULL], ids=["default", "full"])
def test_same_seed_is_bit_identical(config: SimConfig) -> None:
    simulator = Simulator(config)
    for label in (0, 1):
        a, pa_ = simulator.render(row_rng(7, "test", 11), label)
        # Global numpy state must play no part, nor a second Simulator.
        np.random.seed(123)
        b, pb = Simulator(config).render(row_rng(7, "test", 11), label)
        assert a.tobytes() == b.tobytes()
        assert pa_ == pytest.approx(pb, nan_ok=True)
        c, _ = simulator.render(row_rng(7, "test", 12), label)
        assert a.tobytes() != c.tobytes()


def test_row_rng_depends_on_split_and_row_only() -> None:
    draws = {(s, r): row_rng(5, s, r).random() for s in ("train", "val", "test") for r in (0, 1)}
    assert len(set(draws.values())) == len(draws)
    assert row_rng(5, "val", 1).random() == draws[("val", 1)]
    with pytest.raises(ValueError, match="unknown split"):
        row_rng(5, "holdout", 0)


@pytest.mark.parametrize("companions", [0, 3])
def test_positive_differs_from_negative_only_by_the_lensed_source(companions: int) -> None:
    simulator = Simulator(SIM.model_copy(update={"n_companions_max": companions}))
    pos, p_pos = simulator.render(row_rng(0, "train", 42), 1, noise=False)
    neg, p_neg = simulator.render(row_rng(0, "train", 42), 0, noise=False)
    shared = [
        k
        for k in PARAM_KEYS
        if k.startswith(("lens", "gamma", "companion", "n_companions", "psf")) or k == "theta_e_arcsec"
    ]
    assert {k: p_pos[k] for k in shared} == pytest.approx({k: p_neg[k] for k in shared}, nan_ok=True)
    _, source = simulator.render_components(simulator.sample(row_rng(0, "train", 42), 1))
    np.testing.assert_allclose(pos - neg, source.astype(np.float32), atol=1e-3)
    arc = pos - neg
    assert arc.sum() > 0.05 * neg.sum()  # a visible arc, not a rounding error
    # The arc is a ring-like feature near theta_E, not at the lens centre.
    yy, xx = np.indices(arc.shape[1:]) - (arc.shape[1] - 1) / 2
    r_arcsec = np.hypot(xx, yy) * SIM.pixel_scale_arcsec
    weighted_r = float((arc[0] * r_arcsec).sum() / arc[0].sum())
    assert 0.4 * p_pos["theta_e_arcsec"] < weighted_r < 1.6 * p_pos["theta_e_arcsec"]


def test_noise_statistics_match_the_background(simulator: Simulator) -> None:
    model, _ = simulator.render(row_rng(0, "train", 9), 0, noise=False)
    noisy, _ = simulator.render(row_rng(0, "train", 9), 0)
    resid = (noisy - model)[0]
    corner = np.concatenate([resid[:6, :6].ravel(), resid[-6:, -6:].ravel()])
    assert np.std(corner) == pytest.approx(simulator._bkg_sigma[0], rel=0.35)
    # Pull of the whole image is ~N(0, 1) under the expected variance (Poisson + background).
    pull = resid / np.sqrt(simulator.variance(model.astype(np.float64))[0])
    assert abs(pull.mean()) < 0.15
    assert pull.std() == pytest.approx(1.0, rel=0.15)


def _pair(update: dict, row: int = 3, label: int = 1) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """The same row rendered without and with a change to the config (noise-free)."""
    a, pa_ = Simulator(SIM).render(row_rng(2, "train", row), label, noise=False)
    b, pb = Simulator(SIM.model_copy(update=update)).render(row_rng(2, "train", row), label, noise=False)
    assert np.isfinite(b).all()
    return a, b, pa_, pb


def test_epl_slope_changes_the_arcs_and_gamma_two_is_the_sie() -> None:
    a, b, _, pb = _pair({"lens_mass_model": "EPL", "lens_gamma": 2.0})
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * a.max())
    a, b, _, pb = _pair({"lens_mass_model": "EPL", "lens_gamma": 1.8})
    assert pb["lens_gamma"] == 1.8
    assert np.abs(a - b).max() > 0.01 * a.max()


def test_two_component_lens_light_keeps_the_total_and_spreads_it() -> None:
    update = {"lens_light_components": 2, "lens2_flux_frac": 0.5, "lens2_r_sersic_arcsec": 3.0}
    a, b, pa_, pb = _pair(update, label=0)
    assert pb["lens_flux_e_per_s"] == pytest.approx(pa_["lens_flux_e_per_s"])
    assert (pb["lens2_flux_frac"], pb["lens2_r_sersic_arcsec"]) == (0.5, 3.0)
    assert math.isnan(pa_["lens2_flux_frac"])
    # An extended envelope: less light in the core, more in the outskirts.
    core = (slice(None), slice(13, 19), slice(13, 19))
    assert b[core].sum() < 0.9 * a[core].sum()
    assert (b.sum() - b[core].sum()) > (a.sum() - a[core].sum())


def test_clumps_carry_part_of_the_source_flux_and_make_arcs_knotty() -> None:
    update = {"source_clumps_max": 4, "source_clump_flux_frac": 0.4, "source_clump_sigma_arcsec": 0.05}
    simulator = Simulator(SIM.model_copy(update=update))
    rows = [
        r for r in range(40) if simulator.sample(row_rng(2, "train", r), 1).params["n_source_clumps"] >= 2
    ]
    assert len(rows) >= 10
    counts = [simulator.sample(row_rng(2, "train", r), 1).params["n_source_clumps"] for r in range(40)]
    assert set(counts) <= {0.0, 1.0, 2.0, 3.0, 4.0} and len(set(counts)) >= 4
    row = rows[0]
    system = simulator.sample(row_rng(2, "train", row), 1)
    # Sersic + active clumps hold exactly the source magnitude's flux.
    sersic = system.kwargs_source[0]
    total = simulator._sersic_profile.total_flux(
        amp=sersic["amp"],
        R_sersic=sersic["R_sersic"],
        n_sersic=sersic["n_sersic"],
        e1=sersic["e1"],
        e2=sersic["e2"],
    ) + sum(system.kwargs_source[i]["amp"] for i in system.source_on[1:])
    assert total == pytest.approx(10 ** (-0.4 * system.params["source_mag"]))
    # Same source without clumps: the clumpy arc peaks higher (compact knots).
    smooth = Simulator(SIM)
    _, arc_smooth = smooth.render_components(smooth.sample(row_rng(2, "train", row), 1))
    _, arc_clumpy = simulator.render_components(system)
    assert np.isfinite(arc_clumpy).all()
    assert (
        arc_clumpy.max() > 1.1 * arc_smooth.max()
        or abs(arc_clumpy - arc_smooth).max() > 0.05 * arc_smooth.max()
    )
    assert system.params["source_clump_flux_frac"] == 0.4


def test_seeing_varies_per_image_within_its_distribution() -> None:
    simulator = Simulator(SIM.model_copy(update={"psf_fwhm_scale": Uniform(min=0.8, max=1.5)}))
    fwhm = [simulator.render(row_rng(0, "train", r), 0)[1]["psf_fwhm_arcsec"] for r in range(60)]
    assert min(fwhm) >= 0.8 * 0.7 - 1e-9 and max(fwhm) <= 1.5 * 0.7 + 1e-9
    assert np.std(fwhm) > 0.05
    sharp = Simulator(SIM.model_copy(update={"psf_fwhm_scale": 0.8}))
    blurred = Simulator(SIM.model_copy(update={"psf_fwhm_scale": 1.5}))
    a, _ = sharp.render(row_rng(0, "train", 1), 0, noise=False)
    b, _ = blurred.render(row_rng(0, "train", 1), 0, noise=False)
    assert b.max() < 0.9 * a.max()


# -- instruments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("instrument", sorted(SURVEY_PRESETS))
def test_survey_presets_load_for_every_band_and_render(instrument: str) -> None:
    cls_name, bands, _, _ = SURVEY_PRESETS[instrument]
    module = importlib.import_module(f"lenstronomy.SimulationAPI.ObservationConfig.{cls_name}")
    for band in bands:
        sim = SimConfig(instrument=instrument, bands=(band,), image_size_px=24)
        kw = getattr(module, cls_name)(band=band).kwargs_single_band()
        obs = sim.observing[band]
        assert sim.pixel_scale_arcsec == kw["pixel_scale"]
        assert (obs.psf_fwhm_arcsec, obs.magnitude_zero_point, obs.sky_brightness_mag_arcsec2) == (
            kw["seeing"],
            kw["magnitude_zero_point"],
            kw["sky_brightness"],
        )
        assert (obs.exposure_time_s, obs.num_exposures, obs.read_noise_e) == (
            kw["exposure_time"],
            kw["num_exposures"],
            kw["read_noise"],
        )
        image, params = Simulator(sim).render(row_rng(0, "train", 0), 1)
        assert np.isfinite(image).all() and params["arc_snr"] > 0
        assert params["psf_fwhm_arcsec"] == kw["seeing"]


def test_presets_differ_and_coadd_depth_lowers_the_noise() -> None:
    r = {i: SimConfig(instrument=i, bands=("r",)) for i in ("lsst", "des", "custom")}
    euclid = SimConfig(instrument="euclid", bands=("VIS",))
    scales = {r["lsst"].pixel_scale_arcsec, r["des"].pixel_scale_arcsec, euclid.pixel_scale_arcsec}
    assert scales == {0.2, 0.263, 0.101}
    seeing = {c.observing[b].psf_fwhm_arcsec for c, b in [(r["lsst"], "r"), (r["des"], "r"), (euclid, "VIS")]}
    assert len(seeing) == 3
    one_year = SimConfig(instrument="lsst", bands=("r",), instrument_coadd_years=1)
    assert one_year.observing["r"].num_exposures == r["lsst"].observing["r"].num_exposures // 10
    deep, shallow = Simulator(r["lsst"]), Simulator(one_year)
    assert shallow._bkg_sigma[0] > 2.5 * deep._bkg_sigma[0]


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["sim.instrument=lsst", "sim.bands=[r, VIS]"], ["not a lsst band", "VIS"]),
        (["sim.instrument=euclid", "sim.bands=[VIS, J]"], ["bands", "different pixel scales"]),
        (["sim.instrument=lsst", "sim.psf_fwhm_arcsec=1.1"], ["psf_fwhm_arcsec", "custom only"]),
        (["sim.instrument=des", "sim.instrument_coadd_years=9"], ["instrument_coadd_years", "[1, 6]"]),
        (["sim.instrument_coadd_years=2"], ["instrument_coadd_years", "custom"]),
        (["sim.instrument=hsc"], ["sim.instrument", "lsst"]),
    ],
)
def test_bad_instrument_settings_name_the_field(overrides: list[str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for name in names:
        assert name in str(err.value)


def test_observing_is_recorded_and_re_derived_on_load() -> None:
    sim = SimConfig(instrument="euclid", bands=("VIS",), pixel_scale_arcsec=0.1)
    dumped = sim.model_dump(mode="json")
    assert dumped["observing"]["VIS"]["psf_fwhm_arcsec"] == 0.16
    assert SimConfig.model_validate(dumped) == sim
    # A dumped config edited and loaded again describes the edited instrument, not the stale record.
    custom = SimConfig().model_dump(mode="json") | {"psf_fwhm_arcsec": 1.1, "bands": ["g", "r"]}
    reloaded = SimConfig.model_validate(custom)
    assert set(reloaded.observing) == {"g", "r"}
    assert reloaded.observing["g"].psf_fwhm_arcsec == 1.1


# -- hard negatives and shared nuisances -----------------------------------------------------------------


def test_hard_negatives_carry_the_arc_flux_of_their_twin(full: Simulator) -> None:
    pos = [full.render(row_rng(1, "train", r), 1)[1] for r in range(120)]
    neg = [full.render(row_rng(1, "train", r), 0)[1] for r in range(120)]
    for p in pos:
        assert all(math.isnan(p[k]) for k in INTERLOPER_KEYS)
    for p in neg:
        assert all(np.isfinite(p[k]) for k in INTERLOPER_KEYS)
        assert all(math.isnan(p[k]) for k in SOURCE_KEYS)
    arc = np.array([p["source_flux_e_per_s"] for p in pos])
    interloper = np.array([p["interloper_flux_e_per_s"] for p in neg])
    # Each interloper carries the flux its positive twin's arc has; they differ only where an arc runs
    # off this small cutout (the arc's flux is measured after the PSF, the interloper's before).
    ratio = interloper / arc
    assert np.mean(np.abs(ratio - 1) < 0.02) > 0.9
    assert np.all(np.abs(ratio - 1) < 0.25)
    # Hence the total flux of the two classes has the same distribution.
    tot_pos = np.array(
        [p["lens_flux_e_per_s"] + p["companion_flux_e_per_s"] + p["source_flux_e_per_s"] for p in pos]
    )
    tot_neg = np.array(
        [p["lens_flux_e_per_s"] + p["companion_flux_e_per_s"] + p["interloper_flux_e_per_s"] for p in neg]
    )
    assert np.median(tot_neg) == pytest.approx(np.median(tot_pos), rel=0.3)


def test_hard_negative_images_hold_the_interloper_flux() -> None:
    # A cutout large enough to hold the interlopers (at most 2.2 theta_E = 4.4" out), and pixels
    # supersampled so that compact profiles keep their flux.
    base = SIM.model_copy(update={"image_size_px": 64, "supersampling": 3})
    simulator, plain = Simulator(base.model_copy(update={"hard_negatives": True})), Simulator(base)
    totals: dict[str, list[float]] = {"pos": [], "hard": [], "plain": []}
    ratios = []
    for r in range(60):
        totals["pos"].append(simulator.render(row_rng(3, "val", r), 1)[0].sum())
        hard, p = simulator.render(row_rng(3, "val", r), 0, noise=False)
        easy, _ = plain.render(row_rng(3, "val", r), 0, noise=False)
        totals["hard"].append(hard.sum())
        totals["plain"].append(easy.sum())
        # The interloper is the whole difference from a plain negative, near the lens (less the
        # outskirts of the largest ones, beyond the cutout).
        ratios.append((hard.sum() - easy.sum()) / p["interloper_flux_e_per_s"])
        assert p["interloper_offset_arcsec"] <= 2.2 * p["theta_e_arcsec"] + 1e-9
    assert np.median(ratios) == pytest.approx(1.0, abs=0.03)
    assert min(ratios) > 0.8 and max(ratios) < 1.05
    med = {k: float(np.median(v)) for k, v in totals.items()}
    assert med["hard"] == pytest.approx(med["pos"], rel=0.3)
    assert med["hard"] > med["plain"]


def test_companions_are_shared_by_both_labels_and_shown() -> None:
    # Well-sampled companions (n = 1, R = 0.5"), so pixel sampling does not change their flux.
    update = {"n_companions_max": 4, "companion_mag": 20.0, "companion_n_sersic": 1.0, "supersampling": 2}
    simulator = Simulator(SIM.model_copy(update=update | {"companion_r_sersic_arcsec": 0.5}))
    bare = Simulator(SIM.model_copy(update={"supersampling": 2}))
    seen = set()
    for r in range(20):
        neg, pn = simulator.render(row_rng(0, "test", r), 0, noise=False)
        _, pp = simulator.render(row_rng(0, "test", r), 1, noise=False)
        assert (pn["n_companions"], pn["companion_flux_e_per_s"]) == (
            pp["n_companions"],
            pp["companion_flux_e_per_s"],
        )
        seen.add(pn["n_companions"])
        if pn["n_companions"] > 0:
            lone, _ = bare.render(row_rng(0, "test", r), 0, noise=False)
            # Companions may sit partly outside the cutout: at most their total flux is added.
            added = float(neg.sum() - lone.sum())
            assert 0.3 * pn["companion_flux_e_per_s"] < added <= 1.02 * pn["companion_flux_e_per_s"]
    assert seen == {0.0, 1.0, 2.0, 3.0, 4.0}


def _shortcut_auc(sim: SimConfig, n: int) -> float:
    """ROC AUC of a logistic regression on nuisance statistics (the shortcut audit): total flux, peak pixel,
    background std (outer 4-pixel frame), PSF width, lens-light flux; 5-fold cross-validated."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    simulator = Simulator(sim)
    frame = np.ones((sim.image_size_px,) * 2, bool)
    frame[4:-4, 4:-4] = False
    rows, labels = [], []
    for r in range(n):
        label = label_for(r, 0.5)
        image, p = simulator.render(row_rng(11, "train", r), label)
        image = image.astype(np.float64)
        rows.append(
            [image.sum(), image.max(), image[:, frame].std(), p["psf_fwhm_arcsec"], p["lens_flux_e_per_s"]]
        )
        labels.append(label)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    prob = cross_val_predict(model, np.array(rows), np.array(labels), cv=5, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, prob))


def test_default_negatives_share_the_positives_nuisance_statistics() -> None:
    sim = SimConfig(psf_fwhm_scale=Uniform(min=0.85, max=1.2))
    assert sim.hard_negatives
    assert _shortcut_auc(sim, 400) < 0.65
    # Without hard negatives the total flux (given the lens flux) gives the label away.
    assert _shortcut_auc(sim.model_copy(update={"hard_negatives": False}), 400) > 0.8


# -- records ---------------------------------------------------------------------------------------------


def test_every_parameter_has_a_unit_its_name_agrees_with() -> None:
    assert tuple(PARAM_UNITS) == PARAM_KEYS
    kept = [
        "theta_e_arcsec",
        "lens_e1",
        "lens_e2",
        "gamma1",
        "gamma2",
        "lens_mag",
        "source_mag",
        "source_x_arcsec",
        "source_y_arcsec",
        "magnification",
        "arc_snr",
        "lens_flux_e_per_s",
        "source_flux_e_per_s",
        "psf_fwhm_arcsec",
        "n_companions",
        "interloper_flux_e_per_s",
    ]
    assert set(kept) <= set(PARAM_KEYS)
    for key, unit in PARAM_UNITS.items():
        assert key.endswith("_arcsec") == (unit == "arcsec"), key
        assert key.endswith("_e_per_s") == (unit == "e-/s"), key
        assert key.endswith("_mag") == unit.startswith("mag"), key
        assert key.startswith("n_") == (unit == "count"), key


def test_parameter_records(simulator: Simulator) -> None:
    for row in range(6):
        _, pos = simulator.render(row_rng(3, "train", row), 1)
        _, neg = simulator.render(row_rng(3, "val", row), 0)
        for params in (pos, neg):
            assert set(params) == set(PARAM_KEYS)
            assert SIM.theta_e_arcsec.min <= params["theta_e_arcsec"] <= SIM.theta_e_arcsec.max
            assert math.hypot(params["lens_e1"], params["lens_e2"]) <= SIM.lens_ellipticity.max
            assert math.hypot(params["gamma1"], params["gamma2"]) <= SIM.shear_strength.max
            assert SIM.lens_mag.min <= params["lens_mag"] <= SIM.lens_mag.max
            assert params["psf_fwhm_arcsec"] == SIM.psf_fwhm_arcsec
            assert params["lens_gamma"] == 2.0 and params["n_companions"] == 0
            assert all(math.isnan(params[k]) for k in INTERLOPER_KEYS)  # hard negatives off
            # Lens flux in e-/s of the first band from the magnitude and the zero point.
            assert params["lens_flux_e_per_s"] == pytest.approx(10 ** (-0.4 * (params["lens_mag"] - 28.0)))
        assert pos["arc_snr"] > 0
        assert pos["magnification"] > 1.0
        assert 0.0 <= pos["source_offset_frac"] <= SIM.source_offset_max_frac
        offset = math.hypot(
            pos["source_x_arcsec"] - pos["lens_x_arcsec"], pos["source_y_arcsec"] - pos["lens_y_arcsec"]
        )
        assert offset <= SIM.source_offset_max_frac * pos["theta_e_arcsec"] + 1e-9
        assert SIM.source_mag.min <= pos["source_mag"] <= SIM.source_mag.max
        assert neg["arc_snr"] == 0.0
        assert neg["source_flux_e_per_s"] == 0.0
        assert all(math.isnan(neg[k]) for k in SOURCE_KEYS)
        expected_nan = {k for k in PARAM_KEYS if k.startswith(("lens2_", "interloper_"))}
        assert {k for k in PARAM_KEYS if math.isnan(pos[k])} == expected_nan


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sim_presets_render(path: Path) -> None:
    sim = load_config(path).sim
    simulator = Simulator(sim)
    for label in range(len(sim.classes)):
        image, params = simulator.render(row_rng(0, "train", 0), label)
        assert image.shape == simulator.shape and np.isfinite(image).all()
        assert set(params) == set(simulator.param_keys) >= set(PARAM_KEYS)


@pytest.mark.parametrize("frac", [0.5, 0.3, 0.1, 0.77])
def test_labels_exactly_balanced_and_interleaved(frac: float) -> None:
    labels = np.array([label_for(i, frac) for i in range(1000)])
    assert set(np.unique(labels)) <= {0, 1}
    for n in (1, 2, 7, 10, 999, 1000):
        assert labels[:n].sum() == n_positives(n, frac) == math.floor(n * frac + 0.5)
    # Every window of 100 rows (a shard) holds the configured mix, to within one row.
    windows = labels.reshape(10, 100).sum(axis=1)
    assert np.all(np.abs(windows - 100 * frac) <= 1)
