"""The service's one door to FeatInv models: where an allowed model comes from, how it is loaded, how it samples.

Models come only from the configured allow-list (`serve.featinv_models`: name -> a ControlNet folder,
`runs:/<run id>/<path>`, `models:/<name>/<version>` or `models:/<name>@<alias>` in MLflow; "default" is
`featinv.controlnet` or a fresh model). A request names a model, never a path. Every call into
featmap_ray.featinv is here, so the service follows that package's API in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from featmap_ray.config import Config

DEFAULT = "default"


@dataclass(frozen=True)
class Sampling:
    """What a request may vary; one sampler call serves items with equal settings."""

    steps: int
    guidance: float
    control_scale: float


def allowed_models(cfg: Config) -> dict[str, str | None]:
    """name -> source; "default" is featinv.controlnet (None: a fresh model from the base UNet)."""
    return {DEFAULT: cfg.featinv.controlnet, **cfg.serve.featinv_models}


def pinned(cfg: Config) -> Config:
    """`cfg` with every allowed model's MLflow alias (`models:/<name>@<alias>`, `models:/<name>/latest`) resolved,
    once, to the version it names now (`models:/<name>/<version>`): every replica then loads that version,
    even if the alias moves while the service runs. Other sources are kept as they are."""
    from featmap_ray.io import tracking

    def pin(source: str | None) -> str | None:
        return None if source is None else tracking.model_source(cfg, source).registered or source

    out = cfg.model_copy(deep=True)
    out.featinv.controlnet = pin(cfg.featinv.controlnet)
    out.serve.featinv_models = {name: pin(source) for name, source in cfg.serve.featinv_models.items()}
    return out


def mlflow_run_id(cfg: Config, source: str | None) -> str | None:
    """The MLflow run a model source belongs to (runs:/ and models:/ URIs; None for a folder)."""
    from featmap_ray.io import tracking

    return None if source is None else tracking.model_source(cfg, source).run_id


def load(cfg: Config, name: str, device: str = "cpu"):
    """The FeatInv pipeline `name` of the allow-list on `device`, in eval mode (MLflow URIs are downloaded)."""
    from featmap_ray.featinv import loading

    pipe = loading.featinv_pipeline(cfg, allowed_models(cfg)[name]).to(device)
    pipe.set_progress_bar_config(disable=True)  # one bar per batch would flood the replicas' logs
    return pipe


def check_features(model, features: torch.Tensor) -> None:
    """Raise featinv's FeatureMismatch unless `features` (B, C, H, W) fit the model (layout, shape, finite)."""
    model.controlnet.check_features(features)


def sample(model, features: torch.Tensor, seeds: Sequence[int], sampling: Sampling, cfg: Config) -> np.ndarray:
    """uint8 (B, S, S, 3) images of B maps, one seed each (an image depends on its map and seed only)."""
    from featmap_ray.featinv.pipeline import seeded_generators

    s = cfg.featinv.sampling
    images = model(features, seeded_generators(seeds), num_inference_steps=sampling.steps,
                   guidance_scale=sampling.guidance, controlnet_conditioning_scale=sampling.control_scale,
                   prompt=s.prompt, negative_prompt=s.negative_prompt).images
    return np.stack([np.asarray(image) for image in images])
