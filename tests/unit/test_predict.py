"""EnsemblePredictor: save/load round trip, combine/spread math, input validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lensmill.models import LensClassifier
from lensmill.predict import (
    EnsembleArtifactError,
    EnsembleNotFoundError,
    EnsemblePredictor,
    Member,
    validate_images,
)

SHAPE = (1, 32, 32)


def _member(name: str, seed: int, weight: float) -> Member:
    torch.manual_seed(seed)
    model = LensClassifier("tiny", in_chans=1, mean=[0.0], std=[1.0])
    # Non-trivial BatchNorm statistics, so that eval mode (not batch statistics) is exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    # Metadata as the ensemble stage passes it: load_classifier's keys plus numpy scalars.
    meta = {"val_auc": np.float64(0.9 + seed / 100), "in_chans": 1, "norm_mean": [0.0], "norm_std": [1.0]}
    return Member(name=name, model=model, weight=weight, meta=meta)


@pytest.fixture(scope="module")
def predictor() -> EnsemblePredictor:
    members = [_member("tiny-a", 1, 0.6), _member("tiny-b", 2, 0.4)]
    return EnsemblePredictor(members, SHAPE, threshold=0.5, info={"dataset_id": "ds-test"}, batch_size=4)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(10, *SHAPE)).astype(np.float32)


def test_save_load_round_trip(predictor: EnsemblePredictor, images: np.ndarray, tmp_path: Path) -> None:
    before = predictor.predict(images)
    predictor.save(tmp_path / "ens")
    manifest = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["image_shape"] == list(SHAPE)
    assert manifest["dataset_id"] == "ds-test"
    assert [m["file"] for m in manifest["members"]] == ["member-0.pt", "member-1.pt"]
    assert [m["model"] for m in manifest["members"]] == ["tiny", "tiny"]
    assert sum(m["weight"] for m in manifest["members"]) == pytest.approx(1.0)
    assert manifest["members"][0]["val_auc"] == pytest.approx(0.91)
    # What the member file already holds is not repeated in ensemble.json.
    assert set(manifest["members"][0]) == {
        "name", "model", "weight", "file", "val_auc", "input_size_px", "temperature",
    }  # fmt: skip

    loaded = EnsemblePredictor.load(tmp_path / "ens")
    after = loaded.predict(images)
    assert loaded.member_names == ["tiny-a", "tiny-b"]
    assert loaded.image_shape == SHAPE
    assert loaded.info == {"dataset_id": "ds-test"}
    np.testing.assert_allclose(loaded.weights, [0.6, 0.4])
    for key in ("p_lens", "label", "member_probs", "spread"):
        np.testing.assert_allclose(after[key], before[key], rtol=0, atol=1e-7)


def test_predict_shapes_and_consistency(predictor: EnsemblePredictor, images: np.ndarray) -> None:
    out = predictor.predict(images)
    assert out["p_lens"].shape == (10,)
    assert out["label"].shape == (10,) and out["label"].dtype.kind == "i"
    assert out["member_probs"].shape == (10, 2)
    assert out["spread"].shape == (10,)
    assert ((out["member_probs"] > 0) & (out["member_probs"] < 1)).all()
    np.testing.assert_allclose(out["p_lens"], out["member_probs"] @ np.array([0.6, 0.4]))
    np.testing.assert_array_equal(out["label"], (out["p_lens"] >= 0.5).astype(int))
    # Batching (batch_size=4 over 10 images) must not change results: score one by one.
    singles = np.concatenate([predictor.member_probabilities(img) for img in images])
    np.testing.assert_allclose(singles, out["member_probs"], atol=1e-6)
    # Member probabilities are the sigmoid of each member's logits.
    with torch.inference_mode():
        logits = predictor.members[1].model(torch.from_numpy(images)).double()
    np.testing.assert_allclose(out["member_probs"][:, 1], torch.sigmoid(logits).numpy(), atol=1e-7)


def test_combine_math() -> None:
    probs = np.array([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(EnsemblePredictor.combine(probs, np.array([0.5, 0.5])), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(EnsemblePredictor.combine(probs, np.array([0.75, 0.25])), [0.35, 0.75, 0.5])
    # Unnormalised weights give the same weighted average.
    np.testing.assert_allclose(EnsemblePredictor.combine(probs, np.array([3.0, 1.0])), [0.35, 0.75, 0.5])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        EnsemblePredictor.combine(probs, np.array([0.2, 0.3, 0.5]))


def test_spread() -> None:
    agree = np.array([[0.3, 0.3, 0.3], [0.9, 0.9, 0.9]])
    np.testing.assert_allclose(EnsemblePredictor.weighted_std(agree, np.array([0.2, 0.3, 0.5])), [0, 0])
    # Two members at 0 and 1 with equal weights: mean 0.5, std 0.5.
    split = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(EnsemblePredictor.weighted_std(split, np.array([1.0, 1.0])), [0.5])
    # Weighted: mean 0.25, var 0.75 * 0.25**2 + 0.25 * 0.75**2 = 0.1875.
    np.testing.assert_allclose(EnsemblePredictor.weighted_std(split, np.array([3.0, 1.0])), [np.sqrt(0.1875)])


def test_spread_zero_when_members_agree(images: np.ndarray) -> None:
    a, b = _member("a", 7, 0.5), _member("b", 8, 0.5)
    b.model.load_state_dict(a.model.state_dict())
    out = EnsemblePredictor([a, b], SHAPE).predict(images)
    np.testing.assert_allclose(out["spread"], 0.0, atol=1e-7)
    np.testing.assert_allclose(out["p_lens"], out["member_probs"][:, 0])


def test_validate_images_accepts_squeezed_forms() -> None:
    img = np.ones(SHAPE[1:], dtype=np.float64)
    assert validate_images(img, SHAPE).shape == (1, *SHAPE)
    assert validate_images(np.stack([img, img]), SHAPE).shape == (2, *SHAPE)
    out = validate_images(np.stack([img, img])[:, None], SHAPE)
    assert out.shape == (2, *SHAPE) and out.dtype == np.float32
    assert validate_images(img.tolist(), SHAPE).shape == (1, *SHAPE)
    # Multi-band: a single (C, H, W) image is accepted, (N, H, W) is not.
    assert validate_images(np.zeros((3, 8, 8)), (3, 8, 8)).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"received shape \(5, 8, 8\)"):
        validate_images(np.zeros((5, 8, 8)), (3, 8, 8))


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (
            np.zeros((2, 1, 16, 16)),
            r"expected images of shape \(N, 1, 32, 32\).*received shape \(2, 1, 16, 16\)",
        ),
        (np.zeros((2, 3, 32, 32)), r"received shape \(2, 3, 32, 32\)"),
        (np.zeros(32), r"received shape \(32\)"),
        (np.zeros((0, 1, 32, 32)), r"empty batch"),
        (np.full((1, 32, 32), np.nan), r"NaN or infinite"),
        (np.full((32, 32), np.inf), r"NaN or infinite"),
        (np.full((32, 32), 1e300), r"NaN or infinite"),
        (np.full((32, 32), "x"), r"numeric"),
    ],
)
def test_validate_images_errors(array: np.ndarray, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        validate_images(array, SHAPE)


def test_validate_images_ragged() -> None:
    with pytest.raises(ValueError, match="rectangular"):
        validate_images([[1.0, 2.0], [3.0]], SHAPE)


def test_constructor_checks() -> None:
    m = _member("a", 1, 1.0)
    with pytest.raises(ValueError, match="channel"):
        EnsemblePredictor([m], (3, 32, 32))
    with pytest.raises(ValueError, match="weights"):
        EnsemblePredictor([Member("a", m.model, -1.0)], SHAPE)
    with pytest.raises(ValueError, match="unique"):
        EnsemblePredictor([m, m], SHAPE)
    with pytest.raises(ValueError, match="at least one"):
        EnsemblePredictor([], SHAPE)


def test_load_errors_name_the_path(predictor: EnsemblePredictor, tmp_path: Path) -> None:
    with pytest.raises(EnsembleNotFoundError, match=str(tmp_path)):
        EnsemblePredictor.load(tmp_path)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for callers that catch that
        EnsemblePredictor.load(tmp_path)

    (tmp_path / "ensemble.json").write_text("{not json")
    with pytest.raises(EnsembleArtifactError, match=r"ensemble\.json is not valid JSON"):
        EnsemblePredictor.load(tmp_path)

    ens = predictor.save(tmp_path / "ens")
    manifest = json.loads((ens / "ensemble.json").read_text())
    for mutate, pattern in [
        (lambda d: d.update(format_version=2), r"format_version: .*\(got 2\)"),
        (lambda d: d.update(image_shape=[1, 32]), "image_shape"),
        (lambda d: d.update(members=[]), "members"),
        (lambda d: d["members"][0].pop("weight"), r"members\.0\.weight: Field required"),
        (lambda d: d["members"][0].update(weight=-1), r"members\.0\.weight: .*greater than or equal to 0"),
        (lambda d: d["members"][1].update(file="gone.pt"), "gone.pt does not exist"),
        (lambda d: d.update(image_shape=[3, 32, 32]), "channel"),
        (lambda d: d.update(temperature=0), "temperature"),
        (lambda d: d.update(temperature="hot"), "temperature"),
    ]:
        broken = json.loads(json.dumps(manifest))
        mutate(broken)
        (ens / "ensemble.json").write_text(json.dumps(broken))
        with pytest.raises(EnsembleArtifactError, match=pattern) as info:
            EnsemblePredictor.load(ens)
        assert str(ens / "ensemble.json") in str(info.value)


def test_temperature_calibrates_p_lens_and_survives_a_round_trip(images: np.ndarray, tmp_path: Path) -> None:
    members = [_member("tiny-a", 1, 0.6), _member("tiny-b", 2, 0.4)]
    plain = EnsemblePredictor(members, SHAPE, info={"dataset_id": "ds"})
    hot = EnsemblePredictor(members, SHAPE, info={"dataset_id": "ds"}, temperature=2.0)
    assert plain.temperature == 1.0 and hot.temperature == 2.0
    a, b = plain.predict(images), hot.predict(images)
    np.testing.assert_allclose(b["p_lens_uncalibrated"], a["p_lens"])
    np.testing.assert_allclose(a["p_lens_uncalibrated"], a["p_lens"])
    z = np.log(a["p_lens"] / (1 - a["p_lens"]))
    np.testing.assert_allclose(b["p_lens"], 1 / (1 + np.exp(-z / 2.0)), rtol=1e-12)
    # T > 1 pulls every probability towards 0.5, keeps the order and the labels at threshold 0.5.
    assert (np.abs(b["p_lens"] - 0.5) <= np.abs(a["p_lens"] - 0.5) + 1e-12).all()
    np.testing.assert_array_equal(np.argsort(b["p_lens"]), np.argsort(a["p_lens"]))
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_allclose(b["member_probs"], a["member_probs"])  # members stay uncalibrated

    hot.save(tmp_path / "ens")
    manifest = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert manifest["temperature"] == 2.0
    loaded = EnsemblePredictor.load(tmp_path / "ens")
    assert loaded.temperature == 2.0 and loaded.info == {"dataset_id": "ds"}
    np.testing.assert_allclose(loaded.predict(images)["p_lens"], b["p_lens"], atol=1e-7)

    # An artifact written before calibration existed has no temperature: it scores as before.
    del manifest["temperature"]
    (tmp_path / "ens" / "ensemble.json").write_text(json.dumps(manifest))
    old = EnsemblePredictor.load(tmp_path / "ens")
    assert old.temperature == 1.0
    np.testing.assert_allclose(old.predict(images)["p_lens"], a["p_lens"], atol=1e-7)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="temperature"):
            EnsemblePredictor(members, SHAPE, temperature=bad)


def test_tta_scores_do_not_depend_on_orientation_and_survive_save_load(
    predictor: EnsemblePredictor, images: np.ndarray, tmp_path: Path
) -> None:
    members = [_member("tiny-a", 1, 0.6), _member("tiny-b", 2, 0.4)]
    tta = EnsemblePredictor(members, SHAPE, threshold=0.5, batch_size=4, tta=True)
    p = tta.member_probabilities(images)
    # Averaged over the dihedral group: a rotated or mirrored image scores the same.
    for turned in (
        np.rot90(images, 1, axes=(2, 3)),
        images[..., ::-1],
        np.rot90(images[..., ::-1], 3, axes=(2, 3)),
    ):
        assert np.allclose(tta.member_probabilities(np.ascontiguousarray(turned)), p, atol=1e-6)
    # Without TTA the tiny CNN is not rotation invariant, so the check above could fail.
    plain = predictor.member_probabilities(images)
    assert not np.allclose(
        predictor.member_probabilities(np.ascontiguousarray(np.rot90(images, 1, axes=(2, 3)))),
        plain,
        atol=1e-4,
    )
    loaded = EnsemblePredictor.load(tta.save(tmp_path / "tta"))
    assert loaded.tta and np.allclose(loaded.member_probabilities(images), p)
    assert json.loads((tmp_path / "tta" / "ensemble.json").read_text())["tta"] is True


def test_members_at_their_own_scales_score_native_images_and_keep_their_scale(tmp_path: Path) -> None:
    torch.manual_seed(0)
    seen: list[tuple[int, ...]] = []
    native = LensClassifier("tiny", 1, mean=[0.0], std=[1.0])
    scaled = LensClassifier("vit_cutout_tiny", 1, mean=[0.0], std=[1.0], input_size_px=48)
    scaled.backbone.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    ens = EnsemblePredictor([Member("cnn", native, 0.5), Member("vit", scaled, 0.5)], (1, 32, 32))
    x = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    before = ens.member_probabilities(x)
    assert seen == [(3, 1, 48, 48)]  # the transformer saw 48x48, the CNN the images as given
    ens.save(tmp_path / "ens")
    loaded = EnsemblePredictor.load(tmp_path / "ens")
    assert [m.model.input_size_px for m in loaded.members] == [None, 48]
    manifest = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert [m["input_size_px"] for m in manifest["members"]] == [None, 48]
    np.testing.assert_allclose(loaded.member_probabilities(x), before, atol=1e-6)


def test_a_member_temperature_is_applied_to_its_column_and_survives_save_load(tmp_path: Path) -> None:
    from lensmill.metrics import apply_temperature

    torch.manual_seed(0)
    model = LensClassifier("tiny", 1, mean=[0.0], std=[1.0])
    x = np.random.default_rng(1).normal(size=(4, 1, 32, 32)).astype(np.float32)
    as_trained = EnsemblePredictor([Member("m", model, 1.0)], (1, 32, 32)).member_probabilities(x)
    hot = EnsemblePredictor([Member("m", model, 1.0, temperature=2.5)], (1, 32, 32))
    np.testing.assert_allclose(hot.member_probabilities(x), apply_temperature(as_trained, 2.5), atol=1e-12)
    hot.save(tmp_path / "e")
    assert EnsemblePredictor.load(tmp_path / "e").members[0].temperature == 2.5
    np.testing.assert_allclose(
        EnsemblePredictor.load(tmp_path / "e").member_probabilities(x), hot.member_probabilities(x)
    )
