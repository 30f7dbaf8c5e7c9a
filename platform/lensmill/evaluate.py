"""The evaluation stage: the registered champion on the test split -> metrics.json,
detailed_predictions.csv, plots, MLflow.

Every task gets the C-class figures (``class_evaluation``: macro and micro ROC AUC, one-vs-rest AUC
per class with bootstrap intervals, the C x C confusion matrix); lens finding, the two-class case,
also gets its own (TPR0/TPR10, calibration, completeness, purity at survey prevalence).

The numbers come from ``lensmill.metrics`` and the pictures from ``lensmill.plots``; this module
only puts them together for one dataset and one model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from lensmill import plots, tracking
from lensmill.config import Config, EvaluateConfig
from lensmill.layout import evaluation_uri, stage_run_name
from lensmill.metrics import (
    TPR_FP,
    bootstrap_intervals,
    class_bootstrap_intervals,
    class_metrics,
    completeness_table,
    compute_metrics,
    expected_calibration_error,
    purity_at_prevalence,
    reliability_table,
)
from lensmill.shards import dataset_uri_for, load_split
from lensmill.storage import join_uri, write_bytes

# Lens properties that completeness is reported against: column -> axis label.
COMPLETENESS_COLUMNS: dict[str, str] = {
    "theta_e_arcsec": "Einstein radius θ_E [arcsec]",
    "arc_snr": "arc signal-to-noise",
}


def write_report(
    out_dir: Path, labels: np.ndarray, scores: dict[str, np.ndarray], params: Any, metrics: dict[str, Any],
    summary: dict[str, Any],
) -> list[Path]:  # fmt: skip
    """detailed_predictions.csv (scores + physical parameters), metrics.json, evaluation_summary.json
    and the plots: ROC, PR, confusion, score histogram, reliability, completeness; returns their paths.

    ``scores`` holds ``p_lens`` (calibrated) and, when calibration changed it, ``p_lens_uncalibrated``;
    for more than two classes (``metrics["classes"]`` names them) ``probs`` (N, C) instead, written
    as one ``p_<class>`` column each, and the plots are the one-vs-rest ROC and the confusion matrix.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = metrics.get("classes", [])
    if len(classes) > 2:
        scores = dict(scores)
        probs = scores.pop("probs")
        scores = {f"p_{name}": probs[:, c] for c, name in enumerate(classes)} | scores
    table = params if params is not None else pa.table({"label": np.asarray(labels)})
    # A CSV holds scalars: list columns (a substructure row's subhalos) stay in the shards.
    table = table.drop_columns([f.name for f in table.schema if pa.types.is_nested(f.type)])
    for name, col in [("label", labels), *scores.items()]:
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array(np.asarray(col)))
    pacsv.write_csv(table, out_dir / "detailed_predictions.csv")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "evaluation_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    files = [out_dir / n for n in ("detailed_predictions.csv", "metrics.json", "evaluation_summary.json")]
    if len(classes) > 2:
        return files + [
            plots.plot_roc_per_class(labels, probs, classes, out_dir / "roc_per_class.png"),
            plots.plot_class_confusion(
                metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png"
            ),
        ]
    p = scores["p_lens"]
    n_bins = int(metrics.get("calibration_bins", 15))
    curves = {"calibrated": p}
    if "p_lens_uncalibrated" in scores:
        curves = {
            "uncalibrated": scores["p_lens_uncalibrated"],
            f"T = {metrics.get('temperature', 1):.2f}": p,
        }
    paths = [
        *files,
        plots.plot_roc(labels, p, out_dir / "roc.png", title=summary.get("model", "")),
        plots.plot_pr(labels, p, out_dir / "pr_curve.png"),
        plots.plot_confusion(metrics, out_dir / "confusion_matrix.png"),
        plots.plot_score_histogram(
            labels, p, out_dir / "score_histogram.png", threshold=metrics["threshold"]
        ),
        plots.plot_reliability(labels, curves, out_dir / "reliability.png", n_bins),
    ]
    if "survey" in metrics:
        paths.append(plots.plot_purity(metrics["survey"], out_dir / "purity_at_prevalence.png"))
    for column, table_rows in metrics.get("completeness", {}).items():
        xlabel = COMPLETENESS_COLUMNS.get(column, column)
        path = out_dir / f"completeness_{column}.png"
        paths.append(plots.plot_completeness(table_rows, path, xlabel, threshold=metrics["threshold"]))
    return paths


