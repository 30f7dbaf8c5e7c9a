"""Metrics on arrays for lens finding (binary) and C-class tasks: pure numpy/scikit-learn, no Ray,
MLflow or config.

Classification metrics (including TPR0/TPR10 of the Bologna lens-finding challenge), calibration
(expected calibration error, reliability table, temperature scaling ``sigmoid(logit(p) / T)``),
bootstrap confidence intervals, and completeness (the fraction of lenses found) against a physical
parameter such as the Einstein radius or the arc signal-to-noise.

Binary: labels are 1 for a lens, 0 for a non-lens; scores are probabilities p(lens) in [0, 1]. C
classes (``class_metrics``, ``class_bootstrap_intervals``, ``roc_auc``, the temperature): labels in
0..C-1 and (N, C) probabilities, of which two classes with (N,) p(lens) is the case above. Everything
returned is plain Python ``int``/``float`` (JSON-serialisable).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLASS_NAMES: tuple[str, str] = ("non-lens", "lens")
CONFUSION_KEYS: tuple[str, ...] = ("tn", "fp", "fn", "tp")


def check_arrays(labels: Any, probs: Any, *, need_both_classes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return (int labels, float probs) as 1-D arrays, or raise ValueError naming the problem."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"labels and probs must be 1-D arrays, got shapes {y.shape} and {p.shape}")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"labels and probs have different lengths: {y.shape[0]} != {p.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("labels and probs are empty")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"labels must be numeric 0/1, got dtype {y.dtype}")
    bad_labels = sorted({float(v) for v in np.unique(y)} - {0.0, 1.0})
    if bad_labels:
        raise ValueError(f"labels must be 0 (non-lens) or 1 (lens); found {bad_labels[:5]}")
    y = y.astype(np.int64)
    n_nan = int(np.count_nonzero(~np.isfinite(p)))
    if n_nan:
        raise ValueError(f"probs contain {n_nan} NaN/inf value(s)")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"probs must lie in [0, 1]; found min {p.min():.6g}, max {p.max():.6g}")
    if need_both_classes and np.unique(y).size < 2:
        only = CLASS_NAMES[int(y[0])]
        raise ValueError(
            f"labels contain a single class (all {int(y[0])} = {only}): ROC AUC, PR AUC and TPR0/TPR10 "
            "are undefined; evaluate on a set with both lenses and non-lenses"
        )
    return y, p


def check_class_arrays(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(int labels (N,), float probs (N, C)) for C classes, or raise ValueError naming the problem:
    labels must be integers in 0..C-1 and each row of probs a distribution over the C classes."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 2:
        raise ValueError(f"labels must be (N,) and probs (N, C), got shapes {y.shape} and {p.shape}")
    if y.shape[0] != p.shape[0] or y.shape[0] == 0:
        raise ValueError(
            f"labels and probs must be non-empty and of one length: {y.shape[0]} != {p.shape[0]}"
        )
    if p.shape[1] < 2:
        raise ValueError(f"probs need at least 2 classes (columns), got {p.shape[1]}")
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    bad = sorted(set(np.unique(y).tolist()) - set(range(p.shape[1])))
    if bad:
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1} (one per probs column); found {bad[:5]}")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probs must be finite and lie in [0, 1]")
    return y, p


def as_class_probs(probs: Any) -> np.ndarray:
    """(N, C) class probabilities; (N,) binary p(lens) becomes [1 - p, p] (the two-class case)."""
    p = np.asarray(probs, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1) if p.ndim == 1 else p


def roc_auc(labels: Any, probs: Any) -> float:
    """ROC AUC of (N,) p(lens) or (N, C) class probabilities: for two classes the AUC of the second
    (the lens), for more the macro average of the one-vs-rest AUCs; NaN when a class is missing."""
    from sklearn.metrics import roc_auc_score

    y, p = check_class_arrays(labels, as_class_probs(probs))
    if np.unique(y).size < p.shape[1]:
        return float("nan")
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(p.shape[1]))))


def class_metrics(labels: Any, probs: Any, classes: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Metrics of C-class probabilities (N, C) (two classes: the lens-finding case, (N,) p(lens)
    accepted), with the prediction the most probable class:

    - ``accuracy``, ``log_loss``; ``macro_roc_auc`` (mean of the one-vs-rest AUCs) and
      ``micro_roc_auc`` (all one-vs-rest decisions pooled);
    - ``per_class``: for each class its one-vs-rest ``roc_auc``, ``precision``, ``recall``, ``f1``
      and ``support``;
    - ``confusion_matrix``: C x C counts, rows the true class, columns the predicted one;
    - ``classes``, ``n``.
    """
    from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support, roc_auc_score

    y, p = check_class_arrays(labels, as_class_probs(probs))
    n_cls = p.shape[1]
    if len(classes) != n_cls:
        raise ValueError(f"{len(classes)} class names for {n_cls} probability columns")
    present = np.unique(y).size == n_cls
    onehot = np.eye(n_cls, dtype=np.int64)[y]  # (N, C)
    pred = p.argmax(axis=1)
    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=list(range(n_cls)), zero_division=0
    )
    per_class = {
        name: {
            "roc_auc": float(roc_auc_score(onehot[:, c], p[:, c])) if present else float("nan"),
            "precision": float(prec[c]),
            "recall": float(rec[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c, name in enumerate(classes)
    }
    return {
        "classes": list(classes),
        "n": int(y.size),
        "accuracy": float(np.mean(pred == y)),
        "log_loss": float(log_loss(y, np.clip(p, 1e-7, 1.0), labels=list(range(n_cls)))),
        "macro_roc_auc": float(np.mean([v["roc_auc"] for v in per_class.values()])),
        "micro_roc_auc": float(roc_auc_score(onehot.ravel(), p.ravel())) if present else float("nan"),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(n_cls))).tolist(),
    }


def class_bootstrap_intervals(
    labels: Any, probs: Any, classes: tuple[str, ...] | list[str], n_samples: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:  # fmt: skip
    """Percentile bootstrap intervals of each class's one-vs-rest ROC AUC, the macro AUC and the
    accuracy (most probable class), resampling objects with replacement; seeded.

    Returns ``{"per_class": {name: {"estimate", "low", "high"}}, "macro_roc_auc": {...},
    "accuracy": {...}, "n_samples", "level", "seed"}``; resamples missing a class are left out of
    the AUC intervals. ``n_samples = 0`` gives the estimates with ``None`` bounds.
    """
    y, p = check_class_arrays(labels, as_class_probs(probs))
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n_cls, n = p.shape[1], y.size
    onehot = np.eye(n_cls)[y]  # (N, C)
    correct = (p.argmax(axis=1) == y).astype(np.float64)

    def aucs(idx: np.ndarray) -> np.ndarray:
        # (B, N) resample indices -> (B, C) one-vs-rest AUCs
        return np.stack([_auc_from_ranks(onehot[idx, c], p[idx, c]) for c in range(n_cls)], axis=1)

    full = aucs(np.arange(n)[None])[0]  # (C,)

    def estimate(value: float) -> dict[str, float | None]:
        return {"estimate": float(value), "low": None, "high": None}

    out: dict[str, Any] = {
        "per_class": {name: estimate(full[c]) for c, name in enumerate(classes)},
        "macro_roc_auc": estimate(np.mean(full)),
        "accuracy": estimate(correct.mean()),
        "n_samples": int(n_samples),
        "level": float(level),
        "seed": int(seed),
    }
    if n_samples <= 0:
        return out
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // (n * n_cls))  # resamples per step: bounded (chunk, N) matrices
    per_class, accuracy = [], []
    for start in range(0, int(n_samples), chunk):
        idx = rng.integers(0, n, size=(min(chunk, int(n_samples) - start), n))  # (B, N)
        per_class.append(aucs(idx))
        accuracy.append(correct[idx].mean(axis=1))
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    samples = np.concatenate(per_class)  # (n_samples, C)

    def bounds(values: np.ndarray) -> dict[str, float | None]:
        values = values[np.isfinite(values)]
        if not values.size:
            return {"low": None, "high": None}
        lo, hi = np.percentile(values, q)
        return {"low": float(lo), "high": float(hi)}

    for c, name in enumerate(classes):
        out["per_class"][name].update(bounds(samples[:, c]))
    out["macro_roc_auc"].update(bounds(samples.mean(axis=1)))
    out["accuracy"].update(bounds(np.concatenate(accuracy)))
    return out


def _ratio(num: int, den: int) -> float:
    """num / den as a float, 0.0 when den is 0 (scikit-learn's ``zero_division=0`` convention)."""
    return float(num) / float(den) if den else 0.0


def tpr_at_max_fp(labels: Any, probs: Any, max_false_positives: int) -> float:
    """Highest true-positive rate reached with at most ``max_false_positives`` false positives.

    Objects are called lenses when their score is *strictly above* a threshold. Sort the non-lens
    scores from highest down, s_1 >= s_2 >= ...; with at most m false positives the lowest usable
    threshold sits at s_{m+1}, so the result is the fraction of lenses scored strictly above s_{m+1}
    (1.0 when there are no more than m non-lenses). Ties are counted against the finder: a lens
    tied with s_{m+1} is not counted, since no threshold separates it from that non-lens.
    ``max_false_positives=0`` gives TPR0, ``9`` gives TPR10 (see :func:`compute_metrics`).
    """
    if int(max_false_positives) != max_false_positives or max_false_positives < 0:
        raise ValueError(f"max_false_positives must be a non-negative integer, got {max_false_positives!r}")
    y, p = check_arrays(labels, probs)
    return float(_tpr_at_max_fp_rows(y[None], p[None], int(max_false_positives))[0])


def compute_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Classification metrics for lens (1) / non-lens (0) labels and scores p(lens).

    An object is predicted a lens when ``prob >= threshold``. Keys (plain Python numbers):

    - ``accuracy``, ``precision``, ``recall``, ``f1``: scikit-learn at ``threshold``
      (``zero_division=0``: 0.0 when undefined, e.g. precision with no predicted lenses).
    - ``roc_auc``: area under the ROC curve; ``pr_auc``: average precision (scikit-learn's
      ``average_precision_score``, the step-wise area under the precision-recall curve).
    - ``confusion_matrix``: ``{"tn", "fp", "fn", "tp"}`` counts at ``threshold``.
    - ``sensitivity`` = tp/(tp+fn) (= recall), ``specificity`` = tn/(tn+fp),
      ``ppv`` = tp/(tp+fp) (= precision), ``npv`` = tn/(tn+fn); 0.0 when the denominator is 0.
    - ``tpr0`` and ``tpr10``: the Bologna lens-finding challenge metrics (Metcalf et al. 2019,
      A&A 625, A119), threshold-free. TPR0 is the highest true-positive rate reached at a threshold
      that lets through zero false positives: the fraction of lenses scored strictly above the
      highest-scored non-lens. TPR10 is the same with fewer than ten (at most nine) false positives:
      the fraction of lenses scored strictly above the tenth-highest non-lens score (1.0 when there
      are fewer than ten non-lenses). A lens tied with that non-lens does not count: no threshold
      separates the two. So if the top-scored object is a non-lens, TPR0 = 0.
    - ``n``, ``n_pos`` (lenses), ``threshold``.

    Raises ValueError when lengths differ, arrays are empty or not 1-D, labels are not 0/1 or hold
    a single class (AUC undefined), probs are NaN/inf or outside [0, 1], or threshold is not in [0, 1].
    """
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y, p = check_arrays(labels, probs)
    threshold = float(threshold)
    if not np.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tpr0": tpr_at_max_fp(y, p, 0),
        "tpr10": tpr_at_max_fp(y, p, 9),
        "n": int(y.size),
        "n_pos": int(np.count_nonzero(y == 1)),
        "threshold": threshold,
    }


# -- calibration ------------------------------------------------------------------------------------

# Probabilities are clipped this far from 0 and 1 before taking logits when fitting a temperature.
_LOGIT_EPS = 1e-7


def apply_temperature(probs: Any, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` elementwise on binary probabilities p(lens), float64: the two-class
    case of ``apply_class_temperature``. T = 1 returns them unchanged.

    Order-preserving, and p = 0.5 stays 0.5. p = 0 and 1 stay 0 and 1 (infinite logits).
    """
    p = np.asarray(probs, dtype=np.float64)
    t = _temperature(temperature)
    if t == 1.0:
        return p.copy()
    with np.errstate(divide="ignore", over="ignore"):
        z = (np.log(p) - np.log1p(-p)) / t
        return 1.0 / (1.0 + np.exp(-z))


def apply_class_temperature(probs: Any, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` over the classes of (N, C) probabilities, float64; for C = 2 the
    second column is ``apply_temperature`` of it. T = 1 returns them unchanged; each row keeps the
    order of its classes."""
    p = np.asarray(probs, dtype=np.float64)
    t = _temperature(temperature)
    if t == 1.0:
        return p.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log(p) / t  # (N, C); -inf where p = 0
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _temperature(temperature: float) -> float:
    t = float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _class_log_probs(probs: np.ndarray) -> np.ndarray:
    """(N, C) log-probabilities, clipped off 0; (N,) binary p(lens) becomes [log(1 - p), log(p)]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    return np.log(np.clip(p, _LOGIT_EPS, 1.0))


def fit_temperature(labels: Any, probs: Any, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the log loss of temperature-scaled probabilities (``apply_temperature``
    of (N,) binary p(lens), ``apply_class_temperature`` of (N, C)) on (labels, probs):
    probs (N,) binary p(lens) with 0/1 labels, or (N, C) with labels in 0..C-1.

    T > 1 when the scores are over-confident, T < 1 when under-confident. A one-parameter fit on the
    validation split: for two classes it changes no ranking, so it cannot overfit the ordering the
    weights chose; for more it keeps each row's most probable class (the label), while one class's
    probability may reorder across rows a little.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    p = np.asarray(probs, dtype=np.float64)
    y = (
        check_arrays(labels, p, need_both_classes=False)[0]
        if p.ndim == 1
        else check_class_arrays(labels, p)[0]
    )
    z = _class_log_probs(p)  # (N, C)
    picked = z[np.arange(len(y)), y]

    def nll(log_t: float) -> float:
        inv_t = np.exp(-log_t)
        return float(np.mean(logsumexp(z * inv_t, axis=1) - picked * inv_t))

    res = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
    return float(np.exp(res.x))


def reliability_table(labels: Any, probs: Any, n_bins: int = 15) -> list[dict[str, Any]]:
    """Equal-width bins of p(lens) on [0, 1]: per bin its edges, count, mean p and lens fraction.

    Empty bins are listed with ``n = 0`` and ``None`` means (JSON has no NaN). Bins are half-open
    ``[lo, hi)`` except the last, which includes p = 1.
    """
    y, p = check_arrays(labels, probs, need_both_classes=False)
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, int(n_bins) - 1)
    rows: list[dict[str, float | int]] = []
    for b in range(int(n_bins)):
        mask = idx == b
        n = int(np.count_nonzero(mask))
        rows.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": n,
                "mean_p": float(p[mask].mean()) if n else None,
                "frac_lens": float(y[mask].mean()) if n else None,
            }
        )
    return rows


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = 15) -> float:
    """ECE of p(lens): sum over equal-width bins of (bin count / N) x |mean p - fraction of lenses|.

    0 for perfectly calibrated scores; a classifier saying 0.9 for objects that are lenses 60% of the
    time contributes 0.3 x its share of the objects.
    """
    y, p = check_arrays(labels, probs, need_both_classes=False)
    table = reliability_table(y, p, n_bins)
    return float(sum(r["n"] / y.size * abs(r["mean_p"] - r["frac_lens"]) for r in table if r["n"]))


# -- uncertainty and completeness -------------------------------------------------------------------


# Bologna challenge metrics: TPR with at most this many false positives (TPR0, TPR10).
TPR_FP: dict[str, int] = {"tpr0": 0, "tpr10": 9}


def _auc_from_ranks(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC AUC per row of (B, N) label/score matrices (Mann-Whitney U with mid-ranks for ties);
    NaN for rows holding a single class."""
    from scipy.stats import rankdata

    ranks = rankdata(p, axis=1)  # mid-ranks: ties count one half, as in roc_auc_score
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    u = (ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _tpr_at_max_fp_rows(y: np.ndarray, p: np.ndarray, m: int) -> np.ndarray:
    """``tpr_at_max_fp`` per row of (B, N) label/score matrices (the bootstrap scores thousands of
    resamples at once); NaN for rows without lenses."""
    neg = np.where(y == 0, p, -np.inf)  # (B, N): lenses pushed below every non-lens score
    n_neg = (y == 0).sum(axis=1)
    n_pos = (y == 1).sum(axis=1)
    # The (m+1)-th highest non-lens score per row: the lowest threshold with at most m false positives.
    kth = -np.partition(-neg, m, axis=1)[:, m] if neg.shape[1] > m else np.full(len(y), -np.inf)
    above = ((y == 1) & (p > kth[:, None])).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(n_pos > 0, above / n_pos, np.nan)
    return np.where(n_neg <= m, np.where(n_pos > 0, 1.0, np.nan), tpr)


def bootstrap_intervals(
    labels: Any, probs: Any, threshold: float = 0.5, n_samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Percentile bootstrap intervals for ROC AUC, accuracy, TPR0 and TPR10 (resampling objects
    with replacement).

    Returns ``{"roc_auc": {"estimate", "low", "high"}, "accuracy": {...}, "tpr0": {...},
    "tpr10": {...}, "n_samples", "level", "seed"}``. Resamples holding a single class are left out
    of the AUC and TPR intervals. Seeded: the same inputs give the same interval. ``n_samples = 0``
    gives the estimates with ``None`` bounds.
    """
    y, p = check_arrays(labels, probs)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    pred = (p >= threshold).astype(np.float64)
    correct = (pred == y).astype(np.float64)
    auc_hat = float(_auc_from_ranks(y[None].astype(np.float64), p[None])[0])
    out: dict[str, Any] = {
        "roc_auc": {"estimate": auc_hat, "low": None, "high": None},
        "accuracy": {"estimate": float(correct.mean()), "low": None, "high": None},
        **{
            name: {"estimate": tpr_at_max_fp(y, p, m), "low": None, "high": None}
            for name, m in TPR_FP.items()
        },
        "n_samples": int(n_samples),
        "level": float(level),
        "seed": int(seed),
    }
    if n_samples <= 0:
        return out
    rng = np.random.default_rng(seed)
    n = y.size
    chunk = max(1, 2_000_000 // n)  # resamples per step: bounded (chunk, N) matrices
    samples: dict[str, list[np.ndarray]] = {name: [] for name in ("roc_auc", "accuracy", *TPR_FP)}
    for start in range(0, int(n_samples), chunk):
        idx = rng.integers(0, n, size=(min(chunk, int(n_samples) - start), n))  # (B, N)
        yb, pb = y[idx].astype(np.float64), p[idx]
        samples["roc_auc"].append(_auc_from_ranks(yb, pb))
        samples["accuracy"].append(correct[idx].mean(axis=1))
        for name, m in TPR_FP.items():
            samples[name].append(_tpr_at_max_fp_rows(yb, pb, m))
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    for name, parts in samples.items():
        values = np.concatenate(parts)
        values = values[np.isfinite(values)]  # resamples holding a single class
        if values.size:
            lo, hi = np.percentile(values, q)
            out[name].update(low=float(lo), high=float(hi))
    return out


def _wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial fraction k / n (sensible at 0 and n)."""
    if n == 0:
        return 0.0, 1.0
    f = k / n
    centre = (f + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(f * (1 - f) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At k = 0 or k = n a bound equals f exactly in theory; rounding must not leave f outside.
    return float(max(0.0, min(f, centre - half))), float(min(1.0, max(f, centre + half)))


def completeness_table(
    labels: Any, probs: Any, values: Any, threshold: float = 0.5, n_bins: int = 6
) -> list[dict[str, float | int]]:
    """Completeness (fraction of lenses with p >= threshold) in bins of a lens property (N,).

    Only lenses with a finite value count. Bin edges are quantiles of those values (equal numbers
    of lenses per bin, so no bin is starved at the tails); fewer bins when values repeat. Each row:
    ``lo``, ``hi``, ``n_lenses``, ``n_found``, ``completeness`` and its Wilson 95% interval.
    """
    y, p = check_arrays(labels, probs, need_both_classes=False)
    v = np.asarray(values, dtype=np.float64)
    if v.shape != y.shape:
        raise ValueError(f"values must have the labels' shape {y.shape}, got {v.shape}")
    keep = (y == 1) & np.isfinite(v)
    v, found = v[keep], p[keep] >= threshold
    if v.size == 0:
        return []
    edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, int(n_bins) + 1)))
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, edges.size - 2)
    rows: list[dict[str, float | int]] = []
    for b in range(edges.size - 1):
        mask = idx == b
        n, k = int(np.count_nonzero(mask)), int(np.count_nonzero(found[mask]))
        lo, hi = _wilson(k, n)
        rows.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n_lenses": n,
                "n_found": k,
                "completeness": _ratio(k, n),
                "ci_low": lo,
                "ci_high": hi,
            }
        )
    return rows


def purity_at_prevalence(
    labels: Any,
    probs: Any,
    prevalence: float = 1e-3,
    *,
    survey_galaxies: int = 1_000_000,
    top_n: tuple[int, ...] = (100, 1000, 10000),
    purity_targets: tuple[float, ...] = (0.5, 0.9),
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Purity against completeness on a labelled set re-weighted to a survey's ``prevalence``.

    A test split holds lenses and non-lenses in some mix (often half and half); a survey holds about
    one lens in ``1 / prevalence`` galaxies. The true- and false-positive rates do not depend on the
    mix, so at each score threshold ``purity = pi TPR / (pi TPR + (1 - pi) FPR)`` with ``pi`` the
    survey's prevalence. The FPR of a finite set of non-lenses is resolved only to ``1 / N_neg``: the
    conservative purity uses the upper end of the FPR's 95% Clopper-Pearson interval (a threshold
    with no false positive in the set still has an FPR below ~3.7 / N_neg), and every figure comes in
    both versions.

    Returned: the curve (completeness, purity, conservative purity, threshold; at most ~200 points),
    the completeness at each purity target, the purity at ``threshold``, and for the top N of a
    survey of ``survey_galaxies`` galaxies ranked by score, the expected lenses and false positives
    (and the false positives at the FPR's bound).
    """
    from scipy.stats import beta
    from sklearn.metrics import roc_curve

    if not 0 < prevalence < 1:
        raise ValueError(f"prevalence must lie in (0, 1), got {prevalence}")
    y, p = check_arrays(labels, probs)
    n_neg = int(np.count_nonzero(y == 0))
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    fp = np.rint(fpr * n_neg)
    # One-sided 97.5% upper bound of the FPR from the false-positive count (1.0 at fp = n_neg).
    fpr_high = np.where(fp < n_neg, beta.ppf(0.975, fp + 1, np.maximum(n_neg - fp, 1)), 1.0)
    pi = float(prevalence)

    def purity(rate: np.ndarray) -> np.ndarray:
        num = pi * tpr
        den = num + (1 - pi) * rate
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    pur, pur_low = purity(fpr), purity(fpr_high)
    keep = tpr > 0  # the first ROC point selects nothing: no purity
    c, pur, pur_low, t = tpr[keep], pur[keep], pur_low[keep], thr[keep]
    fpr_k, fpr_high_k = fpr[keep], fpr_high[keep]

    def completeness_at(target: float, curve: np.ndarray) -> float:
        ok = curve >= target
        return float(c[ok].max()) if ok.any() else 0.0

    # Expected selections in the survey along the ROC points (non-decreasing), then the top N by
    # interpolating between points (randomising between two thresholds reaches any point between).
    s = float(survey_galaxies)
    selected = s * (pi * c + (1 - pi) * fpr_k)
    # From the origin (nothing selected) along the ROC points.
    sel = np.r_[0.0, selected]
    lenses, falses = np.r_[0.0, pi * s * c], np.r_[0.0, (1 - pi) * s * fpr_k]
    falses_high = np.r_[0.0, (1 - pi) * s * fpr_high_k]
    rows = []
    for n in top_n:
        lens, false = float(np.interp(n, sel, lenses)), float(np.interp(n, sel, falses))
        rows.append(
            {
                "top_n": int(n),
                "threshold": float(t[min(int(np.searchsorted(selected, n)), t.size - 1)]),
                "expected_lenses": lens,
                "expected_false_positives": false,
                # At the same thresholds, with the FPR's 97.5% bound: what the test set rules out.
                "false_positives_conservative": float(np.interp(n, sel, falses_high)),
                "purity": lens / (lens + false) if lens + false > 0 else 0.0,
            }
        )
    at = p >= threshold
    tpr_t = float(np.mean(at[y == 1]))
    fp_t = int(np.count_nonzero(at[y == 0]))
    fpr_t = fp_t / n_neg
    fpr_t_high = float(beta.ppf(0.975, fp_t + 1, max(n_neg - fp_t, 1))) if fp_t < n_neg else 1.0

    def point_purity(rate: float) -> float:
        return pi * tpr_t / (pi * tpr_t + (1 - pi) * rate) if tpr_t > 0 else 0.0

    step = max(1, c.size // 200)
    idx = np.unique(np.r_[np.arange(0, c.size, step), c.size - 1])
    return {
        "prevalence": pi,
        "test_prevalence": float(np.mean(y)),
        "n_negatives": n_neg,
        "survey_galaxies": int(survey_galaxies),
        "completeness_at_purity": {f"{q:g}": completeness_at(q, pur) for q in purity_targets},
        "completeness_at_purity_conservative": {
            f"{q:g}": completeness_at(q, pur_low) for q in purity_targets
        },
        "threshold": float(threshold),
        "completeness_at_threshold": tpr_t,
        "purity_at_threshold": point_purity(fpr_t),
        "purity_at_threshold_conservative": point_purity(fpr_t_high),
        "expected_false_positives_per_million_at_threshold": 1e6 * (1 - pi) * fpr_t,
        "top_n": rows,
        "curve": [
            {
                "threshold": float(t[i]),
                "completeness": float(c[i]),
                "purity": float(pur[i]),
                "purity_conservative": float(pur_low[i]),
            }
            for i in idx
        ],  # fmt: skip
    }
