"""EnsemblePredictor: a weighted ensemble of ``LensClassifier`` members, shared by serving and batch scoring.

On disk an ensemble is a directory (the contract between the ensemble stage, MLflow and serving)::

    ensemble.json   {"format_version": 1, "image_shape": [C, H, W], "threshold": 0.5,
                     "temperature": 1.3, "dataset_id": "...",
                     "members": [{"name": ..., "model": ..., "weight": ...,
                     "file": "member-0.pt", "val_auc": ...}, ...]}
    member-0.pt     written by ``lensmill.models.save_classifier``
    ...

``temperature`` (fitted on the validation split by the ensemble stage; 1.0 when absent, as in
artifacts written before it existed) calibrates the ensemble: ``p_lens = sigmoid(logit(p) / T)`` of
the weighted mean ``p`` of the members' probabilities. T > 1 softens over-confident scores. It keeps
the ranking (ROC AUC, TPR0/10) and the p = 0.5 point, so serving and evaluation share one calibrated
``p_lens``.

The file is a ``records.EnsembleManifest``. Top-level keys other than ``format_version``,
``tta`` (false when absent): each member's probability is the mean over the 8 rotations and flips
of the image (the dihedral group: a lens is a lens at any orientation), so scores do not depend on
how a survey's cutouts are oriented; 8x the inference cost.

``image_shape``, ``threshold``, ``temperature``, ``tta`` and ``members`` (such as ``dataset_id``) are kept in
``EnsemblePredictor.info``; member keys other than ``name``, ``weight`` and ``file`` are kept in
``Member.meta``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensmill.config import StorageConfig
from lensmill.metrics import apply_class_temperature
from lensmill.models import LensClassifier, class_logits, load_classifier, save_classifier
from lensmill.records import (
    ENSEMBLE_FORMAT_VERSION,
    EnsembleManifest,
    EnsembleMemberEntry,
    RecordError,
    parse_record,
    write_record,
)

MANIFEST = "ensemble.json"
# Member keys that save() writes itself, or that the member file already holds (save_classifier).
_MEMBER_FILE_KEYS = (
    "name", "weight", "file", "model", "in_chans", "norm_mean", "norm_std", "norm_scale", "input_size_px",
    "temperature", "classes", "state_dict",
)  # fmt: skip


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays and paths in metadata become plain JSON values."""
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} in ensemble metadata is not JSON serialisable")


