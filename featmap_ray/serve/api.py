"""The service's ingress: a FastAPI app inside a Ray Serve deployment (validation, routing, the page).

Routes (README: Serving; the OpenAPI schema is at /docs and /openapi.json):

    GET  /                        the page (static/index.html; static/ is mounted at /static)
    GET  /health                  {"status": "ok", ...}
    GET  /models                  backbone/layer, FeatInv models, mapping runs, MLflow run ids and metrics
    POST /reconstruct             an image (multipart `file`, raw image bytes, or JSON {"image": base64})
    POST /reconstruct/mapped      the same image's map after mapping run `run`, turned back into an image
    POST /reconstruct/features    a feature map (.npy without pickle, or .safetensors)
    POST /reconstruct/sample      a stored image by `source_id` and `variant` (its stored feature map)

Sampling parameters are query parameters of every POST: model, seeds (repeated: seeds=1&seeds=2),
steps, guidance, control_scale, format (json | png; `Accept: image/png` also asks for PNG). Answers are
JSON with base64 PNGs, or the first reconstruction as image/png with its metrics in X-Featmap-* headers.
Bad requests get a 4xx JSON body {"error": "..."} naming what is wrong; a replica that died under a
request gives 503 with Retry-After (retrying succeeds once Serve has replaced it).
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from featmap_ray import backbones
from featmap_ray.config import Config
from featmap_ray.cosine import median_cosine
from featmap_ray.featinv.data import backbone_view, featinv_backbone
from featmap_ray.featinv.metrics import classifier_agreement
from featmap_ray.io import tables
from featmap_ray.serve import catalogue, inputs, models
from featmap_ray.serve.inputs import RequestError

STATIC = resources.files("featmap_ray.serve") / "static"
KEY_PATTERN = r"^[A-Za-z0-9_.:=+-]{1,128}$"  # source ids, variants, run keys: never a path
# Replica deaths seen by the caller: Serve starts a new replica, so the same request succeeds later.
RETRYABLE = (RayActorError, ActorUnavailableError)

IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "required": ["image"],
                                    "properties": {"image": {"type": "string", "description": "base64 (or a data URL)"}}}},
}}}
FEATURES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary",
                                                               "description": ".npy or .safetensors"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "required": ["features"],
                                    "properties": {"features": {"type": "string",
                                                                "description": "base64 of .npy or .safetensors"}}}},
}}}


class Params:
    """The sampling parameters of a request, checked against `serve.limits` (422 naming the limit)."""

    def __init__(self, cfg: Config, model: str, seeds: list[int] | None, steps: int | None, guidance: float | None,
                 control_scale: float | None, fmt: str, accept: str):
        s, limits, sampling = cfg.serve, cfg.serve.limits, cfg.featinv.sampling
        self.model = model
        self.seeds = list(seeds or s.seeds)
        self.sampling = models.Sampling(steps=s.steps if steps is None else steps,
                                        guidance=sampling.guidance if guidance is None else guidance,
                                        control_scale=sampling.control_scale if control_scale is None else control_scale)
        self.png = fmt == "png" or (fmt is None and "image/png" in accept)
        problems = []
        if not 1 <= len(self.seeds) <= limits.max_seeds:
            problems.append(f"seeds: give 1 to {limits.max_seeds} seeds, got {len(self.seeds)}")
        if not all(0 <= seed < 2**63 for seed in self.seeds):
            problems.append(f"seeds: each must be within [0, 2**63), got {self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds: repeated values in {self.seeds}")
        for name, value, high in (("steps", self.sampling.steps, limits.max_steps),
                                  ("guidance", self.sampling.guidance, limits.max_guidance),
                                  ("control_scale", self.sampling.control_scale, limits.max_control_scale)):
            if not (value >= (1 if name == "steps" else 0) and value <= high and np.isfinite(value)):
                problems.append(f"{name}: must be within [{1 if name == 'steps' else 0}, {high}], got {value}")
        if problems:
            raise RequestError(422, "; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "steps": self.sampling.steps, "guidance": self.sampling.guidance,
                "control_scale": self.sampling.control_scale}


def _metrics(source_features: np.ndarray, source_logits: np.ndarray | None,
             probed: list[tuple[np.ndarray, np.ndarray | None]]) -> list[dict[str, Any]]:
    """Per reconstruction, the reconstruct job's metrics: median per-position cosine (rule lower)
    between the map it was sampled from and its own map, and whether the backbone's top-1 class of
    the source image is the reconstruction's top-1 / among its top-5 (None without a source image)."""
    recon = torch.from_numpy(np.stack([f for f, _ in probed]))
    source = torch.tensor(source_features)[None].expand_as(recon)  # a copy: arrays from Ray are read-only
    cosine = median_cosine(source, recon, "lower").tolist()
    out = [{"cos_median_lower": c, "source_top1": None, "top1_match": None, "top5_match": None} for c in cosine]
    if source_logits is not None:
        logits = torch.from_numpy(np.stack([lg for _, lg in probed]))
        top1, match1, match5 = classifier_agreement(torch.tensor(source_logits)[None].expand_as(logits), logits)
        for row, t, m1, m5 in zip(out, top1.tolist(), match1.tolist(), match5.tolist(), strict=True):
            row.update(source_top1=t, top1_match=m1, top5_match=m5)
    return out


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the reconstructions (fractions for the matches)."""
    def mean(name: str) -> float | None:
        values = [float(r[name]) for r in rows if r[name] is not None]
        return sum(values) / len(values) if values else None

    return {"cos_median_lower": mean("cos_median_lower"), "top1_match": mean("top1_match"),
            "top5_match": mean("top5_match"), "count": len(rows)}


@serve.deployment
@serve.ingress()
class Ingress:
    """Validation and routing; the models live in the composed deployments."""

    def __init__(self, cfg: Config, backbone: DeploymentHandle, featinv: dict[str, DeploymentHandle],
                 mapping: DeploymentHandle | None):
        self.cfg = cfg
        self.backbone = backbone
        self.featinv = {name: handle.options(method_name="reconstruct") for name, handle in featinv.items()}
        self.mapping = mapping
        self.request, self.layer = featinv_backbone(cfg)
        self.input_size = backbones.get_spec(self.request.name).input_size
        self.mapping_keys = catalogue.mapping_run_keys(cfg)
        self.catalogue = catalogue.describe(cfg, self.mapping_keys)
        self.store = tables.Store(cfg.storage)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    # -- calls into the other deployments -----------------------------------------------------------

    async def call(self, response) -> Any:
        from featmap_ray.featinv.model import FeatureMismatch

        try:
            return await response
        except FeatureMismatch as e:  # raised by the FeatInv replica's check, before any sampling
            raise RequestError(422, str(getattr(e, "cause", e))) from None  # the message, not the remote traceback
        except RETRYABLE as e:
            raise RequestError(503, f"a model replica became unavailable ({type(e).__name__}); Serve is "
                                    "replacing it: retry the request") from None

    async def probe(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return await self.call(self.backbone.remote(pixels))

    async def reconstruct(self, features: np.ndarray, params: Params) -> tuple[np.ndarray, list]:
        """Images of one map for every seed, and each image as the backbone sees it (map, logits)."""
        if params.model not in self.featinv:
            raise RequestError(404, f"unknown model {params.model!r}; served: {sorted(self.featinv)}")
        images = await self.call(self.featinv[params.model].remote(features, params.seeds, params.sampling))
        probed = [await self.call(r) for r in [self.backbone.remote(image) for image in images]]
        return images, probed

    async def answer(self, kind: str, params: Params, features: np.ndarray, source_logits: np.ndarray | None,
                     view: np.ndarray | None = None, original: bytes | None = None, **extra: Any) -> Response:
        started = time.perf_counter()
        images, probed = await self.reconstruct(features, params)
        rows = _metrics(features, source_logits, probed)
        served = next(m for m in self.catalogue["featinv"] if m["name"] == params.model)
        model = {"featinv": params.model, "source": served["source"], "mlflow_run_id": served["mlflow_run_id"],
                 "backbone": self.request.name, "layer": self.layer}
        if params.png:
            headers = {"X-Featmap-Model": params.model, "X-Featmap-Seed": str(params.seeds[0])}
            headers.update({f"X-Featmap-{k.replace('_', '-')}": str(v) for k, v in rows[0].items()})
            return Response(inputs.png(images[0]), media_type="image/png", headers=headers)
        return JSONResponse({
            "input": kind,
            "model": model,
            **extra,
            "parameters": params.as_dict(),
            "original": None if original is None else inputs.to_base64(original),
            "backbone_view": None if view is None else inputs.to_base64(inputs.png(view)),
            "reconstructions": [{"seed": seed, "image": inputs.to_base64(inputs.png(image)), "metrics": row}
                                for seed, image, row in zip(params.seeds, images, rows, strict=True)],
            "metrics": _aggregate(rows),
            "seconds": round(time.perf_counter() - started, 4),
        })

    # -- request bodies ---------------------------------------------------------------------------

    async def body_bytes(self, request: Request, json_key: str) -> bytes:
        """The upload: multipart field `file`, JSON {json_key: base64}, or the raw body."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError(400, f"multipart body: expected a file field named 'file', got {sorted(form)}")
            data = await upload.read()
        elif kind == "application/json":
            try:
                payload = await request.json()
            except ValueError:
                raise RequestError(400, "JSON body: not valid JSON") from None
            if not isinstance(payload, dict) or not isinstance(payload.get(json_key), str):
                raise RequestError(400, f"JSON body: expected {{\"{json_key}\": \"<base64>\"}}")
            data = inputs.from_base64(payload[json_key], json_key)
        else:
            data = await request.body()
        if not data:
            raise RequestError(400, "empty body: send the file (multipart field 'file', raw bytes, or base64 JSON)")
        return data

    async def image(self, request: Request) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray | None]:
        """(uploaded bytes, the backbone's view, its feature map, its logits)."""
        data = await self.body_bytes(request, "image")
        limits = self.cfg.serve.limits
        view = inputs.backbone_view(inputs.decode_image(data, max_pixels=limits.max_pixels, min_side=limits.min_side),
                                    self.input_size)
        features, logits = await self.probe(view)
        return data, view, features, logits


