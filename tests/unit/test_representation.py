"""The autoencoder, the multi-task objective, encoders reused by fine-tuning, and the frozen probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensmill.config import load_config
from lensmill.errors import ConfigError
from lensmill.models import LensClassifier, load_pretrained, save_classifier
from lensmill.representation import encoder_features, linear_probe, regression_head
from lensmill.train import train_step

CLASSES = ("no_sub", "cdm", "vortex")


def _batch(n: int = 32, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    # A blob whose width is the class: something both the decoder and the head can learn.
    r2 = (torch.arange(size) - size / 2).view(1, -1) ** 2 + (torch.arange(size) - size / 2).view(-1, 1) ** 2
    x = torch.exp(-r2 / (2 * (2.0 + 2 * y.float()).view(-1, 1, 1) ** 2)).unsqueeze(1)
    return x + 0.05 * torch.randn(x.shape, generator=g), y


def test_the_autoencoder_reconstructs_its_normalised_input_and_its_encoder_is_shared() -> None:
    ae = LensClassifier("conv_ae", 1, [0.0], [1.0], classes=CLASSES)
    x, _ = _batch()
    logits, target, recon = ae(x, reconstruct=True)
    assert logits.shape == (32, 3) and recon.shape == target.shape == (32, 1, 32, 32)
    assert ae.features(x).shape == (32, 256)
    encoder = LensClassifier("conv_encoder", 1, [0.0], [1.0], classes=CLASSES)
    with pytest.raises(Exception, match="no decoder"):
        encoder(x, reconstruct=True)
    ae_keys = {k for k in ae.backbone.state_dict() if k.startswith("encoder.")}
    assert ae_keys == {k for k in encoder.backbone.state_dict() if k.startswith("encoder.")}


def test_reconstruction_and_multitask_steps_learn(tmp_path) -> None:
    torch.manual_seed(0)
    x, y = _batch()
    for objective in ("reconstruct", "multitask"):
        model = LensClassifier("conv_ae", 1, [0.0], [1.0], classes=CLASSES)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        step = [
            train_step(model, opt, x, y, torch.device("cpu"), None, 0.0, 0.0, objective, 1.0)
            for _ in range(25)
        ]
        assert step[-1] < 0.5 * step[0], objective
    # The multitask encoder initialises a classifier of the encoder alone: encoder weights loaded,
    # the decoder's skipped, the head's kept fresh when its shape differs.
    save_classifier(model, tmp_path / "ae.pt")
    fresh = LensClassifier("conv_encoder", 1, [0.0], [1.0], classes=CLASSES)
    report = load_pretrained(fresh.backbone, tmp_path / "ae.pt")
    assert all(k.startswith(("encoder.", "head.")) for k in report["loaded"])
    assert any(k.startswith("decoder.") for k in report["skipped"])
    torch.testing.assert_close(fresh.backbone.features(x), model.backbone.features(x))


def test_an_objective_that_reconstructs_needs_an_autoencoder() -> None:
    with pytest.raises(ConfigError, match=r"train\.objective: multitask needs an autoencoder"):
        load_config(None, ["train.objective=multitask", "train.model=resnet18"])
    assert (
        load_config(None, ["train.objective=reconstruct", "train.model=conv_ae"]).train.objective
        == "reconstruct"
    )


def test_the_probes_read_what_the_features_hold() -> None:
    rng = np.random.default_rng(0)
    n = 600
    y = np.arange(n) % 3
    theta = rng.uniform(0.8, 2.0, n)
    # Features: the class in two directions, theta_E in a third, noise in the rest.
    f = rng.normal(size=(n, 8))
    f[:, 0] += 2.0 * (y == 1)
    f[:, 1] += 2.0 * (y == 2)
    f[:, 2] += 10.0 * theta  # noise 1 -> an error of about 0.1 arcsec
    half = n // 2
    probs = linear_probe((f[:half], y[:half]), f[half:])
    assert probs.shape == (half, 3) and np.mean(probs.argmax(1) == y[half:]) > 0.7
    target = theta.copy()
    target[::7] = np.nan  # rows where the target does not apply are left out
    r = regression_head((f[:half], target[:half]), (f[half:], target[half:]), n_boot=200)
    assert r["rmse"] < 0.5 * r["target_std"] and r["r2"] > 0.7
    assert r["rmse_ci95"][0] < r["rmse"] < r["rmse_ci95"][1]
    assert r["n_test"] == np.isfinite(target[half:]).sum()


def test_encoder_features_are_batched_alike() -> None:
    model = LensClassifier("conv_encoder", 1, [0.0], [1.0], classes=CLASSES).eval()
    x = _batch(10)[0].numpy()
    np.testing.assert_allclose(
        encoder_features(model, x, batch_size=3), encoder_features(model, x), atol=1e-5
    )


def test_the_resnet_autoencoder_initialises_a_plain_resnet18(tmp_path) -> None:
    ae = LensClassifier("resnet18_ae", 1, [0.0], [1.0], classes=CLASSES).eval()
    x = _batch(4, 64)[0]
    logits, target, recon = ae(x, reconstruct=True)
    assert logits.shape == (4, 3) and recon.shape == target.shape == (4, 1, 64, 64)
    save_classifier(ae, tmp_path / "ae.pt")
    plain = LensClassifier("resnet18", 1, [0.0], [1.0], classes=CLASSES).eval()
    report = load_pretrained(plain.backbone, tmp_path / "ae.pt")
    assert {k.split(".")[0] for k in report["skipped"]} >= {"decoder"}
    assert not any(k.startswith("decoder.") for k in report["loaded"])
    torch.testing.assert_close(plain(x), ae(x))
    torch.testing.assert_close(plain.features(x), ae.features(x))
    with pytest.raises(Exception, match="no pooled features"):
        LensClassifier("tiny", 1, [0.0], [1.0]).features(x)


def test_bench_representation_rows_are_checked_and_kept_in_table_order() -> None:
    from lensmill.bench.representation import ROWS, plan_rows

    assert plan_rows(None) == list(ROWS)
    assert plan_rows(["multi-task", "supervised"]) == ["supervised", "multi-task"]
    with pytest.raises(ConfigError, match="multitask.*rows are"):
        plan_rows(["multitask"])
    with pytest.raises(ConfigError, match="autoencoder"):
        plan_rows(["fine-tuned encoder"])


def test_bench_representation_means_each_row_over_its_seeds() -> None:
    from lensmill.bench.representation import mean_rows

    def row(name: str, seed: int, acc: float, auc: float, rmse: float) -> dict:
        return {"name": name, "seed": seed, "accuracy": acc, "accuracy_ci95": [acc - 0.01, acc + 0.01],
                "macro_roc_auc": auc, "macro_roc_auc_ci95": [auc - 0.01, auc + 0.01],
                "regression": {"theta_e_arcsec": {"rmse": rmse, "rmse_ci95": [rmse, rmse]}}}  # fmt: skip

    runs = [
        [row("supervised", 0, 0.90, 0.98, 0.08), row("multi-task", 0, 0.92, 0.99, 0.06)],
        [row("multi-task", 1, 0.94, 0.97, 0.04), row("supervised", 1, 0.80, 0.96, 0.10)],
    ]
    sup, multi = mean_rows(runs)
    assert sup["name"] == "supervised" and sup["seeds"] == [0, 1]
    assert sup["accuracy"] == pytest.approx(0.85) and sup["accuracy_per_seed"] == [0.90, 0.80]
    assert sup["accuracy_sd"] == pytest.approx(np.std([0.90, 0.80], ddof=1))
    assert multi["macro_roc_auc"] == pytest.approx(0.98) and multi["macro_roc_auc_per_seed"] == [0.99, 0.97]
    assert multi["regression"]["theta_e_arcsec"]["rmse"] == pytest.approx(0.05)
    assert runs[0][1]["macro_roc_auc"] == 0.99  # the seeds' own rows are left as they were
    (one,) = mean_rows([[row("supervised", 3, 0.5, 0.6, 0.1)]])
    assert one["accuracy_sd"] == 0.0 and one["accuracy"] == 0.5


def test_bench_representation_table_gives_intervals_for_one_seed_and_spreads_for_several() -> None:
    from lensmill.bench.representation import mean_rows, representation_markdown

    def row(seed: int, auc: float) -> dict:
        return {"name": "supervised", "seed": seed, "accuracy": 0.9, "accuracy_ci95": [0.88, 0.92],
                "macro_roc_auc": auc, "macro_roc_auc_ci95": [auc - 0.01, auc + 0.01],
                "regression": {}}  # fmt: skip

    assert "0.900 [0.880, 0.920] | 0.950 [0.940, 0.960] | n/a" in representation_markdown(
        mean_rows([[row(0, 0.95)]])
    )
    assert "| 0.960 ± 0.014 |" in representation_markdown(mean_rows([[row(0, 0.95)], [row(1, 0.97)]]))


def test_bench_representation_refuses_an_unknown_row_before_ray_starts() -> None:
    from typer.testing import CliRunner

    from lensmill.cli import app

    result = CliRunner().invoke(app, ["bench", "representation", "--row", "multitask"])
    assert result.exit_code == 2
    assert "--row: unknown row(s) ['multitask']" in result.output and "Traceback" not in result.output
