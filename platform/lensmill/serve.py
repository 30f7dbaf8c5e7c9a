"""Ray Serve deployment with a FastAPI ingress that scores images with an ``EnsemblePredictor``.

HTTP contract (the README's "Keep the endpoint up and query it" shows it in use):

- ``POST /v1/predict``: JSON ``{"images": [...]}`` (nested lists) or ``{"npy_b64": "<base64 .npy>"}``,
  or ``multipart/form-data`` with files in field ``files`` (``.png``, ``.fits``/``.fit``/``.fts``,
  ``.npy``). Each file is decoded by ``lensmill.images``, exactly as ``lensmill import`` decodes it
  (PNG grayscale -> 1 channel, colour -> 3, values as stored), and must hold one image of the model's
  (C, H, W); a 4-D ``.npy`` holds a stack (N, C, H, W). Answers ``{"model": {"name", "version"},
  "predictions": [{"label", "class", "probabilities", "members", "spread"[, "p_lens"]}, ...]}``, one
  prediction per image, in request order (files in upload order); ``p_lens`` for lens finding.
- ``GET /healthz`` and ``GET /v1/model``; OpenAPI at ``/docs``.
- Client mistakes answer 4xx with ``{"error": "..."}``.

Requests are micro-batched by ``lensmill.batching.AdaptiveBatcher`` (each queued item is one request's
(n, C, H, W) array): a lone request runs at once, and those arriving during a forward pass go into the
next one together. The model comes from a local ensemble directory (``model_dir``) or
from the MLflow registry (``lensmill.tracking.load_ensemble``).

This module deliberately avoids ``from __future__ import annotations``: FastAPI and Serve's class-based
views inspect route signatures at runtime.
"""

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import shlex
import signal
import tempfile
import threading
import time
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from lensmill import __version__
from lensmill.batching import AdaptiveBatcher
from lensmill.config import Config, ServeConfig, load_config
from lensmill.errors import ConfigError
from lensmill.images import (
    SUFFIXES,
    ImageDecodeError,
    UnsupportedImageType,
    decode_image,
    decode_npy_array,
    image_kind,
    to_chw,
)
from lensmill.predict import MANIFEST as ENSEMBLE_MANIFEST
from lensmill.predict import EnsembleNotFoundError, EnsemblePredictor
from lensmill.tracking import load_ensemble

logger = logging.getLogger("lensmill.serve")

APP_NAME = "lensmill"
DEPLOYMENT_NAME = "LensEndpoint"
# Multipart field names that carry image files.
FILE_FIELDS = ("files", "file")
BUILD_ARGS = ("config_path", "overrides", "model_dir")
# JSON spells a float32 in up to ~16 characters; allow twice that per value plus slack for brackets.
_BYTES_PER_VALUE = 32
_BODY_SLACK = 1 << 20


class ClientError(Exception):
    """A request the client must fix; becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------------
# Request decoding: pure functions (no Ray), shared by the endpoint and usable in tests.
# ---------------------------------------------------------------------------------------------------
def decode_npy(data: bytes, what: str = "npy") -> np.ndarray:
    """A ``.npy`` file's array, any shape (``npy_b64`` carries a batch); pickled data is refused."""
    try:
        return decode_npy_array(data, what)
    except ImageDecodeError as exc:
        raise ClientError(400, str(exc)) from None


