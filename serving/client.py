"""A small client for the lensmill endpoint (needs only httpx and numpy).

    python serving/client.py --url http://127.0.0.1:8000 cutouts.npy lens.fits field.png

Files are uploaded as they are (the server decodes .npy, .fits/.fit/.fts and .png); one JSON line per
image is printed: {"file", "index", "p_lens", "label", "members", "spread", "model"}.

From Python: ``score(url, images)`` with an (N, C, H, W) (or (N, H, W) / (H, W)) array.

An endpoint with an API key: ``--api-key`` or the ``LENSMILL_API_KEY`` environment variable (sent as
``Authorization: Bearer <key>``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "LENSMILL_API_KEY"


def _client(url: str, timeout_s: float, api_key: str | None) -> httpx.Client:
    key = api_key or os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers)


class EndpointError(RuntimeError):
    """The endpoint answered with an error; the message carries its status and ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = str(response.json().get("error", response.text))
        except ValueError:
            message = response.text
        raise EndpointError(response.status_code, message)
    return response.json()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def score(
    url: str, images: np.ndarray, chunk_size: int = 256, timeout_s: float = 60.0, api_key: str | None = None
) -> list[dict[str, Any]]:
    """Score images; returns one dict per image (p_lens, label, members, spread, model).

    Arrays are sent as base64 ``.npy`` (compact and exact) in chunks of ``chunk_size`` images, which
    should not exceed the server's ``serve.max_images_per_request``.
    """
    arr = np.asarray(images, dtype=np.float32)
    # A single image (H, W) or (C, H, W)... is sent as is; the server knows the expected shape.
    chunks = [arr] if arr.ndim < 3 else [arr[i : i + chunk_size] for i in range(0, len(arr), chunk_size)]
    results: list[dict[str, Any]] = []
    with _client(url, timeout_s, api_key) as client:
        for chunk in chunks:
            body = {"npy_b64": base64.b64encode(_npy_bytes(chunk)).decode("ascii")}
            out = _check(client.post("/v1/predict", json=body))
            results += [{**p, "model": out["model"]} for p in out["predictions"]]
    return results


def score_files(
    url: str, paths: Sequence[str | Path], timeout_s: float = 60.0, api_key: str | None = None
) -> list[dict[str, Any]]:
    """Upload files one request each; returns one dict per image with its ``file`` and ``index``."""
    results: list[dict[str, Any]] = []
    with _client(url, timeout_s, api_key) as client:
        for path in map(Path, paths):
            files = [("files", (path.name, path.read_bytes(), "application/octet-stream"))]
            out = _check(client.post("/v1/predict", files=files))
            for i, p in enumerate(out["predictions"]):
                results.append({"file": str(path), "index": i, **p, "model": out["model"]})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score image files with a lensmill endpoint.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"endpoint base URL (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--api-key", default=None, help=f"the endpoint's API key (default: ${API_KEY_ENV})")
    parser.add_argument("files", nargs="+", help=".npy, .fits/.fit/.fts or .png files")
    args = parser.parse_args(argv)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        print(f"error: no such file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        for row in score_files(args.url, args.files, timeout_s=args.timeout, api_key=args.api_key):
            print(json.dumps(row))
    except EndpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
