"""Plots of evaluation results as PNG files: ROC, precision-recall, confusion matrix, score
histogram, reliability diagram, completeness; for C classes one-vs-rest ROC curves and the C x C
confusion matrix.

matplotlib is imported inside the functions, so importing this module stays cheap; every figure is
drawn on an explicit Agg canvas and never touches pyplot's global backend or figure state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lensmill.metrics import (
    CLASS_NAMES,
    CONFUSION_KEYS,
    as_class_probs,
    check_arrays,
    check_class_arrays,
    expected_calibration_error,
    reliability_table,
    tpr_at_max_fp,
)


def _new_figure(width_in: float, height_in: float) -> Any:
    """A matplotlib Figure drawn by the Agg backend, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: Path, title: str = "") -> Path:
    """Plot the ROC curve (with AUC, TPR0 and TPR10 in the legend) to a PNG file; return its path."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = check_arrays(labels, probs)
    fpr, tpr, _ = roc_curve(y, p)
    auc = roc_auc_score(y, p)
    tpr0, tpr10 = tpr_at_max_fp(y, p, 0), tpr_at_max_fp(y, p, 9)

    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    ax.plot([], [], ls="none", label=f"TPR0 = {tpr0:.3f}, TPR10 = {tpr10:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (non-lenses flagged)")
    ax.set_ylabel("True positive rate (lenses found)")
    ax.set_title(title or f"ROC curve (n = {y.size}, lenses = {int(y.sum())})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def plot_roc_per_class(
    labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] | list[str], path: Path, title: str = ""
) -> Path:
    """One-vs-rest ROC curve of each class of (N, C) probabilities (AUC in the legend), the macro
    and micro AUC in the title, to a PNG."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = check_class_arrays(labels, as_class_probs(probs))
    onehot = np.eye(p.shape[1], dtype=np.int64)[y]  # (N, C)
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    aucs = []
    for c, name in enumerate(classes):
        if onehot[:, c].min() == onehot[:, c].max():
            continue  # a class absent from (or alone in) the set has no ROC curve
        fpr, tpr, _ = roc_curve(onehot[:, c], p[:, c])
        aucs.append(roc_auc_score(onehot[:, c], p[:, c]))
        ax.plot(fpr, tpr, lw=2, label=f"{name} vs rest (AUC = {aucs[-1]:.3f}, n = {int(onehot[:, c].sum())})")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    micro = roc_auc_score(onehot.ravel(), p.ravel()) if len(aucs) == p.shape[1] else float("nan")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_title(title or f"One-vs-rest ROC: macro AUC {np.mean(aucs):.3f}, micro {micro:.3f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_class_confusion(matrix: list[list[int]], classes: tuple[str, ...] | list[str], path: Path) -> Path:
    """A C x C confusion matrix (rows: true class, columns: predicted; counts and row %) to a PNG."""
    grid = np.asarray(matrix, dtype=np.int64)
    row_sums = grid.sum(axis=1, keepdims=True)
    frac = np.divide(grid, row_sums, out=np.zeros(grid.shape, dtype=np.float64), where=row_sums > 0)
    k = len(classes)
    fig = _new_figure(1.2 * k + 2.4, 1.1 * k + 1.8)
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, f"{grid[i, j]}\n({100 * frac[i, j]:.1f}%)", ha="center", va="center", color=colour)
    ax.set_xticks(range(k), labels=list(classes))
    ax.set_yticks(range(k), labels=list(classes))
    ax.set(xlabel="predicted class (most probable)", ylabel="true class")
    ax.set_title("Confusion matrix")
    fig.colorbar(image, ax=ax, label="fraction of true class")
    return _save(fig, path)


def plot_confusion(metrics: dict[str, Any], path: Path) -> Path:
    """Plot the confusion matrix from :func:`compute_metrics` output (counts and row %) to a PNG."""
    cm = metrics.get("confusion_matrix")
    if not isinstance(cm, dict) or any(k not in cm for k in CONFUSION_KEYS):
        raise ValueError(f"metrics['confusion_matrix'] must be a dict with keys {CONFUSION_KEYS}, got {cm!r}")
    grid = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]], dtype=np.int64)
    row_sums = grid.sum(axis=1, keepdims=True)
    frac = np.divide(grid, row_sums, out=np.zeros(grid.shape, dtype=np.float64), where=row_sums > 0)

    fig = _new_figure(4.6, 4.0)
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, f"{grid[i, j]}\n({100 * frac[i, j]:.1f}%)", ha="center", va="center", color=colour)
    ax.set_xticks([0, 1], labels=[f"predicted {c}" for c in CLASS_NAMES])
    ax.set_yticks([0, 1], labels=[f"true {c}" for c in CLASS_NAMES], rotation=90, va="center")
    threshold = metrics.get("threshold")
    ax.set_title("Confusion matrix" + (f" (threshold {threshold:g})" if threshold is not None else ""))
    fig.colorbar(image, ax=ax, label="fraction of true class")
    return _save(fig, path)


