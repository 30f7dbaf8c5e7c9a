"""Ensemble members from anywhere: named training runs and registered versions, at different input
scales, weighed on probabilities Ray Data computed, round-tripped through a real MLflow registry.

Two real (one-epoch) training runs on 32x32 images: a small CNN at the data's own scale and the cutout
ViT at 64x64 (``train.input_size_px``), the seed project's multi-scale ensemble in miniature.
"""

from __future__ import annotations

import numpy as np
import pytest

from lensmill import tracking
from lensmill.config import load_config
from lensmill.ensemble import build_ensemble
from lensmill.errors import ConfigError
from lensmill.layout import run_name_for
from lensmill.members import named_sources, validation_probabilities
from lensmill.shards import dataset_uri_for, load_split, write_shards
from lensmill.train import fit

BASE = [
    "sim.n_train=48", "sim.n_val=24", "sim.n_test=8", "sim.rows_per_shard=24", "sim.image_size_px=32",
    "train.epochs=1", "train.batch_size=16", "train.cpus_per_worker=1", "ensemble.weight_trials=8",
    "evaluate.bootstrap_samples=0", "scoring.batch_size=8", "tracking.registered_model=members-test",
]  # fmt: skip
SCALES = {"tiny": None, "vit_cutout_tiny": 64}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, ray_session: str, mlflow_uri: str):
    """The dataset and two trained runs: ``(overrides, {model: run name})``."""
    root = tmp_path_factory.mktemp("members")
    overrides = [*BASE, f"storage.root={root}", f"tracking.tracking_uri={mlflow_uri}"]
    write_shards(load_config(None, overrides))
    names = {}
    for model, size in SCALES.items():
        cfg = load_config(None, [*overrides, f"train.model={model}", f"train.input_size_px={size or 'null'}"])
        fit(cfg)
        names[model] = run_name_for(cfg)
    return overrides, names


def test_named_runs_at_two_scales_round_trip_through_the_registry(runs, tmp_path) -> None:
    overrides, names = runs
    members = "[" + ", ".join(f"run:{n}" for n in names.values()) + "]"
    cfg = load_config(None, [*overrides, f"ensemble.members={members}"])
    result = build_ensemble(cfg)
    assert [m["source"] for m in result["members"]] == [f"run:{n}" for n in names.values()]
    assert [m["input_size_px"] for m in result["members"]] == list(SCALES.values())
    assert result["alias"] == "champion" and abs(sum(result["ensemble_weights"]) - 1) < 1e-9

    # What Ray Data computed for the weight search is what the registered version gives once loaded.
    sources = named_sources(cfg, tmp_path / "sources")
    ray_data_probs, labels = validation_probabilities(cfg, dataset_uri_for(cfg), sources)
    loaded = tracking.load_ensemble(cfg, tmp_path / "download")
    assert loaded.source == "mlflow" and loaded.version == result["version"]
    assert [m.model.input_size_px for m in loaded.predictor.members] == list(SCALES.values())
    images, val_labels, params = load_split(dataset_uri_for(cfg), "val", cfg.storage)
    order = np.argsort(params.column("row_id").to_numpy())
    np.testing.assert_array_equal(val_labels[order], labels)
    loaded_probs = loaded.predictor.member_class_probabilities(images[order])  # (N, M, 2)
    np.testing.assert_allclose(loaded_probs, ray_data_probs, atol=1e-6)
    assert ray_data_probs[:, :, 1].std(axis=0).min() > 0  # trained members, not constants

    # An evaluation's test figures join the description; a second evaluation replaces them.
    for auc in ("0.9000", "0.9100"):
        tracking.describe_test_figures(
            cfg, "members-test", result["version"], f"Test (8 images): ROC AUC {auc}"
        )
    description = tracking.client(cfg).get_model_version("members-test", result["version"]).description
    assert description.startswith("Ensemble of 2 members") and description.count("Test (") == 1
    assert description.endswith("\n\nTest (8 images): ROC AUC 0.9100")


