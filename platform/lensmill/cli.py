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

from lensmill.config import Config, ConfigError, load_config

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


def _user_errors() -> tuple[type[BaseException], ...]:
    from lensmill.shards import DatasetError
    from lensmill.storage import StorageError
    from lensmill.tracking import TrackingError

    return ConfigError, StorageError, DatasetError, TrackingError, FileNotFoundError


def _json_default(obj: Any) -> Any:
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
    config: Path | None, overrides: list[str] | None, fn: Callable[[Config], dict[str, Any]], ray: bool = True
) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    try:
        cfg = load_config(config, overrides or [])
        from lensmill.runtime import ray_connection

        with ray_connection(cfg) if ray else nullcontext():
            out = fn(cfg)
    except _user_errors() as exc:
        print(f"lensmill: error: {exc}", file=sys.stderr)
        emit({"ok": False, "error": str(exc)})
        raise typer.Exit(2) from None
    emit({**out, "wall_s": round(time.perf_counter() - t0, 1)})


@app.command()
def simulate(config: ConfigPath = None, overrides: Overrides = None) -> None:
    """Render the dataset with lenstronomy on Ray Data: Parquet shards + manifest."""
    from lensmill.shards import dataset_uri_for, write_shards

    def fn(cfg: Config) -> dict[str, Any]:
        m = write_shards(cfg)
        return {"dataset_uri": dataset_uri_for(cfg), "dataset_id": m["dataset_id"], "splits": m["splits"]}

    run_command(config, overrides, fn)


@app.command()
def train(config: ConfigPath = None, overrides: Overrides = None) -> None:
    """Train one architecture (train.model) with Ray Train; resumes a rerun of the same config."""
    from lensmill.train import fit

    run_command(config, overrides, fit)


@app.command()
def tune(config: ConfigPath = None, overrides: Overrides = None) -> None:
    """Ray Tune search over tune.models x tune.lrs; each trial is a Ray Train run."""
    from lensmill.tune import tune_architectures

    run_command(config, overrides, tune_architectures)


@app.command()
def ensemble(config: ConfigPath = None, overrides: Overrides = None) -> None:
    """Weight the best trials on validation and register the ensemble @champion in MLflow."""
    from lensmill.ensemble import build_ensemble

    run_command(config, overrides, build_ensemble)


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
    from lensmill.serve import serve_until_interrupted, start_endpoint

    def fn(cfg: Config) -> dict[str, Any]:
        url = start_endpoint(cfg, model_dir=model_dir)
        # The JSON line comes as soon as the endpoint is up, for scripts that wait on it.
        emit({"endpoint": f"{url}/v1/predict", "healthz": f"{url}/healthz", "docs": f"{url}/docs"})
        print(f"serving on {url} — Ctrl-C to stop", file=sys.stderr)
        serve_until_interrupted()
        return {"stopped": True}

    run_command(config, overrides, fn)


@app.command()
def pipeline(
    config: ConfigPath = None,
    overrides: Overrides = None,
    queries: Annotated[int, typer.Option(help="Held-out test images to score over HTTP at the end.")] = 8,
) -> None:
    """The whole path: simulate, tune, ensemble, evaluate, then serve and query the endpoint."""
    from lensmill.pipeline import run_pipeline

    run_command(config, overrides, lambda cfg: run_pipeline(cfg, n_queries=queries))


@app.command("models")
def models_cmd() -> None:
    """List the model names create_model accepts."""
    from lensmill.models import list_models

    emit({"models": list_models()})


if __name__ == "__main__":
    app()