def decode_file(filename: str, data: bytes) -> np.ndarray:
    """One uploaded file -> its image (C, H, W) as ``lensmill.images`` decodes it (as at import), or
    for a 4-D ``.npy`` its stack of images (N, C, H, W)."""
    try:
        if image_kind(filename) == "npy":
            array = decode_npy_array(data, filename)
            return array if array.ndim == 4 else to_chw(array, filename)
        return decode_image(data, filename)
    except ImageDecodeError as exc:
        status = 415 if isinstance(exc, UnsupportedImageType) else 400
        raise ClientError(status, f"file {filename!r}: {exc.reason}") from None


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(filename, bytes) for each uploaded file, in order.

    The stdlib email parser handles multipart/form-data, so that serving needs no python-multipart.
    """
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart() or not isinstance(msg, EmailMessage) or msg.defects:
        raise ClientError(400, "multipart body could not be parsed (check the boundary)")
    files: list[tuple[str, bytes]] = []
    for part in msg.iter_parts():
        field = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        if field not in FILE_FIELDS:
            raise ClientError(400, f"unexpected form field {field!r}: send images as files in field 'files'")
        if not filename:
            raise ClientError(400, f"form field {field!r} must carry a file with a name (e.g. image.npy)")
        payload = part.get_payload(decode=True)
        files.append((str(filename), payload if isinstance(payload, bytes) else b""))
    if not files:
        raise ClientError(400, "multipart body holds no files: send them in field 'files'")
    return files


def _validated(predictor: EnsemblePredictor, raw: Any, what: str) -> np.ndarray:
    try:
        return predictor.validate_images(raw)
    except ValueError as exc:
        raise ClientError(422, f"{what}: {exc}") from None


def decode_json(body: bytes, predictor: EnsemblePredictor) -> np.ndarray:
    """``{"images": nested lists}`` or ``{"npy_b64": base64 .npy}`` -> validated (N, C, H, W)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClientError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ClientError(400, 'request body must be a JSON object: {"images": [...]} or {"npy_b64": "..."}')
    unknown = sorted(set(payload) - {"images", "npy_b64"})
    if unknown:
        raise ClientError(400, f"unknown key(s) {unknown}: send exactly one of 'images' or 'npy_b64'")
    if len(payload) != 1:
        raise ClientError(400, "send exactly one of 'images' (nested lists) or 'npy_b64' (base64 .npy)")
    if "images" in payload:
        return _validated(predictor, payload["images"], "images")
    encoded = payload["npy_b64"]
    if not isinstance(encoded, str):
        raise ClientError(400, "npy_b64 must be a base64 string of a .npy file")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientError(400, f"npy_b64 is not valid base64: {exc}") from None
    return _validated(predictor, decode_npy(data, "npy_b64"), "npy_b64")


def decode_request(
    content_type: str, body: bytes, predictor: EnsemblePredictor, max_images: int
) -> np.ndarray:
    """Any supported request body -> validated float32 (N, C, H, W), at most ``max_images`` images."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        arrays = []
        for filename, data in parse_multipart(body, content_type):
            raw = decode_file(filename, data)
            # One image goes in as a batch of one, so that its (C, H, W) must be the model's.
            arrays.append(_validated(predictor, raw[None] if raw.ndim == 3 else raw, f"file {filename!r}"))
        images = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    elif media in ("", "application/json") or media.endswith("+json"):
        images = decode_json(body, predictor)
    else:
        raise ClientError(
            415, f"unsupported content type {media!r}: send application/json or multipart/form-data"
        )
    if images.shape[0] > max_images:
        raise ClientError(
            413, f"too many images: {images.shape[0]} > serve.max_images_per_request={max_images}"
        )
    return images


def predictions_of(
    out: dict[str, np.ndarray], member_names: list[str], classes: tuple[str, ...]
) -> list[dict[str, Any]]:
    """``EnsemblePredictor.predict`` output -> the response's ``predictions``, one per image: the
    calibrated ``probabilities`` per class, ``label`` and its ``class``, the members' ``spread``;
    two classes (lens finding) add ``p_lens`` and give each member's p(lens), more classes each
    member's probabilities per class."""
    rows = []
    for i in range(len(out["label"])):
        label = int(out["label"][i])
        row: dict[str, Any] = {
            "label": label,
            "class": classes[label],
            "probabilities": {c: float(p) for c, p in zip(classes, out["probs"][i], strict=True)},
            "spread": float(out["spread"][i]),
        }
        if len(classes) == 2:
            row["p_lens"] = float(out["p_lens"][i])
            row["members"] = {n: float(p) for n, p in zip(member_names, out["member_probs"][i], strict=True)}
        else:
            row["members"] = {
                n: {c: float(p) for c, p in zip(classes, ps, strict=True)}
                for n, ps in zip(member_names, out["member_class_probs"][i], strict=True)
            }
        rows.append(row)
    return rows


def api_key_digest(serve_cfg: ServeConfig) -> str | None:
    """SHA-256 of the configured API key, or None when the endpoint is open. Only the digest goes to
    the replicas (it is part of the deployment's arguments, which the dashboard shows)."""
    key = None
    if serve_cfg.api_key_env:
        key = os.environ.get(serve_cfg.api_key_env) or None
    if key is None and serve_cfg.api_key_file:
        path = Path(serve_cfg.api_key_file).expanduser()
        try:
            lines = path.read_text().strip().splitlines()
        except OSError as exc:
            raise ConfigError(f"serve.api_key_file: cannot read {path}: {exc}") from None
        key = lines[0].strip() if lines else None
    if key is None and (serve_cfg.api_key_env or serve_cfg.api_key_file):
        where = " or ".join(
            w for w in (serve_cfg.api_key_env and f"${serve_cfg.api_key_env}", serve_cfg.api_key_file) if w
        )
        raise ConfigError(f"serve: an API key is configured but {where} holds none")
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def check_api_key(headers: Any, digest: str | None) -> None:
    """401 unless the request carries the key (``Authorization: Bearer`` or ``X-API-Key``)."""
    if digest is None:
        return
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
    if not given:
        raise ClientError(401, "missing API key: send Authorization: Bearer <key> or X-API-Key: <key>")
    if not hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), digest):
        raise ClientError(401, "wrong API key")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes: checked against a
    declared Content-Length first, then while a chunked (or lying) body streams in."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"request body of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"request body exceeds {limit} bytes (stopped reading at {size})")
        chunks.append(chunk)
    return b"".join(chunks)


