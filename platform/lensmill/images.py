"""Image files (PNG, FITS, NPY) -> float32 (C, H, W) arrays: the one decoder behind ``lensmill import``
and the serving endpoint's file uploads, so that a file gives the same array wherever it is read.

Pixel values are kept as stored (a PNG's 0-255 counts become 0.0-255.0, 16-bit counts 0.0-65535.0):
no rescaling. Layouts:

- PNG: grayscale (L, I, I;16, F; LA and 1-bit become L) -> 1 channel; anything else (RGB, RGBA,
  palette, CMYK, ...) -> 3 channels R, G, B, alpha dropped and palette expanded.
- FITS (``.fits``, ``.fit``, ``.fts``): the first image HDU with data (so an empty primary HDU followed
  by an image extension works), BSCALE/BZERO applied.
- NPY: loaded without pickle (object arrays are refused), and an ``.npz`` archive is refused.
- FITS and NPY arrays: 2-D (H, W) -> 1 channel, 3-D is (C, H, W); other ranks, what looks like
  (H, W, C) and non-numeric pixels are refused.
"""

from __future__ import annotations

import io
from pathlib import PurePath

import numpy as np

from lensmill.errors import LensmillError

# File name suffix (lower case) -> format.
SUFFIXES: dict[str, str] = {".png": "png", ".fits": "fits", ".fit": "fits", ".fts": "fits", ".npy": "npy"}
# More channels than this on the first axis of a 3-D array, with few on the last, is (H, W, C).
_MAX_CHANNELS = 16
# Pillow's grayscale modes that hold the stored values as they are (16-bit and float included).
_GRAY_MODES = ("L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class ImageDecodeError(LensmillError, ValueError):
    """An image file that cannot be decoded; the message names the file and what was wrong."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class UnsupportedImageType(ImageDecodeError):
    """The file name's suffix is not one of ``SUFFIXES``."""


def image_kind(name: str) -> str:
    """The format (``png``, ``fits`` or ``npy``) of a file, from its name's suffix."""
    kind = SUFFIXES.get(PurePath(name).suffix.lower())
    if kind is None:
        raise UnsupportedImageType(name, f"unsupported file type (expected one of {', '.join(SUFFIXES)})")
    return kind


def to_chw(array: np.ndarray, name: str) -> np.ndarray:
    """A decoded 2-D (H, W) or 3-D (C, H, W) numeric array -> contiguous native-endian float32 (C, H, W)."""
    if array.dtype.kind not in "biuf":
        raise ImageDecodeError(name, f"unsupported pixel type {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    elif array.ndim != 3:
        raise ImageDecodeError(
            name, f"{array.ndim}-D array of shape {array.shape}; expected (H, W) or (C, H, W)"
        )
    elif array.shape[0] > _MAX_CHANNELS and array.shape[2] <= 4:
        raise ImageDecodeError(
            name, f"array of shape {array.shape} looks like (H, W, C); arrays must be (C, H, W) or (H, W)"
        )
    # np.float32 is native-endian: FITS's big-endian data is byte-swapped here.
    return np.ascontiguousarray(array, dtype=np.float32)


def decode_npy_array(data: bytes, name: str) -> np.ndarray:
    """A ``.npy`` file's array as stored (any shape and dtype); pickled data and ``.npz`` are refused."""
    try:
        # Unpickling untrusted bytes can run code: object arrays are refused rather than loaded.
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ImageDecodeError(name, f"not a readable .npy array: {exc}") from None
    if not isinstance(loaded, np.ndarray):  # a zip archive loads as an NpzFile
        loaded.close()
        raise ImageDecodeError(name, "an .npz archive, not a single .npy array")
    return loaded


def _decode_png(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        # Only the PNG plugin: other formats (some of which run external programs) are not PNG files.
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if img.mode == "P":  # palette: via RGBA when an entry is transparent, as Pillow asks
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            if img.mode in ("LA", "La", "1"):
                img = img.convert("L")
            elif img.mode not in (*_GRAY_MODES, "RGB"):
                img = img.convert("RGB")
            array = np.asarray(img)
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not a PNG image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(name, f"not a readable PNG: {exc}") from None
    # Pillow gives (H, W) or (H, W, 3).
    return to_chw(array.transpose(2, 0, 1) if array.ndim == 3 else array, name)


def _decode_fits(data: bytes, name: str) -> np.ndarray:
    from astropy.io import fits

    try:
        with fits.open(io.BytesIO(data), memmap=False) as hdus:
            # is_image first: a table HDU's data is not read. astropy applies BSCALE/BZERO.
            found = (h.data for h in hdus if h.is_image and h.data is not None and h.data.size > 0)
            array = next(found, None)
    except (OSError, ValueError, TypeError) as exc:
        raise ImageDecodeError(name, f"not a readable FITS file: {exc}") from None
    if array is None:
        raise ImageDecodeError(name, "no image HDU with data")
    return to_chw(np.asarray(array), name)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """An image file's bytes -> float32 (C, H, W) with its stored pixel values.

    ``name`` (a file name or path) picks the format by its suffix and is named in every error.
    """
    kind = image_kind(name)
    if kind == "png":
        return _decode_png(data, name)
    if kind == "fits":
        return _decode_fits(data, name)
    return to_chw(decode_npy_array(data, name), name)
