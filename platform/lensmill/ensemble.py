"""Ensemble: pick members among the trials with checkpoints, search their weights on validation, register.

Member probabilities on the validation split are computed once; Ray Tune then searches the weights
on those arrays (``search_weights``: Ray Tune's Optuna search algorithm, TPE over one raw weight
per member, normalised onto the simplex, and with ``ensemble.member_temperatures`` a temperature
per member), maximising ``ensemble.objective``; equal weights
and each member alone are evaluated first, so the result never trails them on validation. A
temperature for the weighted probability is then fitted on the same arrays
(``metrics.fit_temperature``), and the decision threshold is chosen on the calibrated validation
probabilities (``choose_threshold``, ``ensemble.operating_point``). Both go into ``ensemble.json``,
so that serving, scoring and evaluation report calibrated probabilities and labels at that
threshold. The result is registered in MLflow; it becomes ``@champion`` only when it beats the
current champion on the same validation data by the same objective (or when told to: ``promote``),
otherwise ``@challenger``; the decision and both figures are logged.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import log_loss, roc_curve

from lensmill import tracking
from lensmill.config import Config, EnsembleConfig, OperatingPoint
from lensmill.errors import TrackingError
from lensmill.layout import ensemble_result_uri, stage_run_name
from lensmill.members import (
    MemberSource,
    named_sources,
    trial_sources,
    validation_dataset,
    validation_probabilities,
)
from lensmill.metrics import (
    apply_class_temperature,
    apply_temperature,
    as_class_probs,
    expected_calibration_error,
    fit_temperature,
    roc_auc,
    tpr_at_max_fp,
)
from lensmill.predict import EnsemblePredictor, Member
from lensmill.records import TrialResult
from lensmill.shards import load_split, read_manifest
from lensmill.storage import write_json
from lensmill.tune import load_tune_results

log = logging.getLogger(__name__)
CHALLENGER_ALIAS = "challenger"


def select_members(
    trials: Sequence[TrialResult], max_members: int, min_val_auc: float = 0.0
) -> list[TrialResult]:
    """Best usable trial of each architecture first (diversity), then the next best overall; a trial
    below ``min_val_auc`` on validation (one that learnt nothing, such as an architecture ASHA
    stopped at chance) is no member."""
    ranked = sorted((t for t in trials if t.usable), key=lambda t: -t.val_auc)
    usable = [t for t in ranked if t.val_auc >= min_val_auc]
    if ranked and not usable:
        # Nothing reaches the bar (a smoke run on a handful of images): the best trial alone.
        log.warning(
            "no trial reaches val AUC %.3g: the best (%.3g) is the only member",
            min_val_auc,
            ranked[0].val_auc,
        )
        return ranked[:1]
    firsts: dict[str, TrialResult] = {}
    for t in usable:
        firsts.setdefault(t.model, t)
    rest = [t for t in usable if t not in firsts.values()]
    return (list(firsts.values()) + rest)[:max_members]


def combine(member_probs: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of member probabilities, (N, M) p(lens) -> (N,) or (N, M, C) -> (N, C); weights
    (M,) need not sum to 1."""
    return EnsemblePredictor.combine(member_probs, np.asarray(weights, np.float64))


def objective_value(objective: str, labels: np.ndarray, p: np.ndarray) -> float:
    """The ensemble's validation objective, larger is better (log loss enters negated), of (N,)
    p(lens) or (N, C) class probabilities: ROC AUC is the macro one-vs-rest AUC for more than two
    classes; TPR10 is a lens-finding figure (two classes only)."""
    if objective == "roc_auc":
        return roc_auc(labels, p)
    if objective == "tpr10":
        probs = as_class_probs(p)
        if probs.shape[1] != 2:
            raise ValueError(
                f"ensemble.objective tpr10 is for two classes (lens finding); this task has "
                f"{probs.shape[1]}: use roc_auc or log_loss"
            )
        return tpr_at_max_fp(labels, probs[:, 1], 10)
    return -_log_loss(labels, p)


def _log_loss(labels: np.ndarray, p: np.ndarray) -> float:
    probs = as_class_probs(p)
    return float(log_loss(labels, np.clip(probs, 1e-7, 1.0), labels=list(range(probs.shape[1]))))


MEMBER_TEMPERATURE_RANGE = (0.25, 4.0)


