"""The HTTP API and the web page of ``medtl serve`` (FastAPI).

``create_app(served_or_path)`` builds the application; ``medtl serve`` runs it on uvicorn
(medtl.serving.server). Serving a bundle imports no PyTorch.
"""

from __future__ import annotations

import asyncio
import html
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from medtl.errors import MedtlError
from medtl.serving import heatmap
from medtl.serving.batching import Batcher
from medtl.serving.guard import FILES_KEY, Guard
from medtl.serving.model import Served, load_served
from medtl.serving.uploads import RequestFiles, Upload, UploadError, decode, store

log = logging.getLogger("medtl.serve")

STATIC = Path(__file__).parent / "static"
MAX_FILES = 64  # files in one /v1/predict request
# The page and /docs reach nothing but this server (the page's own meta tag says the same).
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
EXPLAIN_HEADERS = ["X-Medtl-Explain-Method", "X-Medtl-Target", "X-Medtl-Probability"]


@dataclass
class Settings:
    """What ``medtl serve``'s options set (see docs/usage.md)."""

    token: str | None = None
    batch_size: int = 32
    batch_wait_ms: float = 5.0
    max_upload_mb: float = 64.0
    max_pixels: int = 50_000_000
    cors_origins: list[str] = field(default_factory=list)


class _State:
    """The served model (None while it loads), why it failed to load, and the batcher."""

    def __init__(self, served: Served | None, settings: Settings) -> None:
        self.served = served
        self.error: str | None = None
        self.settings = settings
        self.batcher = Batcher(self._predict, settings.batch_size, settings.batch_wait_ms / 1000)
        self._uploads: Path | None = None
        self.closed = False

    def files(self) -> RequestFiles:
        """A request's upload files, in the server's private temporary folder."""
        if self._uploads is None:
            self._uploads = Path(tempfile.mkdtemp(prefix="medtl-serve-uploads-"))  # mode 0700
        return RequestFiles(self._uploads)

    def close(self) -> None:
        self.closed = True
        if self._uploads is not None:
            shutil.rmtree(self._uploads, ignore_errors=True)
            self._uploads = None
        if self.served is not None:
            self.served.close()

    def _predict(self, batch: np.ndarray):
        return self.require().model.predict_batch_ood(batch)

    def require(self) -> Served:
        if self.served is None:
            detail = ("the model is loading" if self.error is None
                      else f"the model could not be loaded: {self.error}")
            raise HTTPException(503, detail)
        return self.served

    def load(self, path: str | Path) -> None:
        try:
            served = load_served(path)
        except MedtlError as exc:
            self.error = str(exc)
            log.error("the model could not be loaded: %s", exc)
            return
        except Exception as exc:  # an unforeseen failure must not leave /ready "loading"
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("the model could not be loaded")
            return
        if self.closed:  # the server stopped while a run was being exported
            served.close()
        else:
            self.served = served


def create_app(served: Served | str | Path, settings: Settings | None = None, **options: Any
               ) -> FastAPI:
    """The application serving ``served`` (a loaded :class:`Served`, or a bundle or run path
    loaded in a thread at start-up, /ready answering 503 until it is done). ``options``:
    :class:`Settings` fields. The app's ``state.medtl`` holds the model and the batcher."""
    import contextlib

    import medtl

    settings = settings or Settings(**options)
    state = _State(served if isinstance(served, Served) else None, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        if state.served is None and state.error is None:
            threading.Thread(target=state.load, args=(served,), daemon=True).start()
        try:
            yield
        finally:
            await state.batcher.stop()
            state.close()

    app = FastAPI(title="medtl", version=medtl.__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Predictions of an exported medtl model. "
                  "Research use, not for clinical diagnosis.")
    app.state.medtl = state
    _errors(app)
    _public_routes(app, state)
    _model_routes(app, state)
    _image_routes(app, state)
    app.add_middleware(Guard, token=settings.token,
                       max_bytes=int(settings.max_upload_mb * 2**20))
    if settings.cors_origins:  # added last, so outermost: a preflight needs no token
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization"],
                           expose_headers=EXPLAIN_HEADERS)
    return app