def sampling_params(
        request: Request,
        model: Annotated[str, Query(pattern=KEY_PATTERN, description="a served FeatInv model (GET /models)")]
        = models.DEFAULT,
        seeds: Annotated[list[int] | None, Query(description="one image per seed (repeat: seeds=1&seeds=2)")] = None,
        steps: Annotated[int | None, Query(description="DDIM steps")] = None,
        guidance: Annotated[float | None, Query(description="text classifier-free guidance")] = None,
        control_scale: Annotated[float | None, Query(description="multiplies the ControlNet residuals")] = None,
        format: Annotated[Literal["json", "png"] | None, Query(description="png: the first image as image/png")]
        = None) -> Params:
    """The query parameters every POST shares (a FastAPI dependency)."""
    return Params(request.app.state.cfg, model, seeds, steps, guidance, control_scale, format,
                  request.headers.get("accept", ""))


# Module level: FastAPI resolves the (string) annotations of routes in this module's namespace.
Sampled = Annotated[Params, Depends(sampling_params)]
RunKey = Annotated[str, Query(pattern=KEY_PATTERN, description="a mapping run (GET /models)")]
SampleKey = Annotated[str, Query(pattern=KEY_PATTERN)]


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, from Content-Length before anything is read, or
    while a chunked body streams in. (FastAPI's own max_body_size answers in plain text.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.app(scope, _refuse, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413)  # answered by the app's handler, as JSON
            return message

        await self.app(scope, counted, send)


async def _refuse():
    raise HTTPException(413)


def create_api(ingress: Ingress) -> FastAPI:
    cfg = ingress.cfg
    api = FastAPI(title="featmap: FeatInv as a service", version="1",
                  description="Feature maps of a vision backbone turned back into images (README: Serving).")
    api.add_middleware(BodyLimit, max_bytes=cfg.serve.limits.max_body_bytes)
    api.state.cfg = cfg  # read by `sampling_params`

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return error(e.status, e.message)

    @api.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        message = e.detail
        if e.status_code == 413:
            message = f"request body larger than serve.limits.max_body_mb ({cfg.serve.limits.max_body_mb} MiB)"
        return error(e.status_code, str(message))

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return error(422, "; ".join(problems), fields=[{"loc": list(err["loc"]), "msg": err["msg"]}
                                                       for err in e.errors()])


    @api.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            return error(404, "the page is not installed (featmap_ray/serve/static/index.html)")
        return FileResponse(str(index))

    api.mount("/static", StaticFiles(directory=str(STATIC), check_dir=False), name="static")

    @api.get("/health")
    async def health() -> dict[str, Any]:
        """The ingress answers; which models it routes to."""
        return {"status": "ok", "featinv": sorted(ingress.featinv), "mapping_runs": len(ingress.mapping_keys)}

    @api.get("/models")
    async def list_models() -> dict[str, Any]:
        """Backbone and layer, FeatInv models and mapping runs, with MLflow run ids and metrics; defaults and limits."""
        return ingress.catalogue

    @api.post("/reconstruct", openapi_extra=IMAGE_BODY)
    async def reconstruct_image(request: Request, p: Sampled) -> Response:
        """An uploaded image -> the backbone's view -> its feature map -> FeatInv reconstructions."""
        data, view, features, logits = await ingress.image(request)
        return await ingress.answer("image", p, features, logits, view=view, original=data)

    @api.post("/reconstruct/mapped", openapi_extra=IMAGE_BODY)
    async def reconstruct_mapped(request: Request, p: Sampled, run: RunKey) -> Response:
        """An uploaded image's feature map after mapping run `run`, turned back into images (metrics: the
        mapped map vs each reconstruction's map; classes vs the uploaded image)."""
        if ingress.mapping is None or run not in ingress.mapping_keys:
            raise RequestError(404, f"unknown mapping run {run!r}; served: {ingress.mapping_keys}")
        data, view, features, logits = await ingress.image(request)
        mapped = await ingress.call(ingress.mapping.remote(run, features))
        return await ingress.answer("mapped", p, mapped, logits, view=view, original=data, mapping_run=run,
                                    mapped_vs_input_cos_median_lower=float(median_cosine(
                                        torch.tensor(mapped)[None], torch.tensor(features)[None], "lower")))

    @api.post("/reconstruct/features", openapi_extra=FEATURES_BODY)
    async def reconstruct_features(request: Request, p: Sampled) -> Response:
        """An uploaded feature map (C, H, W) of the served backbone/layer -> reconstructions (no source image:
        top-1/top-5 are null)."""
        features = inputs.read_feature_map(await ingress.body_bytes(request, "features"))
        return await ingress.answer("features", p, features, None)

    @api.post("/reconstruct/sample")
    async def reconstruct_sample(p: Sampled, source_id: SampleKey, variant: SampleKey = "original") -> Response:
        """A stored image (images table) and its stored feature map (features table) -> reconstructions."""
        key = (source_id, variant)
        st = ingress.store
        found = st.rows(st.layout.features(ingress.request.name, ingress.layer), [key], ["feature"])
        images = st.rows(st.layout.images, [key], ["image"])
        if found.num_rows == 0 or images.num_rows == 0:
            where = "features" if images.num_rows else "images"
            raise RequestError(404, f"no stored sample {source_id}/{variant} in the {where} table")
        features = tables.tensor_numpy(found["feature"])[0].astype(np.float32)
        stored = images["image"][0].as_py()
        view = backbone_view(stored, ingress.input_size)
        _, logits = await ingress.probe(view)
        return await ingress.answer("sample", p, features, logits, view=view, original=stored,
                                    source_id=source_id, variant=variant)

    return api