def _weights_of(config: dict[str, Any], m: int) -> list[float]:
    return [float(config[f"w{j}"]) for j in range(m)]


def _temperatures_of(config: dict[str, Any], m: int) -> list[float]:
    return [float(config.get(f"t{j}", 1.0)) for j in range(m)]


def apply_member_temperatures(member_probs: np.ndarray, temperatures: Sequence[float]) -> np.ndarray:
    """Each member's probabilities, (N, M) p(lens) or (N, M, C), at its own temperature (M,)."""
    scale = apply_temperature if member_probs.ndim == 2 else apply_class_temperature
    return np.stack([scale(member_probs[:, j], t) for j, t in enumerate(temperatures)], axis=1)


def _score_weights(
    member_probs: np.ndarray,
    labels: np.ndarray,
    weights: list[float],
    objective: str,
    temperatures: list[float] | None = None,
) -> dict[str, float]:
    """One weight vector's objective, and its log loss (the tie-break)."""
    if sum(weights) <= 0:  # all zero: no ensemble; the worst score rather than an error
        return {"objective": -np.inf, "log_loss": np.inf}
    if temperatures is not None:
        member_probs = apply_member_temperatures(member_probs, temperatures)
    p = combine(member_probs, weights)
    return {"objective": objective_value(objective, labels, p), "log_loss": _log_loss(labels, p)}


def search_weights(member_probs: np.ndarray, labels: np.ndarray, settings: EnsembleConfig) -> dict[str, Any]:
    """Search the weights of members' validation probabilities (N, M) p(lens) or (N, M, C) with Ray
    Tune's Optuna search
    algorithm (TPE): the best weights (M,, summing to 1), their objective, and the objectives of
    equal weights and of each member alone on the same data.

    The searcher is driven directly (``suggest`` / ``on_trial_complete``), in this process: one
    evaluation is milliseconds of numpy on arrays already in memory, where a Tune trial would start
    a Ray worker for each (seconds). One suggestion at a time, so the result follows from
    ``settings.seed`` alone.
    """
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    m = member_probs.shape[1]
    space = {f"w{j}": tune.uniform(0.0, 1.0) for j in range(m)}
    temps = settings.member_temperatures
    if temps:
        space |= {f"t{j}": tune.loguniform(*MEMBER_TEMPERATURE_RANGE) for j in range(m)}
    # Equal weights, then each member alone, are evaluated first (members as trained: T = 1).
    starts = [[1.0] * m] + [[1.0 if i == j else 0.0 for i in range(m)] for j in range(m)]
    searcher = OptunaSearch(
        space=space,
        metric="objective",
        mode="max",
        seed=settings.seed,
        points_to_evaluate=[
            {f"w{j}": w[j] for j in range(m)} | ({f"t{j}": 1.0 for j in range(m)} if temps else {})
            for w in starts
        ],
    )
    rows = []
    for i in range(max(settings.weight_trials, len(starts))):
        trial_id = f"weights-{i}"
        config = searcher.suggest(trial_id)
        weights, temperatures = _weights_of(config, m), _temperatures_of(config, m)
        result = _score_weights(member_probs, labels, weights, settings.objective, temperatures)
        usable = bool(np.isfinite(result["objective"]))
        searcher.on_trial_complete(trial_id, result if usable else None, error=not usable)
        if usable:
            rows.append((result["objective"], -result["log_loss"], weights, temperatures))
    if not rows:
        raise RuntimeError("the ensemble's weight search produced no usable result")
    best_objective, _, best, best_temperatures = max(rows, key=lambda r: (r[0], r[1]))
    singles = [objective_value(settings.objective, labels, member_probs[:, j]) for j in range(m)]
    return {
        "weights": np.asarray(best) / sum(best),
        "temperatures": best_temperatures,
        "val_objective": float(best_objective),
        "equal_weights_val_objective": objective_value(settings.objective, labels, member_probs.mean(axis=1)),
        "best_member_val_objective": max(singles),
        "member_val_objectives": singles,
        "trials": len(rows),
    }


