import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from lensmill.config import OperatingPoint
from lensmill.ensemble import choose_threshold, objective_value, select_members
from lensmill.metrics import tpr_at_max_fp
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


def scores(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half lenses; a lens scores higher on average, with overlap."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 2.0 * labels - 1.0)))
    return labels, p


def test_threshold_for_a_false_positive_rate_is_the_lowest_that_meets_it():
    labels, p = scores()
    op = choose_threshold(labels, p, OperatingPoint(kind="fpr", value=0.01))
    neg = np.sort(p[labels == 0])[::-1]
    # At most 1% of the 1,000 non-lenses at or above it, and one more would be called a lens just below.
    assert (neg >= op["threshold"]).sum() <= 10 and op["val_fpr"] <= 0.01
    assert (neg >= np.nextafter(neg[10], 0)).sum() == 11
    assert op["threshold"] <= neg[9] and op["threshold"] > neg[10]
    assert op["val_tpr"] == pytest.approx((p[labels == 1] >= op["threshold"]).mean())
    # Far fewer false positives than at p >= 0.5 (the demo's 57 of 300).
    assert op["val_fpr"] < ((p >= 0.5) & (labels == 0)).sum() / 1000


def test_threshold_for_a_purity_counts_the_survey_prevalence():
    labels, p = scores()
    balanced = choose_threshold(labels, p, OperatingPoint(kind="purity", value=0.9))
    survey = choose_threshold(labels, p, OperatingPoint(kind="purity", value=0.9, prevalence=0.01))
    assert balanced["val_purity"] >= 0.9 and balanced["prevalence"] == pytest.approx(0.5)
    # One lens in a hundred: the same purity needs a higher threshold (fewer false positives).
    assert survey["threshold"] > balanced["threshold"]
    tpr, fpr = survey["val_tpr"], survey["val_fpr"]
    if tpr > 0:
        assert tpr * 0.01 / (tpr * 0.01 + fpr * 0.99) >= 0.9
    fixed = choose_threshold(labels, p, OperatingPoint(kind="fixed", value=0.7))
    assert fixed["threshold"] == 0.7 and fixed["val_tpr"] == pytest.approx((p[labels == 1] >= 0.7).mean())


def test_objectives_are_larger_is_better():
    labels, p = scores(400)
    assert objective_value("roc_auc", labels, p) == pytest.approx(roc_auc_score(labels, p))
    assert objective_value("tpr10", labels, p) == tpr_at_max_fp(labels, p, 10)
    assert objective_value("log_loss", labels, p) == pytest.approx(-log_loss(labels, p))
    assert objective_value("log_loss", labels, p) > objective_value("log_loss", labels, 1 - p)


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
    # A trial at chance is no member, however diverse its architecture.
    at_chance = [*trials, trial("vit", 0.52, 1)]
    assert "vit" in {t.model for t in select_members(at_chance, 5)}
    assert "vit" not in {t.model for t in select_members(at_chance, 5, min_val_auc=0.6)}
    # Nothing reaches the bar: the best trial alone, rather than no ensemble.
    assert [(t.model, t.val_auc) for t in select_members(at_chance, 5, min_val_auc=0.995)] == [("a", 0.99)]


def test_promotion_needs_a_better_figure_on_the_same_data_or_the_users_word():
    from lensmill.ensemble import decide_promotion

    champion = {"value": 0.95, "version": "3", "why": "compared on the same validation data"}
    assert decide_promotion(0.96, champion, promote=False)[0]
    refused, why = decide_promotion(0.94, champion, promote=False)
    assert not refused and "does not beat champion version 3" in why and "0.94" in why
    assert not decide_promotion(0.95, champion, promote=False)[0]  # a tie keeps the champion
    assert decide_promotion(0.5, champion, promote=True) == (True, "promoted as asked (--promote)")
    assert decide_promotion(0.5, {"value": None, "version": None, "why": "no champion yet"}, False)[0]
    other = {"value": None, "version": "3", "why": "the champion takes other images: not comparable"}
    assert decide_promotion(0.99, other, promote=False) == (False, other["why"])


def test_the_sweeps_results_table_ranks_trials_and_keeps_failed_ones():
    from lensmill.tune import TRIALS_TABLE_COLUMNS, trials_markdown, trials_table

    failed = trial("c", 0.0, 3, usable=False).model_copy(update={"error": "OOM | killed"})
    rows = trials_table([trial("a", 0.91, 1), failed, trial("b", 0.97, 2)])
    assert [r["model"] for r in rows] == ["b", "a", "c"]
    assert rows[0]["val_auc"] == 0.97 and rows[0]["epochs_run"] == 1 and rows[2]["val_auc"] is None
    assert set(rows[0]) == set(TRIALS_TABLE_COLUMNS)
    md = trials_markdown(rows).splitlines()
    assert md[0] == "| " + " | ".join(TRIALS_TABLE_COLUMNS) + " |" and len(md) == 5
    assert "OOM / killed" in md[4] and "0.9700" in md[2]