def evaluation_metrics(
    labels: np.ndarray,
    p_lens: np.ndarray,
    p_uncalibrated: np.ndarray,
    params: dict[str, np.ndarray],
    threshold: float,
    temperature: float,
    settings: EvaluateConfig,
) -> dict[str, Any]:
    """Everything metrics.json holds: ``compute_metrics`` of the calibrated scores, plus calibration
    (ECE before/after, the reliability table), bootstrap intervals and completeness tables.

    ``params`` maps a lens property (``COMPLETENESS_COLUMNS``) to its (N,) values; ``settings`` is an
    ``EvaluateConfig`` (bootstrap_samples, calibration_bins, completeness_bins, seed).
    """
    bins = settings.calibration_bins
    metrics = compute_metrics(labels, p_lens, threshold)
    boot = bootstrap_intervals(
        labels, p_lens, threshold, n_samples=settings.bootstrap_samples, seed=settings.seed
    )
    metrics |= {
        "temperature": float(temperature),
        "ece": expected_calibration_error(labels, p_lens, bins),
        "ece_uncalibrated": expected_calibration_error(labels, p_uncalibrated, bins),
        "calibration_bins": int(bins),
        "reliability": reliability_table(labels, p_lens, bins),
        "bootstrap": boot,
        "roc_auc_ci95": [boot["roc_auc"]["low"], boot["roc_auc"]["high"]],
        "accuracy_ci95": [boot["accuracy"]["low"], boot["accuracy"]["high"]],
        "tpr0_ci95": [boot["tpr0"]["low"], boot["tpr0"]["high"]],
        "tpr10_ci95": [boot["tpr10"]["low"], boot["tpr10"]["high"]],
        "completeness": {
            column: completeness_table(labels, p_lens, values, threshold, settings.completeness_bins)
            for column, values in params.items()
        },
        "survey": purity_at_prevalence(
            labels,
            p_lens,
            settings.prevalence,
            survey_galaxies=settings.survey_galaxies,
            top_n=settings.top_n,
            threshold=threshold,
        ),  # fmt: skip
    }
    return metrics


def class_evaluation(
    labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], settings: EvaluateConfig
) -> dict[str, Any]:
    """The C-class figures of (N, C) probabilities (``metrics.class_metrics``), each class's
    one-vs-rest ROC AUC, the macro AUC and the accuracy with their bootstrap intervals."""
    m = class_metrics(labels, probs, classes)
    boot = class_bootstrap_intervals(
        labels, probs, classes, n_samples=settings.bootstrap_samples, seed=settings.seed
    )
    for name, row in m["per_class"].items():
        row["roc_auc_ci95"] = [boot["per_class"][name]["low"], boot["per_class"][name]["high"]]
    for key in ("macro_roc_auc", "accuracy"):
        m[f"{key}_ci95"] = [boot[key]["low"], boot[key]["high"]]
    m["bootstrap"] = {k: boot[k] for k in ("n_samples", "level", "seed")}
    return m


