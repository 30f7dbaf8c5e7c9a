import numpy as np
import pytest
import torch

from lensmill.models import LensClassifier, create_model, list_models, load_classifier, save_classifier
from lensmill.train import dihedral_augment


def test_dihedral_augment_only_permutes_pixels_within_each_image():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4).repeat(32, 1, 1, 1)
    y = dihedral_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    for a, b in zip(x, y, strict=True):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
    # With 64 images, more than one of the 8 transforms must have been drawn.
    assert len({tuple(im.flatten().tolist()) for im in y[::2]}) > 1


def test_every_registered_model_runs_forward_and_backward():
    for name in ["tiny", "resnet18", "resnet34", "timm:resnet10t"]:
        assert name in list_models() or name.startswith("timm:")
        m = create_model(name, in_chans=3, num_classes=1)
        out = m(torch.randn(2, 3, 64, 64))
        out.sum().backward()
        assert out.shape == (2, 1)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


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
