import numpy as np
import pytest
import torch

from lensmill.errors import ModelError
from lensmill.models import (
    LensClassifier,
    create_model,
    list_models,
    load_classifier,
    load_pretrained,
    save_classifier,
)
from lensmill.train import (
    ShardBatches,
    dihedral_augment,
    normalisation_of,
    plan_attempt,
    should_stop_early,
)


def test_dihedral_augment_only_permutes_pixels_within_each_image():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4).repeat(32, 1, 1, 1)
    y = dihedral_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    for a, b in zip(x, y, strict=True):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
    # With 64 images, more than one of the 8 transforms must have been drawn.
    assert len({tuple(im.flatten().tolist()) for im in y[::2]}) > 1


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize(
    "name",
    ["tiny", "resnet18", "resnet34", "resnet18_small_stem", "vit_b_16", "vit_cutout_tiny", "timm:resnet10t"],
)
def test_every_registered_model_runs_forward_and_backward(name: str, in_chans: int):
    assert name in list_models() or name.startswith("timm:")
    torch.manual_seed(0)
    m = create_model(name, in_chans=in_chans, num_classes=1)
    out = m(torch.randn(2, in_chans, 64, 64))  # the ViT resizes to 224x224 itself
    out.sum().backward()
    assert out.shape == (2, 1)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_the_cutout_vit_takes_other_cutout_sizes_by_interpolating_its_position_embeddings():
    m = create_model("vit_cutout_tiny", in_chans=2).eval()
    with torch.inference_mode():
        assert m(torch.randn(3, 2, 32, 32)).shape == (3, 1) and m(torch.randn(1, 2, 96, 96)).shape == (1, 1)
    assert m.patch_embed.grid_size == (8, 8) and 2e6 < sum(p.numel() for p in m.parameters()) < 4e6


def test_small_stem_keeps_the_cutouts_resolution_into_the_first_block():
    seen = {}
    for name in ("resnet18", "resnet18_small_stem"):
        m = create_model(name, in_chans=3).eval()
        m.layer1.register_forward_hook(
            lambda mod, args, out, name=name: seen.update({name: tuple(out.shape)})
        )
        with torch.inference_mode():
            m(torch.randn(1, 3, 64, 64))
    # The ImageNet stem (7x7 stride 2 + max-pool) leaves 16x16 of a 64x64 cutout; the small stem 64x64.
    assert seen == {"resnet18": (1, 64, 16, 16), "resnet18_small_stem": (1, 64, 64, 64)}
    assert create_model("resnet34_small_stem", in_chans=1).conv1.kernel_size == (3, 3)


def test_vit_keeps_torchvision_keys_and_resizes_inside():
    m = create_model("vit_b_16", in_chans=2)
    assert m.conv_proj.in_channels == 2 and "conv_proj.weight" in m.state_dict()
    seen = []
    m.conv_proj.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    with torch.inference_mode():
        m.eval()(torch.randn(1, 2, 48, 48))
    assert seen == [(1, 2, 224, 224)]


def test_pretrained_weights_load_from_a_file_adapting_bands_and_skipping_the_head(tmp_path):
    torch.manual_seed(1)
    src = create_model("resnet18", in_chans=3, num_classes=1000)  # like an ImageNet state_dict
    torch.save(src.state_dict(), tmp_path / "r18.pt")
    dst = create_model("resnet18", in_chans=1, pretrained_path=tmp_path / "r18.pt")
    torch.testing.assert_close(dst.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    # One band: the RGB filters summed (timm's recipe); the 1000-class head keeps its fresh init.
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight.sum(dim=1, keepdim=True))
    assert dst.fc.weight.shape == (1, 512)
    fresh = create_model("resnet18", in_chans=1)
    report = load_pretrained(fresh, f"file://{tmp_path / 'r18.pt'}")
    assert report["adapted"] == ["conv1.weight"] and set(report["skipped"]) == {"fc.weight", "fc.bias"}
    # Five bands tile the three filters, rescaled by 3/5.
    five = create_model("resnet18", in_chans=5, pretrained_path=tmp_path / "r18.pt")
    torch.testing.assert_close(five.conv1.weight[:, 3], src.conv1.weight[:, 0] * 0.6)