def plot_score_histogram(
    labels: np.ndarray, probs: np.ndarray, path: Path, threshold: float | None = None, title: str = ""
) -> Path:
    """Plot histograms of p(lens) for lenses and non-lenses (log counts) to a PNG; return its path."""
    y, p = check_arrays(labels, probs, need_both_classes=False)
    bins = np.linspace(0.0, 1.0, 41)

    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for cls, colour in ((0, "tab:blue"), (1, "tab:orange")):
        scores = p[y == cls]
        if scores.size:
            label = f"{('non-lenses', 'lenses')[cls]} (n = {scores.size})"
            ax.hist(scores, bins=bins, histtype="step", lw=2, color=colour, label=label)
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    # Headroom above the tallest bin (log axis) so the legend never hides the histograms.
    ax.set_ylim(0.8, max(ax.get_ylim()[1], 1.0) * 6.0)
    ax.set(xlim=(0, 1), xlabel="Predicted p(lens)", ylabel="Number of objects")
    ax.set_title(title or "Score distribution by true class")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", ncols=3, fontsize=9)
    return _save(fig, path)


def plot_pr(labels: np.ndarray, probs: np.ndarray, path: Path, title: str = "") -> Path:
    """Plot the precision-recall curve (average precision in the legend) to a PNG; return its path."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, p = check_arrays(labels, probs)
    precision, recall, _ = precision_recall_curve(y, p)
    ap = average_precision_score(y, p)

    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", lw=2, label=f"PR (AP = {ap:.3f})")
    ax.axhline(y.mean(), ls="--", lw=1, color="grey", label=f"chance (lens fraction {y.mean():.2f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (lenses found)", ylabel="Precision (purity)")
    ax.set_title(title or f"Precision-recall (n = {y.size}, lenses = {int(y.sum())})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    return _save(fig, path)


def plot_reliability(labels: np.ndarray, curves: dict[str, np.ndarray], path: Path, n_bins: int = 15) -> Path:
    """Reliability diagram: lens fraction against mean p(lens) per bin, one line per named set of
    scores (e.g. before and after temperature scaling, ECE in the legend), with the bin counts."""
    fig = _new_figure(5.0, 6.0)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="perfect calibration")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    for name, probs in curves.items():
        y, p = check_arrays(labels, probs, need_both_classes=False)
        rows = [r for r in reliability_table(y, p, n_bins) if r["n"]]
        ece = expected_calibration_error(y, p, n_bins)
        ax.plot(
            [r["mean_p"] for r in rows], [r["frac_lens"] for r in rows], marker="o", lw=1.5,
            label=f"{name} (ECE = {ece:.3f})",
        )  # fmt: skip
        ax_n.hist(p, bins=edges, histtype="step", lw=1.5, label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="Fraction of lenses")
    ax.set_title("Reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax_n.set_yscale("log")
    ax_n.set(xlabel="Predicted p(lens)", ylabel="Objects")
    ax_n.grid(alpha=0.3)
    return _save(fig, path)


def plot_completeness(
    table: list[dict[str, Any]], path: Path, xlabel: str, title: str = "", threshold: float | None = None
) -> Path:
    """Completeness per bin (Wilson 95% error bars, bin widths as horizontal bars) to a PNG."""
    fig = _new_figure(5.5, 4.0)
    ax = fig.add_subplot()
    if table:
        lo = np.array([r["lo"] for r in table])
        hi = np.array([r["hi"] for r in table])
        c = np.array([r["completeness"] for r in table])
        err = np.clip(
            np.array(
                [
                    [r["completeness"] - r["ci_low"] for r in table],
                    [r["ci_high"] - r["completeness"] for r in table],
                ]
            ),
            0.0,
            None,
        )  # (2, bins); never below 0 from rounding
        mid = (lo + hi) / 2
        ax.errorbar(mid, c, yerr=err, xerr=(hi - lo) / 2, fmt="o", capsize=3, lw=1.5)
        for x, r in zip(mid, table, strict=True):
            ax.annotate(str(r["n_lenses"]), (x, 0.03), ha="center", fontsize=8, color="grey")
    else:
        ax.text(0.5, 0.5, "no lenses with this property", ha="center", va="center", transform=ax.transAxes)
    ax.set(ylim=(0, 1.05), xlabel=xlabel, ylabel="Completeness (lenses found)")
    at = f" at p ≥ {threshold:g}" if threshold is not None else ""
    ax.set_title(title or f"Completeness{at} (grey: lenses per bin)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_purity(table: dict[str, Any], path: Path, title: str = "") -> Path:
    """Purity against completeness at a survey's prevalence (``metrics.purity_at_prevalence``), with
    the conservative curve the test set's count of non-lenses can vouch for, to a PNG."""
    fig = _new_figure(5.5, 4.2)
    ax = fig.add_subplot()
    curve = table["curve"]
    c = [r["completeness"] for r in curve]
    ax.plot(c, [r["purity"] for r in curve], lw=2, label="estimate")
    ax.plot(c, [r["purity_conservative"] for r in curve], lw=1.5, ls="--",
            label=f"conservative (FPR 97.5% bound, {table['n_negatives']} non-lenses)")  # fmt: skip
    for q in (0.5, 0.9):
        ax.axhline(q, color="grey", lw=0.8, ls=":")
    ax.plot([table["completeness_at_threshold"]], [table["purity_at_threshold"]], "o", color="C3",
            label=f"operating threshold {table['threshold']:.3g}")  # fmt: skip
    one_in = round(1 / table["prevalence"])
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="Completeness (lenses found)", ylabel="Purity")
    ax.set_title(title or f"Purity at a prevalence of 1 lens in {one_in:,} galaxies")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_parallel_coordinates(rows: list[dict[str, Any]], params: list[str], metric: str, path: Path) -> Path:
    """A sweep as parallel coordinates: one line per trial through its settings (``params``, each
    axis scaled to its own range; names and switches as categories, learning rates and weight decays
    in log) to ``metric``, coloured by ``metric``. Trials without the metric are grey and dashed."""
    from matplotlib import colormaps

    axes = [*params, metric]
    columns: list[tuple[np.ndarray, list[tuple[float, str]]]] = []  # per axis: positions, tick labels
    names = []
    for name in axes:
        raw = [r.get(name) for r in rows]
        given = [v for v in raw if v is not None]
        if given and all(isinstance(v, int | float) and not isinstance(v, bool) for v in given):
            vals = np.array([np.nan if v is None else float(v) for v in raw])
            lo_v, hi_v = float(np.nanmin(vals)), float(np.nanmax(vals))
            log = name in ("lr", "weight_decay") and lo_v > 0 and hi_v > 3 * lo_v
            x = np.log10(vals) if log else vals
            lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
            pos = (x - lo) / (hi - lo) if hi > lo else np.where(np.isnan(x), np.nan, 0.5)
            ticks = [(0.0, f"{lo_v:.3g}"), (1.0, f"{hi_v:.3g}")] if hi > lo else [(0.5, f"{lo_v:.3g}")]
            names.append(f"{name} (log)" if log else name)
        else:
            cats = sorted({str(v) for v in given})
            spot = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
            pos = np.array([np.nan if v is None else spot[str(v)] for v in raw])
            ticks = [(y, c) for c, y in spot.items()]
            names.append(name)
        columns.append((pos, ticks))

    fig = _new_figure(1.9 * len(axes) + 1.5, 4.5)
    ax = fig.add_subplot()
    scores = np.array([np.nan if r.get(metric) is None else r[metric] for r in rows], dtype=float)
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cmap = colormaps["viridis"]
    xs = np.arange(len(axes))
    # Best trials drawn last, on top.
    for i in np.argsort(np.nan_to_num(scores, nan=-np.inf)):
        ys = np.array([c[0][i] for c in columns])
        if np.isfinite(scores[i]):
            colour = cmap((scores[i] - lo) / (hi - lo) if hi > lo else 1.0)
            ax.plot(xs, ys, "-o", color=colour, lw=1.6, ms=3, alpha=0.85)
        else:
            ax.plot(xs, ys, "--", color="grey", lw=1, alpha=0.6)
    for x, (_, ticks) in zip(xs, columns, strict=True):
        ax.axvline(x, color="black", lw=0.8)
        for y, label in ticks[:12]:
            ax.annotate(label, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(xs, names, fontsize=9)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.2, len(axes) - 0.5)
    ax.set_title(f"Sweep: {len(rows)} trials, coloured by {metric} ({lo:.3f} to {hi:.3f})", fontsize=10)
    return _save(fig, path)


def plot_regression(series: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> Path:
    """Predicted against true values, one panel per target (``{name: (true (N,), predicted (N,))}``),
    with the identity line and the RMSE, to a PNG."""
    fig = _new_figure(4.2 * len(series), 4.2)
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (name, (truth, pred)) in zip(axes, series.items(), strict=True):
        rmse = float(np.sqrt(np.mean((pred - truth) ** 2)))
        ax.scatter(truth, pred, s=4, alpha=0.4)
        lo, hi = float(min(truth.min(), pred.min())), float(max(truth.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1)
        ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}")
        ax.set_title(f"{name}: RMSE {rmse:.4g} (n = {truth.size})", fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
