"""``lensmill`` command line: thin wrappers that load a config and call one library function.

Every command takes ``--config PATH`` (default: the embedded defaults) and ``key=value`` overrides,
logs to stderr, and ends with one JSON line on stdout. A user's mistake (config typo, unreachable URI,
missing dataset) prints a one-line error and exits 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from pydantic import BaseModel

from lensmill.config import Config, load_config
from lensmill.errors import LensmillError

app = typer.Typer(
    name="lensmill",
    help="Simulate strong lenses, train and tune ensembles on Ray, track them in MLflow, serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigPath = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: the embedded demo defaults).")
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. train.lr=3e-4 sim.n_train=5000")
]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def emit(summary: dict[str, Any]) -> None:
    """The command's one JSON line on stdout (flushed, after everything Ray printed)."""
    sys.stdout.flush()
    print(json.dumps(summary, default=_json_default), flush=True)


def run_command(
    config: Path | None,
    overrides: list[str] | None,
    fn: Callable[[Config], dict[str, Any] | BaseModel],
    ray: bool = True,
) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    try:
        cfg = load_config(config, overrides or [])
        from lensmill.runtime import ray_connection

        with ray_connection(cfg) if ray else nullcontext():
            out = fn(cfg)
    except LensmillError as exc:  # the user's to fix: the message names the file, field or URI
        print(f"lensmill: error: {exc}", file=sys.stderr)
        emit({"ok": False, "error": str(exc)})
        raise typer.Exit(2) from None
    except Exception as exc:  # not the user's mistake: keep the traceback for the report, end in JSON
        logging.getLogger("lensmill").exception("unexpected error (a bug: please report the traceback above)")
        emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        raise typer.Exit(1) from None
    if isinstance(out, BaseModel):
        out = out.model_dump(mode="json")
    emit({**out, "wall_s": round(time.perf_counter() - t0, 1)})


@app.command()
def simulate(config: ConfigPath = None, overrides: Overrides = None) -> None:
    """Render the dataset with lenstronomy on Ray Data: Parquet shards + manifest."""
    from lensmill.shards import dataset_uri_for, write_shards

    def fn(cfg: Config) -> dict[str, Any]:
        m = write_shards(cfg)
        return {"dataset_uri": dataset_uri_for(cfg), "dataset_id": m.dataset_id, "splits": m.splits}

    run_command(config, overrides, fn)


@app.command()
def train(config: ConfigPath = None, overrides: Overrides = None) -> None:
    """Train one architecture (train.model) with Ray Train; resumes a rerun of the same config."""
    from lensmill.train import fit

    run_command(config, overrides, fit)


@app.command()
def tune(config: ConfigPath = None, overrides: Overrides = None) -> None:
    """Ray Tune over tune.models x tune.lrs, or tune.num_samples trials sampled by Optuna from
    tune.search_space; each trial is a Ray Train run, stopped early by ASHA."""
    from lensmill.tune import tune_architectures

    run_command(config, overrides, tune_architectures)


Promote = Annotated[
    bool, typer.Option(help="Make the new ensemble @champion even if it does not beat the current one.")
]


@app.command()
def ensemble(config: ConfigPath = None, overrides: Overrides = None, promote: Promote = False) -> None:
    """Weight the best trials on validation and register the ensemble in MLflow: @champion when it
    beats the current champion on validation (or with --promote), else @challenger."""
    from lensmill.ensemble import build_ensemble

    run_command(config, overrides, lambda cfg: build_ensemble(cfg, promote=promote))


@app.command()
def evaluate(config: ConfigPath = None, overrides: Overrides = None) -> None:
    """Score the champion on the test split: metrics JSON, plots, MLflow."""
    from lensmill.evaluate import evaluate as evaluate_stage

    run_command(config, overrides, evaluate_stage, ray=False)