def test_pretrained_weights_from_a_lensmill_member_file(tmp_path):
    trained = LensClassifier("tiny", 1, mean=[0.0], std=[1.0])
    save_classifier(trained, tmp_path / "member.pt")  # keys "backbone.*" inside {"state_dict": ...}
    m = create_model("tiny", in_chans=1, pretrained_path=tmp_path / "member.pt")
    for k, v in trained.backbone.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v)


def test_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="pretrained weights not found"):
        create_model("tiny", pretrained_path=tmp_path / "missing.pt")
    torch.save(create_model("tiny").state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="wrong architecture"):
        create_model("resnet18", pretrained_path=tmp_path / "tiny.pt")
    torch.save({"not": "weights"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="state_dict"):
        create_model("tiny", pretrained_path=tmp_path / "junk.pt")


def test_pretrained_weights_from_s3(s3_endpoint, tmp_path):
    """A storage URI goes through lensmill.storage (moto's S3-compatible server here)."""
    import io

    import boto3

    from lensmill.config import StorageConfig

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="weights")
    buf = io.BytesIO()
    src = create_model("tiny", in_chans=1)
    torch.save(src.state_dict(), buf)
    s3.put_object(Bucket="weights", Key="tiny.pt", Body=buf.getvalue())
    storage = StorageConfig(root=str(tmp_path), s3_endpoint_url=s3_endpoint)
    m = create_model("tiny", in_chans=1, pretrained_path="s3://weights/tiny.pt", storage=storage)
    torch.testing.assert_close(m.head.weight, src.head.weight)


def test_unknown_model_names_are_clear():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        create_model("resnet9000")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("timm:not_a_model_xyz")


def test_classifier_round_trip_keeps_normalisation_and_outputs(tmp_path):
    m = LensClassifier("tiny", 2, mean=[1.0, 2.0], std=[3.0, 4.0], scale=[0.5, 0.25]).eval()
    x = torch.randn(3, 2, 32, 32)
    save_classifier(m, tmp_path / "m.pt", {"epoch": 3})
    loaded, meta = load_classifier(tmp_path / "m.pt")
    assert meta["epoch"] == 3 and meta["norm_std"] == [3.0, 4.0] and meta["norm_scale"] == [0.5, 0.25]
    with torch.inference_mode():
        np.testing.assert_allclose(m(x).numpy(), loaded(x).numpy(), rtol=1e-6)


def test_asinh_stretch_is_linear_in_the_noise_and_compresses_bright_cores():
    m = LensClassifier("tiny", 1, mean=[0.0], std=[1.0], scale=[0.2])
    x = torch.tensor([0.02, 0.2, 200.0]).view(1, 1, 1, 3)
    z = m.normalise(x).flatten()
    assert z[0] == pytest.approx(0.1, rel=2e-3)  # asinh(0.1) = 0.0998: noise stays linear
    assert z[2] == pytest.approx(np.arcsinh(1000.0), rel=1e-5)  # a core 1000 sigma bright -> ~7.6
    plain = LensClassifier("tiny", 1, mean=[0.0], std=[1.0])
    assert torch.equal(plain.normalise(x), x)


def test_stretch_auto_is_asinh_for_sky_subtracted_pixels_and_linear_for_display_counts(tmp_path):
    rng = np.random.default_rng(0)
    sky = rng.normal(0.0, 0.5, (2, 20_000))  # (C, P) sky-subtracted fluxes: noise around zero
    sky[:, :100] += 500.0  # a few bright cores
    fluxes = normalisation_of(sky, "auto")
    assert fluxes.scale is not None and fluxes.scale[0] == pytest.approx(0.5, rel=0.05)
    counts = np.round(rng.uniform(0, 255, (1, 20_000)))  # an 8-bit PNG's counts: never negative
    display = normalisation_of(counts, "auto")
    assert display.scale is None and display.as_params()["norm_stretch"] == "linear"
    assert display.mean[0] == pytest.approx(counts.mean()) and display.std[0] == pytest.approx(counts.std())
    assert normalisation_of(counts, "asinh").scale is not None  # the setting overrides the rule
    assert normalisation_of(sky, "linear").scale is None
    # The linear model standardises only, and keeps that through save and load.
    m = display.classifier("tiny")
    x = torch.full((1, 1, 8, 8), float(counts.mean()))
    assert torch.allclose(m.normalise(x), torch.zeros_like(x), atol=1e-5)
    save_classifier(m, tmp_path / "m.pt")
    loaded, meta = load_classifier(tmp_path / "m.pt")
    assert meta["norm_scale"] is None and not loaded.stretch