def choose_threshold(labels: np.ndarray, p: np.ndarray, point: OperatingPoint) -> dict[str, float]:
    """The decision threshold (``label = p >= threshold``) for an operating point, on validation
    labels (N,) and calibrated probabilities (N,), with the rates it gives there."""
    prevalence = point.prevalence if point.prevalence is not None else float(np.mean(labels))
    fpr, tpr, thresholds = roc_curve(labels, p, drop_intermediate=False)
    # roc_curve: thresholds decrease, thresholds[0] = inf (nothing called a lens).
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = np.where(tpr + fpr > 0, tpr * prevalence / (tpr * prevalence + fpr * (1 - prevalence)), 1.0)
    if point.kind == "fixed":
        threshold = point.value
    else:
        ok = fpr <= point.value if point.kind == "fpr" else purity >= point.value
        # The lowest threshold that meets the target (the most lenses); none: call nothing a lens.
        i = int(np.flatnonzero(ok)[-1]) if ok.any() else 0
        if point.kind == "purity" and not ok[1:].any():
            log.warning(
                "no threshold reaches purity %.3g at prevalence %.3g on validation", point.value, prevalence
            )
        threshold = float(thresholds[i])
    # The predictor needs 0 < threshold < 1 (an infinite one means "nothing").
    threshold = float(np.clip(threshold, 1e-6, 1 - 1e-6))
    pred = p >= threshold
    n_neg, n_pos = int((labels == 0).sum()), int((labels == 1).sum())
    tpr_t = float(pred[labels == 1].sum() / n_pos) if n_pos else 0.0
    fpr_t = float(pred[labels == 0].sum() / n_neg) if n_neg else 0.0
    denom = tpr_t * prevalence + fpr_t * (1 - prevalence)
    return {
        "threshold": threshold,
        "val_tpr": tpr_t,
        "val_fpr": fpr_t,
        "val_purity": tpr_t * prevalence / denom if denom > 0 else 1.0,
        "prevalence": prevalence,
    }


def _version_description(
    cfg: Config,
    dataset_id: str,
    members: list[Member],
    member_aucs: list[float],
    val_auc: float,
    search: dict[str, Any],
    temperature: float,
    operating: dict[str, float],
    why: str,
) -> str:
    """What the registry shows for a version: members, weights, validation figures, the decision."""
    point, obj = cfg.ensemble.operating_point, cfg.ensemble.objective
    return "\n".join(
        [
            f"Ensemble of {len(members)} members on dataset {dataset_id}:",
            *(
                f"- {m.name}: weight {m.weight:.3f}, temperature {m.temperature:.3g}, "
                f"validation ROC AUC {a:.4f}"
                for m, a in zip(members, member_aucs, strict=True)
            ),
            "",  # ends the Markdown list the registry page renders
            f"Validation: ROC AUC {val_auc:.4f}, {obj} {search['val_objective']:.4f} "
            f"(equal weights {search['equal_weights_val_objective']:.4f}, "
            f"best member {search['best_member_val_objective']:.4f}); temperature {temperature:.3f}; "
            + (
                f"threshold {operating['threshold']:.4f} ({point.kind} {point.value:g}: "
                f"validation TPR {operating['val_tpr']:.3f}, FPR {operating['val_fpr']:.4f})."
                if "val_tpr" in operating
                else "label: the most probable class."
            ),
            "",
            f"Promotion: {why}.",
        ]
    )


def champion_objective(
    cfg: Config, images: np.ndarray, labels: np.ndarray, download_to: Path, classes: tuple[str, ...]
) -> dict[str, Any]:
    """The current champion's objective on these validation images (its calibrated probabilities):
    ``{"value", "version", "why"}``, value None when there is no champion or it takes other images
    or classes."""
    try:
        loaded = tracking.load_ensemble(cfg, download_to)
    except TrackingError:
        return {"value": None, "version": None, "why": "no champion yet"}
    shape = tuple(int(s) for s in images.shape[1:])
    if loaded.predictor.image_shape != shape:
        theirs = loaded.predictor.image_shape
        why = f"the champion (version {loaded.version}) takes {theirs} images, not {shape}: not comparable"
        return {"value": None, "version": loaded.version, "why": why}
    if loaded.predictor.classes != classes:
        theirs = list(loaded.predictor.classes)
        why = f"the champion (version {loaded.version}) tells {theirs} apart, not {list(classes)}"
        return {"value": None, "version": loaded.version, "why": why}
    p = loaded.predictor.predict(images)["probs"]  # (N, C) calibrated
    value = objective_value(cfg.ensemble.objective, labels, p)
    return {"value": value, "version": loaded.version, "why": "compared on the same validation data"}