def results_table(
    labels: np.ndarray, scored: dict[str, tuple[np.ndarray, float]], settings: EvaluateConfig
) -> list[dict[str, Any]]:
    """One row per scorer (each member alone, then the ensemble): ``scored`` maps a name to its
    probabilities ((N,) p(lens), or (N, C)) and decision threshold.

    Two classes: accuracy, precision, recall, F1 at that threshold; ROC AUC and TPR10
    (threshold-free, the fair comparison) with bootstrap intervals. More: accuracy (most probable
    class), macro and micro ROC AUC and the log loss, with intervals for accuracy and macro AUC.
    """
    rows = []
    for name, (p, threshold) in scored.items():
        row: dict[str, Any] = {"name": name}
        if p.ndim == 2 and p.shape[1] > 2:
            classes = tuple(str(c) for c in range(p.shape[1]))
            m = class_evaluation(labels, p, classes, settings)
            row |= {k: m[k] for k in ("accuracy", "macro_roc_auc", "micro_roc_auc", "log_loss")}
            row |= {k: m[k] for k in ("accuracy_ci95", "macro_roc_auc_ci95")}
            rows.append(row)
            continue
        m = compute_metrics(labels, p, threshold)
        boot = bootstrap_intervals(
            labels, p, threshold, n_samples=settings.bootstrap_samples, seed=settings.seed
        )
        row["threshold"] = float(threshold)
        row |= {k: m[k] for k in ("accuracy", "precision", "recall", "f1")}
        for k in ("roc_auc", "tpr10", "accuracy"):
            row[f"{k}_ci95"] = [boot[k]["low"], boot[k]["high"]]
        row |= {"roc_auc": m["roc_auc"], "tpr10": m["tpr10"]}
        rows.append(row)
    return rows


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The results table as Markdown (intervals in brackets when bootstrapped)."""

    def cell(row: dict[str, Any], key: str) -> str:
        ci = row.get(f"{key}_ci95")
        text = f"{row[key]:.3f}"
        return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else text

    if rows and "macro_roc_auc" in rows[0]:
        keys: tuple[str, ...] = ("accuracy", "macro_roc_auc", "micro_roc_auc", "log_loss")
        lines = ["| model | accuracy | macro ROC AUC | micro ROC AUC | log loss |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | " + " | ".join(cell(r, k) for k in keys) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    keys = ("accuracy", "precision", "recall", "f1", "roc_auc", "tpr10")
    lines = [
        "| model | threshold | accuracy | precision | recall | F1 | ROC AUC | TPR10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['threshold']:.3f} | " + " | ".join(cell(r, k) for k in keys) + " |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def _mlflow_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a metric in MLflow: top-level scalars, the interval bounds, each class's
    one-vs-rest AUC and, for lens finding, the figures at survey prevalence."""
    out = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for key, value in metrics.items():
        if key.endswith("_ci95") and isinstance(value, list) and len(value) == 2:
            for bound, v in zip(("low", "high"), value, strict=True):
                if v is not None:
                    out[f"{key}_{bound}"] = v
    per_class = metrics.get("per_class") or metrics.get("class_metrics", {}).get("per_class", {})
    for name, row in per_class.items():
        out[f"roc_auc_{name}"] = row["roc_auc"]
    if "survey" not in metrics:
        return out
    survey = metrics["survey"]
    conservative = survey["completeness_at_purity_conservative"]
    for q, value in survey["completeness_at_purity"].items():
        out[f"survey_completeness_at_purity_{q}"] = value
        out[f"survey_completeness_at_purity_{q}_conservative"] = conservative[q]
    out["survey_purity_at_threshold"] = survey["purity_at_threshold"]
    for row in survey["top_n"]:
        out[f"survey_false_positives_top{row['top_n']}"] = row["expected_false_positives"]
    for name in ("roc_auc", "accuracy", *TPR_FP):
        for bound in ("low", "high"):
            value = metrics["bootstrap"][name][bound]
            if value is not None:
                out[f"{name}_ci95_{bound}"] = value
    return out


def _fmt(bound: float | None) -> str:
    return "n/a" if bound is None else f"{bound:.4f}"


def _test_line(metrics: dict[str, Any], n: int, dataset_id: str | None, run_id: str) -> str:
    """The test figures a registered version's description shows."""
    head = f"{tracking.TEST_LINE_PREFIX}{n} images of dataset {dataset_id}): "
    if "tpr10" in metrics:
        lo, hi = metrics["roc_auc_ci95"]
        t_lo, t_hi = metrics["tpr10_ci95"]
        figures = (
            f"ROC AUC {metrics['roc_auc']:.4f} [{_fmt(lo)}, {_fmt(hi)}], "
            f"TPR10 {metrics['tpr10']:.3f} [{_fmt(t_lo)}, {_fmt(t_hi)}], accuracy "
            f"{metrics['accuracy']:.3f} at threshold {metrics['threshold']:.4f}"
        )
    else:
        lo, hi = metrics["macro_roc_auc_ci95"]
        figures = (
            f"macro ROC AUC {metrics['macro_roc_auc']:.4f} [{_fmt(lo)}, {_fmt(hi)}], "
            f"accuracy {metrics['accuracy']:.3f} over {', '.join(metrics['classes'])}"
        )
    return f"{head}{figures}; evaluation run {run_id}."


