"""The lenstronomy boundary: shapes, determinism, physics sanity, labels and parameter records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lensmill.config import ConfigError, SimConfig, load_config
from lensmill.simulate import PARAM_KEYS, Simulator, label_for, n_positives, row_rng

SIM = SimConfig(image_size_px=32)
SOURCE_KEYS = [k for k in PARAM_KEYS if k.startswith("source_") and k != "source_flux_e_per_s"]


@pytest.fixture(scope="module")
def simulator() -> Simulator:
    return Simulator(SIM)


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


def test_same_seed_is_bit_identical(simulator: Simulator) -> None:
    a, pa_ = simulator.render(row_rng(7, "test", 11), 1)
    # Global numpy state must play no part.
    np.random.seed(123)
    b, pb = simulator.render(row_rng(7, "test", 11), 1)
    assert a.tobytes() == b.tobytes()
    assert pa_ == pytest.approx(pb, nan_ok=True)
    c, _ = simulator.render(row_rng(7, "test", 12), 1)
    assert a.tobytes() != c.tobytes()


def test_row_rng_depends_on_split_and_row_only() -> None:
    draws = {(s, r): row_rng(5, s, r).random() for s in ("train", "val", "test") for r in (0, 1)}
    assert len(set(draws.values())) == len(draws)
    assert row_rng(5, "val", 1).random() == draws[("val", 1)]
    with pytest.raises(ValueError, match="unknown split"):
        row_rng(5, "holdout", 0)


def test_positive_differs_from_negative_only_by_the_lensed_source(simulator: Simulator) -> None:
    pos, p_pos = simulator.render(row_rng(0, "train", 42), 1, noise=False)
    neg, p_neg = simulator.render(row_rng(0, "train", 42), 0, noise=False)
    lens_keys = [
        k for k in PARAM_KEYS if k.startswith("lens_") or k.startswith("gamma") or k == "theta_e_arcsec"
    ]
    lens_keys.remove("lens_flux_e_per_s")
    assert {k: p_pos[k] for k in lens_keys} == {k: p_neg[k] for k in lens_keys}
    _, source = simulator.render_components(p_pos)
    np.testing.assert_allclose(pos - neg, source[0].astype(np.float32)[None], atol=1e-3)
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


def test_parameter_records(simulator: Simulator) -> None:
    for row in range(6):
        _, pos = simulator.render(row_rng(3, "train", row), 1)
        _, neg = simulator.render(row_rng(3, "val", row), 0)
        for params in (pos, neg):
            assert set(params) == set(PARAM_KEYS)
            assert SIM.theta_e_arcsec.min <= params["theta_e_arcsec"] <= SIM.theta_e_arcsec.max
            assert math.hypot(params["lens_e1"], params["lens_e2"]) <= SIM.lens_e_max
            assert math.hypot(params["gamma1"], params["gamma2"]) <= SIM.shear_max
            assert SIM.lens_mag.min <= params["lens_mag"] <= SIM.lens_mag.max
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
        assert not any(math.isnan(pos[k]) for k in PARAM_KEYS)


@pytest.mark.parametrize("frac", [0.5, 0.3, 0.1, 0.77])
def test_labels_exactly_balanced_and_interleaved(frac: float) -> None:
    labels = np.array([label_for(i, frac) for i in range(1000)])
    assert set(np.unique(labels)) <= {0, 1}
    for n in (1, 2, 7, 10, 999, 1000):
        assert labels[:n].sum() == n_positives(n, frac) == math.floor(n * frac + 0.5)
    # Every window of 100 rows (a shard) holds the configured mix, to within one row.
    windows = labels.reshape(10, 100).sum(axis=1)
    assert np.all(np.abs(windows - 100 * frac) <= 1)