def decide_promotion(new_value: float, champion: dict[str, Any], promote: bool) -> tuple[bool, str]:
    """Whether the new ensemble becomes champion, and why (a line for the log and MLflow)."""
    if promote:
        return True, "promoted as asked (--promote)"
    if champion["value"] is None:
        return champion["version"] is None, champion["why"]
    if new_value > champion["value"]:
        return (
            True,
            f"beats champion version {champion['version']}: {new_value:.5g} > {champion['value']:.5g}",
        )
    return (
        False,
        f"does not beat champion version {champion['version']}: {new_value:.5g} <= {champion['value']:.5g}",
    )


def build_ensemble(cfg: Config, promote: bool = False) -> dict[str, Any]:
    """Take the members (``ensemble.members``, else the best tune trials), weight them on validation,
    register the ensemble: ``@champion`` when it beats the current one on validation (or
    ``promote``), else ``@challenger``."""
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.ensemble.members:
            sources = named_sources(cfg, Path(tmp) / "members")
        else:
            trials = load_tune_results(cfg).trials
            e = cfg.ensemble
            chosen = [
                t.summary for t in select_members(trials, e.max_members, e.min_member_val_auc) if t.summary
            ]
            if not chosen:
                raise RuntimeError("no usable trials to build an ensemble from")
            taken = {c.run_name for c in chosen}
            left_out = [
                t.run_name
                for t in trials
                if t.usable and t.val_auc < e.min_member_val_auc and t.run_name not in taken
            ]
            if left_out:
                log.info(
                    "ensemble: %d trial(s) below min_member_val_auc left out: %s", len(left_out), left_out
                )
            sources = trial_sources(cfg, chosen, Path(tmp) / "members")
        dataset_uri = validation_dataset(cfg, sources)
        dataset_id = read_manifest(dataset_uri, cfg.storage).dataset_id
        with tracking.run(cfg, stage_run_name(cfg, "ensemble"), "ensemble", dataset_id) as run_id:
            result = _weigh_and_register(cfg, sources, dataset_uri, dataset_id, run_id, promote, Path(tmp))
    write_json(ensemble_result_uri(cfg), result, cfg.storage)
    return result


