"""The evaluation stage: the registered champion on the test split -> metrics.json,
detailed_predictions.csv, plots, MLflow.

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

    ``scores`` holds ``p_lens`` (calibrated) and, when calibration changed it, ``p_lens_uncalibrated``.
    """
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
    n_bins = int(metrics.get("calibration_bins", 15))
    curves = {"calibrated": p}
    if "p_lens_uncalibrated" in scores:
        curves = {
            "uncalibrated": scores["p_lens_uncalibrated"],
            f"T = {metrics.get('temperature', 1):.2f}": p,
        }
    paths = [
        out_dir / "detailed_predictions.csv",
        out_dir / "metrics.json",
        out_dir / "evaluation_summary.json",
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


def results_table(
    labels: np.ndarray, scored: dict[str, tuple[np.ndarray, float]], settings: EvaluateConfig
) -> list[dict[str, Any]]:
    """One row per scorer (each member alone, then the ensemble): ``scored`` maps a name to its
    probabilities (N,) and decision threshold. Accuracy, precision, recall, F1 at that threshold;
    ROC AUC and TPR10 (threshold-free, the fair comparison) with bootstrap intervals."""
    rows = []
    for name, (p, threshold) in scored.items():
        m = compute_metrics(labels, p, threshold)
        boot = bootstrap_intervals(
            labels, p, threshold, n_samples=settings.bootstrap_samples, seed=settings.seed
        )
        row: dict[str, Any] = {"name": name, "threshold": float(threshold)}
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
    """The numbers worth a metric in MLflow: top-level scalars, the interval bounds and the figures
    at survey prevalence."""
    out = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
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
            columns = {
                c: params.column(c).to_numpy(zero_copy_only=False)
                for c in COMPLETENESS_COLUMNS
                if params is not None and c in params.column_names
            }
            metrics = evaluation_metrics(
                labels, out["p_lens"], out["p_lens_uncalibrated"], columns, predictor.threshold,
                predictor.temperature, cfg.evaluate,
            )  # fmt: skip
            scores = {
                "p_lens": out["p_lens"],
                "p_lens_uncalibrated": out["p_lens_uncalibrated"],
                "predicted_label": out["label"],
                "spread": out["spread"],
            }
            scores |= {f"p_{n}": out["member_probs"][:, j] for j, n in enumerate(predictor.member_names)}
            files_uri = evaluation_uri(cfg)
            headline = ("accuracy", "roc_auc", "tpr0", "tpr10", "ece", "ece_uncalibrated", "temperature")
            summary = {
                "model": model,
                "dataset_uri": dataset_uri,
                "split": "test",
                "n_images": int(len(labels)),
                "members": dict(zip(predictor.member_names, predictor.weights.tolist(), strict=True)),
                "headline": {k: metrics[k] for k in headline},
                "roc_auc_ci95": metrics["roc_auc_ci95"],
                "accuracy_ci95": metrics["accuracy_ci95"],
                "files_uri": files_uri,
                # At the survey's prevalence (evaluate.prevalence), without the curve.
                "survey": {k: v for k, v in metrics["survey"].items() if k != "curve"},
            }
            # Each member alone (its own probability, cut at 0.5) next to the ensemble (calibrated,
            # cut at its operating threshold): the ROC AUC and TPR10 columns compare like with like.
            scored = {n: (out["member_probs"][:, j], 0.5) for j, n in enumerate(predictor.member_names)}
            scored["ensemble"] = (out["p_lens"], predictor.threshold)
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
                lo, hi = metrics["roc_auc_ci95"]
                t_lo, t_hi = metrics["tpr10_ci95"]
                line = (
                    f"{tracking.TEST_LINE_PREFIX}{len(labels)} images of dataset {dataset_id}): "
                    f"ROC AUC {metrics['roc_auc']:.4f} [{_fmt(lo)}, {_fmt(hi)}], "
                    f"TPR10 {metrics['tpr10']:.3f} [{_fmt(t_lo)}, {_fmt(t_hi)}], accuracy "
                    f"{metrics['accuracy']:.3f} at threshold {predictor.threshold:.4f}; "
                    f"evaluation run {run_id}."
                )
                tracking.describe_test_figures(cfg, loaded.name, loaded.version, line)
    return {
        "metrics": metrics,
        "results": table,
        "model": model,
        "files_uri": files_uri,
        "mlflow_run_id": run_id,
    }
