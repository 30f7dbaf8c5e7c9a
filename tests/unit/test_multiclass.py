"""C classes through the stages, and lens finding as their two-class case (no copy of the code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lensmill.catalog import score_columns
from lensmill.config import EnsembleConfig, EvaluateConfig
from lensmill.ensemble import objective_value, search_weights
from lensmill.evaluate import class_evaluation, results_markdown, results_table, write_report
from lensmill.metrics import (
    apply_class_temperature,
    apply_temperature,
    class_bootstrap_intervals,
    class_metrics,
    compute_metrics,
    fit_temperature,
    roc_auc,
)
from lensmill.models import LensClassifier, class_logits, load_classifier, save_classifier
from lensmill.predict import EnsemblePredictor, Member
from lensmill.serve import predictions_of
from lensmill.train import train_step

CLASSES = ("no_sub", "cdm", "vortex")


def _three_class(n: int = 600, signal: float = 1.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) and softmax probabilities (n, 3) whose true class is favoured by ``signal``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(n, 3))
    z[np.arange(n), y] += signal
    return y, np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def test_two_classes_are_one_logit_read_as_zero_and_z() -> None:
    z = torch.tensor([-3.0, 0.0, 0.7, 5.0])
    y = torch.tensor([0, 1, 1, 0])
    logits = class_logits(z)
    assert logits.shape == (4, 2)
    # Cross-entropy of [0, z] is the binary cross-entropy of z; softmax of it is the sigmoid.
    ce = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y.float() * 0.9 + 0.05)
    assert ce.item() == pytest.approx(bce.item(), rel=1e-6)
    torch.testing.assert_close(torch.softmax(logits, 1)[:, 1], torch.sigmoid(z))
    three = torch.randn(4, 3)
    assert class_logits(three) is three


def test_a_classifier_carries_its_classes_through_save_and_load(tmp_path) -> None:
    model = LensClassifier("tiny", 1, [0.0], [1.0], classes=CLASSES)
    x = torch.randn(5, 1, 32, 32)
    assert model.eval()(x).shape == (5, 3)
    save_classifier(model, tmp_path / "m.pt")
    loaded, meta = load_classifier(tmp_path / "m.pt")
    assert loaded.classes == CLASSES and meta["classes"] == list(CLASSES)
    torch.testing.assert_close(loaded(x), model(x))
    binary = LensClassifier("tiny", 1, [0.0], [1.0])
    assert binary.eval()(x).shape == (5,) and binary.classes == ("non-lens", "lens")


def test_training_steps_learn_three_separable_classes() -> None:
    torch.manual_seed(0)
    model = LensClassifier("tiny", 1, [0.0], [1.0], classes=CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    y = torch.arange(48) % 3
    x = torch.randn(48, 1, 16, 16) * 0.3 + (y.float() - 1).view(-1, 1, 1, 1)  # the class in the brightness
    first = train_step(model, opt, x, y, torch.device("cpu"), None)
    for _ in range(30):
        last = train_step(model, opt, x, y, torch.device("cpu"), None)
    assert last < first / 2
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_class_metrics_of_two_classes_are_the_binary_metrics() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + 0.65 * rng.random(400), 0, 1)
    m = class_metrics(y, p, ("non-lens", "lens"))
    binary = compute_metrics(y, p)
    assert m["macro_roc_auc"] == pytest.approx(binary["roc_auc"])
    assert m["per_class"]["lens"]["roc_auc"] == pytest.approx(binary["roc_auc"])
    assert roc_auc(y, p) == pytest.approx(binary["roc_auc"])
    cm = m["confusion_matrix"]  # argmax = p >= 0.5 for two classes
    assert [cm[0][0], cm[0][1], cm[1][0], cm[1][1]] == [
        binary["confusion_matrix"][k] for k in ("tn", "fp", "fn", "tp")
    ]
    assert fit_temperature(y, p) == pytest.approx(fit_temperature(y, np.stack([1 - p, p], 1)))
    np.testing.assert_allclose(
        apply_class_temperature(np.stack([1 - p, p], 1), 2.0)[:, 1], apply_temperature(p, 2.0)
    )


def test_three_class_metrics_and_per_class_intervals() -> None:
    y, p = _three_class()
    m = class_metrics(y, p, CLASSES)
    assert m["macro_roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["per_class"]["cdm"]["roc_auc"] == pytest.approx(roc_auc_score(y == 1, p[:, 1]))
    assert np.asarray(m["confusion_matrix"]).sum() == len(y) and len(m["confusion_matrix"]) == 3
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    boot = class_bootstrap_intervals(y, p, CLASSES, n_samples=300, seed=3)
    for name in CLASSES:
        b = boot["per_class"][name]
        assert b["low"] < b["estimate"] < b["high"]
    assert boot["macro_roc_auc"]["estimate"] == pytest.approx(m["macro_roc_auc"])
    assert boot == class_bootstrap_intervals(y, p, CLASSES, n_samples=300, seed=3)  # seeded
    with pytest.raises(ValueError, match="0..2"):
        class_metrics(np.r_[y[:-1], 5], p, CLASSES)


def test_an_overconfident_three_class_model_gets_a_temperature_above_one() -> None:
    y, p = _three_class(2000, signal=1.0)
    sharp = apply_class_temperature(p, 0.4)  # over-confident: the same ranking, more extreme
    t = fit_temperature(y, sharp)
    assert 2.0 < t < 3.2  # the analytic value is 1 / 0.4 = 2.5
    # Each row's order of classes is kept (the labels); across rows, one class's probability may
    # reorder, so the one-vs-rest AUCs move a little (for two classes they cannot).
    calibrated = apply_class_temperature(sharp, t)
    np.testing.assert_array_equal(calibrated.argmax(1), sharp.argmax(1))
    assert roc_auc(y, calibrated) == pytest.approx(roc_auc(y, sharp), abs=0.02)


def _predictor(seed: int, classes: tuple[str, ...] = CLASSES) -> EnsemblePredictor:
    torch.manual_seed(seed)
    members = [
        Member(f"m{j}", LensClassifier("tiny", 1, [0.0], [1.0], classes=classes), 1.0 + j) for j in range(2)
    ]
    return EnsemblePredictor(members, (1, 16, 16), temperature=1.3)


def test_the_predictor_gives_class_probabilities_and_keeps_them_on_disk(tmp_path) -> None:
    pred = _predictor(0)
    x = np.random.default_rng(0).normal(size=(7, 1, 16, 16)).astype(np.float32)
    out = pred.predict(x)
    assert out["probs"].shape == (7, 3) and out["member_class_probs"].shape == (7, 2, 3)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0)
    np.testing.assert_array_equal(out["label"], out["probs"].argmax(1))
    assert "p_lens" not in out and out["spread"].shape == (7,)
    mean = np.einsum("nmc,m->nc", out["member_class_probs"], pred.weights)
    np.testing.assert_allclose(out["probs_uncalibrated"], mean)
    loaded = EnsemblePredictor.load(pred.save(tmp_path / "ens"))
    assert loaded.classes == CLASSES
    np.testing.assert_allclose(loaded.predict(x)["probs"], out["probs"], atol=1e-12)
    with pytest.raises(ValueError, match="two classes"):
        pred.member_probabilities(x)
    lens = Member("lens", LensClassifier("tiny", 1, [0.0], [1.0]), 1.0)
    with pytest.raises(ValueError, match="share their classes"):
        EnsemblePredictor([pred.members[0], lens], (1, 16, 16))


def test_the_binary_predictor_keeps_its_lens_views() -> None:
    pred = _predictor(1, ("non-lens", "lens"))
    x = np.random.default_rng(1).normal(size=(5, 1, 16, 16)).astype(np.float32)
    out = pred.predict(x)
    np.testing.assert_allclose(out["p_lens"], out["probs"][:, 1])
    np.testing.assert_allclose(out["member_probs"], out["member_class_probs"][:, :, 1])
    np.testing.assert_array_equal(out["label"], (out["p_lens"] >= pred.threshold).astype(int))
    np.testing.assert_allclose(
        out["spread"], EnsemblePredictor.weighted_std(out["member_probs"], pred.weights)
    )


def test_the_weight_search_works_on_three_classes() -> None:
    y, good = _three_class(800, signal=2.0, seed=4)
    noise = _three_class(800, signal=0.0, seed=5)[1]
    probs = np.stack([noise, good], axis=1)  # (N, 2 members, 3 classes)
    out = search_weights(probs, y, EnsembleConfig(weight_trials=16))
    assert out["weights"][1] > 0.7
    assert out["val_objective"] >= out["best_member_val_objective"] - 1e-12
    assert objective_value("log_loss", y, good) > objective_value("log_loss", y, noise)
    with pytest.raises(ValueError, match="tpr10 is for two classes"):
        objective_value("tpr10", y, good)


def test_three_class_answers_of_the_endpoint_and_the_catalog_columns() -> None:
    pred = _predictor(2)
    out = pred.predict(np.zeros((2, 1, 16, 16), np.float32))
    rows = predictions_of(out, pred.member_names, pred.classes)
    assert set(rows[0]) == {"label", "class", "probabilities", "members", "spread"}
    assert rows[0]["class"] == CLASSES[rows[0]["label"]]
    assert set(rows[0]["members"]["m0"]) == set(CLASSES)
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0)
    columns, members = score_columns(CLASSES, ["a", "b"])
    assert columns == ["p_no_sub", "p_cdm", "p_vortex"] and len(members) == 6
    assert score_columns(("non-lens", "lens"), ["a"]) == (["p_lens"], {"p_member_0": "a"})


def test_three_class_evaluation_report(tmp_path) -> None:
    y, p = _three_class(300, seed=6)
    settings = EvaluateConfig(bootstrap_samples=100)
    m = class_evaluation(y, p, CLASSES, settings)
    assert m["macro_roc_auc_ci95"][0] < m["macro_roc_auc"] < m["macro_roc_auc_ci95"][1]
    paths = write_report(tmp_path, y, {"probs": p, "predicted_label": p.argmax(1)}, None, m, {})
    names = {q.name for q in paths}
    assert {"roc_per_class.png", "confusion_matrix.png", "detailed_predictions.csv"} <= names
    header = (tmp_path / "detailed_predictions.csv").read_text().splitlines()[0]
    assert all(f'"p_{c}"' in header for c in CLASSES)
    rows = results_table(y, {"ensemble": (p, 0.5)}, settings)
    assert rows[0]["macro_roc_auc"] == pytest.approx(m["macro_roc_auc"])
    assert "macro ROC AUC" in results_markdown(rows)