def _h(*aucs: float) -> list[dict]:
    return [{"epoch": i, "val_auc": a} for i, a in enumerate(aucs)]


def test_should_stop_early_counts_epochs_without_improvement():
    assert not should_stop_early(_h(0.6, 0.7), None)
    assert not should_stop_early([], 1)
    assert not should_stop_early(_h(0.6, 0.7, 0.8), 1)
    assert should_stop_early(_h(0.6, 0.7, 0.65), 1)
    assert not should_stop_early(_h(0.6, 0.7, 0.65), 2)
    assert should_stop_early(_h(0.6, 0.7, 0.65, 0.69), 2)
    assert should_stop_early(_h(0.6, 0.7, 0.7), 1)  # a tie is no improvement
    assert not should_stop_early(_h(0.6, 0.7, 0.65, 0.71), 2)
    assert should_stop_early(_h(float("nan"), float("nan")), 1)  # NaN counts as the worst


def test_fault_drill_is_planned_once_per_run():
    # First start, failure after the first checkpoint: planned; the restart resumes and is not drilled.
    first = plan_attempt([], fail_at_epoch=2, start_epoch=0, resumed_from=None)
    assert first["attempt"] == 0 and first["inject_failure_at"] == 2
    second = plan_attempt([first], fail_at_epoch=2, start_epoch=2, resumed_from=1)
    assert second["attempt"] == 1 and second["inject_failure_at"] is None
    assert second["resumed_from_epoch"] == 1
    # Failure at epoch 0: the restart has no checkpoint either, and still must not fail again.
    first = plan_attempt([], fail_at_epoch=0, start_epoch=0, resumed_from=None)
    assert first["inject_failure_at"] == 0
    assert plan_attempt([first], 0, 0, None)["inject_failure_at"] is None
    # A run resumed past the drill epoch is not drilled; no drill without fail_at_epoch.
    assert plan_attempt([], 1, 3, 2)["inject_failure_at"] is None
    assert plan_attempt([], None, 0, None)["inject_failure_at"] is None


class _FakeShard:
    """Stands in for a Ray Data iterator: yields collated batches, counts the passes."""

    def __init__(self, n: int) -> None:
        self.x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
        self.y = (torch.arange(n) % 2).float()
        self.passes = 0

    def iter_torch_batches(self, batch_size: int, **_: object):
        self.passes += 1
        for s in range(0, len(self.y), batch_size):
            yield {"image": self.x[s : s + batch_size], "label": self.y[s : s + batch_size]}


def test_shard_batches_stream_once_then_serve_shuffled_epochs_from_memory():
    shard = _FakeShard(10)
    data = ShardBatches(shard, (1, 2, 2), batch_size=4, cache=True, seed=3)
    first = list(data.epoch(0, shuffle=True))
    assert shard.passes == 1 and data.cached and [len(y) for _, y in first] == [4, 4, 2]
    second = list(data.epoch(1, shuffle=True))
    third = list(data.epoch(2, shuffle=True))
    assert shard.passes == 1  # no second pass through Ray Data
    ids = [torch.cat([x[:, 0, 0, 0] for x, _ in ep]).long().tolist() for ep in (second, third)]
    assert sorted(ids[0]) == list(range(10)) and ids[0] != ids[1]  # a new permutation per epoch
    for x, y in second:  # images and labels stay paired
        torch.testing.assert_close(y, (x[:, 0, 0, 0].long() % 2).float())
    ordered = torch.cat([x[:, 0, 0, 0] for x, _ in data.epoch(0, shuffle=False)])
    assert ordered.long().tolist() == list(range(10))
    # Without the cache every epoch streams.
    shard = _FakeShard(6)
    data = ShardBatches(shard, (1, 2, 2), batch_size=4, cache=False)
    list(data.epoch(0, True)), list(data.epoch(1, True))
    assert shard.passes == 2 and not data.cached