def max_body_bytes(serve_cfg: ServeConfig, image_shape: tuple[int, ...]) -> int:
    """A generous bound on a legitimate request body: refuse bigger ones before reading them."""
    values = serve_cfg.max_images_per_request * int(np.prod(image_shape))
    return values * _BYTES_PER_VALUE + _BODY_SLACK


# ---------------------------------------------------------------------------------------------------
# FastAPI app: schemas for /docs and error handlers turning every failure into {"error": ...}.
# ---------------------------------------------------------------------------------------------------
class PredictJSON(BaseModel):
    """Send exactly one of the two fields."""

    images: list[Any] | None = Field(None, description="(N, C, H, W), or (N, H, W) / (H, W) for 1 channel")
    npy_b64: str | None = Field(None, description="base64 of a .npy file holding such an array")


class ModelRef(BaseModel):
    name: str
    version: str


class Prediction(BaseModel):
    label: int = Field(
        description="lens finding: 1 when p_lens >= threshold; more classes: the most probable"
    )
    class_name: str = Field(alias="class", description="the label's class name")
    probabilities: dict[str, float] = Field(description="calibrated ensemble probability of each class")
    p_lens: float | None = Field(
        None, description="lens finding: ensemble probability that the image shows a strong lens"
    )
    members: dict[str, float] | dict[str, dict[str, float]] = Field(
        description="each member's p_lens (lens finding) or probability of each class"
    )
    spread: float = Field(
        description="weighted standard deviation of the members' probabilities of the label"
    )


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class MemberInfo(BaseModel):
    name: str
    weight: float
    model: str | None = None
    val_auc: float | None = None


class ModelInfo(BaseModel):
    name: str
    version: str
    source: str
    image_shape: list[int]
    classes: list[str]
    threshold: float
    dataset_id: str | None
    members: list[MemberInfo]


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PredictJSON.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "image files: " + ", ".join(SUFFIXES),
                        }
                    },
                    "required": ["files"],
                }
            },
        },
    }
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {"error": "..."}}}}
    for code, text in [
        (400, "malformed request"),
        (401, "missing or wrong API key (when serve.api_key_env / api_key_file is set)"),
        (413, "too many images or body too large"),
        (415, "unsupported content or file type"),
        (422, "wrong image shape, NaN/inf, empty batch"),
    ]
}

api = FastAPI(
    title="lensmill",
    version=__version__,
    description="Strong-gravitational-lens finder: a weighted CNN ensemble served by Ray Serve.",
)