def _plain(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata as plain JSON values (numpy scalars, paths), as ensemble.json will hold them."""
    return json.loads(json.dumps(meta, default=_json_default))


class EnsembleArtifactError(RecordError):
    """An ensemble directory that cannot be read; the message names the path and what was wrong."""


class EnsembleNotFoundError(EnsembleArtifactError, FileNotFoundError):
    """The directory has no ``ensemble.json``."""


@dataclass
class Member:
    """One ensemble member: a classifier mapping raw (N, C, H, W) images to logits ((N,) binary)."""

    name: str
    model: LensClassifier
    weight: float
    meta: dict[str, Any] = field(default_factory=dict)
    # The member's own calibration, searched with the weights (ensemble.member_temperatures):
    # its probabilities are softmax(logits / temperature) before the weighted mean; 1.0 = as trained.
    temperature: float = 1.0


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def validate_images(images: Any, image_shape: Sequence[int]) -> np.ndarray:
    """Return ``images`` as a float32 (N, C, H, W) array, or raise ``ValueError`` saying what was wrong.

    Accepted: (N, C, H, W); a single (C, H, W) image when C > 1; (N, H, W) or (H, W) when C == 1.
    Empty batches and NaN/inf values are rejected.
    """
    c, h, w = (int(s) for s in image_shape)
    try:
        arr = np.asarray(images)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise ValueError(f"images are not a rectangular numeric array: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)):
        raise ValueError(f"images must be numeric, received dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError("images must be real-valued, received complex numbers")

    expected = [f"(N, {c}, {h}, {w})"]
    if c == 1:
        expected += [f"(N, {h}, {w})", f"({h}, {w})"]
    else:
        expected += [_shape_text((c, h, w))]
    if arr.ndim == 4 and arr.shape[1:] == (c, h, w):
        batch = arr
    elif arr.ndim == 3 and c == 1 and arr.shape[1:] == (h, w):
        batch = arr[:, None]
    elif arr.ndim == 3 and c > 1 and arr.shape == (c, h, w):
        batch = arr[None]
    elif arr.ndim == 2 and c == 1 and arr.shape == (h, w):
        batch = arr[None, None]
    else:
        raise ValueError(
            f"expected images of shape {' or '.join(expected)}; received shape {_shape_text(arr.shape)}"
        )
    if batch.shape[0] == 0:
        raise ValueError(f"empty batch: received shape {_shape_text(arr.shape)}, need at least one image")
    # Cast first: float64 values beyond float32's range become inf and must be rejected too.
    with np.errstate(over="ignore", invalid="ignore"):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
    finite = np.isfinite(batch)
    if not finite.all():
        bad = int(batch.size - np.count_nonzero(finite))
        raise ValueError(f"images contain {bad} NaN or infinite value(s) (or values beyond float32 range)")
    return batch


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations and reflections of a batch (N, C, H, W) of square images, identity first."""
    flipped = torch.flip(x, dims=(3,))
    return [torch.rot90(v, k, dims=(2, 3)) for v in (x, flipped) for k in range(4)]


class EnsemblePredictor:
    """Weighted average of member probabilities, temperature-calibrated, with a decision threshold
    and the members' spread."""

    def __init__(
        self,
        members: Sequence[Member],
        image_shape: Sequence[int],
        threshold: float = 0.5,
        info: dict[str, Any] | None = None,
        batch_size: int = 256,
        temperature: float = 1.0,
        tta: bool = False,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        weights = np.array([float(m.weight) for m in members], dtype=np.float64)
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"member weights must be finite, >= 0 and not all 0, got {weights.tolist()}")
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be [C, H, W] with positive sizes, got {list(image_shape)}")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        try:
            t = float(temperature)
        except (TypeError, ValueError):
            t = math.nan
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        classes = members[0].model.classes
        for m in members:
            if m.model.classes != classes:
                raise ValueError(
                    f"member {m.name!r} has classes {list(m.model.classes)}, "
                    f"member {members[0].name!r} {list(classes)}: an ensemble's members share their classes"
                )
            in_chans = int(m.model.mean.shape[1])
            if in_chans != shape[0]:
                raise ValueError(
                    f"member {m.name!r} takes {in_chans} channel(s), image_shape says {shape[0]}"
                )
            m.model.eval()
        self._members = list(members)
        self._classes = tuple(classes)
        self._image_shape = shape
        self._threshold = float(threshold)
        self._info = dict(info or {})
        self._batch_size = int(batch_size)
        self._temperature = t
        self._tta = bool(tta)
        self._device = torch.device("cpu")
        # Stored normalised so that combine() and spread use the same weights the files describe.
        self._weights = weights / weights.sum()

    # -- properties -------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape  # type: ignore[return-value]

    @property
    def threshold(self) -> float:
        """The binary decision threshold on p(lens); unused for more classes (the most probable wins)."""
        return self._threshold

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in label order (``("non-lens", "lens")`` for lens finding)."""
        return self._classes

    @property
    def binary(self) -> bool:
        return len(self._classes) == 2

    @property
    def temperature(self) -> float:
        """Calibration temperature applied to the ensemble's probability (1.0 = none)."""
        return self._temperature

    @property
    def tta(self) -> bool:
        """Whether members score the 8 rotations/flips of each image (averaged)."""
        return self._tta

    @property
    def members(self) -> list[Member]:
        return list(self._members)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self._members]

    @property
    def weights(self) -> np.ndarray:
        """Member weights, normalised to sum to 1 (a copy)."""
        return self._weights.copy()

    @property
    def info(self) -> dict[str, Any]:
        """Ensemble-level metadata from ``ensemble.json`` (dataset_id, ...), a copy."""
        return dict(self._info)

    def to(self, device: str | torch.device) -> EnsemblePredictor:
        """Score on ``device`` (e.g. ``"cuda"``): the members move there; inputs and outputs stay numpy."""
        self._device = torch.device(device)
        for m in self._members:
            m.model.to(self._device)
        return self

    # -- scoring ----------------------------------------------------------------------------------
    def validate_images(self, images: Any) -> np.ndarray:
        """``validate_images`` against this ensemble's image shape."""
        return validate_images(images, self._image_shape)

    def member_class_probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, M, C) float64 class probabilities, one row per member (each at its own temperature,
        TTA-averaged when asked), computed in batches."""
        batch = self.validate_images(images)
        n = batch.shape[0]
        out = np.empty((n, len(self._members), len(self._classes)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, n, self._batch_size):
                x = torch.from_numpy(batch[start : start + self._batch_size]).to(self._device)
                views = dihedral_views(x) if self._tta else [x]
                for j, member in enumerate(self._members):
                    p = torch.zeros(x.shape[0], len(self._classes), dtype=torch.float64, device=self._device)
                    for view in views:
                        logits = class_logits(member.model(view))  # (B, C)
                        if logits.shape[0] != x.shape[0]:
                            n_out, n_in = logits.shape[0], x.shape[0]
                            raise RuntimeError(
                                f"member {member.name!r} gave {n_out} logits for {n_in} images"
                            )
                        # Softmax in float64 keeps probabilities near 0 and 1 distinguishable.
                        p += torch.softmax(logits.double(), dim=1)
                    out[start : start + x.shape[0], j] = apply_class_temperature(
                        (p / len(views)).cpu().numpy(), member.temperature
                    )
        return out

    def member_probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, M) p(lens) of each member: the binary view of ``member_class_probabilities``."""
        if not self.binary:
            raise ValueError(f"p(lens) is for two classes; this ensemble has {list(self._classes)}")
        return self.member_class_probabilities(images)[:, :, 1]

    @staticmethod
    def combine(member_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Weighted average over members: (N, M) or (N, M, C) probabilities and (M,) weights ->
        (N,) or (N, C)."""
        p = np.asarray(member_probs, dtype=np.float64)
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if p.ndim not in (2, 3) or p.shape[1] != w.shape[0]:
            raise ValueError(
                f"member_probs must be (N, {w.shape[0]}) or (N, {w.shape[0]}, C), "
                f"received {_shape_text(p.shape)}"
            )
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be >= 0 and not all 0, got {w.tolist()}")
        return np.tensordot(p, w / w.sum(), axes=([1], [0]))

    @staticmethod
    def weighted_std(member_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Weighted standard deviation across members: (N, M) -> (N,), (N, M, C) -> (N, C); 0 when
        all members agree."""
        p = np.asarray(member_probs, dtype=np.float64)
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        w = w / w.sum()
        mean = EnsemblePredictor.combine(p, w)
        var = np.tensordot((p - np.expand_dims(mean, 1)) ** 2, w, axes=([1], [0]))
        return np.sqrt(np.maximum(var, 0.0))

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        """Apply this ensemble's temperature to combined (N, C) probabilities."""
        return apply_class_temperature(p, self._temperature)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """(N,) labels of calibrated (N, C) probabilities: p(lens) >= threshold for two classes, the
        most probable class for more."""
        if self.binary:
            return (probs[:, 1] >= self._threshold).astype(np.int64)
        return probs.argmax(axis=1).astype(np.int64)

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """For raw images: ``probs`` (N, C) calibrated, ``label`` (N,), ``member_class_probs``
        (N, M, C) and ``spread`` (N,) (the members' weighted std of the label's class probability,
        uncalibrated), ``probs_uncalibrated`` (N, C). Two classes add the binary views ``p_lens``
        (N,), ``p_lens_uncalibrated`` (N,) and ``member_probs`` (N, M)."""
        member_class = self.member_class_probabilities(images)
        raw = self.combine(member_class, self._weights)  # (N, C)
        probs = self.calibrate(raw)
        label = self.decide(probs)
        spread = self.weighted_std(member_class, self._weights)[np.arange(len(label)), label]
        out = {
            "probs": probs,
            "label": label,
            "member_class_probs": member_class,
            "spread": spread,
            "probs_uncalibrated": raw,
        }
        if self.binary:
            out |= {
                "p_lens": probs[:, 1],
                "p_lens_uncalibrated": raw[:, 1],
                "member_probs": member_class[:, :, 1],
            }
        return out

    # -- persistence ------------------------------------------------------------------------------
    def save(self, dir: Path) -> Path:
        """Write ``ensemble.json`` and one ``member-<i>.pt`` per member into ``dir``; returns ``dir``."""
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, (member, weight) in enumerate(zip(self._members, self._weights, strict=True)):
            file = f"member-{i}.pt"
            save_classifier(member.model, dir / file)
            meta = {k: v for k, v in member.meta.items() if k not in _MEMBER_FILE_KEYS}
            entries.append(
                EnsembleMemberEntry(
                    name=member.name, weight=float(weight), file=file, model=member.model.model_name,
                    input_size_px=member.model.input_size_px, temperature=float(member.temperature),
                    **_plain(meta),
                )
            )  # fmt: skip
        info = {k: v for k, v in self._info.items() if k not in EnsembleManifest.model_fields}
        manifest = EnsembleManifest(
            format_version=ENSEMBLE_FORMAT_VERSION,
            image_shape=self._image_shape,
            threshold=self._threshold,
            temperature=self._temperature,
            tta=self._tta,
            classes=self._classes,
            members=tuple(entries),
            **_plain(info),
        )
        # Written last (and atomically) so that a directory with an ensemble.json is complete.
        write_record(str(dir / MANIFEST), manifest, StorageConfig())
        return dir

    @classmethod
    def load(cls, dir: Path, batch_size: int = 256) -> EnsemblePredictor:
        """Read an ensemble directory written by ``save`` (or by the ensemble stage / MLflow)."""
        dir = Path(dir)
        path = dir / MANIFEST
        manifest = read_ensemble_manifest(dir)

        members = []
        for i, entry in enumerate(manifest.members):
            file = dir / entry.file
            if not file.is_file():
                raise EnsembleArtifactError(f"{path}: members[{i}] file {file} does not exist")
            try:
                model, _saved_meta = load_classifier(file)
            except Exception as exc:  # torch raises many types for a damaged file
                raise EnsembleArtifactError(
                    f"{path}: members[{i}] file {file} could not be loaded: {exc}"
                ) from exc
            temperature = float(entry.meta.get("temperature", 1.0))
            if not np.isfinite(temperature) or temperature <= 0:
                raise EnsembleArtifactError(
                    f"{path}: members[{i}] temperature must be > 0, got {temperature}"
                )
            members.append(
                Member(
                    name=entry.name,
                    model=model,
                    weight=entry.weight,
                    meta=entry.meta,
                    temperature=temperature,
                )
            )
        if manifest.classes is not None and tuple(manifest.classes) != members[0].model.classes:
            raise EnsembleArtifactError(
                f"{path}: classes {list(manifest.classes)} but the member files hold "
                f"{list(members[0].model.classes)}"
            )
        try:
            return cls(
                members,
                manifest.image_shape,
                threshold=manifest.threshold,
                info=manifest.info,
                batch_size=batch_size,
                temperature=manifest.temperature,
                tta=manifest.tta,
            )
        except ValueError as exc:
            raise EnsembleArtifactError(f"{path}: {exc}") from None


def read_ensemble_manifest(dir: Path) -> EnsembleManifest:
    """An ensemble directory's ``ensemble.json`` (shape, threshold, members), without the weights."""
    path = Path(dir) / MANIFEST
    if not path.is_file():
        raise EnsembleNotFoundError(f"no {MANIFEST} in {dir}: not an ensemble directory")
    try:
        return parse_record(EnsembleManifest, path.read_bytes(), str(path))
    except RecordError as exc:
        raise EnsembleArtifactError(str(exc)) from None
    except OSError as exc:
        raise EnsembleArtifactError(f"{path} cannot be read: {exc}") from None