def test_a_registered_version_lends_its_members(runs, tmp_path) -> None:
    overrides, names = runs
    first = load_config(None, [*overrides, f"ensemble.members=[run:{names['tiny']}]"])
    version = build_ensemble(first, promote=True)["version"]
    cfg = load_config(
        None, [*overrides, f"ensemble.members=[models:/members-test/{version}, run:{names['tiny']}]"]
    )
    result = build_ensemble(cfg)
    got = [(m["name"], m["source"]) for m in result["members"]]
    # The same run twice: once from the registry, once by name; names kept apart for the registry.
    assert got[0][1] == f"models:/members-test/{version}#0" and got[1][1] == f"run:{names['tiny']}"
    assert got[1][0] == got[0][0] + "#2"
    by_alias = load_config(None, [*overrides, "ensemble.members=[models:/members-test@champion]"])
    champion = tracking.client(by_alias).get_model_version_by_alias("members-test", "champion").version
    sources = named_sources(by_alias, tmp_path)
    want = [f"models:/members-test/{champion}#{j}" for j in range(len(sources))]
    assert sources and [s.source for s in sources] == want


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("run:no-such-run", r"ensemble.members\[0\]: no finished run 'no-such-run'"),
        ("models:/members-test/999", r"ensemble.members\[0\]: no model members-test/999 in the registry"),
        ("models:/members-test@nobody", r"ensemble.members\[0\]: no model members-test@nobody"),
        ("models:/members-test", r"ensemble.members\[0\]: 'models:/members-test' names no version"),
    ],
)
def test_a_member_that_is_not_there_is_named(runs, source: str, message: str) -> None:
    overrides, _ = runs
    with pytest.raises(ConfigError, match=message):
        build_ensemble(load_config(None, [*overrides, f"ensemble.members=[{source}]"]))


def test_the_endpoint_picks_up_a_new_champion_without_a_restart(runs) -> None:
    import time

    import httpx

    from lensmill.serve import start_endpoint, stop_endpoint

    try:
        from tests.conftest import free_port
    except ImportError:
        from conftest import free_port  # type: ignore[no-redef]

    overrides, names = runs
    serving = [
        *overrides,
        f"serve.port={free_port()}",
        "serve.watch_champion_s=1",
        "serve.cpus_per_replica=0.25",
    ]
    first = load_config(None, [*serving, f"ensemble.members=[run:{names['tiny']}]"])
    before = build_ensemble(first, promote=True)["version"]
    url = start_endpoint(first)
    try:
        with httpx.Client(base_url=url, timeout=30.0) as http:
            assert http.get("/v1/model").json()["version"] == before
            # A new champion is registered while the endpoint serves: the replica swaps it in.
            second = load_config(None, [*serving, f"ensemble.members=[run:{names['vit_cutout_tiny']}]"])
            after = build_ensemble(second, promote=True)["version"]
            assert after != before
            deadline = time.monotonic() + 90
            while http.get("/v1/model").json()["version"] != after and time.monotonic() < deadline:
                time.sleep(0.5)
            info = http.get("/v1/model").json()
            assert info["version"] == after and [m["model"] for m in info["members"]] == ["vit_cutout_tiny"]
            answer = http.post("/v1/predict", json={"images": np.zeros((1, 1, 32, 32)).tolist()}).json()
            assert answer["model"]["version"] == after
            assert list(answer["predictions"][0]["members"]) == [m["name"] for m in info["members"]]
    finally:
        stop_endpoint()


def test_a_multitask_run_registers_its_encoder_for_fine_tuning_and_the_probe(runs) -> None:
    """train.objective multitask on conv_ae: its encoder lands in the registry; a conv_encoder run
    starts from it through train.pretrained_uri=models:/..., and lensmill probe reads it frozen."""
    import torch

    from lensmill.representation import probe_encoder
    from lensmill.train import read_pretrained

    overrides, _ = runs
    cfg = load_config(None, [*overrides, "train.model=conv_ae", "train.objective=multitask"])
    summary = fit(cfg)
    assert summary.encoder_uri is not None and summary.encoder_uri.startswith("models:/lens-encoder/")
    assert summary.objective == "multitask" and summary.history[-1]["val_recon_mse"] > 0
    version = tracking.client(cfg).get_model_version("lens-encoder", summary.encoder_uri.rsplit("/", 1)[1])
    assert version.tags["run_name"] == summary.run_name

    fine = load_config(
        None, [*overrides, "train.model=conv_encoder", f"train.pretrained_uri={summary.encoder_uri}"]
    )
    state = read_pretrained(fine)  # what the workers load: the registered encoder's weights
    trained = torch.load(
        f"{summary.checkpoint_uri}/{summary.member_file}", map_location="cpu", weights_only=False
    )["state_dict"]
    key = "backbone.encoder.0.0.weight"
    torch.testing.assert_close(state[key], trained[key])
    tuned = fit(fine)
    assert tuned.pretrained_uri == summary.encoder_uri and not np.isnan(tuned.val_auc)

    result = probe_encoder(cfg, summary.encoder_uri, targets=("theta_e_arcsec",))
    assert result["features"] == 256 and result["classes"] == ["non-lens", "lens"]
    assert 0.0 <= result["linear_probe"]["accuracy"] <= 1.0
    assert result["regression"]["theta_e_arcsec"]["n_test"] == 8 and "mlflow_run_id" in result
    with pytest.raises(ConfigError, match="no finished run"):
        probe_encoder(cfg, "run:nope")
