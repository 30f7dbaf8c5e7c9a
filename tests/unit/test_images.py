"""One image decoder: a file gives the same array through ``lensmill.images``, the importer and serving."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from astropy.io import fits
from PIL import Image

from lensmill.config import StorageConfig
from lensmill.images import ImageDecodeError, UnsupportedImageType, decode_image
from lensmill.importer import CutoutImportError, import_cutouts, read_image
from lensmill.models import LensClassifier
from lensmill.predict import EnsemblePredictor, Member
from lensmill.serve import ClientError, decode_file, decode_json, decode_npy, decode_request
from lensmill.shards import load_split

H, W = 5, 7  # not square: a transposed image would not pass


def _png(img: Image.Image, mode: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as back:  # the file holds the mode under test
        assert back.mode == mode
        assert ("transparency" in back.info) == ("transparency" in save)
    return data


def _fits(*hdus: fits.hdu.base.ExtensionHDU) -> bytes:
    buf = io.BytesIO()
    fits.HDUList(list(hdus)).writeto(buf)
    return buf.getvalue()


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# Each case: (file bytes, the expected float32 (C, H, W) computed without lensmill).
def gray8() -> tuple[bytes, np.ndarray]:
    a = _rng(1).integers(0, 256, (H, W), dtype=np.uint8)
    return _png(Image.fromarray(a), "L"), a[None].astype(np.float32)


def gray16() -> tuple[bytes, np.ndarray]:
    a = _rng(2).integers(0, 65536, (H, W), dtype=np.uint16)
    a[0, 0] = 65535  # far above 255: squashing to 8 bits would show
    return _png(Image.fromarray(a), "I;16"), a[None].astype(np.float32)


def gray_alpha() -> tuple[bytes, np.ndarray]:
    a = _rng(3).integers(0, 256, (H, W, 2), dtype=np.uint8)
    return _png(Image.fromarray(a), "LA"), a[None, :, :, 0].astype(np.float32)


def rgb() -> tuple[bytes, np.ndarray]:
    a = _rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return _png(Image.fromarray(a), "RGB"), a.transpose(2, 0, 1).astype(np.float32)


def rgba() -> tuple[bytes, np.ndarray]:
    a = _rng(5).integers(0, 256, (H, W, 4), dtype=np.uint8)
    a[0, :, 3] = 0  # fully transparent pixels keep their stored colour
    return _png(Image.fromarray(a), "RGBA"), a[..., :3].transpose(2, 0, 1).astype(np.float32)


def _palette(transparent: bool) -> tuple[bytes, np.ndarray]:
    rng = _rng(6)
    palette = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    index = rng.integers(0, 8, (H, W), dtype=np.uint8)
    img = Image.frombytes("P", (W, H), index.tobytes())
    img.putpalette(palette.tobytes())
    save = {"transparency": 2} if transparent else {}
    return _png(img, "P", **save), palette[index].transpose(2, 0, 1).astype(np.float32)


def palette() -> tuple[bytes, np.ndarray]:
    return _palette(transparent=False)


def palette_transparent() -> tuple[bytes, np.ndarray]:
    return _palette(transparent=True)


def fits_primary() -> tuple[bytes, np.ndarray]:
    a = _rng(7).normal(size=(2, H, W)).astype(np.float32)
    return _fits(fits.PrimaryHDU(a)), a


def fits_extension_scaled() -> tuple[bytes, np.ndarray]:
    raw = _rng(8).integers(-1000, 1000, (H, W)).astype(np.int16)
    hdu = fits.ImageHDU(raw)
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 100.0
    return _fits(fits.PrimaryHDU(), hdu), (raw * 0.5 + 100.0)[None].astype(np.float32)


def fits_extension_big_endian() -> tuple[bytes, np.ndarray]:
    a = _rng(9).normal(size=(3, H, W)).astype(np.float32)
    return _fits(fits.PrimaryHDU(), fits.ImageHDU(a.astype(">f4"))), a


def npy_2d() -> tuple[bytes, np.ndarray]:
    a = _rng(10).normal(size=(H, W))  # float64 on disk
    return _npy(a), a[None].astype(np.float32)


def npy_3d() -> tuple[bytes, np.ndarray]:
    a = _rng(11).integers(-5000, 5000, (2, H, W)).astype(np.int16)
    return _npy(a), a.astype(np.float32)


CASES: dict[str, Callable[[], tuple[bytes, np.ndarray]]] = {
    "gray8.png": gray8,
    "gray16.png": gray16,
    "gray_alpha.png": gray_alpha,
    "rgb.png": rgb,
    "rgba.png": rgba,
    "palette.png": palette,
    "palette_transparent.png": palette_transparent,
    "primary.fits": fits_primary,
    "extension_scaled.fit": fits_extension_scaled,
    "extension_big_endian.FTS": fits_extension_big_endian,
    "two_d.npy": npy_2d,
    "three_d.npy": npy_3d,
}


@cache
def predictor(shape: tuple[int, int, int]) -> EnsemblePredictor:
    """A one-member ensemble for ``shape``: serving validates uploads against its (C, H, W)."""
    torch.manual_seed(0)
    c = shape[0]
    model = LensClassifier("tiny", in_chans=c, mean=[0.0] * c, std=[1.0] * c)
    return EnsemblePredictor([Member(name="tiny", model=model, weight=1.0, meta={})], shape)


def multipart(files: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """(content type, body) of an upload as httpx encodes it."""
    request = httpx.Request(
        "POST", "http://x/", files=[("files", (n, d, "application/octet-stream")) for n, d in files]
    )
    return request.headers["content-type"], request.read()


def assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.dtype.isnative
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("name", list(CASES))
def test_same_array_through_every_path(name: str, tmp_path: Path) -> None:
    data, expected = CASES[name]()
    assert expected.dtype == np.float32 and expected.ndim == 3

    assert_same(decode_image(data, name), expected)

    src = tmp_path / "src"
    path = src / "lens" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert_same(read_image(path), expected)
    st = StorageConfig(root=str(tmp_path / "root"))
    uri, m = import_cutouts(src, None, st, val_fraction=0, test_fraction=0)
    assert m.image_shape == expected.shape
    images, _, _ = load_split(uri, "train", st)
    assert_same(images[0], expected)

    assert_same(decode_file(name, data), expected)
    content_type, body = multipart([(name, data)])
    served = decode_request(content_type, body, predictor(expected.shape), max_images=4)
    assert_same(served, expected[None])


def test_pickled_npy_is_refused(tmp_path: Path) -> None:
    data = _npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ImageDecodeError, match=r"^objects\.npy: .*pickle"):
        decode_image(data, "objects.npy")
    path = tmp_path / "objects.npy"
    path.write_bytes(data)
    with pytest.raises(CutoutImportError, match=rf"^{tmp_path}/objects\.npy: .*pickle"):
        read_image(path)

    with pytest.raises(ClientError) as err:
        decode_file("objects.npy", data)
    assert err.value.status == 400 and "objects.npy" in err.value.message and "pickle" in err.value.message
    with pytest.raises(ClientError) as err:
        decode_npy(data, "npy_b64")
    assert err.value.status == 400 and "pickle" in err.value.message
    body = json.dumps({"npy_b64": base64.b64encode(data).decode()}).encode()
    with pytest.raises(ClientError) as err:
        decode_json(body, predictor((1, H, W)))
    assert err.value.status == 400 and "pickle" in err.value.message


def test_npz_archive_is_refused() -> None:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((H, W)))
    with pytest.raises(ImageDecodeError, match=r"^a\.npy: an \.npz archive"):
        decode_image(buf.getvalue(), "a.npy")
    with pytest.raises(ClientError) as err:
        decode_npy(buf.getvalue(), "npy_b64")
    assert err.value.status == 400 and ".npz" in err.value.message


def test_unknown_suffix_is_415_at_serving() -> None:
    with pytest.raises(UnsupportedImageType, match=r"^notes\.txt: unsupported file type"):
        decode_image(b"hello", "notes.txt")
    content_type, body = multipart([("notes.txt", b"hello")])
    with pytest.raises(ClientError) as err:
        decode_request(content_type, body, predictor((1, H, W)), max_images=4)
    assert err.value.status == 415 and "notes.txt" in err.value.message


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("broken.png", b"\x89PNG nope", "not a PNG image"),
        ("truncated.png", rgb()[0][:60], "not a readable PNG"),
        ("photo.png", b"\xff\xd8\xff\xe0 a JPEG named .png", "not a PNG image"),
        ("broken.fits", b"SIMPLE  = garbage", "not a readable FITS file"),
        ("table.fits", _fits(fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
            [fits.Column(name="a", format="E", array=np.zeros(3))])), "no image HDU with data"),
        ("broken.npy", b"\x93NUMPY garbage", "not a readable .npy array"),
        ("hwc.npy", _npy(np.zeros((32, 32, 3), np.float32)), "looks like (H, W, C)"),
        ("four_d.fits", _fits(fits.PrimaryHDU(np.zeros((2, 1, H, W), np.float32))), "4-D array"),
        ("text.npy", _npy(np.array([["a", "b"], ["c", "d"]])), "unsupported pixel type"),
    ],
)  # fmt: skip
def test_damaged_files_are_400_naming_the_file(name: str, data: bytes, fragment: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, name)
    assert not isinstance(err.value, UnsupportedImageType)
    assert str(err.value).startswith(f"{name}: ") and fragment in str(err.value)
    with pytest.raises(ClientError) as served:
        decode_file(name, data)
    assert served.value.status == 400
    assert served.value.message == f"file {name!r}: {err.value.reason}"


def test_serving_refuses_a_file_whose_image_is_not_the_models_shape() -> None:
    # Before: an RGB PNG sent to a 1-channel model became its luminance; now it is the array that
    # import gives, (3, H, W), and does not fit.
    content_type, body = multipart([("rgb.png", rgb()[0])])
    with pytest.raises(ClientError) as err:
        decode_request(content_type, body, predictor((1, H, W)), max_images=4)
    assert err.value.status == 422
    assert "rgb.png" in err.value.message and f"received shape (1, 3, {H}, {W})" in err.value.message

    # A 3-D .npy is one (C, H, W) image, as at import, not a batch of 1-channel images.
    content_type, body = multipart([("two.npy", _npy(np.zeros((2, H, W), np.float32)))])
    with pytest.raises(ClientError) as err:
        decode_request(content_type, body, predictor((1, H, W)), max_images=4)
    assert err.value.status == 422 and f"received shape (1, 2, {H}, {W})" in err.value.message


def test_serving_takes_a_4d_npy_as_a_stack() -> None:
    stack = _rng(12).normal(size=(3, 1, H, W)).astype(np.float32)
    one = gray8()
    content_type, body = multipart([("stack.npy", _npy(stack)), ("one.png", one[0])])
    served = decode_request(content_type, body, predictor((1, H, W)), max_images=4)
    assert_same(served, np.concatenate([stack, one[1][None]]))
