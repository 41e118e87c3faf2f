"""Backbone registry: name -> timm model, input size and the feature maps ("layers") we tap.

Every tap is returned as an NCHW tensor (C, H, W per image); models whose blocks are NHWC
(SwinV2) or token sequences (ViTs) are converted here, once, by timm's `forward_intermediates`.
Any timm model not in the registry can be used by name; its layers are then the `features_only`
stages `stage0..stageN`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featmap_ray import seeding
from featmap_ray.config import BackboneRequest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFound(FileNotFoundError):
    """Pretrained weights were requested but are not available locally."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str  # timm model id including the pretrained tag
    input_size: int  # images are resized (shorter side) and centre-cropped to this
    taps: dict[str, int]  # layer name -> index for timm's forward_intermediates
    default_layers: tuple[str, ...]
    # forward_intermediates(norm=...): SwinV2 applies its final norm to the last stage only,
    # EVA/DINOv3 to every tapped block (timm semantics).
    norm: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    features_only: bool = False  # generic timm model tapped through features_only


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    REGISTRY[spec.name] = spec
    return spec


# ConvNeXt-B at its native 288 evaluation size: stages 0-3 = 128x72x72 ... 1024x9x9.
# stage3 is the stage output before the head's norm (= forward_features, what FeatInv inverts).
register(BackboneSpec("convnext_base", "convnext_base.fb_in22k_ft_in1k", 288,
                      {f"stage{i}": i for i in range(4)}, ("stage0", "stage1", "stage2", "stage3")))
# ConvNeXt-atto, the family's smallest member (3.7 M parameters; the demo's backbone), at 224: 40x56x56 ... 320x7x7.
register(BackboneSpec("convnext_atto", "convnext_atto.d2_in1k", 224,
                      {f"stage{i}": i for i in range(4)}, ("stage0", "stage1", "stage2", "stage3")))
# SwinV2-B at 384: 256x48x48, 512x24x24 and the final map after the final LayerNorm, 1024x12x12.
register(BackboneSpec("swinv2_base", "swinv2_base_window12to24_192to384.ms_in22k_ft_in1k", 384,
                      {"stage1": 1, "stage2": 2, "stage3": 3}, ("stage1", "stage2", "stage3"), norm=True))
# DINOv3 ViT-B/16 at 224: 768x14x14 patch-token grids (CLS and register tokens dropped) after
# zero-based blocks 6 and 9 and the final block 11, each through the final LayerNorm.
register(BackboneSpec("dinov3_vitb16", "vit_base_patch16_dinov3.lvd1689m", 224,
                      {"block6": 6, "block9": 9, "final": 11}, ("block6", "block9", "final"),
                      norm=True, model_kwargs={"img_size": 224}))
# ResNet50 (timm a1) final map, 2048x7x7 at 224: index 4 = layer4 (0 is the stem).
register(BackboneSpec("resnet50", "resnet50.a1_in1k", 224, {"final": 4}, ("final",)))


def get_spec(name: str) -> BackboneSpec:
    """A registered backbone, or any timm model by name with its features_only stages as layers."""
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: not in the registry {sorted(REGISTRY)} and not a timm model")
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, features_only=True)
    cfg = timm.models.get_pretrained_cfg(name)
    n = len(model.feature_info)
    layers = tuple(f"stage{i}" for i in range(n))
    return BackboneSpec(name, name, int(cfg.input_size[-1]) if cfg else 224, {layer: i for i, layer in enumerate(layers)},
                        layers, mean=tuple(cfg.mean) if cfg else IMAGENET_MEAN,
                        std=tuple(cfg.std) if cfg else IMAGENET_STD, features_only=True)


def resolve_layers(spec: BackboneSpec, layers: list[str] | None) -> list[str]:
    layers = list(layers or spec.default_layers)
    unknown = [layer for layer in layers if layer not in spec.taps]
    if unknown:
        raise ValueError(f"backbone {spec.name!r} has no layer(s) {unknown}; available: {list(spec.taps)}")
    return layers