def evaluate(cfg: Config) -> dict[str, Any]:
    """Score the ``@champion`` ensemble on the test split of ``cfg``'s dataset; files to storage + MLflow.

    ``p_lens`` is the ensemble's calibrated probability (the temperature fitted on validation by the
    ensemble stage); ECE is reported before and after that calibration, on test data it never saw.
    """
    with tempfile.TemporaryDirectory() as tmp:
        loaded = tracking.load_ensemble(cfg, Path(tmp) / "model")
        predictor, model = loaded.predictor, loaded.ref
        # The run carries the lineage tags every run carries (dataset_id, config hash, git sha) and
        # ends FAILED if scoring or reporting fails.
        dataset_id = predictor.info.get("dataset_id")
        with tracking.run(
            cfg, stage_run_name(cfg, "evaluate"), "evaluate", dataset_id, {"model": model}
        ) as run_id:
            dataset_uri = dataset_uri_for(cfg)
            images, labels, params = load_split(dataset_uri, "test", cfg.storage)
            out = predictor.predict(images)
            classes = predictor.classes
            general = class_evaluation(labels, out["probs"], classes, cfg.evaluate)
            members = predictor.member_names
            if predictor.binary:
                columns = {
                    c: params.column(c).to_numpy(zero_copy_only=False)
                    for c in COMPLETENESS_COLUMNS
                    if params is not None and c in params.column_names
                }
                metrics = evaluation_metrics(
                    labels, out["p_lens"], out["p_lens_uncalibrated"], columns, predictor.threshold,
                    predictor.temperature, cfg.evaluate,
                )  # fmt: skip
                metrics["class_metrics"] = general
                scores = {
                    "p_lens": out["p_lens"],
                    "p_lens_uncalibrated": out["p_lens_uncalibrated"],
                    "predicted_label": out["label"],
                    "spread": out["spread"],
                }
                scores |= {f"p_{n}": out["member_probs"][:, j] for j, n in enumerate(members)}
                headline: tuple[str, ...] = (
                    "accuracy", "roc_auc", "tpr0", "tpr10", "ece", "ece_uncalibrated", "temperature",
                )  # fmt: skip
                main_ci = "roc_auc_ci95"
            else:
                metrics = general | {
                    "temperature": predictor.temperature,
                    "log_loss_uncalibrated": class_metrics(labels, out["probs_uncalibrated"], classes)[
                        "log_loss"
                    ],
                }
                scores = {"probs": out["probs"], "predicted_label": out["label"], "spread": out["spread"]}
                scores |= {
                    f"p_{n}_{c}": out["member_class_probs"][:, j, k]
                    for j, n in enumerate(members)
                    for k, c in enumerate(classes)
                }
                headline = ("accuracy", "macro_roc_auc", "micro_roc_auc", "log_loss", "temperature")
                main_ci = "macro_roc_auc_ci95"
            files_uri = evaluation_uri(cfg)
            summary = {
                "model": model,
                "dataset_uri": dataset_uri,
                "split": "test",
                "n_images": int(len(labels)),
                "members": dict(zip(predictor.member_names, predictor.weights.tolist(), strict=True)),
                "classes": list(classes),
                "headline": {k: metrics[k] for k in headline},
                main_ci: metrics[main_ci],
                "accuracy_ci95": metrics["accuracy_ci95"],
                "files_uri": files_uri,
            }
            if predictor.binary:  # at the survey's prevalence (evaluate.prevalence), without the curve
                summary["survey"] = {k: v for k, v in metrics["survey"].items() if k != "curve"}
            # Each member alone (its own probability, cut at 0.5) next to the ensemble (calibrated,
            # cut at its operating threshold): the ROC AUC and TPR10 columns compare like with like.
            view = "member_probs" if predictor.binary else "member_class_probs"
            scored = {n: (out[view][:, j], 0.5) for j, n in enumerate(members)}
            scored["ensemble"] = (out["p_lens"] if predictor.binary else out["probs"], predictor.threshold)
            table = results_table(labels, scored, cfg.evaluate)
            summary["results"] = table
            paths = write_report(Path(tmp) / "evaluation", labels, scores, params, metrics, summary)
            report_dir = Path(tmp) / "evaluation"
            (report_dir / "ensemble_metrics.json").write_text(json.dumps(table, indent=2))
            (report_dir / "ensemble_metrics.md").write_text(results_markdown(table))
            paths += [report_dir / "ensemble_metrics.json", report_dir / "ensemble_metrics.md"]
            for path in paths:  # to the storage root (local or S3) ...
                write_bytes(join_uri(files_uri, path.name), path.read_bytes(), cfg.storage)
            # ... and to MLflow.
            tracking.log_metrics(cfg, run_id, _mlflow_scalars(metrics))
            tracking.log_artifacts(cfg, run_id, paths, "evaluation")
            if loaded.source == "mlflow":
                tracking.describe_test_figures(
                    cfg, loaded.name, loaded.version, _test_line(metrics, len(labels), dataset_id, run_id)
                )
    return {
        "metrics": metrics,
        "results": table,
        "model": model,
        "files_uri": files_uri,
        "mlflow_run_id": run_id,
    }