@app.command()
def serve(
    config: ConfigPath = None,
    overrides: Overrides = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="Serve a local ensemble folder instead of the MLflow champion.")
    ] = None,
) -> None:
    """Keep the HTTP endpoint up (POST /v1/predict, GET /healthz) until Ctrl-C."""
    from lensmill.serve import serve_until_interrupted, start_endpoint, stop_endpoint, stop_on_sigterm

    def fn(cfg: Config) -> dict[str, Any]:
        stop_on_sigterm()  # also while the endpoint starts (Ray's handler would abort the process)
        try:
            url = start_endpoint(cfg, model_dir=model_dir)
        except KeyboardInterrupt:
            logging.getLogger("lensmill.serve").info("interrupted while starting: shutting Serve down")
            stop_endpoint()
            return {"stopped": True}
        # The JSON line comes as soon as the endpoint is up, for scripts that wait on it.
        emit({"endpoint": f"{url}/v1/predict", "healthz": f"{url}/healthz", "docs": f"{url}/docs"})
        print(f"serving on {url} — Ctrl-C or SIGTERM to stop", file=sys.stderr)
        serve_until_interrupted()
        return {"stopped": True}

    run_command(config, overrides, fn)


@app.command()
def pipeline(
    config: ConfigPath = None,
    overrides: Overrides = None,
    queries: Annotated[int, typer.Option(help="Held-out test images to score over HTTP at the end.")] = 8,
    promote: Promote = False,
) -> None:
    """The whole path: simulate, tune, ensemble, evaluate, then serve and query the endpoint."""
    from lensmill.pipeline import run_pipeline

    run_command(config, overrides, lambda cfg: run_pipeline(cfg, n_queries=queries, promote=promote))


def _dataset_arg(uri: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """A positional URI that is really an override (``lensmill validate sim.n_train=10``) goes back
    to the overrides; the dataset then defaults to the one the config describes."""
    overrides = list(overrides or [])
    if uri is not None and "=" in uri and "://" not in uri and not Path(uri).exists():
        return None, [uri, *overrides]
    return uri, overrides


def _dataset_uri(cfg: Config, uri: str | None) -> str:
    from lensmill.shards import dataset_uri_for

    return uri if uri is not None else dataset_uri_for(cfg)


DatasetArg = Annotated[
    str | None,
    typer.Argument(help="Dataset URI (folder or s3://...); default: the dataset the config describes."),
]


@app.command("import")
def import_cmd(
    src: Annotated[Path, typer.Argument(help="Folder of class subfolders (lens/ nonlens/ or 1/ 0/).")],
    overrides: Overrides = None,
    config: ConfigPath = None,
    out: Annotated[
        str | None,
        typer.Option("--out", help="Dataset URI to write (default: {storage.root}/datasets/{id})."),
    ] = None,
    labels_csv: Annotated[
        Path | None, typer.Option("--labels-csv", help="CSV of path,label rows instead of class folders.")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of each class for validation.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Fraction of each class for the test split.")] = 0.1,
    seed: Annotated[int | None, typer.Option(help="Split shuffle seed (default: sim.seed).")] = None,
    pixel_scale: Annotated[
        float | None, typer.Option(help="Pixel scale in arcsec, for the manifest.")
    ] = None,
    bands: Annotated[str | None, typer.Option(help="Comma-separated band names, one per channel.")] = None,
) -> None:
    """Import labelled PNG / FITS / NPY cutouts into Parquet shards + manifest (no Ray needed)."""
    from lensmill.importer import import_cutouts

    def fn(cfg: Config) -> dict[str, Any]:
        uri, m = import_cutouts(
            src, out, cfg.storage, labels_csv=labels_csv, val_fraction=val_fraction,
            test_fraction=test_fraction, seed=cfg.sim.seed if seed is None else seed,
            rows_per_shard=cfg.sim.rows_per_shard, pixel_scale_arcsec=pixel_scale,
            bands=[b.strip() for b in bands.split(",")] if bands else None,
        )  # fmt: skip
        return {
            "dataset_uri": uri,
            "dataset_id": m.dataset_id,
            "image_shape": m.image_shape,
            "splits": m.splits,
            "files": len(m.files),
            "inputs": m.inputs.count if m.inputs else None,
        }

    run_command(config, overrides, fn, ray=False)


@app.command()
def validate(
    uri: DatasetArg = None,
    overrides: Overrides = None,
    config: ConfigPath = None,
    max_shortcut_auc: Annotated[
        float, typer.Option(help="Fail when the nuisance-statistics classifier's AUC exceeds this.")
    ] = 0.65,
    max_imbalance: Annotated[
        float, typer.Option(help="Fail when majority/minority class count in a split exceeds this.")
    ] = 1.5,
    shortcut_rows: Annotated[
        int, typer.Option(help="Training rows the shortcut audit uses (at most).")
    ] = 4000,
    shortcut_features: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated statistics for the joint classifier (default: total_flux,peak_pixel,"
            "background_std,psf_fwhm_arcsec; lens_flux is always audited on its own)."
        ),
    ] = None,
) -> None:
    """Check a dataset (schema, NaN/inf, value ranges, balance, checksums) and audit it for shortcuts.

    Exit code 0 when every check passes, 1 when one fails, 2 when the dataset cannot be read.
    """
    from lensmill.audit import DEFAULT_SHORTCUT_FEATURES, validate_dataset

    uri, overrides = _dataset_arg(uri, overrides)
    features = (
        tuple(f.strip() for f in shortcut_features.split(",") if f.strip())
        if shortcut_features
        else DEFAULT_SHORTCUT_FEATURES
    )
    result: dict[str, Any] = {}

    def fn(cfg: Config) -> dict[str, Any]:
        result.update(
            validate_dataset(
                _dataset_uri(cfg, uri), cfg.storage, max_shortcut_auc=max_shortcut_auc,
                max_imbalance=max_imbalance, shortcut_rows=shortcut_rows, shortcut_features=features,
                seed=cfg.sim.seed,
            )
        )  # fmt: skip
        for c in result["checks"]:
            print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}", file=sys.stderr)
        return result

    run_command(config, overrides, fn, ray=False)
    if not result.get("ok"):
        raise typer.Exit(1)