def _errors(app: FastAPI) -> None:
    """Every error is ``{"detail": "one line"}``."""

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(MedtlError)
    async def medtl_error(request: Request, exc: MedtlError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: "
                           f"{e.get('msg', 'invalid')}" for e in exc.errors()[:5])]
        return JSONResponse({"detail": parts[0] or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path[:100],
                  type(exc).__name__)  # its message may hold a path: not logged
        return JSONResponse({"detail": "internal error"}, status_code=500)


def _public_routes(app: FastAPI, state: _State) -> None:
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            return HTMLResponse("<!doctype html><title>medtl</title><p>medtl serve: the page "
                                "is not installed; the API is at <a href=docs>/docs</a>.",
                                headers={"Content-Security-Policy": PAGE_CSP})
        return FileResponse(index, headers={"Content-Security-Policy": PAGE_CSP,
                                            "Cache-Control": "no-cache"})

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once the model is loaded, 503 before")
    async def ready() -> JSONResponse:
        if state.served is None:
            return JSONResponse({"ready": False, "detail": state.error or "the model is loading"},
                                status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_docs_page(app.openapi()),
                            headers={"Content-Security-Policy": PAGE_CSP})


def _model_routes(app: FastAPI, state: _State) -> None:
    @app.get("/v1/model", summary="The model: classes (multi-label: labels and their "
                                  "thresholds), operating points, OOD guard, card")
    async def model() -> dict[str, Any]:
        served = state.require()
        m = served.model
        return {"id": served.id, "sha256": m.sha256, "classes": m.classes,
                **(_task(m) if getattr(m, "multilabel", False) else {}),
                "positive_class": m.positive_class, "operating_points": m.operating_points,
                "input": {"size": m.preprocessing.size, "channels": m.preprocessing.channels},
                "ood": m.ood, "card": m.card, "explain": served.explain_method}

    @app.post("/v1/predict", summary="Probabilities, decisions (multi-label: per label at its "
                                     "threshold) and OOD flag per uploaded file")
    async def predict(request: Request, files: Annotated[list[UploadFile], File(
            description="PNG, JPEG, TIFF or DICOM files (judged by content)")]) -> dict:
        served = state.require()
        setattr(request.state, FILES_KEY, len(files))
        if len(files) > MAX_FILES:
            raise HTTPException(413, f"{len(files)} files in one request; at most {MAX_FILES}")
        start = time.perf_counter()
        with state.files() as folder:
            jobs = [_predict_one(state, served, f, i, folder, start)
                    for i, f in enumerate(files)]
            done = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        return {"results": done}


def _image_routes(app: FastAPI, state: _State) -> None:
    """/v1/explain and /v1/preview: one upload in, one PNG out."""

    @app.post("/v1/explain", summary="Heat map over the image (PNG); the method in a header",
              response_class=Response,
              responses={200: {"content": {"image/png": {}}}})
    async def explain(request: Request, file: Annotated[UploadFile, File()],
                      target: Annotated[str | None, Form(
                          description="A class name; default: the predicted class (a "
                                      "multi-label model: a label; default: the most "
                                      "probable label)")] = None
                      ) -> Response:
        served = state.require()
        setattr(request.state, FILES_KEY, 1)
        classes = served.model.classes
        if target not in (None, "", "predicted") and target not in classes:
            what = "label" if getattr(served.model, "multilabel", False) else "class"
            raise HTTPException(422, f"target {target[:80]!r}: not a {what} of this model "
                                     f"({', '.join(classes)})")
        index = classes.index(target) if target in classes else None
        data = await file.read()
        with state.files() as folder:
            png, used, t, p = await run_in_threadpool(
                _explain, state, served, data, file.filename, folder, index)
        return Response(png, media_type="image/png", headers={
            "X-Medtl-Explain-Method": used, "X-Medtl-Target": _header_text(classes[t]),
            "X-Medtl-Probability": f"{p:.6f}", "Cache-Control": "no-store"})

    @app.post("/v1/preview", summary="The image as the model reads it (PNG; DICOM windowed)",
              response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def preview(request: Request, file: Annotated[UploadFile, File()]) -> Response:
        served = state.require()
        setattr(request.state, FILES_KEY, 1)
        data = await file.read()
        with state.files() as folder:
            png = await run_in_threadpool(_preview, state, served, data, file.filename, folder)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def _header_text(text: str) -> str:
    """A class name as an HTTP header value (latin-1 only; anything else escaped)."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _read(state: _State, served: Served, data: bytes, filename: str | None, index: int,
          folder: RequestFiles) -> tuple[Upload, np.ndarray]:
    upload = store(data, filename, index, folder, max_pixels=state.settings.max_pixels)
    return upload, decode(served.model, upload)


async def _predict_one(state: _State, served: Served, file: UploadFile, index: int,
                       folder: RequestFiles, start: float) -> dict[str, Any]:
    data = await file.read()
    upload, image, x, kind = await run_in_threadpool(_prepare, state, served, data,
                                                     file.filename, index, folder)
    proba, score = await state.batcher.submit(x)
    return _result(served, upload.name, proba, score, kind,
                   (time.perf_counter() - start) * 1000)


def _prepare(state: _State, served: Served, data: bytes, filename: str | None, index: int,
             folder: RequestFiles):
    """Store, check and decode one upload, and build the model's input (in a worker thread)."""
    upload, image = _read(state, served, data, filename, index, folder)
    # The model's input row: for an ensemble bundle, each member's own resize and normalisation
    x = served.model.prepare(image)
    kind = None
    if upload.kind == "dicom" and served.model.ood is not None:
        from medtl.transfer.ood import dicom_kind

        kind = dicom_kind(upload.path)  # Modality and BodyPartExamined only
    return upload, image, x, kind


def label_thresholds(model) -> dict[str, float]:
    """A multi-label model's decision threshold per label: the bundle's, chosen on validation;
    0.5 for every label when the run recorded none (as ``medtl predict`` decides then)."""
    from medtl.evaluation.multilabel import DEFAULT_THRESHOLD

    th = model.thresholds
    return {c: DEFAULT_THRESHOLD if th is None else float(th[c]) for c in model.classes}


def _task(model) -> dict[str, Any]:
    """/v1/model's entries for a multi-label model: the task, each label's decision threshold
    and where they were chosen, by which rule (and the labels that fell back to 0.5)."""
    th = model.thresholds
    chosen = ({k: th[k] for k in ("chosen_on", "rule", "fallback")
               if k in th and k not in model.classes} if th is not None
              else {"chosen_on": None, "rule": "0.5 for every label: the run recorded none"})
    return {"task": "multilabel", "thresholds": label_thresholds(model),
            "thresholds_chosen": chosen}


def label_decisions(model, proba: np.ndarray) -> dict[str, dict[str, Any]]:
    """A multi-label model's call on each label: present when its probability is at least the
    label's threshold (as medtl's predictions.csv decides)."""
    return {label: {"probability": float(p), "threshold": t, "present": bool(p >= t)}
            for (label, t), p in zip(label_thresholds(model).items(), proba, strict=True)}


def _result(served: Served, name: str, proba: np.ndarray, score: float | None,
            kind: tuple[str | None, str | None] | None, latency_ms: float) -> dict[str, Any]:
    m = served.model
    if getattr(m, "multilabel", False):  # no arg-max: each label is decided on its own
        labels = label_decisions(m, proba)
        return {"file": name, "task": "multilabel",
                "probabilities": {c: float(p) for c, p in zip(m.classes, proba, strict=True)},
                "labels": labels,
                "present": [c for c, d in labels.items() if d["present"]],
                "ood": _ood(m.ood, score, kind), "model": {"id": served.id, "sha256": m.sha256},
                "latency_ms": round(latency_ms, 2)}
    k = int(np.argmax(proba))
    return {"file": name,
            "probabilities": {c: float(p) for c, p in zip(m.classes, proba, strict=True)},
            "predicted_class": m.classes[k], "probability": float(proba[k]),
            "decisions": decisions(m, proba), "ood": _ood(m.ood, score, kind),
            "model": {"id": served.id, "sha256": m.sha256}, "latency_ms": round(latency_ms, 2)}


def decisions(model, proba: np.ndarray) -> dict[str, dict[str, Any]]:
    """The call at each operating point: positive when the positive class's probability is at
    least the point's threshold (as medtl evaluates them), the class decided, the threshold."""
    if model.positive_class is None:
        return {}
    classes = list(model.classes)
    pos = classes.index(model.positive_class)
    others = [i for i in range(len(classes)) if i != pos]
    out = {}
    for point, threshold in model.operating_points.items():
        positive = bool(proba[pos] >= threshold)
        label = classes[pos] if positive else classes[max(others, key=lambda i: proba[i])]
        out[point] = {"threshold": threshold, "positive": positive, "label": label}
    return out


def _ood(record: dict[str, Any] | None, score: float | None,
         kind: tuple[str | None, str | None] | None) -> dict[str, Any] | None:
    """The out-of-distribution verdict: the feature distance against the threshold, and a
    DICOM whose Modality or BodyPartExamined the training data did not have."""
    if record is None:
        return None
    from medtl.transfer.ood import tag_mismatch

    threshold = float(record["threshold"])
    reasons = []
    if score is not None and np.isfinite(score) and score > threshold:
        reasons.append(f"feature distance {score:.1f} > threshold {threshold:.1f}: the image "
                       "is unlike the training images")
    if why := tag_mismatch(kind, record.get("modalities") or [], record.get("body_parts") or []):
        reasons.append(why)
    return {"score": None if score is None or not np.isfinite(score) else float(score),
            "threshold": threshold, "flag": bool(reasons), "reasons": reasons}


def _explain(state: _State, served: Served, data: bytes, filename: str | None,
             folder: RequestFiles, target: int | None) -> tuple[bytes, str, int, float]:
    upload, image = _read(state, served, data, filename, 0, folder)
    if served.explain_method == "gradcam":
        heat, t, p = heatmap.gradcam_map(served, image, target)
    else:
        heat, t, p = heatmap.occlusion_map(served.model, image, target)
    shown = image if served.model.view.get("mode") != "2.5d" else np.repeat(image[..., 1:2], 3, 2)
    return heatmap.overlay_png(shown, heat, strength=p), served.explain_method, t, p


def _preview(state: _State, served: Served, data: bytes, filename: str | None,
             folder: RequestFiles) -> bytes:
    _, image = _read(state, served, data, filename, 0, folder)
    return heatmap.preview_png(image, served.model.view.get("mode", "2d"))


def _docs_page(spec: dict[str, Any]) -> str:
    """The API described as plain HTML from the OpenAPI document (no script, nothing fetched
    from elsewhere: Swagger UI would load its JavaScript from a CDN)."""
    rows = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {})
            fields = []
            for media in body.values():
                ref = media.get("schema", {}).get("$ref", "")
                schema = spec.get("components", {}).get("schemas", {}).get(ref.split("/")[-1], {})
                fields += list(schema.get("properties", {}))
            rows.append(f"<tr><td><code>{html.escape(method.upper())} {html.escape(path)}"
                        f"</code></td><td>{html.escape(op.get('summary', ''))}</td>"
                        f"<td>{html.escape(', '.join(fields))}</td></tr>")
    return ("<!doctype html><html lang=en><meta charset=utf-8><title>medtl API</title>"
            f"<h1>{html.escape(spec['info']['title'])} API {html.escape(spec['info']['version'])}"
            "</h1><p>Research use, not for clinical diagnosis. Routes under /v1/ need "
            "<code>Authorization: Bearer TOKEN</code> when the server has a token. The full "
            "description: <a href=openapi.json>openapi.json</a>.</p><table border=1>"
            "<tr><th>route</th><th>what</th><th>multipart fields</th></tr>"
            + "".join(rows) + "</table></html>")
