"""A foreign-style cutout set: 8-bit grayscale PNGs written by Pillow with a square-root stretch,
drawn by a small numpy model of its own (not lenstronomy), with faint 1-2 px wide arcs.

It stands for the sets astronomers bring from elsewhere (another simulator, another survey's
pipeline, a stretch chosen for the eye) to ``lensmill import``. Each image: a lens galaxy (an
elliptical Sersic-like profile), up to two companions, Gaussian seeing and sky noise; a lens adds a
thin arc (a ring segment of width ``0.5-0.9`` px sigma, 1-2 px across, at a radius of 5-13 px,
spanning 50-200 degrees) and sometimes a faint counter-image; a hard negative adds an unlensed
elongated blob at such a radius. Each image is stretched on its own: sky-subtracted, clipped at its
99.5th percentile, square-rooted and quantised to 0-255. Per-image generators
``default_rng([seed, index])``, so the same call writes the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

SIZE_PX = 64


def _galaxy(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, x0: float, y0: float) -> np.ndarray:
    """An elliptical Sersic-like profile (n between 1 and 4), unit peak."""
    q, phi = rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
    r_e, n = rng.uniform(2.0, 6.0), rng.uniform(1.0, 4.0)
    dx, dy = xx - x0, yy - y0
    u = dx * np.cos(phi) + dy * np.sin(phi)
    v = -dx * np.sin(phi) + dy * np.cos(phi)
    r = np.sqrt(u**2 + (v / q) ** 2)
    return np.exp(-((r / r_e) ** (1 / n)))


def _arc(
    yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, x0: float, y0: float, radius: float
) -> np.ndarray:
    """A ring segment of Gaussian cross-section (1-2 px across), unit peak."""
    width = rng.uniform(0.5, 0.9)
    span = np.deg2rad(rng.uniform(50, 200))
    start = rng.uniform(0, 2 * np.pi)
    r = np.hypot(xx - x0, yy - y0)
    theta = np.mod(np.arctan2(yy - y0, xx - x0) - start, 2 * np.pi)
    along = np.clip(1 - np.abs(theta - span / 2) / (span / 2), 0, 1) ** 0.5  # brightest mid-arc
    return np.exp(-0.5 * ((r - radius) / width) ** 2) * along


def render_cutout(seed: int, index: int, lens: bool) -> np.ndarray:
    """One 64x64 8-bit image (H, W) uint8."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:SIZE_PX, 0:SIZE_PX].astype(np.float64)
    c = SIZE_PX / 2 - 0.5
    x0, y0 = c + rng.normal(0, 1.0), c + rng.normal(0, 1.0)
    sky_sigma = 1.0
    img = rng.uniform(40, 200) * _galaxy(yy, xx, rng, x0, y0)
    for _ in range(rng.integers(0, 3)):  # companions
        img += rng.uniform(5, 60) * _galaxy(yy, xx, rng, rng.uniform(4, 60), rng.uniform(4, 60))
    radius = rng.uniform(5, 13)
    if lens:
        # Faint: a peak of 6-20 sky sigmas per pixel before seeing (2-8 after it).
        img += rng.uniform(6.0, 20.0) * sky_sigma * _arc(yy, xx, rng, x0, y0, radius)
        if rng.uniform() < 0.5:
            counter = _arc(yy, xx, rng, x0, y0, radius * rng.uniform(0.4, 0.8))
            img += rng.uniform(3.0, 8.0) * sky_sigma * counter
    elif rng.uniform() < 0.5:  # hard negative: an unlensed elongated blob where an arc would be
        angle = rng.uniform(0, 2 * np.pi)
        bx, by = x0 + radius * np.cos(angle), y0 + radius * np.sin(angle)
        blob = np.exp(
            -0.5 * (((xx - bx) / rng.uniform(0.8, 2.5)) ** 2 + ((yy - by) / rng.uniform(0.8, 2.5)) ** 2)
        )
        img += rng.uniform(6.0, 20.0) * sky_sigma * blob
    img = gaussian_filter(img, sigma=rng.uniform(0.6, 1.0)) + rng.normal(0, sky_sigma, img.shape)
    # The other tool's stretch: clip at the 99.5th percentile, square root, 8 bits.
    top = np.percentile(img, 99.5)
    scaled = np.sqrt(np.clip(img, 0, top) / top)
    return np.round(255 * scaled).astype(np.uint8)


def write_foreign_set(out_dir: Path, n_images: int = 2000, seed: int = 0) -> dict[str, int]:
    """``out_dir/lens/*.png`` and ``out_dir/nonlens/*.png``, half each; returns the counts."""
    counts = {"lens": 0, "nonlens": 0}
    for i in range(n_images):
        lens = i % 2 == 1
        folder = out_dir / ("lens" if lens else "nonlens")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_cutout(seed, i, lens), mode="L").save(folder / f"cutout-{i:05d}.png")
        counts["lens" if lens else "nonlens"] += 1
    return counts
