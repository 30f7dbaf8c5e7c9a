import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lensmill.ensemble import search_weights, select_members, simplex_grid
from lensmill.records import RunSummary, TrialResult


def trial(model: str, val_auc: float, lr: float, usable: bool = True) -> TrialResult:
    """A tune trial as the tune stage records it (a summary only when it checkpointed)."""
    summary = RunSummary(
        run_name=f"{model}-{lr}", model=model, lr=lr, dataset_uri="/d", dataset_id="d", mlflow_run_id="r",
        image_shape=(1, 8, 8), in_chans=1, cache_in_memory=True, val_auc=val_auc, best_epoch=0,
        epochs_run=1, stopped_early=False, attempts=1, checkpoint_uri="/c", member_file="model.pt",
        history=(),
    )  # fmt: skip
    return TrialResult(model=model, lr=lr, run_name=summary.run_name, summary=summary if usable else None)


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
        trial("a", 0.99, 1),
        trial("a", 0.98, 2),
        trial("b", 0.90, 1),
        trial("c", 0.97, 1, usable=False),
    ]
    chosen = select_members(trials, 2)
    assert [(t.model, t.lr) for t in chosen] == [("a", 1), ("b", 1)]
    assert len(select_members(trials, 5)) == 3