@api.exception_handler(ClientError)
async def _client_error(_: Request, exc: ClientError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error while serving a request")
    return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


# ---------------------------------------------------------------------------------------------------
# The deployment.
# ---------------------------------------------------------------------------------------------------
@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class LensEndpoint:
    """One replica: an ``EnsemblePredictor`` behind the FastAPI routes, with micro-batching."""

    def __init__(
        self, config: dict[str, Any], model_dir: str | None = None, api_key_digest: str | None = None
    ) -> None:
        self.cfg = Config.model_validate(config)
        self.api_key_digest = api_key_digest
        # Kept on the replica (removed when the replica goes away): the downloaded champion's files.
        self._download_dir = tempfile.TemporaryDirectory(prefix="lensmill-champion-")
        loaded = load_ensemble(self.cfg, Path(self._download_dir.name), model_dir or None)
        self.device = "cuda" if self.cfg.serve.gpus_per_replica > 0 else "cpu"
        torch.set_num_threads(self.cfg.serve.threads)  # Ray sets OMP_NUM_THREADS=1 for a fractional CPU
        self.predictor = loaded.predictor.to(self.device)
        self.model_name, self.model_version, self.source = loaded.name, loaded.version, loaded.source
        # Through a lambda: a champion swapped in later is the one that scores.
        self.batcher = AdaptiveBatcher(
            lambda images: self.predictor.predict(images),
            self.cfg.serve.max_batch_size,
            self.cfg.serve.batch_wait_timeout_s,
        )
        self.max_body_bytes = max_body_bytes(self.cfg.serve, self.predictor.image_shape)
        logger.info(
            "serving %s version %s (%s) with members %s",
            self.model_name,
            self.model_version,
            self.source,
            self.predictor.member_names,
        )
        interval = self.cfg.serve.watch_champion_s
        if self.source == "mlflow" and interval:
            threading.Thread(target=self._watch_alias, args=(interval,), daemon=True).start()

    def _watch_alias(self, interval_s: float) -> None:
        """Poll the registry alias; when it names another version, load that one and swap it in
        (requests in flight finish on the old one). A failed lookup or load keeps the current model."""
        from lensmill.tracking import alias_version

        while True:
            time.sleep(interval_s)
            try:
                version = alias_version(self.cfg)
                if version != self.model_version:
                    self._swap_in(version)
            except Exception:  # the registry down for a moment must not take the endpoint down
                logger.exception("checking %s@%s failed; still serving version %s",
                                 self.model_name, self.cfg.tracking.alias, self.model_version)  # fmt: skip

    def _swap_in(self, version: str) -> None:
        from lensmill.tracking import download_version

        download = tempfile.TemporaryDirectory(prefix="lensmill-champion-")
        got = download_version(self.cfg, self.model_name, version, Path(download.name))
        predictor = EnsemblePredictor.load(got["path"]).to(self.device)
        if tuple(predictor.image_shape) != tuple(self.predictor.image_shape):
            raise ValueError(
                f"version {version} takes images {list(predictor.image_shape)}, not "
                f"{list(self.predictor.image_shape)}: not swapped in (redeploy to change the input shape)"
            )
        old = self.model_version
        self.predictor, self.model_version, self._download_dir = predictor, str(got["version"]), download
        logger.info("%s@%s moved: now serving version %s (was %s)",
                    self.model_name, self.cfg.tracking.alias, self.model_version, old)  # fmt: skip

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model", response_model=ModelInfo)
    async def model_info(self, request: Request) -> dict[str, Any]:
        check_api_key(request.headers, self.api_key_digest)
        p = self.predictor
        members = [
            {
                "name": m.name,
                "weight": float(w),
                "model": m.meta.get("model"),
                "val_auc": m.meta.get("val_auc"),
            }
            for m, w in zip(p.members, p.weights, strict=True)
        ]
        return {
            "name": self.model_name,
            "version": self.model_version,
            "source": self.source,
            "image_shape": list(p.image_shape),
            "classes": list(p.classes),
            "threshold": p.threshold,
            "dataset_id": p.info.get("dataset_id"),
            "members": members,
        }

    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        # p_lens is lens finding's alone: left out, not null, in a C-class model's answers.
        response_model_exclude_none=True,
        openapi_extra=_PREDICT_BODY,
        responses=_ERROR_RESPONSES,
    )
    async def predict(self, request: Request) -> dict[str, Any]:
        check_api_key(request.headers, self.api_key_digest)
        body = await read_body(request, self.max_body_bytes)
        if not body:
            raise ClientError(400, "empty request body")
        images = decode_request(
            request.headers.get("content-type", ""),
            body,
            self.predictor,
            self.cfg.serve.max_images_per_request,
        )
        out = await self.batcher.submit(images)
        return {
            "model": {"name": self.model_name, "version": self.model_version},
            "predictions": predictions_of(out, self.predictor.member_names, self.predictor.classes),
        }


# ---------------------------------------------------------------------------------------------------
# Building and running the application.
# ---------------------------------------------------------------------------------------------------
def max_ongoing_requests(serve_cfg: ServeConfig) -> int:
    """Requests a replica accepts at once: a full batch in flight plus a full batch queued.

    Must be >= max_batch_size, or batches never fill.
    """
    return 2 * serve_cfg.max_batch_size


def deployment_options(s: ServeConfig) -> dict[str, Any]:
    """Replicas (a fixed count, or Serve's autoscaling), their CPUs and GPUs, and batching headroom."""
    replicas: dict[str, Any] = {"num_replicas": s.num_replicas}
    if s.autoscaling is not None:
        replicas = {"autoscaling_config": s.autoscaling.model_dump()}
    return {
        **replicas,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        "max_ongoing_requests": max_ongoing_requests(s),
    }


