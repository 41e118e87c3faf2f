"""The service's Ray Serve deployments, composed: ingress -> backbone, FeatInv (one per allowed model), mapping.

- `Backbone`: images -> the served layer's feature map and the classifier's logits, `@serve.batch`.
- `FeatInv`: feature maps + seeds -> images, one model per replica; each seed is one item of a
  `@serve.batch` queue, so seeds of one request and of concurrent requests share sampler calls.
- `Mapping`: the allowed runs of `mapping.study` applied to feature maps, `@serve.batch`.
- `Ingress` (api.py): FastAPI validation, routing, the page.

Each deployment takes its replicas, `ray_actor_options`, `max_ongoing_requests`, `autoscaling_config`
and batch size from `serve.<name>` in the config (`ServeDeployment`). `build_app(cfg)` composes them;
`app_builder` is the import path of `serve run` / `serve deploy` config files (conf/serve.yaml).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from ray import serve

from featmap_ray.config import Config, ServeDeployment, load_config
from featmap_ray.serve import models


def _device() -> str:
    """cuda when Serve gave this replica a GPU (or a share of one: `ray_actor_options.num_gpus`), else cpu."""
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


def _set_batching(method, options: ServeDeployment) -> None:
    method.set_max_batch_size(options.max_batch_size)
    method.set_batch_wait_timeout_s(options.batch_wait_timeout_s)


async def _grouped(items: Sequence[tuple], key: Callable[[tuple], Hashable],
                   run: Callable[[Hashable, list[tuple]], Sequence[Any]]) -> list[Any]:
    """Results of `run(key, items)` for each group of equal keys, in the items' order; the model
    runs in a thread so the replica's event loop keeps queueing the next batch meanwhile."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[key(item)].append(i)
    out: list[Any] = [None] * len(items)
    for k, indices in groups.items():
        results = await asyncio.to_thread(run, k, [items[i] for i in indices])
        for i, result in zip(indices, results, strict=True):
            out[i] = result
    return out


@serve.deployment
class Backbone:
    """The backbone FeatInv inverts, looked at its layer: uint8 images -> (feature map, logits or None)."""

    def __init__(self, cfg: Config):
        from featmap_ray.featinv.data import featinv_backbone
        from featmap_ray.featinv.metrics import BackboneProbe

        request, layer = featinv_backbone(cfg)
        self.probe = BackboneProbe(request, layer, _device())
        _set_batching(self._batched, cfg.serve.backbone)

    async def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return await self._batched(pixels)

    @serve.batch
    async def _batched(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        return await _grouped([(image,) for image in images], lambda item: item[0].shape, self._forward)

    def _forward(self, _shape, items: list[tuple[np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        # Images of one shape at a time: the probe resizes them to the backbone's input together.
        pixels = torch.from_numpy(np.stack([item[0] for item in items]))
        features = self.probe.features(pixels).cpu().numpy()
        logits = self.probe.logits(pixels).cpu().numpy() if self.probe.has_classifier else [None] * len(items)
        return list(zip(features, logits, strict=True))


@serve.deployment
class FeatInv:
    """One FeatInv model of the allow-list per replica: a feature map + seeds -> uint8 (k, S, S, 3) images."""

    def __init__(self, cfg: Config, name: str):
        self.cfg, self.name = cfg, name
        self.model = models.load(cfg, name, _device())
        _set_batching(self._batched, cfg.serve.featinv)

    async def reconstruct(self, features: np.ndarray, seeds: list[int], sampling: models.Sampling) -> np.ndarray:
        # Checked before queueing: a bad map must fail its own request only, not a whole batch.
        models.check_features(self.model, torch.tensor(features)[None])  # a copy: arrays from Ray are read-only
        images = await asyncio.gather(*(self._batched((features, seed, sampling)) for seed in seeds))
        return np.stack(images)

    @serve.batch
    async def _batched(self, items: list[tuple[np.ndarray, int, models.Sampling]]) -> list[np.ndarray]:
        return await _grouped(items, lambda item: item[2], self._sample)

    def _sample(self, sampling: models.Sampling, items: list[tuple]) -> np.ndarray:
        features = torch.from_numpy(np.stack([item[0] for item in items]))
        return models.sample(self.model, features, [item[1] for item in items], sampling, self.cfg)


@serve.deployment
class Mapping:
    """The allowed mapping runs of `mapping.study` (loaded through the artefacts module): run key +
    feature map -> the run's mapped feature map."""

    def __init__(self, cfg: Config, keys: list[str]):
        from featmap_ray.mapping.artefacts import load_run, runs_root

        self.runs = {key: load_run(runs_root(cfg) / key)[0] for key in keys}
        _set_batching(self._batched, cfg.serve.mapping)

    async def __call__(self, key: str, features: np.ndarray) -> np.ndarray:
        return await self._batched((key, features))

    @serve.batch
    async def _batched(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        return await _grouped(items, lambda item: item[0], self._map)

    def _map(self, key: str, items: list[tuple[str, np.ndarray]]) -> np.ndarray:
        with torch.inference_mode():
            return self.runs[key](torch.from_numpy(np.stack([item[1] for item in items]))).numpy()


def deployment_name(model: str) -> str:
    return f"FeatInv-{model}"


def build_app(cfg: Config) -> serve.Application:
    """The composed application of the config (nothing is loaded until its replicas start; MLflow aliases are
    resolved here, once: `models.pinned`)."""
    from featmap_ray.serve.api import Ingress
    from featmap_ray.serve.catalogue import mapping_run_keys

    requested, cfg = models.allowed_models(cfg), models.pinned(cfg)
    s = cfg.serve
    backbone = Backbone.options(**s.backbone.options()).bind(cfg)
    featinv = {name: FeatInv.options(name=deployment_name(name), **s.featinv.options()).bind(cfg, name)
               for name in models.allowed_models(cfg)}
    keys = mapping_run_keys(cfg)
    mapping = Mapping.options(**s.mapping.options()).bind(cfg, keys) if keys else None
    return Ingress.options(**s.ingress.options()).bind(cfg, backbone, featinv, mapping, requested)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run` / `serve deploy` entry (conf/serve.yaml): args `config` (a featmap YAML file) and
    optional `overrides` (a list of key=value)."""
    unknown = set(args) - {"config", "overrides"}
    if unknown or "config" not in args:
        raise ValueError(f"application args: expected config (and overrides), got {sorted(args)}")
    return build_app(load_config(args["config"], list(args.get("overrides") or [])))



def start(cfg: Config) -> str:
    """Start Serve on `serve.host:serve.port` (loopback by default) in the connected Ray and deploy the
    application without blocking; returns its base URL."""
    s = cfg.serve
    # Serve's own timeout a little later than the ingress's, so that the ingress answers first (504, as JSON).
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.limits.request_timeout_s + 5})
    serve.run(build_app(cfg), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"
