import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lensmill.ensemble import search_weights, select_members, simplex_grid


def test_simplex_grid_covers_the_simplex():
    g = simplex_grid(3, 0.25)
    assert g.shape == (15, 3)  # C(4 + 2, 2)
    assert np.allclose(g.sum(axis=1), 1)
    assert (g >= 0).all()
    assert len({tuple(r) for r in g}) == len(g)


def test_search_weights_prefers_the_informative_member():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    good = np.clip(labels * 0.6 + rng.normal(0.2, 0.15, 400), 0, 1)
    noise = rng.uniform(0, 1, 400)
    w, auc = search_weights(np.stack([noise, good], axis=1), labels, 0.1)
    assert w[1] > 0.8
    assert auc == pytest.approx(roc_auc_score(labels, np.stack([noise, good], 1) @ w))
    assert auc >= roc_auc_score(labels, good) - 1e-12


def test_select_members_takes_best_of_each_architecture_first():
    trials = [
        {"model": "a", "val_auc": 0.99, "usable": True, "lr": 1},
        {"model": "a", "val_auc": 0.98, "usable": True, "lr": 2},
        {"model": "b", "val_auc": 0.90, "usable": True, "lr": 1},
        {"model": "c", "val_auc": 0.97, "usable": False, "lr": 1},
    ]
    chosen = select_members(trials, 2)
    assert [(t["model"], t["lr"]) for t in chosen] == [("a", 1), ("b", 1)]
    assert len(select_members(trials, 5)) == 3
