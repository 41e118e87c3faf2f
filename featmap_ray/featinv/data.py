"""What FeatInv reads from the store, for the reconstruct and training jobs.

Whose feature maps it inverts (`featinv_backbone`), which rows (`selection`), and stored images as
the backbone saw them (`backbone_view`, `stored_views`). No diffusers here: Ray Data tasks that run
the jobs' light UDFs start without it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from featmap_ray import backbones
from featmap_ray.config import BackboneRequest, Config
from featmap_ray.io import imageio, tables


def featinv_backbone(cfg: Config) -> tuple[BackboneRequest, str]:
    """The extract.backbones entry FeatInv inverts (featinv.backbone, else the first) and its layer
    (featinv.layer, else the entry's last layer)."""
    fi = cfg.featinv
    if not cfg.extract.backbones:
        raise ValueError("featinv needs a backbone: extract.backbones is empty")
    requests = cfg.extract.backbones
    request = next(r for r in requests if r.name == fi.backbone) if fi.backbone else requests[0]
    spec = backbones.get_spec(request.name)
    layer = fi.layer or backbones.resolve_layers(spec, request.layers)[-1]
    return request, backbones.resolve_layers(spec, [layer])[0]


def selection(split: str | None, variants: list[str] | None) -> str | None:
    """Lance filter for rows of `split` (None: all) and `variants` (None: all)."""
    conditions = [f"split = {tables.sql_list([split])}"] if split else []
    if variants:
        conditions.append(f"variant IN ({tables.sql_list(variants)})")
    return " AND ".join(conditions) or None


def backbone_view(png: bytes, size: int) -> np.ndarray:
    """A stored image as the backbone sees it: uint8 (size, size, 3), resized and centre-cropped."""
    return np.asarray(imageio.resize_center_crop(Image.fromarray(imageio.decode_png_rgb(png)), size))


def stored_views(st: tables.Store, keys: Iterable[tuple[str, str]], size: int) -> dict[tuple[str, str], np.ndarray]:
    """The backbone views of the stored images of (source_id, variant) `keys`; keys without an image are absent."""
    table = st.rows(st.layout.images, keys, ["image"])
    return {(r["source_id"], r["variant"]): backbone_view(r["image"], size) for r in table.to_pylist()}


def check_featinv(cfg: Config) -> None:
    """Before any FeatInv command starts Ray: the backbone and layer FeatInv inverts and their weights, the
    ControlNet's source (featinv.controlnet as a folder, runs:/ or models:/) and the Stable Diffusion base model."""
    check_sources(cfg, cfg.featinv.controlnet, base_must_exist=True)


def check_sources(cfg: Config, controlnet: str | None, base_must_exist: bool) -> None:
    """The backbone FeatInv inverts and its weights, the ControlNet at `controlnet` (None: a fresh one) and the
    base model (`trained`: its folder, unless `base_must_exist` is False: featinv-train makes it)."""
    from featmap_ray.io import tracking

    request, _ = featinv_backbone(cfg)
    backbones.check_weights(backbones.get_spec(request.name), request)
    if controlnet:
        tracking.model_source(cfg, controlnet)  # ModelNotFound (a FileNotFoundError) names what is missing
    if cfg.featinv.base_model == "tiny" or (cfg.featinv.base_model == "trained" and not base_must_exist):
        return
    from featmap_ray.featinv import loading  # imports diffusers: after the cheap checks

    if cfg.featinv.base_model == "trained":
        if loading.trained_base(cfg).current() is None:
            raise FileNotFoundError(f"featinv.base_model is 'trained', but no base model was trained at "
                                    f"{loading.trained_base(cfg)}: run `featmap featinv-train` first")
    else:
        loading.resolve_base_dir(cfg.featinv.base_model, local_files_only=True)