def _weigh_and_register(
    cfg: Config,
    sources: list[MemberSource],
    dataset_uri: str,
    dataset_id: str,
    run_id: str,
    promote: bool,
    tmp: Path,
) -> dict[str, Any]:
    """Member probabilities on validation, the weight search, the temperature, the registration.

    Two classes (lens finding) work on p(lens): (N, M) member probabilities, a calibrated threshold at
    the operating point. More classes work on (N, M, C), and the label is the most probable class.
    """
    # (N, M, C): each member once, with Ray Data, at its own input scale.
    probs, labels = validation_probabilities(cfg, dataset_uri, sources)
    images, champion_labels, _ = load_split(dataset_uri, "val", cfg.storage)
    members = [s.load() for s in sources]
    classes = members[0].model.classes
    binary = len(classes) == 2
    if binary:
        probs = probs[:, :, 1]  # (N, M) p(lens)
    shape = tuple(int(s) for s in images.shape[1:])
    info = {"dataset_id": dataset_id, "config_hash": cfg.hash()}
    point = cfg.ensemble.operating_point
    tta = cfg.ensemble.tta
    search = search_weights(probs, labels, cfg.ensemble)
    weights = search["weights"]
    for m, w, t in zip(members, weights, search["temperatures"], strict=True):
        m.weight, m.temperature = float(w), float(t)
    probs = apply_member_temperatures(probs, search["temperatures"])  # as the predictor gives
    # Calibration on validation: one temperature for the weighted probabilities, (N,) or (N, C).
    p_val = combine(probs, weights)
    val_auc = roc_auc(labels, p_val)
    temperature = fit_temperature(labels, p_val)
    p_cal = (apply_temperature if binary else apply_class_temperature)(p_val, temperature)
    bins = cfg.evaluate.calibration_bins
    if binary:
        val_ece = expected_calibration_error(labels, p_val, bins)
        val_ece_cal = expected_calibration_error(labels, p_cal, bins)
        operating = choose_threshold(labels, p_cal, point)
        operating_point = {**point.model_dump(mode="json"), **operating}
    else:  # calibration read as the log loss; the label is the most probable class
        val_ece, val_ece_cal = _log_loss(labels, p_val), _log_loss(labels, p_cal)
        operating = {"threshold": 0.5}
        operating_point = {"kind": "argmax", "threshold": 0.5}
    info |= {"operating_point": operating_point}
    predictor = EnsemblePredictor(
        members, shape, operating["threshold"], info, temperature=temperature, tta=tta
    )
    out_dir = tmp / "ensemble"
    predictor.save(out_dir)

    member_aucs = [roc_auc(labels, probs[:, j]) for j in range(len(members))]
    tracking.log_metrics(
        cfg,
        run_id,
        {
            "val_auc": val_auc,
            f"val_{cfg.ensemble.objective}": search["val_objective"],
            f"equal_weights_val_{cfg.ensemble.objective}": search["equal_weights_val_objective"],
            f"best_member_val_{cfg.ensemble.objective}": search["best_member_val_objective"],
            "weight_search_trials": search["trials"],
            "temperature": temperature,
            **(
                {
                    "val_ece_uncalibrated": val_ece,
                    "val_ece": val_ece_cal,
                    "threshold": operating["threshold"],
                    "val_tpr_at_threshold": operating["val_tpr"],
                    "val_fpr_at_threshold": operating["val_fpr"],
                    "val_purity_at_threshold": operating["val_purity"],
                }
                if binary
                else {"val_log_loss_uncalibrated": val_ece, "val_log_loss": val_ece_cal}
            ),
            **{f"weight_{j}": float(w) for j, w in enumerate(weights)},
            **{f"member_temperature_{j}": float(t) for j, t in enumerate(search["temperatures"])},
            **{f"member_val_auc_{j}": a for j, a in enumerate(member_aucs)},
        },
    )
    # The same measure for both: the objective of the calibrated p_lens on these images.
    new_value = objective_value(cfg.ensemble.objective, labels, p_cal)
    champion = champion_objective(cfg, images, champion_labels, tmp / "champion", classes)
    promoted, why = decide_promotion(new_value, champion, promote)
    log.info("ensemble %s: %s", "promoted to champion" if promoted else "registered as challenger", why)
    tracking.log_metrics(
        cfg,
        run_id,
        {f"calibrated_val_{cfg.ensemble.objective}": new_value}
        | (
            {f"champion_val_{cfg.ensemble.objective}": champion["value"]}
            if champion["value"] is not None
            else {}
        ),
    )
    tracking.client(cfg).set_tag(run_id, "lensmill.promotion", why)
    alias = cfg.tracking.alias if promoted else CHALLENGER_ALIAS
    description = _version_description(
        cfg, dataset_id, members, member_aucs, val_auc, search, temperature, operating, why
    )
    version_tags = {
        "dataset_id": dataset_id,
        "config_hash": cfg.hash(),
        "git_sha": tracking.git_sha(),
    }
    registered = tracking.register_ensemble(cfg, run_id, out_dir, alias, description, version_tags)

    result = {
        "members": [
            {
                "name": m.name,
                "model": src.model,
                "lr": src.lr,
                "input_size_px": m.model.input_size_px,
                "source": src.source,
                "val_auc": a,
                "weight": float(w),
                "temperature": m.temperature,
                "mlflow_run_id": src.mlflow_run_id,
            }
            for m, src, a, w in zip(members, sources, member_aucs, weights, strict=True)
        ],
        "ensemble_weights": [float(w) for w in weights],
        "val_auc": val_auc,
        "objective": cfg.ensemble.objective,
        "val_objective": search["val_objective"],
        "equal_weights_val_objective": search["equal_weights_val_objective"],
        "best_member_val_objective": search["best_member_val_objective"],
        "weight_search_trials": search["trials"],
        "operating_point": operating_point,
        "temperature": temperature,
        "classes": list(classes),
        # Two classes: the expected calibration error; more: the log loss, before and after.
        "val_ece_uncalibrated" if binary else "val_log_loss_uncalibrated": val_ece,
        "val_ece" if binary else "val_log_loss": val_ece_cal,
        "dataset_uri": dataset_uri,
        "mlflow_run_id": run_id,
        "promoted": promoted,
        "promotion": why,
        "champion_before": champion,
        **registered,
    }
    return result
