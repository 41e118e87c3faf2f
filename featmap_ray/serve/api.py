"""The service's ingress: a FastAPI app inside a Ray Serve deployment (validation, routing, the page).

Routes (docs/concepts/service.md; the OpenAPI schema is at /docs and /openapi.json):

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

# No `from __future__ import annotations`: the routes' parameter types are built from the config inside
# create_api, and FastAPI must see them as objects, not as names to look up in this module.
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from featmap_ray import backbones
from featmap_ray.config import Config
from featmap_ray.cosine import median_cosine
from featmap_ray.featinv.data import backbone_view, featinv_backbone
from featmap_ray.featinv.metrics import classifier_agreement
from featmap_ray.io import imageio, tables
from featmap_ray.serve import catalogue, guard, inputs, page
from featmap_ray.serve.inputs import RequestError
from featmap_ray.serve.params import Params, sampling_dependency

KEY_PATTERN = r"^[A-Za-z0-9_.:=+-]{1,128}$"  # source ids, variants, run keys: never a path
# Replica deaths seen by the caller: Serve starts a new replica, so the same request succeeds later.
RETRYABLE = (RayActorError, ActorUnavailableError)
# Decoding, resizing and parsing uploads happen here, off the event loop; at most this many at once, which
# also bounds their memory (each is within serve.limits.max_pixels).
DECODE_THREADS = 4
BINARY = {"type": "string", "format": "binary"}


class ErrorBody(BaseModel):
    """Every error answer: what is wrong, and for invalid parameters which ones."""

    error: str
    fields: list[dict[str, Any]] | None = None


ERRORS = {
    400: "a malformed request: the Host header is not this service's, or the body is not what the route reads "
         "(not an image, a truncated or too small or too elongated image, bad base64 or JSON, a bad .npy header)",
    403: "a browser's cross-origin request (its Origin is not this service)",
    404: "no such stored sample or mapping run",
    408: "the body arrived slower than serve.limits.min_upload_kb_s",
    413: "a body larger than serve.limits.max_body_mb, an image over serve.limits.max_pixels, or a body sent to a "
         "route that takes none",
    415: "a Content-Type this route does not take, or an image format outside serve.limits.formats",
    422: "invalid parameters, or a feature map that does not fit the model (its shape, NaN or Inf)",
    503: "a model replica became unavailable; retry (Retry-After)",
    504: "the request took longer than serve.limits.request_timeout_s",
}
GUARD_STATUSES = (400, 403, 413, 504)  # any route: the RequestGuard's refusals


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route: its error statuses with their meaning and body schema."""
    return {status: {"model": ErrorBody, "description": ERRORS[status]} for status in sorted({*GUARD_STATUSES,
                                                                                               *statuses})}


RECONSTRUCTED = {200: {"description": "JSON with base64 PNGs, or with format=png (or Accept: image/png) the first "
                                      "reconstruction as image/png, its metrics in X-Featmap-* headers",
                       "content": {"image/png": {"schema": BINARY}}}}


def image_body(formats: list[str]) -> dict[str, Any]:
    """The request body of the image routes, one entry per content type the route takes."""
    content = {"multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                  "properties": {"file": BINARY}}}}
    content.update({imageio.media_type(f): {"schema": BINARY} for f in formats})
    content["application/octet-stream"] = {"schema": BINARY}
    content["application/json"] = {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "description": "base64 of the image file (or a data URL)"}}}}
    return {"requestBody": {"required": True, "description": f"an image file: {', '.join(formats)}", "content": content}}