def ingress_env(s: ServeConfig) -> dict[str, str]:
    """Environment of Serve's controller for ``serve.ingress`` (its proxies and replicas inherit it):
    none for Serve's Python proxy; for HAProxy, Serve's HAProxy ingress with its throughput-optimised
    settings (replicas serve HTTP themselves, user code on the replica's event loop), its stats and
    metrics ports, and its files in a folder of this endpoint's port (Serve's default, one folder for
    the machine, would be shared by two endpoints)."""
    if s.ingress == "proxy":
        return {}
    state = Path(tempfile.gettempdir()) / f"lensmill-haproxy-{s.port}"
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(s.haproxy_stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(s.haproxy_metrics_port),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
    }


def build_endpoint(cfg: Config, model_dir: str | Path | None = None) -> Application:
    """The Serve application for ``cfg``: replicas, CPUs and batching from ``cfg.serve``."""
    local_dir = None
    if model_dir is not None:
        # Absolute, because replicas do not share the caller's working directory; checked here so
        # that a typo fails now rather than as a replica crash loop.
        path = Path(model_dir).expanduser().resolve()
        if not (path / ENSEMBLE_MANIFEST).is_file():
            raise EnsembleNotFoundError(f"no {ENSEMBLE_MANIFEST} in {path}: not an ensemble directory")
        local_dir = str(path)
    deployment = LensEndpoint.options(**deployment_options(cfg.serve))
    return deployment.bind(cfg.model_dump(mode="json"), local_dir, api_key_digest(cfg.serve))


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder for ``serve run`` / ``serve deploy``.

    ``args``: ``config_path`` (YAML, optional), ``overrides`` (list of ``key=value``, or one string
    split like a shell line), ``model_dir`` (local ensemble directory; default: MLflow champion).
    """
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:  # Serve passes args through untouched: catch typos here.
        raise ValueError(f"unknown build_app argument(s) {unknown}; expected some of {list(BUILD_ARGS)}")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    cfg = load_config(args.get("config_path"), [str(o) for o in overrides])
    return build_endpoint(cfg, args.get("model_dir"))


def base_url(cfg: Config) -> str:
    """The URL a local client uses to reach the proxy (wildcard binds are reached via loopback)."""
    host = cfg.serve.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.serve.port}"


def _check_proxy_matches(cfg: Config) -> None:
    """Serve keeps the HTTP options of an already running instance: refuse to return a wrong URL."""
    try:
        from ray.serve.context import _get_global_client

        current = _get_global_client().http_config
    except Exception:  # private API (Ray is pinned); skip the check rather than fail
        return
    if (current.host, current.port) != (cfg.serve.host, cfg.serve.port):
        raise RuntimeError(
            f"Serve is already running with its HTTP proxy on {current.host}:{current.port}, not "
            f"{cfg.serve.host}:{cfg.serve.port}; call stop_endpoint() first or use that port"
        )


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    """Poll ``GET {url}/healthz`` until it answers 200 (bounded in time)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(f"{url}/healthz")
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.25)
    raise TimeoutError(f"{url}/healthz not healthy after {timeout_s:.0f}s (last: {last})")


def start_endpoint(
    cfg: Config, model_dir: Path | None = None, blocking: bool = False, timeout_s: float = 120.0
) -> str:
    """Deploy the endpoint on the running Ray cluster and return its base URL.

    Ray must already be initialised by the caller. With ``blocking``, serve until Ctrl-C, then shut
    Serve down.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("start_endpoint needs a running Ray: call ray.init(...) first")
    env = ingress_env(cfg.serve)
    serve.start(
        proxy_location=cfg.serve.proxy_location,
        http_options={"host": cfg.serve.host, "port": cfg.serve.port},
        controller_options={"runtime_env": {"env_vars": env}} if env else None,
    )
    _check_proxy_matches(cfg)
    serve.run(build_endpoint(cfg, model_dir), name=APP_NAME, route_prefix="/")
    url = base_url(cfg)
    # serve.run returns once replicas are up; the proxy may route a moment later.
    wait_healthy(url, timeout_s)
    logger.info("lensmill endpoint ready at %s (OpenAPI at %s/docs)", url, url)
    if blocking:
        serve_until_interrupted()
    return url


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # process managers stop servers with SIGTERM: the Ctrl-C path


def stop_on_sigterm() -> None:
    """SIGTERM (systemd, Kubernetes) takes Ctrl-C's clean path. Call it after ``ray.init``, which
    installs Ray's own handler: that one prints a stack dump and aborts the process (exit 134)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def serve_until_interrupted() -> None:
    """Keep the endpoint up until Ctrl-C or SIGTERM (the foreground server of `lensmill serve`), then
    stop it cleanly."""
    stop_on_sigterm()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("interrupted: shutting Serve down")
    finally:
        stop_endpoint()


def stop_endpoint() -> None:
    """Shut Serve down (applications, replicas and the HTTP proxy)."""
    serve.shutdown()