def _create(spec: BackboneSpec, req: BackboneRequest, pretrained: bool) -> torch.nn.Module:
    import timm

    kwargs = {**spec.model_kwargs, **req.model_kwargs}
    if spec.features_only:
        kwargs["features_only"] = True
    if pretrained and req.checkpoint:
        overlay = {"file": req.checkpoint}
        if "num_classes" in kwargs:  # else timm drops a fine-tuned head as a 1000-class mismatch
            overlay["num_classes"] = kwargs["num_classes"]
        kwargs["pretrained_cfg_overlay"] = overlay
    return timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)


def check_weights(spec: BackboneSpec, req: BackboneRequest) -> None:
    """Fail before any work if requested pretrained weights cannot be loaded. Never falls back to
    random weights: a real config gets the weights it names or a clear error."""
    if not req.pretrained:
        return
    if req.checkpoint:
        if not Path(req.checkpoint).expanduser().is_file():
            raise WeightsNotFound(
                f"backbone {spec.name!r}: checkpoint file {req.checkpoint} does not exist. Point "
                f"extract.backbones[].checkpoint at a {spec.timm_name} state dict (.safetensors or .pth)."
            )
        return
    import timm
    from huggingface_hub import hf_hub_download

    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not repo:
        raise WeightsNotFound(f"backbone {spec.name!r}: timm has no Hugging Face weights for {spec.timm_name}; "
                              "set extract.backbones[].checkpoint to a local weight file")
    errors = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            hf_hub_download(repo, filename)
            return
        except Exception as e:  # offline, not cached, no such file: report all below
            errors.append(f"{filename}: {type(e).__name__}")
    cache = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"
    raise WeightsNotFound(
        f"pretrained weights for backbone {spec.name!r} (timm model {spec.timm_name}) are not available: "
        f"not in the Hugging Face cache {cache} and not downloadable here ({'; '.join(errors)}). "
        f"On a machine with internet run `huggingface-cli download {repo} model.safetensors` and copy "
        f"{cache}/models--{repo.replace('/', '--')} here, or set extract.backbones[].checkpoint to the "
        "weight file, or set pretrained: false for random weights (tests and demos only)."
    )


def build_model(spec: BackboneSpec, req: BackboneRequest, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The backbone in eval mode; random weights seeded by `init_seed` when not pretrained (the
    caller's random state is left as it was)."""
    with seeding.seeded_torch(req.init_seed):
        model = _create(spec, req, req.pretrained)
    return model.eval().to(device)


def forward_taps(model: torch.nn.Module, spec: BackboneSpec, layers: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Normalised NCHW pixels -> {layer: NCHW feature map}."""
    indices = sorted({spec.taps[layer] for layer in layers})
    if spec.features_only:
        outs = model(x)
        channels = model.feature_info.channels()
        by_index = {}
        for i in indices:
            out = outs[i]
            if out.shape[1] != channels[i] and out.shape[-1] == channels[i]:  # NHWC stage output
                out = out.permute(0, 3, 1, 2)
            by_index[i] = out
    else:
        outs = model.forward_intermediates(x, indices=indices, norm=spec.norm, output_fmt="NCHW",
                                           intermediates_only=True, stop_early=True)
        by_index = dict(zip(indices, outs, strict=True))
    return {layer: by_index[spec.taps[layer]].contiguous() for layer in layers}


def feature_shapes(spec: BackboneSpec, req: BackboneRequest, layers: list[str]) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each layer, computed on the meta device (no weights, no compute)."""
    with torch.device("meta"):
        model = _create(spec, req, pretrained=False).eval()
        x = torch.empty(1, 3, spec.input_size, spec.input_size)
        taps = forward_taps(model, spec, layers, x)
    return {layer: tuple(t.shape[1:]) for layer, t in taps.items()}


def normalise(pixels: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """uint8 NHWC -> float NCHW with the backbone's mean/std (ToTensor + Normalize)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_numpy(features: torch.Tensor, dtype: str) -> np.ndarray:
    return features.to(getattr(torch, dtype)).cpu().numpy()
