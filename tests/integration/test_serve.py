"""The Serve endpoint over real HTTP on 127.0.0.1: one endpoint for the whole module.

Also checks, without Ray, the serving/config.yaml keys (ServeDeploySchema drops unknown keys
silently) and the multipart parser on bytes that httpx itself encodes.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml

from lensmill.config import load_config
from lensmill.models import LensClassifier
from lensmill.predict import EnsemblePredictor, Member

try:  # tests/ is a package when tests/__init__.py exists, a rootdir of conftest otherwise
    from tests.conftest import free_port
except ImportError:
    from conftest import free_port  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
SHAPE = (1, 32, 32)
MAX_IMAGES = 16
API_KEY_ENV = "LENSMILL_TEST_SERVE_KEY"
API_KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _load_client() -> ModuleType:
    # serving/ is not a package on sys.path in tests: load the script by its path.
    spec = importlib.util.spec_from_file_location("lensmill_serving_client", REPO / "serving" / "client.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _fits(array: np.ndarray) -> bytes:
    from astropy.io import fits

    # Empty primary HDU + image extension: the server must pick the first HDU with data.
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(array.astype(">f4"))])
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((1, 32, 32)))
    return buf.getvalue()


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


def _assert_match(
    predictions: list[dict[str, Any]], expected: dict[str, np.ndarray], names: list[str]
) -> None:
    assert len(predictions) == len(expected["p_lens"])
    got = {
        "p_lens": [p["p_lens"] for p in predictions],
        "label": [p["label"] for p in predictions],
        "spread": [p["spread"] for p in predictions],
        "member_probs": [[p["members"][n] for n in names] for p in predictions],
    }
    for key, values in got.items():
        assert np.allclose(values, expected[key], rtol=1e-5, atol=1e-6), key


def _assert_client_error(r: httpx.Response, status: int, fragment: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    assert fragment.lower() in body["error"].lower(), body["error"]


# --------------------------------------------------------------------------------------------- no Ray
def test_serve_config_yaml_keys_survive_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    from lensmill.serve import BUILD_ARGS, DEPLOYMENT_NAME, build_app

    raw = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    # Every key written must still be there after validation: a dropped key was misspelt or unknown.
    assert schema.model_dump(mode="json", exclude_unset=True) == raw

    (app_cfg,) = schema.applications
    assert app_cfg.import_path == "lensmill.serve:build_app"
    assert set(app_cfg.args) <= set(BUILD_ARGS)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8000
    (dep,) = app_cfg.deployments
    app = build_app(app_cfg.args)
    bound = app._bound_deployment  # the deployment the YAML's entry must name
    assert dep.name == bound.name == DEPLOYMENT_NAME
    cfg = load_config(app_cfg.args.get("config_path"), app_cfg.args.get("overrides", []))
    assert dep.max_ongoing_requests >= cfg.serve.max_batch_size
    assert bound.max_ongoing_requests >= cfg.serve.max_batch_size
    assert dep.ray_actor_options.num_cpus == bound.ray_actor_options["num_cpus"]
    assert dep.num_replicas == bound.num_replicas


def test_build_app_rejects_unknown_args_and_missing_dir(tmp_path: Path) -> None:
    from lensmill.predict import EnsembleNotFoundError
    from lensmill.serve import build_app

    with pytest.raises(ValueError, match="model_dri"):
        build_app({"model_dri": "x"})
    with pytest.raises(EnsembleNotFoundError, match=str(tmp_path)):
        build_app({"model_dir": str(tmp_path)})
    app = build_app({"overrides": "serve.num_replicas=2 serve.max_batch_size=4"})
    assert app._bound_deployment.num_replicas == 2
    assert app._bound_deployment.max_ongoing_requests >= 4


def test_parse_multipart_round_trips_binary() -> None:
    from lensmill.serve import ClientError, parse_multipart

    rng = np.random.default_rng(3)
    # Bytes that look like line endings and boundaries must come back unchanged.
    blobs = [rng.integers(0, 256, 5000, dtype=np.uint8).tobytes() + b"\r\n--\r\n\n\r", b"\r\n", b"x"]
    files = [("files", (f"f{i}.npy", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]
    request = httpx.Request("POST", "http://127.0.0.1/v1/predict", files=files)
    body = request.read()
    parsed = parse_multipart(body, request.headers["content-type"])
    assert parsed == [(f"f{i}.npy", blob) for i, blob in enumerate(blobs)]

    other = httpx.Request("POST", "http://x/", data={"note": "hi"}, files={"files": ("a.npy", b"1")})
    with pytest.raises(ClientError, match="unexpected form field 'note'"):
        parse_multipart(other.read(), other.headers["content-type"])
    with pytest.raises(ClientError, match="multipart"):
        parse_multipart(b"garbage", "multipart/form-data; boundary=zzz")


# -------------------------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    members = []
    for i, weight in enumerate((0.7, 0.3)):
        torch.manual_seed(10 + i)
        model = LensClassifier("tiny", in_chans=1, mean=[0.5], std=[2.0])
        members.append(Member(f"tiny-{i}", model, weight, {"val_auc": 0.8}))
    predictor = EnsemblePredictor(members, SHAPE, threshold=0.5, info={"dataset_id": "ds-serve-test"})
    return predictor.save(tmp_path_factory.mktemp("ensemble"))


@pytest.fixture(scope="module")
def reference(ensemble_dir: Path) -> EnsemblePredictor:
    return EnsemblePredictor.load(ensemble_dir)


@pytest.fixture(scope="module")
def endpoint(ray_session: str, ensemble_dir: Path) -> Iterator[str]:
    from lensmill.serve import start_endpoint, stop_endpoint

    cfg = load_config(
        None,
        [
            f"serve.port={free_port()}",
            f"serve.max_images_per_request={MAX_IMAGES}",
            "serve.max_batch_size=8",
            "serve.batch_wait_timeout_s=0.02",
            "serve.cpus_per_replica=0.5",
            f"serve.api_key_env={API_KEY_ENV}",
        ],
    )
    # Read on this (the driver's) side when the app is built; the replicas get only its digest.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    url = start_endpoint(cfg, model_dir=ensemble_dir)
    monkeypatch.setenv("LENSMILL_API_KEY", API_KEY)  # for serving/client.py
    try:
        assert url.startswith("http://127.0.0.1:")
        yield url
    finally:
        stop_endpoint()
        monkeypatch.undo()


@pytest.fixture(scope="module")
def http(endpoint: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=endpoint, timeout=60.0, headers=AUTH) as client:
        yield client


def test_healthz_and_model(http: httpx.Client, reference: EnsemblePredictor) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    info = http.get("/v1/model").json()
    assert info["name"] == "lens-ensemble" and info["version"] == "local" and info["source"] == "local"
    assert info["image_shape"] == list(SHAPE)
    assert info["threshold"] == 0.5
    assert info["dataset_id"] == "ds-serve-test"
    assert [m["name"] for m in info["members"]] == reference.member_names
    assert [m["weight"] for m in info["members"]] == pytest.approx([0.7, 0.3])
    assert info["members"][0]["model"] == "tiny"
    assert http.get("/docs").status_code == 200
    openapi = http.get("/openapi.json").json()
    assert "/v1/predict" in openapi["paths"]
    content = openapi["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)


def test_predict_json_lists(http: httpx.Client, reference: EnsemblePredictor) -> None:
    images = _images(3, seed=1)
    r = http.post("/v1/predict", json={"images": images.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "lens-ensemble", "version": "local"}
    _assert_match(body["predictions"], reference.predict(images), reference.member_names)
    # A single (H, W) image is accepted for a 1-channel model.
    r = http.post("/v1/predict", json={"images": images[0, 0].tolist()})
    _assert_match(r.json()["predictions"], reference.predict(images[:1]), reference.member_names)


def test_predict_npy_b64(http: httpx.Client, reference: EnsemblePredictor) -> None:
    images = _images(5, seed=2)[:, 0]  # (N, H, W)
    r = http.post("/v1/predict", json={"npy_b64": base64.b64encode(_npy(images)).decode()})
    assert r.status_code == 200, r.text
    _assert_match(r.json()["predictions"], reference.predict(images), reference.member_names)


def test_predict_multipart_files(http: httpx.Client, reference: EnsemblePredictor) -> None:
    stack = _images(2, seed=3)  # a 4-D .npy is a stack; a 3-D one would be one (C, H, W) image
    fits_img = _images(1, seed=4)[0, 0] * 100.0
    png_img = np.random.default_rng(5).integers(0, 256, SHAPE[1:], dtype=np.uint8)
    files = [
        ("files", ("stack.npy", _npy(stack), "application/octet-stream")),
        ("files", ("cutout.FITS", _fits(fits_img), "application/fits")),
        ("files", ("field.png", _png(png_img), "image/png")),
    ]
    r = http.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    expected_images = np.concatenate([stack[:, 0], fits_img[None], png_img[None].astype(np.float32)])
    _assert_match(r.json()["predictions"], reference.predict(expected_images), reference.member_names)


def test_a_thousand_requests_at_concurrency_16_without_an_error(
    endpoint: str, reference: EnsemblePredictor
) -> None:
    batches = [_images(1 + i % 3, seed=100 + i) for i in range(1000)]
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    with httpx.Client(base_url=endpoint, timeout=60.0, headers=AUTH, limits=limits) as client:

        def post(images: np.ndarray) -> tuple[int, dict[str, Any]]:
            r = client.post("/v1/predict", json={"npy_b64": base64.b64encode(_npy(images)).decode()})
            return r.status_code, r.json()

        with ThreadPoolExecutor(max_workers=16) as pool:  # a bounded count: 1,000 requests
            results = list(pool.map(post, batches))
    assert [code for code, _ in results if code != 200] == []
    every = np.concatenate(batches)
    expected = reference.predict(every)
    got = [p for _, body in results for p in body["predictions"]]
    _assert_match(got, expected, reference.member_names)


@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [
        ({"json": {"images": np.zeros((2, 16, 16)).tolist()}}, 422, "received shape (2, 16, 16)"),
        ({"json": {"images": [[1.0, 2.0], [3.0]]}}, 422, "rectangular"),
        ({"json": {"images": []}}, 422, "received shape (0)"),
        ({"json": {"image": [1.0]}}, 400, "unknown key"),
        ({"json": {"images": [1.0], "npy_b64": "AA=="}}, 400, "exactly one"),
        ({"json": [1, 2, 3]}, 400, "JSON object"),
        ({"json": {"npy_b64": "%%% not base64"}}, 400, "base64"),
        ({"json": {"npy_b64": base64.b64encode(b"not an npy").decode()}}, 400, ".npy"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty"),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "content type"),
        # json.dumps writes the non-standard literal NaN, which Python's json.loads accepts.
        ({"content": json.dumps({"images": [[float("nan")] * 32] * 32}).encode()}, 422, "NaN"),
        (
            {"json": {"npy_b64": base64.b64encode(_npy(np.full((1, 32, 32), np.inf, np.float32))).decode()}},
            422,
            "NaN or infinite",
        ),
        ({"json": {"images": np.zeros((MAX_IMAGES + 1, 32, 32)).tolist()}}, 413, "too many images"),
        ({"files": [("files", ("notes.txt", b"hello", "text/plain"))]}, 415, "unsupported file type"),
        (
            {"files": [("files", ("broken.npy", b"\x93NUMPY garbage", "application/octet-stream"))]},
            400,
            "npy",
        ),
        ({"files": [("files", ("broken.fits", b"SIMPLE  = garbage", "application/fits"))]}, 400, "FITS"),
        ({"files": [("files", ("broken.png", b"\x89PNG nope", "image/png"))]}, 400, "PNG"),
        ({"files": [("files", ("small.npy", _npy(np.zeros((8, 8))), "x"))]}, 422, "small.npy"),
        ({"json": {"images": [["a", "b"], ["c", "d"]]}}, 422, "must be numeric"),
        ({"json": {"images": np.zeros((1, 1, 1, 32, 32)).tolist()}}, 422, "shape"),
        (
            {"json": {"npy_b64": base64.b64encode(_npy(np.array([{"a": 1}], dtype=object))).decode()}},
            400,
            "pickle",
        ),
        (
            {"files": [("files", ("stack.npz", _npz(), "application/octet-stream"))]},
            415,
            "unsupported file type",
        ),
        ({"files": [("other", ("x.npy", _npy(np.zeros((1, 32, 32))), "x"))]}, 400, "files"),
        ({"content": b"--zzz\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, "boundary"),
        # A declared Content-Length over the limit (3 MiB against ~1.5 MiB): refused before reading.
        ({"content": b"0" * 3 * 2**20, "headers": {"content-type": "application/json"}}, 413, "exceeds"),
        # Decoded as at import: an RGB PNG is (3, H, W), not the 1-channel model's luminance.
        (
            {"files": [("files", ("rgb.png", _png(np.zeros((32, 32, 3), np.uint8)), "image/png"))]},
            422,
            "received shape (1, 3, 32, 32)",
        ),
    ],
)
def test_client_errors(http: httpx.Client, kwargs: dict[str, Any], status: int, fragment: str) -> None:
    _assert_client_error(http.post("/v1/predict", **kwargs), status, fragment)


def test_the_api_key_guards_the_model_routes_but_not_healthz(endpoint: str) -> None:
    images = {"json": {"images": _images(1, seed=9).tolist()}}
    with httpx.Client(base_url=endpoint, timeout=60.0) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        _assert_client_error(anonymous.post("/v1/predict", **images), 401, "missing API key")
        _assert_client_error(anonymous.get("/v1/model"), 401, "missing API key")
        wrong = {"Authorization": "Bearer not-the-key"}
        _assert_client_error(anonymous.post("/v1/predict", headers=wrong, **images), 401, "wrong API key")
        ok = anonymous.post("/v1/predict", headers={"X-API-Key": API_KEY}, **images)
        assert ok.status_code == 200, ok.text


def test_a_chunked_body_is_refused_while_it_streams_in(http: httpx.Client) -> None:
    from lensmill.config import ServeConfig
    from lensmill.serve import max_body_bytes

    limit = max_body_bytes(ServeConfig(max_images_per_request=MAX_IMAGES), SHAPE)

    def chunks():  # no Content-Length: httpx sends it chunked, 2 chunks past the limit
        for _ in range(limit // 65536 + 2):
            yield b"0" * 65536

    r = http.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    _assert_client_error(r, 413, "exceeds")
    assert http.get("/healthz").status_code == 200


def test_routing_errors_are_json(http: httpx.Client) -> None:
    _assert_client_error(http.get("/v1/nope"), 404, "not found")
    _assert_client_error(http.get("/v1/predict"), 405, "method not allowed")


def test_client_module(
    endpoint: str, reference: EnsemblePredictor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = _load_client()
    images = _images(MAX_IMAGES + 4, seed=7)
    rows = client.score(endpoint, images, chunk_size=MAX_IMAGES)  # two requests
    _assert_match(rows, reference.predict(images), reference.member_names)

    npy_path = tmp_path / "a.npy"
    np.save(npy_path, images[:2])
    fits_path = tmp_path / "b.fits"
    fits_path.write_bytes(_fits(images[2, 0]))
    assert client.main(["--url", endpoint, str(npy_path), str(fits_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["file"], row["index"]) for row in lines] == [
        (str(npy_path), 0),
        (str(npy_path), 1),
        (str(fits_path), 0),
    ]
    _assert_match(lines, reference.predict(images[:3]), reference.member_names)

    bad = tmp_path / "c.txt"
    bad.write_text("hi")
    assert client.main(["--url", endpoint, str(bad)]) == 1
    assert "415" in capsys.readouterr().err


def test_a_three_class_ensemble_answers_each_class_over_http(endpoint: str, tmp_path: Path) -> None:
    """Last in the module: it replaces the module's application with a no_sub / cdm / vortex ensemble
    on the same proxy (the module's teardown shuts Serve down)."""
    from ray import serve

    from lensmill.serve import APP_NAME, build_endpoint

    classes = ("no_sub", "cdm", "vortex")
    members = []
    for i in range(2):
        torch.manual_seed(20 + i)
        members.append(Member(f"sub-{i}", LensClassifier("tiny", 1, [0.5], [2.0], classes=classes), 1.0))
    reference = EnsemblePredictor(members, SHAPE, temperature=1.4)
    model_dir = reference.save(tmp_path / "three")
    cfg = load_config(None, [f"serve.port={endpoint.rsplit(':', 1)[1]}", "serve.cpus_per_replica=0.25"])
    serve.run(build_endpoint(cfg, model_dir), name=APP_NAME, route_prefix="/")
    with httpx.Client(base_url=endpoint, timeout=60.0) as http:
        assert http.get("/v1/model").json()["classes"] == list(classes)
        images = _images(4, seed=11)
        body = http.post("/v1/predict", json={"npy_b64": base64.b64encode(_npy(images)).decode()}).json()
    expected = reference.predict(images)
    for row, probs, label in zip(body["predictions"], expected["probs"], expected["label"], strict=True):
        assert "p_lens" not in row and row["class"] == classes[label] and row["label"] == label
        assert [row["probabilities"][c] for c in classes] == pytest.approx(probs.tolist(), abs=1e-6)
        assert set(row["members"]) == {"sub-0", "sub-1"} and set(row["members"]["sub-0"]) == set(classes)