FEATURES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {**BINARY, "description": ".npy or .safetensors"}}}},
    "application/octet-stream": {"schema": BINARY},
    "application/json": {"schema": {"type": "object", "required": ["features"],
                                    "properties": {"features": {"type": "string",
                                                                "description": "base64 of .npy or .safetensors"}}}},
}}}


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
                 mapping: DeploymentHandle | None, requested: dict[str, str | None] | None = None):
        self.cfg = cfg
        self.backbone = backbone
        self.featinv = {name: handle.options(method_name="reconstruct") for name, handle in featinv.items()}
        self.mapping = mapping
        self.request, self.layer = featinv_backbone(cfg)
        self.input_size = backbones.get_spec(self.request.name).input_size
        self.mapping_keys = catalogue.mapping_run_keys(cfg)
        self.catalogue = catalogue.describe(cfg, self.mapping_keys, requested or {})
        store = tables.Store(cfg.storage)
        # The stored samples as they are now, indexed once: a lookup per request, not a scan.
        self.samples = {"features": tables.KeyIndex(store.open(store.layout.features(self.request.name, self.layer))),
                        "images": tables.KeyIndex(store.open(store.layout.images))}
        self.decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    async def off_loop(self, fn, *args):
        """`fn(*args)` in the decoding threads: the event loop keeps serving other requests meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)

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
            return Response(await self.off_loop(inputs.png, images[0]), media_type="image/png", headers=headers)
        pngs = await self.off_loop(lambda: [inputs.png(image) for image in images])
        return JSONResponse({
            "input": kind,
            "model": model,
            **extra,
            "parameters": params.as_dict(),
            "original": None if original is None else inputs.to_base64(original),
            "backbone_view": None if view is None else inputs.to_base64(await self.off_loop(inputs.png, view)),
            "reconstructions": [{"seed": seed, "image": inputs.to_base64(png), "metrics": row}
                                for seed, png, row in zip(params.seeds, pngs, rows, strict=True)],
            "metrics": _aggregate(rows),
            "seconds": round(time.perf_counter() - started, 4),
        })

    # -- request bodies ---------------------------------------------------------------------------

    async def body_bytes(self, request: Request, json_key: str) -> bytes:
        """The upload: multipart field `file`, JSON {json_key: base64}, or the raw body (the RequestGuard has
        checked its content type and size)."""
        kind = guard.media_type(request.headers)
        if kind == "multipart/form-data":
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError(400, f"multipart body: expected a file field named 'file', got {sorted(form)}")
            data = await upload.read()
        elif kind == "application/json":
            data = await self.off_loop(inputs.from_json, await request.body(), json_key)
        else:
            data = await request.body()
        if not data:
            raise RequestError(400, "empty body: send the file (multipart field 'file', raw bytes, or base64 JSON)")
        return data

    async def image(self, request: Request) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray | None]:
        """(uploaded bytes, the backbone's view, its feature map, its logits)."""
        data = await self.body_bytes(request, "image")
        view = await self.off_loop(inputs.image_view, data, self.cfg.serve.limits, self.input_size)
        features, logits = await self.probe(view)
        return data, view, features, logits

    def stored(self, table: str, key: tuple[str, str], column: str):
        """One stored value of a sample (None when the table has no such row)."""
        row = self.samples[table].row(key, [column])
        return None if row is None else row[column]


def create_api(ingress: Ingress) -> FastAPI:
    cfg = ingress.cfg
    s, limits = cfg.serve, cfg.serve.limits
    api = FastAPI(title="featmap: FeatInv as a service", version="1",
                  description="Feature maps of a vision backbone turned back into images (featmap-ray: docs/concepts/service.md).",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json" if s.docs else None)
    image_route = image_body(limits.formats)
    body_types = {"/reconstruct": tuple(image_route["requestBody"]["content"]),
                  "/reconstruct/mapped": tuple(image_route["requestBody"]["content"]),
                  "/reconstruct/features": tuple(FEATURES_BODY["requestBody"]["content"])}
    api.add_middleware(
        guard.RequestGuard, hosts=guard.allowed_hosts(s.host, s.allowed_hosts),
        body_types=lambda method, path: body_types.get(path) if method == "POST" else None,
        routes=guard.matches_a_route(api.router), max_bytes=limits.max_body_bytes,
        min_rate=limits.min_upload_kb_s * 1024, grace_s=limits.upload_grace_s, deadline_s=limits.request_timeout_s,
        limit_names={"body": "serve.limits.max_body_mb", "rate": "serve.limits.min_upload_kb_s",
                     "deadline": "serve.limits.request_timeout_s", "hosts": "serve.allowed_hosts"})
    Sampled = Annotated[Params, Depends(sampling_dependency(cfg))]

    def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
        headers = {**(headers or {}), **({"Retry-After": "1"} if status == 503 else {})}
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers or None)

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return error(e.status, e.message)

    @api.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail), headers=e.headers)  # e.g. 405 with Allow

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return error(422, "; ".join(problems), fields=[{"loc": list(err["loc"]), "msg": err["msg"]}
                                                       for err in e.errors()])

    page.add_page(api, s.docs)

    @api.get("/health", responses=documented())
    async def health() -> dict[str, Any]:
        """The ingress answers; the FeatInv models it routes to (their sources, MLflow aliases resolved to the
        versions every replica loaded) and how many mapping runs."""
        return {"status": "ok", "featinv": {m["name"]: m["source"] for m in ingress.catalogue["featinv"]},
                "mapping_runs": len(ingress.mapping_keys)}

    @api.get("/models", responses=documented())
    async def list_models() -> dict[str, Any]:
        """Backbone and layer, FeatInv models and mapping runs, with MLflow run ids and metrics; defaults and limits."""
        return ingress.catalogue

    reconstructing = documented(408, 415, 422, 503) | RECONSTRUCTED

    @api.post("/reconstruct", openapi_extra=image_route, responses=reconstructing)
    async def reconstruct_image(request: Request, p: Sampled) -> Response:
        """An uploaded image -> the backbone's view -> its feature map -> FeatInv reconstructions."""
        data, view, features, logits = await ingress.image(request)
        return await ingress.answer("image", p, features, logits, view=view, original=data)

    run_key = (Literal[tuple(ingress.mapping_keys)] if ingress.mapping_keys
               else Annotated[str, Query(pattern=KEY_PATTERN)])

    @api.post("/reconstruct/mapped", openapi_extra=image_route, responses=documented(404) | reconstructing)
    async def reconstruct_mapped(request: Request, p: Sampled,
                                 run: Annotated[run_key, Query(description="a mapping run (GET /models)")]) -> Response:
        """An uploaded image's feature map after mapping run `run`, turned back into images (metrics: the
        mapped map vs each reconstruction's map; classes vs the uploaded image)."""
        if ingress.mapping is None or run not in ingress.mapping_keys:
            raise RequestError(404, f"unknown mapping run {run!r}; served: {ingress.mapping_keys}")
        data, view, features, logits = await ingress.image(request)
        mapped = await ingress.call(ingress.mapping.remote(run, features))
        return await ingress.answer("mapped", p, mapped, logits, view=view, original=data, mapping_run=run,
                                    mapped_vs_input_cos_median_lower=float(median_cosine(
                                        torch.tensor(mapped)[None], torch.tensor(features)[None], "lower")))

    @api.post("/reconstruct/features", openapi_extra=FEATURES_BODY, responses=reconstructing)
    async def reconstruct_features(request: Request, p: Sampled) -> Response:
        """An uploaded feature map (C, H, W) of the served backbone/layer -> reconstructions (no source image:
        top-1/top-5 are null)."""
        features = await ingress.off_loop(inputs.read_feature_map, await ingress.body_bytes(request, "features"))
        return await ingress.answer("features", p, features, None)

    sample_key = Annotated[str, Query(pattern=KEY_PATTERN)]

    @api.post("/reconstruct/sample", responses=documented(404, 422, 503) | RECONSTRUCTED)
    async def reconstruct_sample(p: Sampled, source_id: sample_key, variant: sample_key = "original") -> Response:
        """A stored image (images table) and its stored feature map (features table) -> reconstructions."""
        key = (source_id, variant)
        found, stored = ingress.stored("features", key, "feature"), ingress.stored("images", key, "image")
        if found is None or stored is None:
            where = "features" if stored is not None else "images"
            raise RequestError(404, f"no stored sample {source_id}/{variant} in the {where} table")
        features = tables.tensor_numpy(found)[0].astype(np.float32)
        png = stored[0].as_py()
        view = await ingress.off_loop(backbone_view, png, ingress.input_size)
        _, logits = await ingress.probe(view)
        return await ingress.answer("sample", p, features, logits, view=view, original=png,
                                    source_id=source_id, variant=variant)

    return api