@app.command()
def preview(
    uri: DatasetArg = None,
    overrides: Overrides = None,
    config: ConfigPath = None,
    out: Annotated[
        Path | None, typer.Option(help="PNG path (default: in the dataset folder, or the working folder).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to draw from.")] = "val",
    per_class: Annotated[int, typer.Option(help="Lenses and non-lenses to show, each.", min=1)] = 16,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="Do not log the PNG to MLflow.")] = False,
) -> None:
    """Draw a PNG grid of lenses and non-lenses (asinh stretch, annotated); log it to MLflow."""
    from lensmill.preview import preview as preview_stage

    uri, overrides = _dataset_arg(uri, overrides)

    def fn(cfg: Config) -> dict[str, Any]:
        return preview_stage(
            cfg, _dataset_uri(cfg, uri), out, split=split, n_per_class=per_class, mlflow=not no_mlflow
        )

    run_command(config, overrides, fn, ray=False)


@app.command()
def probe(
    encoder: Annotated[
        str, typer.Argument(help="models:/<name>/<version> (a registered encoder), run:<run name> or a file.")
    ],
    overrides: Overrides = None,
    config: ConfigPath = None,
    targets: Annotated[
        str, typer.Option(help="Comma-separated columns the regression heads predict (those present).")
    ] = "theta_e_arcsec,subhalo_mass_fraction",
) -> None:
    """A frozen encoder's features under a linear probe (classes) and ridge regression heads (e.g. the
    Einstein radius), fitted on the train split and scored on the test split; logged to MLflow."""
    from lensmill.representation import probe_encoder

    wanted = tuple(t.strip() for t in targets.split(",") if t.strip())
    run_command(config, overrides, lambda cfg: probe_encoder(cfg, encoder, wanted), ray=False)


