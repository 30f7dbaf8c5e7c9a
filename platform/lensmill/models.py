"""Model registry in the style of timm: ``create_model(name, in_chans=…, num_classes=…)``.

Names: the torchvision ResNets (``resnet18``, ``resnet34``), the same with a small-cutout stem
(``resnet18_small_stem``, ``resnet34_small_stem``: a 3x3 stride-1 first conv and no max-pool, as
CIFAR-style ResNets have, so a 64x64 cutout reaches the first block at full resolution instead of
16x16 and 1-2 px arcs are not blurred away), torchvision's ViT-B/16 (``vit_b_16``,
which resizes its input to 224x224 itself), ``vit_cutout_tiny`` (a small ViT for cutouts: 8-pixel
patches of a 64x64 image, width 192, depth 6; other sizes by interpolated position embeddings),
``tiny`` (a small CNN for fast tests), and any timm model as ``timm:<name>`` (e.g.
``timm:resnet10t``). Every model takes any number of bands (``in_chans``).
Weights are never fetched from a hub: ``load_pretrained`` reads a state_dict from a local path or a
storage URI (``s3://`` through ``lensmill.storage``).

A ``LensClassifier`` wraps a backbone with the normalisation it was trained with, the input scale
it sees (``input_size_px``) and its class names, so a saved member carries everything needed to score
raw images of shape (N, C, H, W), whatever scale the other members of its ensemble work at. Two
classes (lens finding) are the binary case of the same code: one logit, read as [0, z] (``class_logits``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import nn

from lensmill.errors import ModelError

# Lens finding's classes: a member saved before classes were recorded is one of these.
from lensmill.metrics import CLASS_NAMES

if TYPE_CHECKING:
    from lensmill.config import StorageConfig

_TORCHVISION = ("resnet18", "resnet34")
_SMALL_STEM = "_small_stem"
_VIT = ("vit_b_16",)
_CUTOUT_VIT = "vit_cutout_tiny"
# Autoencoders (encoder + decoder + head) and the small encoder alone as a classifier.
AUTOENCODER = "conv_ae"
_ENCODER = "conv_encoder"
_RESNET_AE = "resnet18_ae"
# torchvision's ViT-B/16 has a fixed 14x14 grid of 16-pixel patches.
VIT_IMAGE_SIZE = 224
# Prefixes a saved state_dict may carry around the backbone's own keys (DDP, LensClassifier).
_KEY_PREFIXES = ("module.", "backbone.")


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


def _conv_stage(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU, the first with stride 2: (N, c_in, H, W) -> (N, c_out, H/2, W/2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )  # fmt: skip


def _deconv_stage(c_in: int, c_out: int, last: bool = False) -> nn.Sequential:
    """A stride-2 transposed conv (and, except for the output, BN-ReLU and a 3x3 conv):
    (N, c_in, H, W) -> (N, c_out, 2H, 2W)."""
    up = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    if last:
        return nn.Sequential(up)
    return nn.Sequential(
        up, nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )  # fmt: skip


class EncoderNet(nn.Module):
    """A convolutional encoder (4 stride-2 stages, ``width`` x 1, 2, 4, 8 channels), a linear head on
    its pooled features and, for ``conv_ae``, a mirrored decoder that reconstructs the input: the
    DeepLense foundation-model recipe. The encoder's keys (``encoder.*``) are the same in both
    names, so a ``conv_ae`` trained on reconstruction initialises a ``conv_encoder`` classifier
    (``train.pretrained_uri``)."""

    def __init__(self, in_chans: int, num_classes: int, width: int = 32, decoder: bool = False) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(4)]
        self.encoder = nn.Sequential(
            *(_conv_stage(c, o) for c, o in zip([in_chans, *chans[:-1]], chans, strict=True))
        )
        self.num_features = chans[-1]
        self.head = nn.Linear(self.num_features, num_classes)
        self.decoder = _decoder(chans[::-1], in_chans) if decoder else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, F, H/16, W/16) -> global average -> (N, F)
        return self.encoder(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, reconstruct: bool = False) -> Any:
        """(N, C, H, W) -> (N, num_classes) logits; with ``reconstruct`` also (N, C, H, W), the
        decoder's image from the same encoding."""
        z = self.encoder(x)  # (N, F, H/16, W/16)
        logits = self.head(z.mean(dim=(2, 3)))
        if not reconstruct:
            return logits
        if self.decoder is None:
            raise ModelError("this model has no decoder: reconstruction needs model conv_ae")
        return logits, _fit_to(self.decoder(z), x)


