"""The baseline of ``lensmill bench serve``: the same ensemble in one plain FastAPI/uvicorn process.

What a team would write without Ray Serve: the members loaded once, each request decoded by the same
``lensmill.serve.decode_request`` and scored on its own (no batching across requests), one forward pass
at a time on all of the process's torch threads (concurrent passes would only fight over the cores),
the same JSON answer. Run as ``python -m lensmill.bench.plain_server ENSEMBLE_DIR PORT``; it binds
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lensmill.predict import EnsemblePredictor
from lensmill.serve import ClientError, decode_request, predictions_of

# serve.max_images_per_request's default: the same requests are accepted on both sides.
MAX_IMAGES = 256


def plain_app(model_dir: Path) -> FastAPI:
    """A FastAPI app answering ``POST /v1/predict`` and ``GET /healthz`` like the Serve endpoint."""
    predictor = EnsemblePredictor.load(model_dir)
    names = predictor.member_names
    lock = asyncio.Lock()
    app = FastAPI(title="lensmill plain baseline")

    @app.exception_handler(ClientError)
    async def _client_error(_: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        images = decode_request(
            request.headers.get("content-type", ""), await request.body(), predictor, MAX_IMAGES
        )
        async with lock:
            out = await asyncio.to_thread(predictor.predict, images)
        return {
            "model": {"name": "plain", "version": str(model_dir)},
            "predictions": predictions_of(out, names, predictor.classes),
        }

    return app


def main() -> None:
    model_dir, port = Path(sys.argv[1]), int(sys.argv[2])
    uvicorn.run(plain_app(model_dir), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
