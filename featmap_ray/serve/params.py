"""A request's sampling parameters as a FastAPI dependency whose schema carries every limit of `serve.limits`.

Built per config (`sampling_dependency(cfg)`), so the published OpenAPI says exactly what is accepted:
the served model names as an enum, 1 to `max_seeds` distinct seeds in [0, 2**63), steps in
[1, `max_steps`], guidance and control_scale in [0, their maximum], finite. FastAPI checks them (422
naming the parameter); `Params` checks what JSON Schema states but pydantic does not enforce (distinct
seeds). This module has no `from __future__ import annotations`: the annotations below are built from
the config at run time and FastAPI reads them as objects.
"""

from typing import Annotated, Any, Literal

from fastapi import Query, Request
from pydantic import Field

from featmap_ray.config import Config
from featmap_ray.serve import models
from featmap_ray.serve.inputs import RequestError

MAX_SEED = 2**63 - 1


class Params:
    """The sampling parameters of one request."""

    def __init__(self, model: str, seeds: list[int], sampling: models.Sampling, png: bool):
        if len(set(seeds)) != len(seeds):
            raise RequestError(422, f"seeds: repeated values in {seeds}")
        self.model, self.seeds, self.sampling, self.png = model, list(seeds), sampling, png

    def as_dict(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "steps": self.sampling.steps, "guidance": self.sampling.guidance,
                "control_scale": self.sampling.control_scale}


def sampling_dependency(cfg: Config):
    """The dependency every reconstruction route takes: query parameters -> `Params`."""
    s, limits, sampling = cfg.serve, cfg.serve.limits, cfg.featinv.sampling
    served = Literal[tuple(models.allowed_models(cfg))]
    seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

    def sampling_params(
            request: Request,
            model: Annotated[served, Query(description="a served FeatInv model (GET /models)")] = models.DEFAULT,
            seeds: Annotated[list[seed], Query(min_length=1, max_length=limits.max_seeds,
                                               json_schema_extra={"uniqueItems": True},
                                               description="one image per seed (repeat: seeds=1&seeds=2)")]
            = list(s.seeds),
            steps: Annotated[int, Query(ge=1, le=limits.max_steps, description="DDIM steps")] = s.steps,
            guidance: Annotated[float, Query(ge=0, le=limits.max_guidance, allow_inf_nan=False,
                                             description="text classifier-free guidance")] = sampling.guidance,
            control_scale: Annotated[float, Query(ge=0, le=limits.max_control_scale, allow_inf_nan=False,
                                                  description="multiplies the ControlNet residuals")]
            = sampling.control_scale,
            format: Annotated[Literal["json", "png"] | None,
                              Query(description="png: the first image as image/png (also `Accept: image/png`)")]
            = None) -> Params:
        png = format == "png" or (format is None and "image/png" in request.headers.get("accept", ""))
        return Params(model, seeds, models.Sampling(steps, guidance, control_scale), png)

    return sampling_params
