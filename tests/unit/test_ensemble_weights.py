"""The ensemble's weight search (Ray Tune's Optuna search algorithm) against a numpy grid over the
simplex, the oracle for two members; it never trails equal weights or the best member on validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from lensmill.config import EnsembleConfig
from lensmill.ensemble import combine, search_weights


def grid_oracle(member_probs: np.ndarray, labels: np.ndarray, step: float) -> float:
    """The best validation AUC over every weight vector in multiples of ``step`` (test oracle)."""
    units = round(1 / step)
    m = member_probs.shape[1]
    best = -np.inf
    for c in itertools.product(range(units + 1), repeat=m - 1):
        if sum(c) <= units:
            w = np.array([*c, units - sum(c)], np.float64) / units
            best = max(best, roc_auc_score(labels, member_probs @ w))
    return float(best)


def members(seed: int = 0, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Two informative members with independent errors, and one that is noise: (N, 3), (N,)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)

    def member(strength: float) -> np.ndarray:
        return 1 / (1 + np.exp(-(rng.normal(0, 1, n) + strength * (labels - 0.5))))

    return np.stack([member(1.6), member(1.2), rng.uniform(0, 1, n)], axis=1), labels


SETTINGS = EnsembleConfig(weight_trials=24)


def test_tune_search_matches_the_grid_oracle_on_two_members() -> None:
    probs, labels = members()
    two = probs[:, :2]
    out = search_weights(two, labels, SETTINGS)
    oracle = grid_oracle(two, labels, 0.05)
    assert out["weights"].shape == (2,) and out["weights"].sum() == pytest.approx(1.0)
    assert out["val_objective"] == pytest.approx(roc_auc_score(labels, combine(two, out["weights"])))
    # TPE with 24 samples against 21 grid points: within the grid's own resolution.
    assert out["val_objective"] >= oracle - 2e-3
    assert out["val_objective"] >= max(out["equal_weights_val_objective"], out["best_member_val_objective"])
    assert out["trials"] == 24


def test_a_noise_member_gets_little_weight_and_the_search_beats_equal_weights() -> None:
    probs, labels = members(seed=1)
    out = search_weights(probs, labels, SETTINGS)
    assert out["weights"][2] < 0.2, out["weights"]
    assert out["val_objective"] > out["equal_weights_val_objective"]
    assert out["val_objective"] >= out["best_member_val_objective"]
    # The same seed, the same weights: the search is reproducible.
    again = search_weights(probs, labels, SETTINGS)
    assert np.allclose(again["weights"], out["weights"])


def test_other_objectives_are_searched_too() -> None:
    probs, labels = members(seed=2)
    for objective in ("tpr10", "log_loss"):
        out = search_weights(probs, labels, SETTINGS.model_copy(update={"objective": objective}))
        assert out["val_objective"] >= max(
            out["equal_weights_val_objective"], out["best_member_val_objective"]
        )


def test_member_temperatures_soften_an_over_confident_member_and_lower_the_log_loss() -> None:
    from lensmill.ensemble import apply_member_temperatures

    probs, labels = members(seed=2)
    # Member 1's logit is z (noise + 1.2 (y - 1/2)); the calibrated one is 1.2 z. Times 4: the
    # temperature that calibrates it is 4 / 1.2 = 3.3.
    logit = np.log(probs[:, 1] / (1 - probs[:, 1]))
    over = np.stack([probs[:, 0], 1 / (1 + np.exp(-4 * logit))], axis=1)
    settings = EnsembleConfig(weight_trials=48, objective="log_loss")
    plain = search_weights(over, labels, settings)
    with_t = settings.model_copy(update={"member_temperatures": True})
    tempered = search_weights(over, labels, with_t)
    assert plain["temperatures"] == [1.0, 1.0]
    assert tempered["val_objective"] > plain["val_objective"] + 0.01
    again = apply_member_temperatures(over, tempered["temperatures"])
    assert tempered["val_objective"] == pytest.approx(-log_loss(labels, combine(again, tempered["weights"])))
    alone = search_weights(over[:, 1:], labels, with_t)
    assert 2.5 < alone["temperatures"][0] < 4.5, alone["temperatures"]