bench_app = typer.Typer(
    name="bench", help="Benchmarks, each against a baseline in the same run.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


@bench_app.command("simulate")
def bench_simulate(
    config: ConfigPath = None,
    overrides: Overrides = None,
    images: Annotated[
        int | None, typer.Option(help="Images the platform writes (default: ~30 s of work per core).", min=8)
    ] = None,
    baseline_images: Annotated[
        int | None, typer.Option(help="Images the plain loop renders (default: ~4 s of work).", min=1)
    ] = None,
) -> None:
    """Plain lenstronomy loop vs Ray Data shard writing on all cores: images/s and per-core efficiency."""
    from lensmill.bench.simulate import run_simulate_bench

    # Ray is started by the bench itself, after the baseline, with one CPU per core.
    run_command(config, overrides, lambda cfg: run_simulate_bench(cfg, images, baseline_images), ray=False)


@bench_app.command("accuracy")
def bench_accuracy(
    config: ConfigPath = None,
    overrides: Overrides = None,
    input_dir: Annotated[
        Path | None,
        typer.Option(
            "--input", help="Class folders of labelled cutouts (default: write the foreign-style set)."
        ),
    ] = None,
    images: Annotated[int, typer.Option(help="Cutouts in the foreign-style set.")] = 2000,
    epochs: Annotated[int, typer.Option(help="Epochs for both sides.")] = 10,
    seeds: Annotated[int, typer.Option(help="Runs per side (train.seed, +1, ...).", min=1)] = 1,
) -> None:
    """The default pipeline against a plain PyTorch ResNet-18 loop on the same files (test ROC AUC)."""
    from lensmill.bench.accuracy import run_accuracy_bench

    run_command(config, overrides, lambda cfg: run_accuracy_bench(cfg, input_dir, images, epochs, seeds))


@bench_app.command("representation")
def bench_representation(
    config: ConfigPath = None,
    overrides: Overrides = None,
    rows: Annotated[
        list[str] | None,
        typer.Option("--row", help="A row to train (repeat; default all four), e.g. --row supervised."),
    ] = None,
    seeds: Annotated[
        int, typer.Option(help="Runs per row (train.seed, +1, ...); means reported.", min=1)
    ] = 1,
) -> None:
    """Autoencoder + linear probe, supervised ResNet-18, multi-task, fine-tuned encoder: test accuracy
    and macro ROC AUC with intervals, and regression heads' errors, on one run (e.g. the substructure
    preset: --config jobs/configs/substructure.yaml)."""
    from lensmill.bench.representation import plan_rows, run_representation_bench
    from lensmill.runtime import ray_connection

    def fn(cfg: Config) -> dict[str, Any]:
        names = plan_rows(rows)  # a misspelt row fails before Ray starts
        with ray_connection(cfg):
            return run_representation_bench(cfg, names, seeds)

    run_command(config, overrides, fn, ray=False)


@bench_app.command("train")
def bench_train(config: ConfigPath = None, overrides: Overrides = None) -> None:
    """Training throughput benchmark (lensmill.bench.train)."""

    def fn(cfg: Config) -> dict[str, Any]:
        from lensmill.bench.train import run_train_bench
        from lensmill.runtime import ray_connection

        # A local Ray without the dashboard, as for bench simulate: its processes would take CPU
        # from the timed workers, and a plain fit (no Tune stopping trials) does not need its State API.
        with ray_connection(cfg, include_dashboard=False):
            return run_train_bench(cfg)

    run_command(config, overrides, fn, ray=False)


@bench_app.command("serve")
def bench_serve(
    config: ConfigPath = None,
    overrides: Overrides = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="A local ensemble folder (default: the MLflow champion).")
    ] = None,
    requests_c1: Annotated[int, typer.Option(help="Requests timed at concurrency 1.", min=1)] = 200,
    requests_c32: Annotated[int, typer.Option(help="Requests timed at concurrency 32.", min=32)] = 1000,
    max_seconds: Annotated[float, typer.Option(help="Time bound of each measurement.", min=1)] = 120.0,
) -> None:
    """The Ray Serve endpoint against a plain FastAPI/uvicorn process with the same members."""

    def fn(cfg: Config) -> dict[str, Any]:
        from lensmill.bench.serve import run_serve_bench
        from lensmill.runtime import ray_connection

        # Without the dashboard (as bench train): its processes would take CPU from the timed side.
        with ray_connection(cfg, include_dashboard=False):
            return run_serve_bench(cfg, model_dir, requests_c1, requests_c32, max_seconds)

    run_command(config, overrides, fn, ray=False)


@bench_app.command("predict")
def bench_predict(
    config: ConfigPath = None,
    overrides: Overrides = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="A local ensemble folder (default: the MLflow champion).")
    ] = None,
    input_uri: Annotated[
        str | None,
        typer.Option("--input", help="A folder or list of cutouts (default: write seeded FITS cutouts)."),
    ] = None,
    images: Annotated[int, typer.Option(help="Cutouts to write when no --input is given.", min=1)] = 2000,
) -> None:
    """Ray Data catalog scoring against a plain PyTorch loop over the same files: images/s."""

    def fn(cfg: Config) -> dict[str, Any]:
        from lensmill.bench.predict import run_predict_bench
        from lensmill.runtime import ray_connection

        with ray_connection(cfg, include_dashboard=False):
            return run_predict_bench(cfg, model_dir, input_uri, images)

    run_command(config, overrides, fn, ray=False)


