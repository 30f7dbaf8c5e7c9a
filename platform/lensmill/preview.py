"""``lensmill preview``: a PNG grid of lenses and non-lenses from one split, as astronomers view them.

Each tile is sky-subtracted (median), scaled by its noise (1.4826 x MAD) and asinh-stretched, so that
faint arcs and the bright lens core both show. With three or more bands the tile is an RGB composite
(Lupton et al. 2004: one asinh stretch of the mean intensity, colours kept); with one or two bands
every band gets its own panel. Tiles are annotated with theta_E, source magnitude and arc S/N where
the dataset has them. The PNG is drawn on a matplotlib Agg canvas (no pyplot global state) and,
when tracking is on, logged to MLflow through ``lensmill.tracking``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lensmill.config import Config, StorageConfig
from lensmill.records import DatasetManifest
from lensmill.shards import decode_images, iter_split, read_manifest, split_files
from lensmill.storage import absolute_uri, is_s3

log = logging.getLogger(__name__)

# Effective wavelengths (nm) of band names we know: composites put the reddest band in red.
_BAND_NM = {"u": 365, "g": 480, "r": 620, "VIS": 700, "i": 750, "z": 870, "y": 970, "Y": 1030,
            "J": 1250, "H": 1650, "K": 2200}  # fmt: skip
_RGB_NAMES = ("R", "G", "B")
ANNOTATE = (("theta_e_arcsec", "θE {:.2f}″"), ("source_mag", "m_s {:.1f}"), ("arc_snr", "S/N {:.0f}"))
# Soft knee of the asinh stretch, in units of the noise sigma: linear below, logarithmic above.
_SOFTENING_SIGMA = 3.0


def _noise(image: np.ndarray) -> float:
    """Robust noise sigma of an image whose pixels are mostly sky."""
    mad = float(np.median(np.abs(image - np.median(image))))
    return 1.4826 * mad if mad > 0 else float(np.std(image)) or 1.0


def asinh_gray(image: np.ndarray) -> np.ndarray:
    """(H, W) -> [0, 1]: median-subtracted, asinh with a knee at a few sigma, top at the peak."""
    x = image - np.median(image)
    soft = _SOFTENING_SIGMA * _noise(image)
    y = np.arcsinh(x / soft)
    lo, hi = np.arcsinh(-1.0 / _SOFTENING_SIGMA), max(float(np.percentile(y, 99.8)), 1e-6)
    return np.clip((y - lo) / (hi - lo), 0.0, 1.0)


def asinh_rgb(bands: np.ndarray) -> np.ndarray:
    """(3, H, W) in (R, G, B) order -> (H, W, 3) in [0, 1], Lupton-style: each band in noise units,
    one asinh stretch of the mean intensity applied to all three, so colours survive the stretch."""
    x = np.stack([(b - np.median(b)) / _noise(b) for b in bands])
    intensity = x.mean(axis=0)
    stretched = np.arcsinh(np.clip(intensity, 0, None) / _SOFTENING_SIGMA)
    top = max(float(np.percentile(stretched, 99.8)), 1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(intensity > 0, stretched / top / intensity, 0.0)
    rgb = np.clip(x * scale[None], 0.0, 1.0)
    return rgb.transpose(1, 2, 0)


def rgb_channels(bands: list[str]) -> list[int] | None:
    """Indices of the bands for (R, G, B), or None for per-band panels (fewer than 3 bands)."""
    if len(bands) < 3:
        return None
    if {b.upper() for b in bands} >= set(_RGB_NAMES) and len(bands) == 3:
        by_name = {b.upper(): i for i, b in enumerate(bands)}
        return [by_name["R"], by_name["G"], by_name["B"]]
    # Bluest to reddest when every name is known, else in the given order; then reddest, middle, bluest.
    order = list(range(len(bands)))
    if all(b in _BAND_NM for b in bands):
        order.sort(key=lambda i: _BAND_NM[bands[i]])
    return [order[-1], order[len(order) // 2], order[0]]


def _sample_rows(
    dataset_uri: str,
    manifest: DatasetManifest,
    split: str,
    n_per_class: int,
    storage: StorageConfig,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """Read shards of ``split`` until a few times ``n_per_class`` of each class, then sample."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(split_files(manifest, dataset_uri, split)))  # not always the first rows
    tables, counts = [], np.zeros(2, int)
    for table in iter_split(dataset_uri, manifest, split, storage, order):
        tables.append(table)
        y = table.column("label").to_numpy()
        counts += [(y == 0).sum(), (y == 1).sum()]
        if counts.min() >= 4 * n_per_class:
            break
    table = pa.concat_tables(tables)
    labels = table.column("label").to_numpy()
    picks = [
        rng.choice(np.flatnonzero(labels == c), min(n_per_class, int((labels == c).sum())), replace=False)
        for c in (1, 0)
    ]
    idx = np.concatenate(picks).astype(int)
    sub = table.take(pa.array(idx))
    images = decode_images(sub.column("image"), manifest.image_shape)
    return images, labels[idx], sub


