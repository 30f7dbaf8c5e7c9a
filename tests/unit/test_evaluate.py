"""lensmill.metrics, lensmill.plots and the evaluation stage's report: every metric against
scikit-learn and by hand; degenerate inputs; PNG plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from lensmill.evaluate import evaluation_metrics
from lensmill.metrics import (
    apply_temperature,
    bootstrap_intervals,
    completeness_table,
    compute_metrics,
    expected_calibration_error,
    fit_temperature,
    purity_at_prevalence,
    reliability_table,
    tpr_at_max_fp,
)
from lensmill.plots import (
    plot_completeness,
    plot_confusion,
    plot_pr,
    plot_purity,
    plot_reliability,
    plot_roc,
    plot_score_histogram,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_KEYS = {
    "accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "confusion_matrix",
    "sensitivity", "specificity", "ppv", "npv", "tpr0", "tpr10", "n", "n_pos", "threshold",
}  # fmt: skip


@pytest.fixture(scope="module")
def scored() -> tuple[np.ndarray, np.ndarray]:
    """Fixed overlapping scores with ties (rounded to 2 decimals), 400 objects."""
    rng = np.random.default_rng(1234)
    labels = rng.integers(0, 2, size=400)
    probs = np.clip(0.35 * labels + 0.65 * rng.random(400), 0.0, 1.0).round(2)
    return labels, probs


def _tpr_at_max_fp_via_roc_curve(labels: np.ndarray, probs: np.ndarray, max_fp: int) -> float:
    """Reference: best TPR among scikit-learn ROC points with at most max_fp false positives."""
    fpr, tpr, _ = skm.roc_curve(labels, probs, drop_intermediate=False)
    n_neg = int(np.sum(labels == 0))
    fp_counts = np.rint(fpr * n_neg)
    return float(tpr[fp_counts <= max_fp].max())


# --- against scikit-learn -----------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_metrics_match_scikit_learn(scored: tuple[np.ndarray, np.ndarray], threshold: float) -> None:
    labels, probs = scored
    m = compute_metrics(labels, probs, threshold=threshold)
    pred = (probs >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()

    assert set(m) == EXPECTED_KEYS
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(labels, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(labels, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert m["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert m["sensitivity"] == pytest.approx(skm.recall_score(labels, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(labels, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(skm.precision_score(labels, pred))
    assert m["npv"] == pytest.approx(skm.precision_score(labels, pred, pos_label=0))
    assert m["tpr0"] == pytest.approx(_tpr_at_max_fp_via_roc_curve(labels, probs, 0))
    assert m["tpr10"] == pytest.approx(_tpr_at_max_fp_via_roc_curve(labels, probs, 9))
    assert (m["n"], m["n_pos"], m["threshold"]) == (400, int(labels.sum()), threshold)


def test_tpr_at_max_fp_matches_roc_curve_for_many_budgets(scored: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = scored
    for max_fp in (0, 1, 2, 5, 9, 10, 50, 1000):
        assert tpr_at_max_fp(labels, probs, max_fp) == pytest.approx(
            _tpr_at_max_fp_via_roc_curve(labels, probs, max_fp)
        ), max_fp


def test_metrics_are_plain_python_and_json_serialisable(scored: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = scored
    m = compute_metrics(labels, probs)
    for key, value in m.items():
        if key == "confusion_matrix":
            assert all(type(v) is int for v in value.values())
        elif key in ("n", "n_pos"):
            assert type(value) is int
        else:
            assert type(value) is float, key
    assert json.loads(json.dumps(m)) == m


# --- by hand ------------------------------------------------------------------------------------


def test_small_case_by_hand() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    probs = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1, 0.6])
    m = compute_metrics(labels, probs, threshold=0.5)
    # Predicted lens: 0.9, 0.8, 0.7 (a non-lens), 0.6 -> tp 3, fp 1; 0.4 is a missed lens.
    assert m["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == m["ppv"] == pytest.approx(3 / 4)
    assert m["recall"] == m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    # (lens, non-lens) pairs ranked right: 0.9 and 0.8 beat all 4; 0.6 and 0.4 beat 3 each -> 14/16.
    assert m["roc_auc"] == pytest.approx(14 / 16)
    # Ranked: 0.9 L, 0.8 L, 0.7 N, 0.6 L, 0.4 L -> AP = (1 + 1 + 3/4 + 4/5) / 4.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 0.75 + 0.8) / 4)
    # Highest non-lens is 0.7: lenses above it are 0.9 and 0.8.
    assert m["tpr0"] == pytest.approx(2 / 4)
    # Only 4 non-lenses (< 10): every lens is found before the tenth false positive.
    assert m["tpr10"] == 1.0
    assert (m["n"], m["n_pos"]) == (8, 4)


def test_perfect_separation() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([0.0, 0.1, 0.2, 0.9, 1.0])
    m = compute_metrics(labels, probs)
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "tpr0", "tpr10"):
        assert m[key] == 1.0, key
    assert m["confusion_matrix"] == {"tn": 3, "fp": 0, "fn": 0, "tp": 2}


def test_top_scored_object_is_a_non_lens_gives_tpr0_zero() -> None:
    labels = np.array([0, 1, 1, 1, 0, 0])
    probs = np.array([0.99, 0.95, 0.9, 0.8, 0.1, 0.05])
    m = compute_metrics(labels, probs)
    assert m["tpr0"] == 0.0
    assert m["tpr10"] == 1.0
    assert tpr_at_max_fp(labels, probs, 1) == 1.0  # one false positive buys all three lenses


def test_tpr0_counts_a_lens_tied_with_the_top_non_lens_as_missed() -> None:
    # Lens 0.8 ties the highest non-lens 0.8: no threshold keeps it while rejecting that non-lens.
    labels = np.array([1, 1, 0, 1, 0])
    probs = np.array([0.9, 0.8, 0.8, 0.3, 0.2])
    assert tpr_at_max_fp(labels, probs, 0) == pytest.approx(1 / 3)
    # One false positive allowed: the threshold drops to just above the next non-lens (0.2).
    assert tpr_at_max_fp(labels, probs, 1) == 1.0


def test_all_scores_tied_give_tpr0_zero() -> None:
    labels = np.array([0, 1] * 6)
    probs = np.full(12, 0.5)
    m = compute_metrics(labels, probs)
    assert m["tpr0"] == 0.0
    assert m["roc_auc"] == pytest.approx(0.5)


def test_tpr10_with_ties_at_the_tenth_non_lens() -> None:
    # 12 non-lenses: scores 0.99 (x8), then 0.5 (x3: the 9th, 10th, 11th), then 0.01.
    # Lenses: 1.0 (x2), 0.7 (x2), 0.5 (x2, tied with the tenth non-lens), 0.2 (x2).
    neg = [0.99] * 8 + [0.5] * 3 + [0.01]
    pos = [1.0] * 2 + [0.7] * 2 + [0.5] * 2 + [0.2] * 2
    labels = np.array([0] * len(neg) + [1] * len(pos))
    probs = np.array(neg + pos)
    # Fewer than 10 FP: the threshold must sit at or above 0.5 (3 non-lenses at 0.5 would make 11),
    # so only 8 FP are allowed and the lenses strictly above 0.5 count: 1.0 x2 and 0.7 x2.
    assert tpr_at_max_fp(labels, probs, 9) == pytest.approx(4 / 8)
    assert compute_metrics(labels, probs)["tpr10"] == pytest.approx(4 / 8)
    # Zero FP: only the lenses above 0.99.
    assert compute_metrics(labels, probs)["tpr0"] == pytest.approx(2 / 8)
    # 10 FP allowed changes nothing (the three tied non-lenses come as a block of 11)...
    assert tpr_at_max_fp(labels, probs, 10) == pytest.approx(4 / 8)
    # ...11 FP allowed puts the threshold just above 0.01: every lens counts.
    assert tpr_at_max_fp(labels, probs, 11) == 1.0


def test_threshold_is_inclusive_and_zero_division_gives_zero() -> None:
    labels = np.array([0, 1, 0, 1])
    probs = np.array([0.2, 0.5, 0.1, 0.3])
    m = compute_metrics(labels, probs, threshold=0.5)
    assert m["confusion_matrix"] == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}  # 0.5 >= 0.5 is a lens
    m = compute_metrics(labels, probs, threshold=1.0)  # nothing predicted a lens
    assert m["confusion_matrix"] == {"tn": 2, "fp": 0, "fn": 2, "tp": 0}
    assert m["precision"] == m["ppv"] == 0.0
    assert m["f1"] == 0.0
    assert m["npv"] == pytest.approx(0.5)


def test_boolean_labels_and_python_lists_are_accepted() -> None:
    m = compute_metrics([False, True, True, False], [0.1, 0.8, 0.6, 0.4])
    assert m["roc_auc"] == 1.0
    assert m["n_pos"] == 2


# --- degenerate inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "probs", "match"),
    [
        ([1, 1, 1], [0.2, 0.5, 0.9], "single class"),
        ([0, 0, 0], [0.2, 0.5, 0.9], "single class"),
        ([0, 1, 1], [0.2, 0.5], "different lengths"),
        ([], [], "empty"),
        ([0, 1, 2], [0.2, 0.5, 0.9], "0 \\(non-lens\\) or 1 \\(lens\\)"),
        ([0, 1, 1], [0.2, math.nan, 0.9], "NaN"),
        ([0, 1, 1], [0.2, math.inf, 0.9], "NaN/inf"),
        ([0, 1, 1], [-0.1, 0.5, 0.9], "\\[0, 1\\]"),
        ([0, 1, 1], [0.1, 0.5, 1.2], "\\[0, 1\\]"),
        ([[0, 1], [1, 0]], [[0.1, 0.9], [0.8, 0.2]], "1-D"),
        (["no", "yes"], [0.1, 0.9], "numeric"),
    ],
)
def test_degenerate_inputs_raise_value_error(labels: list, probs: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(np.asarray(labels), np.asarray(probs))


def test_bad_threshold_and_budget_raise() -> None:
    labels, probs = np.array([0, 1]), np.array([0.2, 0.8])
    with pytest.raises(ValueError, match="threshold"):
        compute_metrics(labels, probs, threshold=1.5)
    with pytest.raises(ValueError, match="max_false_positives"):
        tpr_at_max_fp(labels, probs, -1)


# --- plots --------------------------------------------------------------------------------------


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def test_plots_write_png_files(scored: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    labels, probs = scored
    m = compute_metrics(labels, probs)
    roc = plot_roc(labels, probs, tmp_path / "plots" / "roc.png", title="test ROC")
    cm = plot_confusion(m, tmp_path / "cm.png")
    hist = plot_score_histogram(labels, probs, tmp_path / "hist.png", threshold=0.5)
    assert (roc, cm, hist) == (tmp_path / "plots" / "roc.png", tmp_path / "cm.png", tmp_path / "hist.png")
    for path in (roc, cm, hist):
        _assert_png(path)


def test_histogram_accepts_a_single_class_but_roc_does_not(tmp_path: Path) -> None:
    labels, probs = np.zeros(5, dtype=int), np.linspace(0, 1, 5)
    _assert_png(plot_score_histogram(labels, probs, tmp_path / "hist.png"))
    with pytest.raises(ValueError, match="single class"):
        plot_roc(labels, probs, tmp_path / "roc.png")


def test_plot_confusion_rejects_metrics_without_a_confusion_matrix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="confusion_matrix"):
        plot_confusion({"accuracy": 1.0}, tmp_path / "cm.png")


def test_importing_metrics_and_plots_loads_neither_matplotlib_nor_ray_nor_mlflow() -> None:
    code = (
        "import sys, lensmill.metrics, lensmill.plots; "
        "print(sorted(m for m in ('matplotlib', 'ray', 'mlflow', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- calibration ---------------------------------------------------------------------------------


def test_ece_by_hand() -> None:
    # Bin [0.8, 0.867) with 4 objects at p = 0.8, one lens: |0.8 - 0.25| = 0.55, weight 4/8.
    # Bin [0.133, 0.2) ... p = 0.15 for 4 objects, none lenses: |0.15 - 0| = 0.15, weight 4/8.
    labels = [1, 0, 0, 0, 0, 0, 0, 0]
    probs = [0.8, 0.8, 0.8, 0.8, 0.15, 0.15, 0.15, 0.15]
    assert expected_calibration_error(labels, probs, 15) == pytest.approx(0.5 * 0.55 + 0.5 * 0.15)
    # Perfectly calibrated bins give 0: p = 0.25 where a quarter are lenses, p = 0.75 where three quarters.
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    probs = [0.25] * 4 + [0.75] * 4
    assert expected_calibration_error(labels, probs, 10) == pytest.approx(0.0, abs=1e-12)
    rows = reliability_table(labels, probs, 10)
    assert len(rows) == 10 and sum(r["n"] for r in rows) == 8
    assert [r["frac_lens"] for r in rows if r["n"]] == [0.25, 0.75]
    # p = 1.0 lands in the last bin, p = 0.0 in the first.
    rows = reliability_table([1, 0], [1.0, 0.0], 4)
    assert rows[-1]["n"] == 1 and rows[0]["n"] == 1


def test_temperature_softens_over_confident_scores_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    true_logit = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    calibrated = 1 / (1 + np.exp(-true_logit))
    over = 1 / (1 + np.exp(-3.0 * true_logit))  # logits 3x too large: over-confident
    under = 1 / (1 + np.exp(-0.4 * true_logit))
    t_over = fit_temperature(labels, over)
    assert t_over > 1.0 and t_over == pytest.approx(3.0, rel=0.15)
    assert fit_temperature(labels, under) < 1.0
    assert fit_temperature(labels, calibrated) == pytest.approx(1.0, abs=0.15)
    fixed = apply_temperature(over, t_over)
    assert expected_calibration_error(labels, fixed) < 0.5 * expected_calibration_error(labels, over)
    # Temperature keeps the ranking (AUC) and the 0.5 point.
    assert skm.roc_auc_score(labels, fixed) == pytest.approx(skm.roc_auc_score(labels, over))
    np.testing.assert_allclose(apply_temperature([0.5, 0.0, 1.0], 2.5), [0.5, 0.0, 1.0])
    np.testing.assert_allclose(apply_temperature(over, 1.0), over)
    # sigmoid(logit(0.9) / 2) by hand.
    assert apply_temperature([0.9], 2.0)[0] == pytest.approx(1 / (1 + math.exp(-math.log(9) / 2)))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature([0.5], 0.0)


# --- bootstrap and completeness ------------------------------------------------------------------


def test_bootstrap_interval_contains_the_point_estimate_and_is_seeded(scored) -> None:
    labels, probs = scored
    boot = bootstrap_intervals(labels, probs, 0.5, n_samples=300, seed=7)
    m = compute_metrics(labels, probs, 0.5)
    assert boot["roc_auc"]["estimate"] == pytest.approx(m["roc_auc"])  # rank AUC = scikit-learn's
    assert boot["accuracy"]["estimate"] == pytest.approx(m["accuracy"])
    for key in ("roc_auc", "accuracy"):
        r = boot[key]
        assert r["low"] < r["estimate"] < r["high"]
        assert r["high"] - r["low"] < 0.2  # 400 objects: a few percent either side
    assert boot == bootstrap_intervals(labels, probs, 0.5, n_samples=300, seed=7)
    assert boot != bootstrap_intervals(labels, probs, 0.5, n_samples=300, seed=8)
    none = bootstrap_intervals(labels, probs, 0.5, n_samples=0)
    assert none["roc_auc"]["low"] is None and none["accuracy"]["estimate"] == m["accuracy"]


def test_bootstrap_tpr_rows_match_the_scalar_definition_and_bracket_the_estimate(scored) -> None:
    """Each row of a (B, N) batch is scored as if alone (the hand-made cases above pin the definition)."""
    from lensmill.metrics import _tpr_at_max_fp_rows

    rng = np.random.default_rng(3)
    # Coarse scores (ties between lenses and non-lenses) and rows with few non-lenses.
    y = (rng.random((200, 30)) < 0.7).astype(np.float64)
    p = np.round(rng.random((200, 30)) * 0.5 + 0.5 * y * rng.random((200, 30)), 1)
    for m in (0, 9):
        rows = _tpr_at_max_fp_rows(y, p, m)
        expected = [tpr_at_max_fp(y[i], p[i], m) if 0 < y[i].sum() < 30 else None for i in range(200)]
        for got, want in zip(rows, expected, strict=True):
            if want is not None:
                assert got == pytest.approx(want)
    labels, probs = scored
    boot = bootstrap_intervals(labels, probs, 0.5, n_samples=300, seed=7)
    m = compute_metrics(labels, probs, 0.5)
    for key in ("tpr0", "tpr10"):
        assert boot[key]["estimate"] == m[key]
        assert boot[key]["low"] <= boot[key]["estimate"] <= boot[key]["high"]
    assert boot["tpr10"]["high"] > boot["tpr10"]["low"]


def test_completeness_table_bins_lenses_by_a_property() -> None:
    labels = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    probs = np.array([0.1, 0.2, 0.9, 0.7, 0.8, 0.95, 0.9, 0.1])
    theta = np.array([0.5, 0.6, 1.0, 1.1, 1.5, 1.6, np.nan, np.nan])  # non-lenses have none
    rows = completeness_table(labels, probs, theta, threshold=0.5, n_bins=3)
    assert [r["n_lenses"] for r in rows] == [2, 2, 2]
    assert [r["completeness"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["lo"] == 0.5 and rows[-1]["hi"] == 1.6
    for r in rows:
        assert 0.0 <= r["ci_low"] <= r["completeness"] <= r["ci_high"] <= 1.0
    assert completeness_table([0, 0], [0.1, 0.9], [np.nan, np.nan]) == []
    # All values equal: one bin.
    one = completeness_table([1, 1], [0.9, 0.1], [2.0, 2.0], n_bins=4)
    assert len(one) == 1 and one[0]["completeness"] == 0.5


def test_evaluation_metrics_are_json_and_hold_every_section(scored) -> None:
    from lensmill.config import EvaluateConfig

    labels, probs = scored
    params = {"theta_e_arcsec": np.where(labels == 1, np.linspace(0.8, 2.0, labels.size), np.nan)}
    settings = EvaluateConfig(bootstrap_samples=50, calibration_bins=10, completeness_bins=4, seed=1)
    m = evaluation_metrics(labels, apply_temperature(probs, 1.5), probs, params, 0.5, 1.5, settings)
    assert set(m) >= EXPECTED_KEYS
    assert m["temperature"] == 1.5 and m["calibration_bins"] == 10 and len(m["reliability"]) == 10
    assert m["roc_auc_ci95"][0] < m["roc_auc"] < m["roc_auc_ci95"][1]
    assert len(m["completeness"]["theta_e_arcsec"]) == 4
    assert m["survey"]["prevalence"] == 1e-3 and len(m["survey"]["top_n"]) == 3
    assert json.loads(json.dumps(m)) == m


def test_new_plots_write_png_files(scored, tmp_path: Path) -> None:
    labels, probs = scored
    paths = [
        plot_pr(labels, probs, tmp_path / "pr.png"),
        plot_reliability(
            labels, {"raw": probs, "T = 2": apply_temperature(probs, 2.0)}, tmp_path / "rel.png"
        ),
        plot_completeness(
            completeness_table(labels, probs, np.linspace(0, 1, labels.size)), tmp_path / "c.png", "x"
        ),
        plot_completeness([], tmp_path / "empty.png", "x"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("n", [4, 10, 19, 44, 167])
def test_wilson_bounds_hold_the_estimate_and_the_plot_draws_when_every_lens_is_found(n, tmp_path) -> None:
    """All found (or none found) in a bin: rounding once put the upper bound a hair below 1 and
    matplotlib refused the negative error bar, which stopped the demo."""
    from lensmill.metrics import _wilson
    from lensmill.plots import plot_completeness

    assert _wilson(n, n)[1] == 1.0 and _wilson(n, n)[0] < 1.0
    assert _wilson(0, n)[0] == 0.0 and _wilson(0, n)[1] > 0.0
    labels = np.ones(2 * n, dtype=int)
    probs = np.r_[np.full(n, 0.9), np.full(n, 0.1)]  # first bin: all found; second: none
    theta = np.r_[np.linspace(0.5, 1.0, n), np.linspace(1.5, 2.0, n)]
    rows = completeness_table(labels, probs, theta, threshold=0.5, n_bins=2)
    assert [r["completeness"] for r in rows] == [1.0, 0.0]
    for r in rows:
        assert r["ci_low"] <= r["completeness"] <= r["ci_high"]
    assert plot_completeness(rows, tmp_path / "c.png", "theta").stat().st_size > 0


def test_results_table_has_each_member_and_the_ensemble_with_intervals() -> None:
    from lensmill.config import EvaluateConfig
    from lensmill.evaluate import results_markdown, results_table

    rng = np.random.default_rng(3)
    labels = (np.arange(400) % 2).astype(np.int64)
    weak = np.clip(0.5 + 0.2 * (labels - 0.5) + rng.normal(0, 0.2, 400), 0, 1)
    strong = np.clip(0.5 + 0.6 * (labels - 0.5) + rng.normal(0, 0.2, 400), 0, 1)
    scored = {"weak": (weak, 0.5), "strong": (strong, 0.5), "ensemble": ((weak + 3 * strong) / 4, 0.6)}
    rows = results_table(labels, scored, EvaluateConfig(bootstrap_samples=200))
    assert [r["name"] for r in rows] == ["weak", "strong", "ensemble"]
    for r, (p, t) in zip(rows, scored.values(), strict=True):
        assert r["threshold"] == t
        assert r["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, p))
        assert r["f1"] == pytest.approx(skm.f1_score(labels, p >= t))
        lo, hi = r["roc_auc_ci95"]
        assert lo <= r["roc_auc"] <= hi and lo < hi
    assert rows[1]["roc_auc_ci95"][0] > rows[0]["roc_auc_ci95"][1]  # strong clearly above weak
    md = results_markdown(rows).splitlines()
    assert md[0].startswith("| model | threshold |") and len(md) == 5
    assert md[4].startswith("| ensemble | 0.600 | ") and "[" in md[4]


def test_purity_at_the_test_sets_own_prevalence_is_its_precision(scored) -> None:
    labels, probs = scored
    table = purity_at_prevalence(labels, probs, float(labels.mean()), threshold=0.5)
    assert table["purity_at_threshold"] == pytest.approx(skm.precision_score(labels, probs >= 0.5))
    assert table["completeness_at_threshold"] == pytest.approx(skm.recall_score(labels, probs >= 0.5))
    # Rarer lenses: the same completeness, a lower purity, and the conservative figure lower still.
    rare = purity_at_prevalence(labels, probs, 1e-3, threshold=0.5)
    assert rare["completeness_at_threshold"] == table["completeness_at_threshold"]
    low, estimate = rare["purity_at_threshold_conservative"], rare["purity_at_threshold"]
    assert low < estimate < table["purity_at_threshold"]
    pur = [r["purity"] for r in rare["curve"]]
    assert all(0 <= r["purity_conservative"] <= r["purity"] <= 1 for r in rare["curve"])
    assert max(pur) > min(pur)


def test_purity_is_limited_by_how_many_non_lenses_vouch_for_it() -> None:
    # Perfect separation: the estimate is pure everywhere, but 1,000 non-lenses bound the FPR only
    # below ~3.7e-3, which at 1 lens in 1,000 allows a purity of ~0.21; 100,000 allow ~0.96.
    for n_neg, conservative in ((1000, 0.0), (100_000, 1.0)):
        labels = np.r_[np.ones(500), np.zeros(n_neg)].astype(int)
        probs = np.r_[np.linspace(0.6, 1.0, 500), np.linspace(0.0, 0.4, n_neg)]
        t = purity_at_prevalence(labels, probs, 1e-3, survey_galaxies=1_000_000, top_n=(100, 10_000))
        assert t["completeness_at_purity"] == {"0.5": 1.0, "0.9": 1.0}
        assert t["completeness_at_purity_conservative"]["0.9"] == conservative
        top100, top10k = t["top_n"]
        # 1,000 lenses in the survey: the top 100 are all lenses; the top 10,000 hold all 1,000.
        assert top100["expected_lenses"] == pytest.approx(100) and top100["expected_false_positives"] == 0
        # ... which the set can vouch for only up to its FPR bound, 1 - 0.025^(1/n_neg) ~ 3.7/n_neg.
        bound = 1 - 0.025 ** (1 / n_neg)
        assert top100["false_positives_conservative"] == pytest.approx(0.999e6 * bound, rel=1e-3)
        assert top10k["expected_lenses"] == pytest.approx(1000, rel=1e-6)
        assert top10k["expected_false_positives"] == pytest.approx(9000, rel=1e-6)
    with pytest.raises(ValueError, match="prevalence"):
        purity_at_prevalence(labels, probs, 0.0)


def test_top_n_false_positives_by_hand() -> None:
    # 2 lenses at 0.9 and 0.7, 4 non-lenses at 0.8, 0.3, 0.2, 0.1; prevalence 0.1, 1,000 galaxies:
    # 100 lenses, 900 non-lenses. Above 0.9: 50 lenses; above 0.8: 50 lenses + 225 non-lenses.
    labels = np.array([1, 1, 0, 0, 0, 0])
    probs = np.array([0.9, 0.7, 0.8, 0.3, 0.2, 0.1])
    t = purity_at_prevalence(labels, probs, 0.1, survey_galaxies=1000, top_n=(50, 100))
    first, second = t["top_n"]
    assert (first["expected_lenses"], first["expected_false_positives"]) == pytest.approx((50, 0))
    # The top 100: halfway (by count) from 50 selected to 275 selected is 50 more, 2/9 of the step.
    assert second["expected_lenses"] == pytest.approx(50)
    assert second["expected_false_positives"] == pytest.approx(50)
    assert t["purity_at_threshold"] == pytest.approx(0.1 * 1.0 / (0.1 * 1.0 + 0.9 * 0.25))


def test_purity_plot_writes_a_png(scored, tmp_path: Path) -> None:
    labels, probs = scored
    path = plot_purity(purity_at_prevalence(labels, probs), tmp_path / "purity.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
