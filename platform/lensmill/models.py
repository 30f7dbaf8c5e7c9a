"""Model registry in the style of timm: ``create_model(name, in_chans=…, num_classes=…)``.

Names: the torchvision ResNets (``resnet18``, ``resnet34``), ``tiny`` (a small CNN for fast tests),
and any timm model as ``timm:<name>`` (e.g. ``timm:resnet10t``). Weights are never fetched from a hub:
``pretrained_path`` loads a local file or URI.

A ``LensClassifier`` wraps a backbone with the normalisation it was trained with, so a saved member
carries everything needed to score raw images of shape (N, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

_TORCHVISION = ("resnet18", "resnet34")


class TinyCNN(nn.Module):
    """Three conv blocks and a linear head: seconds to train, for tests and smoke runs."""

    def __init__(self, in_chans: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = in_chans
        for i in range(3):
            out = width * 2**i
            layers += [nn.Conv2d(chans, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            chans = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, F, H/8, W/8) -> global average -> (N, num_classes)
        return self.head(self.features(x).mean(dim=(2, 3)))


def _torchvision_resnet(name: str, in_chans: int, num_classes: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _timm_model(name: str, in_chans: int, num_classes: int) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    except RuntimeError as exc:  # timm raises RuntimeError("Unknown model ...")
        raise ValueError(f"unknown timm model {name!r}: {exc}") from exc


def list_models(pattern: str = "") -> list[str]:
    """Registered names; any timm model is also accepted as ``timm:<name>`` (see ``timm.list_models``)."""
    names = ["tiny", *_TORCHVISION, "timm:<any timm model>"]
    return [n for n in names if pattern in n]


def create_model(
    name: str, in_chans: int = 1, num_classes: int = 1, pretrained_path: str | Path | None = None
) -> nn.Module:
    """Build a backbone by name; ``num_classes=1`` gives one lens logit per image."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "tiny": lambda: TinyCNN(in_chans, num_classes),
        **{n: (lambda n=n: _torchvision_resnet(n, in_chans, num_classes)) for n in _TORCHVISION},
    }
    if name.startswith("timm:"):
        model = _timm_model(name.removeprefix("timm:"), in_chans, num_classes)
    elif name in builders:
        model = builders[name]()
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    if pretrained_path is not None:
        state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model


class LensClassifier(nn.Module):
    """asinh stretch + per-channel standardisation (training-split statistics) + backbone -> one logit.

    Sky-subtracted fluxes are heavy-tailed (a galaxy core is ~10^3 x the sky noise). Fed linearly,
    the rare bright pixels dominate BatchNorm's running variance, and eval-mode outputs collapse
    towards 0.5. ``asinh(x / scale)`` with ``scale`` at the noise level is linear in the noise and
    logarithmic in the cores, the stretch astronomers use to look at such images.
    """

    def __init__(
        self,
        model_name: str,
        in_chans: int,
        mean: list[float],
        std: list[float],
        scale: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.backbone = create_model(model_name, in_chans=in_chans, num_classes=1)
        self.stretch = scale is not None
        self.register_buffer("scale", _channel_buffer(scale or [1.0] * in_chans))
        self.register_buffer("mean", _channel_buffer(mean))
        self.register_buffer("std", _channel_buffer(std))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) raw fluxes -> (N, C, H, W) standardised inputs
        if self.stretch:
            x = torch.asinh(x / self.scale)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) raw fluxes -> (N,) logits
        return self.backbone(self.normalise(x)).squeeze(-1)


def _channel_buffer(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def build_classifier(meta: dict[str, Any]) -> LensClassifier:
    return LensClassifier(
        meta["model"], meta["in_chans"], meta["norm_mean"], meta["norm_std"], meta.get("norm_scale")
    )


def save_classifier(model: LensClassifier, path: Path, extra: dict[str, Any] | None = None) -> None:
    """One file per member: architecture, normalisation and weights (loadable without lensmill's config)."""
    model = getattr(model, "module", model)  # unwrap DDP
    meta = {
        "model": model.model_name,
        "in_chans": int(model.mean.shape[1]),
        "norm_mean": model.mean.flatten().tolist(),
        "norm_std": model.std.flatten().tolist(),
        "norm_scale": model.scale.flatten().tolist() if model.stretch else None,
    }
    torch.save({**meta, **(extra or {}), "state_dict": model.state_dict()}, path)


def load_classifier(path: Path) -> tuple[LensClassifier, dict[str, Any]]:
    """Inverse of ``save_classifier``; returns the model in eval mode and its saved metadata."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    model = build_classifier(blob)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, {k: v for k, v in blob.items() if k != "state_dict"}