def _caption(table: pa.Table, row: int) -> str:
    parts = []
    for key, fmt in ANNOTATE:
        if key in table.column_names:
            value = table.column(key)[row].as_py()
            if value is not None and math.isfinite(value):
                parts.append(fmt.format(value))
    return "  ".join(parts)


def render_preview(
    dataset_uri: str,
    storage: StorageConfig,
    out_path: Path,
    *,
    split: str = "val",
    n_per_class: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Draw ``n_per_class`` lenses and non-lenses of ``split`` into a PNG at ``out_path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    uri = absolute_uri(dataset_uri)
    manifest = read_manifest(uri, storage)
    images, labels, table = _sample_rows(uri, manifest, split, n_per_class, storage, seed)
    bands = list(manifest.bands or [f"band{c}" for c in range(images.shape[1])])
    channels = rgb_channels(bands)
    panels = 1 if channels else images.shape[1]
    # The grid fits what was found (a small split may hold fewer than n_per_class of a class).
    shown = max(1, int((labels == 1).sum()), int((labels == 0).sum()))
    cols = math.ceil(math.sqrt(shown))
    rows = math.ceil(shown / cols)
    tile_in = 1.45
    fig = Figure(
        figsize=(2 * cols * panels * tile_in + 0.4, rows * tile_in + 0.9), dpi=110, layout="constrained"
    )
    FigureCanvasAgg(fig)
    view = f"RGB = {', '.join(bands[i] for i in channels)}" if channels else f"bands {', '.join(bands)}"
    fig.suptitle(
        f"{manifest.dataset_id} — {split} split, asinh stretch, {view}, "
        f"{images.shape[2]}×{images.shape[3]} px",
        fontsize=9,
    )
    for sub_fig, cls, name in zip(fig.subfigures(1, 2), (1, 0), ("lenses", "non-lenses"), strict=True):
        which = np.flatnonzero(labels == cls)
        sub_fig.suptitle(f"{name} (label {cls}, {which.size} shown)", fontsize=9)
        axes = sub_fig.subplots(rows, cols * panels, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for k, row in enumerate(which):
            r, c = divmod(k, cols)
            if channels:
                axes[r, c].imshow(asinh_rgb(images[row][channels]), origin="lower", interpolation="nearest")
            else:
                for b in range(panels):
                    axes[r, c * panels + b].imshow(
                        asinh_gray(images[row, b]), origin="lower", cmap="gray", vmin=0, vmax=1,
                        interpolation="nearest",
                    )  # fmt: skip
            caption = _caption(table, int(row))
            if panels > 1:
                caption = f"{caption}\n" + " | ".join(bands)
            axes[r, c * panels].set_title(caption, fontsize=5.5, loc="left", pad=2)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return {
        "png": str(out_path),
        "dataset_uri": uri,
        "dataset_id": manifest.dataset_id,
        "split": split,
        "lenses": int((labels == 1).sum()),
        "non_lenses": int((labels == 0).sum()),
        "view": "rgb" if channels else "per-band",
    }


def default_out_path(dataset_uri: str, dataset_id: str, split: str) -> Path:
    """Beside the dataset when it is a local folder, else in the working folder."""
    uri = absolute_uri(dataset_uri)
    if not is_s3(uri) and Path(uri).is_dir():
        return Path(uri) / f"preview-{split}.png"
    return Path.cwd() / f"preview-{dataset_id}-{split}.png"


def preview(
    cfg: Config,
    dataset_uri: str,
    out_path: Path | None = None,
    *,
    split: str = "val",
    n_per_class: int = 16,
    mlflow: bool = True,
) -> dict[str, Any]:
    """The ``lensmill preview`` stage: the PNG, then (when tracking is on) an MLflow run holding it."""
    from lensmill import tracking

    uri = absolute_uri(dataset_uri)
    manifest = read_manifest(uri, cfg.storage)
    out = Path(out_path) if out_path else default_out_path(uri, manifest.dataset_id, split)
    summary = render_preview(uri, cfg.storage, out, split=split, n_per_class=n_per_class, seed=cfg.sim.seed)
    # Tracking is on with a server URI, or with the sqlite store a local storage root holds.
    if mlflow and (cfg.tracking.tracking_uri or not is_s3(cfg.storage.root)):
        with tracking.run(
            cfg, f"preview-{manifest.dataset_id}-{split}", "preview", manifest.dataset_id,
            params={"dataset_uri": uri, "split": split, "n_per_class": n_per_class},
        ) as run_id:  # fmt: skip
            tracking.log_artifacts(cfg, run_id, [out], "preview")
        summary |= {
            "mlflow_run_id": run_id,
            "tracking_uri": tracking.tracking_uri_for(cfg),
            "artifact": f"preview/{out.name}",
        }
    else:
        summary |= {"mlflow_run_id": None}
    return summary