@app.command()
def predict(
    config: ConfigPath = None,
    overrides: Overrides = None,
    input_uri: Annotated[
        str | None,
        typer.Option(
            "--input", "--dataset-uri",
            help="What to score: a lensmill dataset (its --split), a folder of PNG/FITS/NPY cutouts, a "
            "list file (.txt) or a catalog (.csv/.parquet: object_id, ra, dec, path or path_<band>). "
            "Default: the config's dataset.",
        ),
    ] = None,
    output_uri: Annotated[
        str | None, typer.Option("--output", "--out", help="Where to write the Parquet predictions.")
    ] = None,
    split: Annotated[str, typer.Option(help="Dataset split to score (lensmill datasets).")] = "test",
    model_dir: Annotated[
        Path | None, typer.Option(help="Score with a local ensemble folder instead of the MLflow champion.")
    ] = None,
) -> None:  # fmt: skip
    """Batch-score with the champion on Ray Data: a dataset split, or a survey's unlabelled cutouts
    (resumable; unreadable files recorded with their reason)."""

    def fn(cfg: Config) -> dict[str, Any]:
        from lensmill.catalog import CatalogError, score_catalog
        from lensmill.layout import manifest_uri
        from lensmill.scoring import score_dataset
        from lensmill.storage import exists

        if input_uri is None or exists(manifest_uri(input_uri), cfg.storage):
            return score_dataset(cfg, split, input_uri, output_uri, model_dir)
        if output_uri is None:
            raise CatalogError(f"--output is needed to score {input_uri} (a folder, list or catalog)")
        return score_catalog(cfg, input_uri, output_uri, model_dir)

    run_command(config, overrides, fn)


@app.command()
def candidates(
    scores_uri: Annotated[str, typer.Argument(help="The --output of `lensmill predict --input ...`.")],
    overrides: Overrides = None,
    config: ConfigPath = None,
    top: Annotated[int, typer.Option(help="How many of the best-ranked cutouts to show.", min=1)] = 64,
    out: Annotated[
        Path | None, typer.Option(help="Folder for candidates.png/.html (default: its _candidates).")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(help="Score column to rank by (default p_lens; a C-class run: one of its p_<class>)."),
    ] = None,
) -> None:
    """The top cutouts of a catalog scoring run by p_lens (or --by): PNG grid and HTML page, in MLflow."""
    from lensmill.candidates import candidates as candidates_stage

    run_command(config, overrides, lambda cfg: candidates_stage(cfg, scores_uri, top, out, by), ray=False)


@app.command()
def cost(
    config: ConfigPath = None,
    overrides: Overrides = None,
    images: Annotated[
        int | None,
        typer.Option(
            help="Score this many catalog cutouts instead of the test split (e.g. 300000000).", min=1
        ),
    ] = None,
    stage: Annotated[
        list[str] | None,
        typer.Option(
            "--stage", help="Stage to estimate: simulate, train or score (repeat it; default: all)."
        ),
    ] = None,
    cluster: Annotated[
        Path, typer.Option(help="Ray cluster launcher file whose node types and limits to price.")
    ] = Path("cluster/aws.yaml"),
) -> None:
    """Estimate node-hours, GPU-hours, wall time and dollars (on-demand, spot) of the configured run."""
    from lensmill.cost import STAGES, estimate_cost, log_estimate, summarize

    def fn(cfg: Config) -> dict[str, Any]:
        estimate = estimate_cost(cfg, cluster, tuple(stage or STAGES), images)
        log_estimate(estimate)
        return summarize(estimate)

    # Arithmetic on the config and the cluster file only: no Ray.
    run_command(config, overrides, fn, ray=False)


@app.command("models")
def models_cmd() -> None:
    """List the model names create_model accepts."""
    from lensmill.models import list_models

    emit({"models": list_models()})


if __name__ == "__main__":
    app()
