"""Metrics on arrays and plots for binary lens finding, and the evaluation stage.

Everything above ``evaluate`` is pure (no Ray, no MLflow, no config); ``evaluate(cfg)`` is the stage:
the registered champion on the test split -> metrics.json, detailed_predictions.csv, plots, MLflow.

Labels are 1 for a lens, 0 for a non-lens; scores are probabilities p(lens) in [0, 1]. Everything
returned by :func:`compute_metrics` is a plain Python ``int``/``float`` (JSON-serialisable).
matplotlib is imported inside the plotting functions, so importing this module stays cheap; the
plots draw on an explicit Agg canvas and never touch pyplot's global backend or figure state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CLASS_NAMES: tuple[str, str] = ("non-lens", "lens")
CONFUSION_KEYS: tuple[str, ...] = ("tn", "fp", "fn", "tp")


def _check_arrays(
    labels: Any, probs: Any, *, need_both_classes: bool = True
) -> tuple[np.ndarray, np.ndarray]:
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
    y, p = _check_arrays(labels, probs)
    m = int(max_false_positives)
    neg = np.sort(p[y == 0])[::-1]
    pos = p[y == 1]
    if neg.size <= m:
        return 1.0
    return float(np.count_nonzero(pos > neg[m])) / float(pos.size)


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

    y, p = _check_arrays(labels, probs)
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

    y, p = _check_arrays(labels, probs)
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
    y, p = _check_arrays(labels, probs, need_both_classes=False)
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


# -- the evaluation stage ---------------------------------------------------------------------------


def write_report(
    out_dir: Path, labels: np.ndarray, scores: dict[str, np.ndarray], params: Any, metrics: dict[str, Any],
    summary: dict[str, Any],
) -> list[Path]:  # fmt: skip
    """The files users of the seed project expect, plus the plots; returns their paths."""
    import json

    import pyarrow as pa
    import pyarrow.csv as pacsv

    out_dir.mkdir(parents=True, exist_ok=True)
    table = params if params is not None else pa.table({})
    for name, col in [("label", labels), *scores.items()]:
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array(np.asarray(col)))
    pacsv.write_csv(table, out_dir / "detailed_predictions.csv")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "evaluation_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    p = scores["p_lens"]
    return [
        out_dir / "detailed_predictions.csv",
        out_dir / "metrics.json",
        out_dir / "evaluation_summary.json",
        plot_roc(labels, p, out_dir / "roc.png", title=summary.get("model", "")),
        plot_confusion(metrics, out_dir / "confusion_matrix.png"),
        plot_score_histogram(labels, p, out_dir / "score_histogram.png", threshold=metrics["threshold"]),
    ]


def evaluate(cfg: Any) -> dict[str, Any]:
    """Score the ``@champion`` ensemble on the test split of ``cfg``'s dataset; files to storage + MLflow."""
    import tempfile

    from lensmill import tracking
    from lensmill.predict import EnsemblePredictor
    from lensmill.shards import dataset_uri_for, load_split
    from lensmill.storage import join_uri, write_bytes
    from lensmill.train import runs_uri

    with tempfile.TemporaryDirectory() as tmp:
        champ = tracking.download_champion(cfg, Path(tmp) / "model")
        predictor = EnsemblePredictor.load(Path(champ["path"]))
        dataset_uri = dataset_uri_for(cfg)
        images, labels, params = load_split(dataset_uri, "test", cfg.storage)
        out = predictor.predict(images)
        metrics = compute_metrics(labels, out["p_lens"], predictor.threshold)
        model = f"{champ['name']}/{champ['version']}"
        scores = {"p_lens": out["p_lens"], "predicted_label": out["label"], "spread": out["spread"]}
        scores |= {f"p_{n}": out["member_probs"][:, j] for j, n in enumerate(predictor.member_names)}
        files_uri = join_uri(runs_uri(cfg), f"{cfg.name}-evaluate")
        summary = {
            "model": model,
            "dataset_uri": dataset_uri,
            "split": "test",
            "n_images": int(len(labels)),
            "members": dict(zip(predictor.member_names, predictor.weights.tolist(), strict=True)),
            "headline": {k: metrics[k] for k in ("accuracy", "roc_auc", "tpr0", "tpr10")},
            "files_uri": files_uri,
        }
        paths = write_report(Path(tmp) / "evaluation", labels, scores, params, metrics, summary)
        for path in paths:  # to the storage root (local or S3) ...
            write_bytes(join_uri(files_uri, path.name), path.read_bytes(), cfg.storage)
        # ... and to MLflow, with the lineage tags every run carries.
        dataset_id = predictor.info.get("dataset_id")
        run_id = tracking.start_run(cfg, f"{cfg.name}-evaluate", "evaluate", dataset_id, {"model": model})
        tracking.log_metrics(cfg, run_id, {k: v for k, v in metrics.items() if isinstance(v, int | float)})
        tracking.log_artifacts(cfg, run_id, paths, "evaluation")
        tracking.end_run(cfg, run_id)
    return {"metrics": metrics, "model": model, "files_uri": files_uri, "mlflow_run_id": run_id}
