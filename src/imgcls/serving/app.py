"""The web app: a trained model behind a small HTTP API (see CONTRACT.md beside this file).

    app = create_app("runs/digits-...")           # torch runtime, no API key
    serve("runs/digits-...", port=8000)          # the same, run by uvicorn

The model is loaded once, in the app's lifespan, from the checkpoint alone
(``runtime="torch"``), from the exported ``<run>/export/model.onnx``
(``runtime="onnx"``) or from its int8 form ``<run>/export/model-int8.onnx``
(``runtime="onnx-int8"``, through the same :class:`imgcls.export.OnnxClassifier`).  Uploads are decoded by their content in worker threads
with the same functions that read training data, and prediction requests
that arrive together share one forward pass
(:class:`~imgcls.serving.batching.MicroBatcher`).

Explanations always come from the torch model, with the same
:func:`imgcls.explain.explain.explain_arrays` as the report.  With the ONNX
runtime the torch checkpoint is loaded on the first ``/v1/explain`` request;
when the run folder no longer holds it, that route answers 501.

Every error is ``{"error": {"code", "message"}}`` with a 4xx status for a bad
request (a 500 only for a bug in this server).  Per-app state only: two apps in
one process share nothing, not even their Prometheus registry.

This module makes the app: its routes, their answers, and the uvicorn server.
What a request meets before a route is :mod:`imgcls.serving.guard`; the
uploads, from bytes to pixels, :mod:`imgcls.serving.uploads`; what one app
holds (model, batcher, explanations, metrics, model card)
:mod:`imgcls.serving.state`; the error answers :mod:`imgcls.serving.errors`.
"""

from __future__ import annotations

import hmac
import io
import math
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import (
    Depends,
    FastAPI,
    File,
    Query,
    Request,
    Security,
    UploadFile,
)
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST

from imgcls import __version__
from imgcls.errors import ConfigError, unknown_name
from imgcls.evaluation.thresholds import prediction_rows
from imgcls.explain.attribution import METHODS as EXPLAIN_METHODS
from imgcls.explain.explain import overlay
from imgcls.serving.errors import ServingError, add_error_handlers
from imgcls.serving.guard import (
    API_KEY_HEADER,
    CLIENT_TIMEOUT,
    FRAME_CSP,
    MAX_REQUEST_BYTES,
    MULTIPART_SLACK,
    Guard,
    RecordMetrics,
)
from imgcls.serving.schemas import (
    ErrorResponse,
    ExplainResponse,
    Health,
    ModelCard,
    PredictResponse,
    Ready,
)
from imgcls.serving.state import (
    EXPLAIN_QUEUE,
    ONNX_FILES,
    ServingState,
    class_thresholds,
)
from imgcls.serving.uploads import decode_uploads
from imgcls.startup import keep_freed_memory

RUNTIMES = ("torch", "onnx", "onnx-int8")
EXPLAIN_FORMATS = ("png", "json")
STATIC_DIR = Path(__file__).parent / "static"
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; script-src 'self'; "
            "object-src 'none'; base-uri 'self'; form-action 'none'; " + FRAME_CSP)
OVERLAY_MIN_SIDE = 224  # px: explanation overlays are upscaled (nearest) to at least this long side
MAP_DECIMALS = 4  # digits of the explanation map values in JSON

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 415, 422, 503)}


# ----------------------------------------------------------------------------
# Answers


def predictions(names: list[str], proba: np.ndarray, meta: dict, top_k: int, thresholds,
                scores: np.ndarray | None = None) -> list[dict]:
    """The ``predictions`` list of /v1/predict from probabilities (N, K) and out-of-distribution scores
    (:func:`imgcls.evaluation.thresholds.prediction_rows`)."""
    return [{"filename": name, **r} for name, r in zip(names, prediction_rows(meta, proba, scores, top_k, thresholds))]


