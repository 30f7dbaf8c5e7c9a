"""The foreign-style cutout set of ``lensmill bench accuracy``: 8-bit PNGs, seeded, importable."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lensmill.bench.foreign import render_cutout, write_foreign_set
from lensmill.config import StorageConfig
from lensmill.importer import import_cutouts
from lensmill.shards import load_split


def test_the_set_is_8_bit_seeded_and_imports_as_one_band(tmp_path) -> None:
    counts = write_foreign_set(tmp_path / "set", n_images=40, seed=3)
    assert counts == {"lens": 20, "nonlens": 20}
    first = Image.open(tmp_path / "set" / "lens" / "cutout-00001.png")
    assert first.mode == "L" and first.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(first), render_cutout(3, 1, lens=True))
    assert not np.array_equal(render_cutout(3, 1, lens=True), render_cutout(4, 1, lens=True))
    uri, manifest = import_cutouts(tmp_path / "set", None, StorageConfig(root=str(tmp_path / "root")))
    images, labels, _ = load_split(uri, "train", StorageConfig())
    assert manifest.image_shape == (1, 64, 64) and images.max() <= 255 and set(labels) == {0, 1}