def _decoder(chans: list[int], out_chans: int) -> nn.Sequential:
    """Stride-2 stages through ``chans`` (widest first), then one to ``out_chans``: each doubles H, W."""
    stages = [_deconv_stage(c, o) for c, o in zip(chans[:-1], chans[1:], strict=True)]
    return nn.Sequential(*stages, _deconv_stage(chans[-1], out_chans, last=True))


def _resnet_trunk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet up to its last stage: (N, C, H, W) -> (N, 512, H/32, W/32) (ResNet-18)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def _fit_to(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The decoder's image at the input's size (sizes that are not multiples of its stride)."""
    if recon.shape[-2:] == x.shape[-2:]:
        return recon
    return nn.functional.interpolate(recon, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _resnet_autoencoder(in_chans: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a decoder from its last stage (``decoder.*``): the state_dict
    keys of the encoder and head are plain ResNet-18's, so its weights initialise a ``resnet18``
    classifier (``train.pretrained_uri``) and the decoder's are skipped there."""
    model = _torchvision_resnet("resnet18", in_chans, num_classes)
    model.decoder = _decoder([512, 256, 128, 64, 32], in_chans)

    def forward(x: torch.Tensor, reconstruct: bool = False) -> Any:
        z = _resnet_trunk(model, x)  # (N, 512, H/32, W/32)
        logits = model.fc(torch.flatten(model.avgpool(z), 1))
        return (logits, _fit_to(model.decoder(z), x)) if reconstruct else logits

    model.forward = forward  # an instance attribute: nn.Module.__call__ dispatches to it
    return model


def _torchvision_resnet(name: str, in_chans: int, num_classes: int, small_stem: bool = False) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if small_stem:
        # (N, C, H, W) -> (N, 64, H, W) into layer1, where the ImageNet stem gives (N, 64, H/4, W/4).
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _resize_for_vit(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Forward pre-hook: (N, C, H, W) -> (N, C, 224, 224), bilinear, when the size differs."""
    x = args[0]
    if tuple(x.shape[-2:]) != (module.image_size, module.image_size):
        x = nn.functional.interpolate(
            x, size=(module.image_size, module.image_size), mode="bilinear", align_corners=False
        )
    return (x, *args[1:])


def _torchvision_vit(name: str, in_chans: int, num_classes: int) -> nn.Module:
    """torchvision's ViT at its native 224x224: smaller cutouts are upsampled inside the model, so
    ensemble members may see different input scales. The resize is a forward pre-hook rather than a
    wrapper module, so the state_dict keys stay torchvision's and its weight files load unchanged."""
    import torchvision

    model = getattr(torchvision.models, name)(
        weights=None, num_classes=num_classes, image_size=VIT_IMAGE_SIZE
    )
    if in_chans != 3:
        old = model.conv_proj
        model.conv_proj = nn.Conv2d(
            in_chans, old.out_channels, kernel_size=old.kernel_size, stride=old.stride
        )
        # torchvision's own initialisation of the patch embedding (truncated normal, std 1/sqrt(fan_in)).
        fan_in = in_chans * old.kernel_size[0] * old.kernel_size[1]
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(model.conv_proj.bias)
    model.register_forward_pre_hook(_resize_for_vit)
    return model


def _timm_model(name: str, in_chans: int, num_classes: int) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    except RuntimeError as exc:  # timm raises RuntimeError("Unknown model ...")
        raise ModelError(f"unknown timm model {name!r}: {exc}") from exc


def _cutout_vit(in_chans: int, num_classes: int) -> nn.Module:
    """timm's VisionTransformer sized for survey cutouts (2.7 M parameters): a 64x64 image is an 8x8
    grid of 8-pixel patches; ``dynamic_img_size`` interpolates the position embeddings for others."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=64,
        patch_size=8,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=192,
        depth=6,
        num_heads=3,
        dynamic_img_size=True,
    )


def list_models(pattern: str = "") -> list[str]:
    """Registered names; any timm model is also accepted as ``timm:<name>`` (see ``timm.list_models``)."""
    names = [
        "tiny",
        *_TORCHVISION,
        *(n + _SMALL_STEM for n in _TORCHVISION),
        *_VIT,
        _CUTOUT_VIT,
        AUTOENCODER,
        _ENCODER,
        _RESNET_AE,
        "timm:<any timm model>",
    ]
    return [n for n in names if pattern in n]


def check_model_name(name: str) -> None:
    """``ModelError`` naming the choices unless ``name`` is a registered model (builds nothing)."""
    if name.startswith("timm:"):
        import timm

        if not timm.is_model(name.removeprefix("timm:")):
            raise ModelError(f"unknown timm model {name.removeprefix('timm:')!r} (see timm.list_models())")
    elif name not in list_models() or name.startswith("timm:<"):
        raise ModelError(f"unknown model {name!r}; choose one of {list_models()}")


def create_model(
    name: str,
    in_chans: int = 1,
    num_classes: int = 1,
    pretrained_path: str | Path | None = None,
    storage: StorageConfig | None = None,
) -> nn.Module:
    """Build a backbone by name; ``num_classes=1`` gives one lens logit per image.

    ``pretrained_path``: a state_dict file (local path or storage URI) loaded by ``load_pretrained``.
    """
    builders: dict[str, Callable[[], nn.Module]] = {
        "tiny": lambda: TinyCNN(in_chans, num_classes),
        **{n: (lambda n=n: _torchvision_resnet(n, in_chans, num_classes)) for n in _TORCHVISION},
        **{
            n + _SMALL_STEM: (lambda n=n: _torchvision_resnet(n, in_chans, num_classes, small_stem=True))
            for n in _TORCHVISION
        },
        **{n: (lambda n=n: _torchvision_vit(n, in_chans, num_classes)) for n in _VIT},
        _CUTOUT_VIT: lambda: _cutout_vit(in_chans, num_classes),
        AUTOENCODER: lambda: EncoderNet(in_chans, num_classes, decoder=True),
        _ENCODER: lambda: EncoderNet(in_chans, num_classes),
        _RESNET_AE: lambda: _resnet_autoencoder(in_chans, num_classes),
    }
    check_model_name(name)
    if name.startswith("timm:"):
        model = _timm_model(name.removeprefix("timm:"), in_chans, num_classes)
    else:
        model = builders[name]()
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path, storage)
    return model


# -- pretrained weights ----------------------------------------------------------------------------


def read_state_dict(source: str | Path, storage: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from a local file or a storage URI (``s3://``: through ``lensmill.storage``).

    Accepted files: a bare state_dict, ``{"state_dict": ...}`` (lensmill member files, timm/Lightning
    checkpoints) or ``{"model": ...}`` (lensmill's resume state). Never downloads from a model hub.
    """
    text = str(source)
    if "://" in text and not text.startswith("file://"):
        from lensmill.config import StorageConfig
        from lensmill.storage import read_bytes

        data = read_bytes(text, storage or StorageConfig())
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    else:
        path = Path(text.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise ModelError(f"pretrained weights not found: {path}")
        blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict):
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ModelError(f"{source} does not hold a state_dict (a mapping of parameter names to tensors)")
    return blob


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first-layer conv weight (O, C_src, kh, kw) for ``in_chans`` input channels (timm's recipe):
    one band sums the source channels; other counts tile them and rescale to keep activations."""
    src = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / src)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (src / in_chans)


def _same_but_in_chans(src: torch.Tensor, want: torch.Tensor) -> bool:
    return src.shape[0] == want.shape[0] and src.shape[2:] == want.shape[2:]


def load_pretrained(
    model: nn.Module, source: str | Path, storage: StorageConfig | None = None
) -> dict[str, list[str]]:
    """Load matching weights from ``source`` into ``model``; returns what was loaded, adapted, skipped.

    Keys may carry ``module.``/``backbone.`` prefixes. A first conv with another number of input
    channels is adapted (``adapt_input_conv``); other shape mismatches (a 1000-class ImageNet head
    against our one-logit head) are skipped and keep their fresh initialisation. Raises ValueError
    when nothing matches (the file is for another architecture).
    """
    return load_state(model, read_state_dict(source, storage), str(source))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """``load_pretrained`` of a state_dict already read (``source`` names it in errors)."""
    src = {_strip_prefixes(k): v for k, v in state.items()}
    target = model.state_dict()
    loaded, adapted, skipped = [], [], []
    new_state: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        want = target.get(key)
        if want is not None and want.shape == value.shape:
            new_state[key] = value
            loaded.append(key)
        elif want is not None and value.ndim == 4 and want.ndim == 4 and _same_but_in_chans(value, want):
            # (O, C_src, kh, kw) -> (O, C, kh, kw): the input conv of a model with other bands.
            new_state[key] = adapt_input_conv(value, want.shape[1]).to(want.dtype)
            adapted.append(key)
        else:
            skipped.append(key)
    if not new_state:
        raise ModelError(
            f"no weight in {source} matches the model ({type(model).__name__}): wrong architecture?"
        )
    model.load_state_dict(new_state, strict=False)
    return {"loaded": loaded, "adapted": adapted, "skipped": skipped}


def output_logits(num_classes: int) -> int:
    """Backbone outputs for ``num_classes`` classes: one logit for two (the binary case, sigmoid),
    one per class otherwise (softmax)."""
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def class_logits(out: torch.Tensor) -> torch.Tensor:
    """A backbone's output as (N, C) class logits: (N,) binary logits z become [0, z], whose softmax
    is [1 - sigmoid(z), sigmoid(z)], so every loss, probability and metric is the one of C classes."""
    if out.ndim == 1:
        return torch.stack([torch.zeros_like(out), out], dim=1)
    return out


class LensClassifier(nn.Module):
    """asinh stretch + per-channel standardisation (training-split statistics) + backbone -> logits.

    Sky-subtracted fluxes are heavy-tailed (a galaxy core is ~10^3 x the sky noise). Fed linearly,
    the rare bright pixels dominate BatchNorm's running variance, and eval-mode outputs collapse
    towards 0.5. ``asinh(x / scale)`` with ``scale`` at the noise level is linear in the noise and
    logarithmic in the cores, the stretch astronomers use to look at such images.

    ``classes``: the class names in label order (default the lens-finding task's two). Two classes
    give one logit per image (N,); more give (N, C). ``class_logits`` turns either into (N, C).
    """

    def __init__(
        self,
        model_name: str,
        in_chans: int,
        mean: list[float],
        std: list[float],
        scale: list[float] | None = None,
        input_size_px: int | None = None,
        classes: tuple[str, ...] | list[str] = CLASS_NAMES,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        # The member's own scale: images are resized to it after normalisation (None: as given), so
        # an ensemble can hold a ResNet at 64x64 beside a transformer at 128x128.
        self.input_size_px = input_size_px
        self.classes = tuple(str(c) for c in classes)
        num_out = output_logits(len(self.classes))
        self.backbone = create_model(model_name, in_chans=in_chans, num_classes=num_out)
        self.stretch = scale is not None
        self.register_buffer("scale", _channel_buffer(scale or [1.0] * in_chans))
        self.register_buffer("mean", _channel_buffer(mean))
        self.register_buffer("std", _channel_buffer(std))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) raw fluxes -> (N, C, H, W) standardised inputs
        if self.stretch:
            x = torch.asinh(x / self.scale)
        return (x - self.mean) / self.std

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) raw fluxes -> the backbone's input: normalised, at the member's own scale."""
        x = self.normalise(x)
        size = self.input_size_px
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            # (N, C, H, W) -> (N, C, size, size); antialiased when shrinking, as an image tool would.
            x = nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1]
            )
        return x

    def forward(self, x: torch.Tensor, reconstruct: bool = False) -> Any:
        """(N, C, H, W) raw fluxes -> (N,) logits for two classes, (N, num_classes) for more. With
        ``reconstruct`` (a ``conv_ae`` backbone): (logits, target, reconstruction), the target the
        normalised input the decoder reproduces, (N, C, H', W') each."""
        x = self.prepare(x)
        if reconstruct:
            out, recon = self.backbone(x, reconstruct=True)
            return (out.squeeze(-1) if out.shape[-1] == 1 else out), x, recon
        out = self.backbone(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) raw fluxes -> (N, F) pooled features before the class head: what a frozen
        encoder hands a probe (``EncoderNet``, torchvision ResNets with or without a decoder, timm)."""
        bb, x = self.backbone, self.prepare(x)
        if isinstance(bb, EncoderNet):
            return bb.features(x)
        if hasattr(bb, "layer4") and hasattr(bb, "fc"):  # torchvision ResNet
            return torch.flatten(bb.avgpool(_resnet_trunk(bb, x)), 1)
        if hasattr(bb, "forward_features") and hasattr(bb, "forward_head"):  # timm
            return bb.forward_head(bb.forward_features(x), pre_logits=True)
        raise ModelError(f"{self.model_name} exposes no pooled features for a probe")


def _channel_buffer(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def build_classifier(meta: dict[str, Any]) -> LensClassifier:
    return LensClassifier(
        meta["model"],
        meta["in_chans"],
        meta["norm_mean"],
        meta["norm_std"],
        meta.get("norm_scale"),
        meta.get("input_size_px"),
        meta.get("classes") or CLASS_NAMES,
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
        "input_size_px": model.input_size_px,
        "classes": list(model.classes),
    }
    torch.save({**meta, **(extra or {}), "state_dict": model.state_dict()}, path)


def load_classifier(path: Path | BinaryIO) -> tuple[LensClassifier, dict[str, Any]]:
    """Inverse of ``save_classifier`` (a path, or the file's bytes as a stream); returns the model in
    eval mode and its saved metadata."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    model = build_classifier(blob)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, {k: v for k, v in blob.items() if k != "state_dict"}