def upscale(rgb: np.ndarray, min_side: int = OVERLAY_MIN_SIDE) -> np.ndarray:
    """Enlarge (H, W, 3) by a whole factor (nearest neighbour) until its long side is at least ``min_side``."""
    factor = max(1, math.ceil(min_side / max(rgb.shape[:2])))
    return rgb if factor == 1 else np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def overlay_png(exp) -> bytes:
    """PNG of the first image of an Explanation with its heatmap over it, upscaled to be seen."""
    buf = io.BytesIO()
    Image.fromarray(upscale(overlay(exp.images[0], exp.maps[0])), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def explanation_json(exp, name: str) -> dict:
    """The JSON answer of /v1/explain for the first image of an Explanation."""
    pred = int(exp.predicted[0])
    height, width = exp.maps.shape[1:3]
    return {"filename": name, "predicted": exp.classes[pred], "probability": float(exp.proba[0, pred]),
            "method": exp.method, "width": int(width), "height": int(height),
            "map": np.round(exp.maps[0].astype(np.float64), MAP_DECIMALS).tolist()}


# ----------------------------------------------------------------------------
# The app


def create_app(run_path: str | Path, runtime: str = "torch", api_key: str | None = None, max_batch: int = 32,
               max_wait_ms: float = 5, max_bytes: int = 10_000_000, max_pixels: int = 40_000_000,
               max_files: int = 32, max_request_bytes: int = MAX_REQUEST_BYTES,
               client_timeout: float = CLIENT_TIMEOUT) -> FastAPI:
    """The FastAPI app serving the model of a run folder.

    Args:
        run_path: a run folder (or a checkpoint file, torch runtime only).
        runtime: ``"torch"`` (the checkpoint), ``"onnx"`` (``<run>/export/model.onnx``,
            made by ``imgcls export RUN --format onnx``) or ``"onnx-int8"``
            (``<run>/export/model-int8.onnx``, made by ``imgcls export RUN --int8``).
        api_key: when set, every /v1 route, /metrics and the API docs (/docs, /redoc,
            /openapi.json) need it in the ``X-API-Key`` header; it is checked before
            the body is read.
        max_batch: most images per forward pass when requests are batched; 1 disables batching.
        max_wait_ms: longest wait (ms) for other requests to join a batch; 0 disables batching.
        max_bytes: largest file accepted, in bytes (413 beyond).
        max_pixels: most pixels (width x height) an image may announce (413 beyond).
        max_files: most files in one /v1/predict request (413 beyond).
        max_request_bytes: largest whole request body, in bytes (413 beyond), however
            many files it carries.
        client_timeout: seconds a client may pause while sending a body, or take to send the request
            headers when served through :func:`uvicorn_config` (408 beyond).

    The model is loaded when the app starts (its lifespan), not here; the run's run.json and eval_test.json
    (for the model card) are read here, and a damaged one raises CheckpointError naming it.
    """
    if runtime not in RUNTIMES:
        raise unknown_name("runtime", runtime, RUNTIMES)
    for option, value in (("max_bytes", max_bytes), ("max_pixels", max_pixels), ("max_files", max_files),
                          ("max_request_bytes", max_request_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{option} must be a positive whole number, got {value!r}")
    if not isinstance(client_timeout, (int, float)) or not math.isfinite(client_timeout) or client_timeout <= 0:
        raise ConfigError(f"client_timeout must be a positive number of seconds, got {client_timeout!r}")
    if api_key is not None and not api_key:
        raise ConfigError("api_key must not be empty; leave it out (None) to serve without a key")
    run_path = Path(run_path).expanduser()
    if not run_path.exists():
        raise ConfigError(f"{run_path} does not exist; give a run folder (runs/<name>)")
    if runtime != "torch" and not run_path.is_dir():
        raise ConfigError(f"the {runtime} runtime needs a run folder (with {ONNX_FILES[runtime]}), got the file "
                          f"{run_path}")
    state = ServingState(run_path, runtime, max_batch, max_wait_ms, max_bytes, max_pixels, max_files)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    # FastAPIOffline serves Swagger UI and ReDoc from its own package: /docs works without internet.
    app = FastAPIOffline(title="imgcls", version=__version__, lifespan=lifespan,
                  description=f"Image classification with the model of run **{state.name}** ({runtime} runtime). "
                  "Errors are `{\"error\": {\"code\", \"message\"}}`.",
                  form_limits={"max_files": max_files})
    app.state.serving = state
    add_error_handlers(app)
    limit = min(max_request_bytes, max_files * (max_bytes + MULTIPART_SLACK) + MULTIPART_SLACK)
    app.state.client_timeout = float(client_timeout)  # the body's here; the headers' in uvicorn_config
    app.add_middleware(Guard, api_key=api_key, limit=limit, timeout=float(client_timeout))
    app.add_middleware(RecordMetrics, observe=state.metrics.observe)  # outermost: sees every answer, 413s included
    _add_routes(app, state, _key_check(api_key))
    return app


def _key_check(api_key: str | None) -> list:
    """Route dependencies that require the API key (none without one); they also document it in /docs."""
    if api_key is None:
        return []
    expected = api_key.encode()
    scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the key the server was started with")

    async def require_api_key(key: str | None = Security(scheme)) -> None:
        if key is None or not hmac.compare_digest(key.encode(), expected):  # constant time: no timing oracle
            raise ServingError(401, "unauthorized",
                               f"missing or wrong API key: send the server's key in the {API_KEY_HEADER} header")

    return [Security(require_api_key)]


async def _require_multipart(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is not None and content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise ServingError(415, "unsupported_media_type",
                           f"send the image(s) as multipart/form-data, got content type {content_type!r}")


def _ready(state: ServingState) -> ServingState:
    if not state.ready:
        raise ServingError(503, "not_ready", "the model is not loaded yet; retry when /readyz answers 200")
    return state


def _add_routes(app: FastAPI, state: ServingState, key: list) -> None:
    upload = key + [Depends(_require_multipart)]

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
              responses=_ERRORS, dependencies=upload, summary="Classify one or more images",
              description=f"Up to {state.max_files:,} files per request, each at most {state.max_bytes:,} bytes and "
              f"{state.max_pixels:,} pixels (413 beyond).")
    async def predict(
        # (annotations are evaluated at module level: no closure variables in them)
        files: Annotated[list[UploadFile], File(description="image files (PNG, JPEG, GIF, BMP, WEBP, TIFF, ...)")],
        top_k: Annotated[int, Query(ge=1, description="classes per image, most probable first (capped at the "
                                    "number of classes)")] = 5,
    ) -> dict:
        _ready(state)
        if len(files) > state.max_files:
            raise ServingError(413, "too_many_files",
                               f"{len(files):,} files in one request; send at most {state.max_files:,} per request")
        names, images = await decode_uploads(state, files)
        proba, scores = state.split_scores(await state.batcher.predict(images))
        thresholds = class_thresholds(state.clf.meta, len(state.clf.classes))
        return {"model": state.name, "predictions": predictions(names, proba, state.clf.meta, top_k, thresholds,
                                                                scores)}

    @app.post("/v1/explain", response_class=Response, dependencies=upload, summary="Explain a prediction",
              responses={200: {"description": "format=png: the heatmap over the image; format=json: the map",
                               "content": {"image/png": {},
                                           "application/json": {"schema": ExplainResponse.model_json_schema()}}},
                         501: {"model": ErrorResponse}, **_ERRORS})
    async def explain(
        file: Annotated[UploadFile, File(description="one image file")],
        method: Annotated[str, Query(description="attribution method",
                                     json_schema_extra={"enum": list(EXPLAIN_METHODS)})] = "gradcam",
        format: Annotated[str, Query(description="png (overlay image) or json (the map)",
                                     json_schema_extra={"enum": list(EXPLAIN_FORMATS)})] = "png",
    ) -> Response:
        _ready(state)
        if method not in EXPLAIN_METHODS:
            raise ServingError(400, "bad_parameter", str(unknown_name("method", method, EXPLAIN_METHODS)))
        if format not in EXPLAIN_FORMATS:
            raise ServingError(400, "bad_parameter", str(unknown_name("format", format, EXPLAIN_FORMATS)))
        names, images = await decode_uploads(state, [file])
        exp = await state.explain(images[0], names[0], method)
        if format == "png":
            return Response(overlay_png(exp), media_type="image/png")
        return JSONResponse(explanation_json(exp, names[0]))

    @app.get("/v1/model", response_model=ModelCard, responses=_ERRORS, dependencies=key, summary="The model card")
    async def model_card() -> dict:
        return _ready(state).card

    @app.get("/healthz", response_model=Health, summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, responses={503: {"model": Ready}},
             summary="Readiness: 200 once the model is loaded, 503 while every explanation slot is taken")
    async def readyz():
        doc = {"ready": state.ready}
        if state.ready and state.explaining:
            doc.update(explanations=state.explaining, explanation_slots=EXPLAIN_QUEUE, saturated=state.saturated)
        return JSONResponse(doc, status_code=200 if state.ready and not state.saturated else 503)

    for path, answer in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD too, as load balancers probe
        app.add_api_route(path, answer, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", response_class=Response, dependencies=key, summary="Prometheus metrics",
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, 401: {"model": ErrorResponse}})
    async def metrics() -> Response:
        return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            raise ServingError(404, "not_found", "the web page is not installed (imgcls/serving/static/index.html)")
        return FileResponse(index, headers={"Content-Security-Policy": PAGE_CSP})

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **options):
    """The ``uvicorn.Config`` that serves ``app`` from :func:`create_app`: its HTTP connections time the
    request headers out after the app's ``client_timeout`` (:mod:`imgcls.serving.http`).  ``options`` go
    to ``uvicorn.Config``."""
    import uvicorn

    from imgcls.serving.http import protocol_with_deadline  # uvicorn: on use

    http = protocol_with_deadline(app.state.client_timeout)
    return uvicorn.Config(app, host=host, port=port, http=http, **options)


def serve(run_path: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **options) -> None:
    """Serve a run with uvicorn until interrupted; ``options`` go to :func:`create_app`."""
    import uvicorn

    keep_freed_memory()  # an entry point: see imgcls.startup
    app = create_app(run_path, **options)
    app.state.serving.preload()  # a bad run or a missing export is one error line, not uvicorn's traceback
    sock = listening_socket(host, port)  # a port in use is one error line, not uvicorn's six
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    # uvicorn says where it listens only when it binds the socket itself
    print(f"serving {Path(run_path)} at http://{shown}:{bound[1]} (Ctrl-C to stop)", flush=True)
    uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level)).run(sockets=[sock])


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` for uvicorn to serve on; ConfigError in one line where it cannot be."""
    import errno

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} is not an address or a name this machine can resolve ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart may reuse the port
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = {errno.EADDRINUSE: "is in use by another program; stop it or give another --port",
               errno.EACCES: "needs privileges this user has not; give a --port of 1024 or more",
               errno.EADDRNOTAVAIL: "is not an address of this machine; give one of its own --host"}
        raise ConfigError(f"{host}:{port} {why.get(exc.errno, f'cannot be listened on ({exc.strerror})')}") from None
    sock.set_inheritable(True)
    return sock
