"""Import a FeatInv checkpoint of the reference code (ControlNet research code / LDM layout) into diffusers folders.

The reference saves one `ControlLDM` state dict (`tool_add_control_featinv.py` writes it at init,
Lightning's `save_checkpoint` after training, then under "state_dict"). Its prefixes:

    control_model.*           the ControlNet; input_hint_block.block.{1,3,5} = FeatureEncoder convs
    model.diffusion_model.*   the frozen UNet
    first_stage_model.*       the VAE
    cond_stage_model.transformer.*   the CLIP text model
    betas, alphas_cumprod, ...       the training noise schedule (checked against ours, not stored)

The standard parts go through diffusers' own single-file converters; the feature encoder is
mapped by hand. Every source key must land in a model parameter and every parameter must be
filled, otherwise `CheckpointMismatch` lists the offenders.

Sizes come from the weights: model channels, channel multipliers, res blocks per level, attention
levels, transformer depth, context dim and hint channels (UNet/ControlNet); channels and levels
(VAE); width, depth, vocabulary and positions (CLIP). What weights cannot tell is taken from
`base_config` (defaults = MiniSD + FeatInv):

    image_size      256      output resolution (UNet sample_size = image_size / VAE factor)
    num_heads       8        UNet/ControlNet attention heads
    text_num_heads  12       CLIP text attention heads (ViT-L/14)
    scale_factor    0.18215  VAE latent scaling
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from featmap_ray.featinv.model import FeatInvControlNetModel, ddim_scheduler
from featmap_ray.featinv.pipeline import FeatInvPipeline

BASE_CONFIG_DEFAULTS = {"image_size": 256, "num_heads": 8, "text_num_heads": 12, "scale_factor": 0.18215}

UNET, CONTROL, VAE, CLIP = "model.diffusion_model.", "control_model.", "first_stage_model.", "cond_stage_model.transformer."
# Reference hint block (nn.Sequential: Upsample, conv, SiLU, conv, SiLU, zero conv) -> FeatureEncoder.
HINT_CONVS = {f"{CONTROL}input_hint_block.block.{i}.": f"controlnet_cond_embedding.{name}."
              for i, name in ((1, "conv_in"), (3, "conv_mid"), (5, "conv_out"))}
# LatentDiffusion's registered buffers: the schedule and what it derives from the betas.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar")


class CheckpointMismatch(ValueError):
    """A checkpoint's keys do not map one-to-one onto the FeatInv models."""


def load_ldm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a `.ckpt` (under "state_dict" or top-level) or a `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _indices(state: dict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) at the start of the keys."""
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return sorted(found)


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointMismatch(f"checkpoint lacks {key!r}, needed to infer the model sizes")
    return state[key]


def _unet_params(state: dict, prefix: str, num_heads: int) -> dict:
    """LDM UNetModel params (as in the reference yaml) read off the encoder weights under `prefix`."""
    p = re.escape(prefix)
    model_channels, in_channels = _require(state, f"{prefix}input_blocks.0.0.weight").shape[:2]
    downsamples = _indices(state, rf"{p}input_blocks\.(\d+)\.0\.op\.weight")
    num_res_blocks = downsamples[0] - 1 if downsamples else len(_indices(state, rf"{p}input_blocks\.(\d+)\.")) - 1
    first_of_level = [1 + level * (num_res_blocks + 1) for level in range(len(downsamples) + 1)]
    channel_mult = [_require(state, f"{prefix}input_blocks.{i}.0.out_layers.3.weight").shape[0] // model_channels
                    for i in first_of_level]
    attention = [i for i in first_of_level if f"{prefix}input_blocks.{i}.1.proj_in.weight" in state]
    if not attention:
        raise CheckpointMismatch(f"no cross-attention blocks under {prefix!r}: not a Stable Diffusion UNet")
    block = f"{prefix}input_blocks.{attention[0]}.1."
    return {
        "in_channels": in_channels, "out_channels": in_channels, "model_channels": model_channels,
        "channel_mult": channel_mult, "num_res_blocks": num_res_blocks, "num_heads": num_heads,
        "attention_resolutions": [2 ** first_of_level.index(i) for i in attention],
        "transformer_depth": len(_indices(state, rf"{re.escape(block)}transformer_blocks\.(\d+)\.")),
        "context_dim": state[f"{block}transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "use_linear_in_transformer": state[f"{block}proj_in.weight"].ndim == 2,
    }


def _vae_params(state: dict) -> dict:
    """LDM AutoencoderKL ddconfig read off the encoder/decoder weights."""
    ch, in_channels = _require(state, f"{VAE}encoder.conv_in.weight").shape[:2]
    levels = _indices(state, rf"{re.escape(VAE)}encoder\.down\.(\d+)\.")
    return {
        "ch": ch, "in_channels": in_channels, "out_ch": _require(state, f"{VAE}decoder.conv_out.weight").shape[0],
        "ch_mult": [state[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels],
        "num_res_blocks": len(_indices(state, rf"{re.escape(VAE)}encoder\.down\.0\.block\.(\d+)\.")),
        "z_channels": state[f"{VAE}encoder.conv_out.weight"].shape[0] // 2,  # double_z: mean and log-variance
    }


def _text_config(state: dict, num_heads: int) -> CLIPTextConfig:
    """CLIPTextConfig of the (OpenAI, quick_gelu) text model read off its weights."""
    prefix = f"{CLIP}text_model." if f"{CLIP}text_model.embeddings.token_embedding.weight" in state else CLIP
    vocab_size, hidden_size = _require(state, f"{prefix}embeddings.token_embedding.weight").shape
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_heads,
        max_position_embeddings=state[f"{prefix}embeddings.position_embedding.weight"].shape[0],
        num_hidden_layers=len(_indices(state, rf"{re.escape(prefix)}encoder\.layers\.(\d+)\.")),
        intermediate_size=state[f"{prefix}encoder.layers.0.mlp.fc1.weight"].shape[0])


def _check_schedule(state: dict) -> None:
    if "betas" in state:
        ours = ddim_scheduler().betas.double()
        if state["betas"].shape != ours.shape or not torch.allclose(state["betas"].double(), ours, rtol=1e-4):
            raise CheckpointMismatch("checkpoint was trained with a noise schedule other than LDM linear "
                                     "0.00085-0.012 over 1000 steps, which the FeatInv sampler assumes")


def _listing(keys: list[str], limit: int) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)}: {shown}" + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _unfilled(name: str, model: nn.Module, converted: dict) -> list[str]:
    """Parameters without a converted value (or of the wrong shape), and converted values without a parameter."""
    expected = model.state_dict()
    problems = [f"{name}.{k}" for k, v in expected.items() if converted.get(k) is None]
    problems += [f"{name}.{k} (shape {tuple(converted[k].shape)} != {tuple(v.shape)})" for k, v in expected.items()
                 if converted.get(k) is not None and converted[k].shape != v.shape]
    problems += [f"{name}.{k} (no such parameter)" for k in converted if k not in expected]
    return problems


def import_ldm_checkpoint(ckpt_path: str | Path, out_dir: str | Path, *, base_config: dict | None = None,
                          backbone: str | None = None, layer: str | None = None, feature_height: int | None = None,
                          feature_width: int | None = None, pooled: bool = False,
                          tokenizer_dir: str | Path | None = None, max_listed: int = 20) -> Path:
    """Convert a reference FeatInv checkpoint into `out_dir/{controlnet,unet,vae,text_encoder,scheduler}`.

    `out_dir/controlnet` is a FeatInvControlNetModel folder (`load_featinv`); with `tokenizer_dir` (a CLIP
    tokenizer folder, e.g. the base model's `tokenizer/`) `out_dir` is also a complete base for
    `load_base_components`, and a whole `FeatInvPipeline.from_pretrained` folder. The pooled flag and the
    bookkeeping (backbone, layer, feature size) are not in the checkpoint and are recorded as given.
    """
    unknown = set(base_config or {}) - set(BASE_CONFIG_DEFAULTS)
    if unknown:
        raise ValueError(f"base_config: unknown keys {sorted(unknown)}; allowed: {sorted(BASE_CONFIG_DEFAULTS)}")
    settings = {**BASE_CONFIG_DEFAULTS, **(base_config or {})}
    state = load_ldm_state_dict(ckpt_path)
    _check_schedule(state)

    # An LDM-style config (what the reference yaml says), from which diffusers derives its configs.
    vae_params = _vae_params(state)
    original_config = {"model": {"params": {
        "scale_factor": settings["scale_factor"],
        "unet_config": {"params": _unet_params(state, UNET, settings["num_heads"])},
        "first_stage_config": {"params": {"ddconfig": vae_params}},
    }}}
    vae_factor = 2 ** (len(vae_params["ch_mult"]) - 1)
    unet_config = create_unet_diffusers_config_from_ldm(original_config, state)
    unet_config["sample_size"] = settings["image_size"] // vae_factor
    vae_config = create_vae_diffusers_config_from_ldm(original_config, state)
    vae_config["sample_size"] = settings["image_size"]

    unet = UNet2DConditionModel(**unet_config)
    hint_weight = _require(state, f"{CONTROL}input_hint_block.block.1.weight")
    controlnet = FeatInvControlNetModel.from_unet(
        unet, feature_channels=hint_weight.shape[1], encoder_hidden_channels=hint_weight.shape[0], pooled=pooled,
        backbone=backbone, layer=layer, feature_height=feature_height, feature_width=feature_width)
    models = {"controlnet": controlnet, "unet": unet, "vae": AutoencoderKL(**vae_config),
              "text_encoder": CLIPTextModel(_text_config(state, settings["text_num_heads"]))}

    hint = {new + k[len(old):]: v for k, v in state.items() for old, new in HINT_CONVS.items() if k.startswith(old)}
    trunk = {k: v for k, v in state.items() if k.startswith(CONTROL) and not k.startswith(tuple(HINT_CONVS))}
    text = convert_ldm_clip_checkpoint(state)
    if not any(k.startswith("text_model.") for k in models["text_encoder"].state_dict()):
        text = {k.removeprefix("text_model."): v for k, v in text.items()}  # transformers >= 5 layout
    try:
        converted = {
            "controlnet": {**convert_controlnet_checkpoint(trunk, unet_config), **hint},
            "unet": convert_ldm_unet_checkpoint(state, unet_config),
            "vae": convert_ldm_vae_checkpoint(state, vae_config),
            # position_ids is a constant buffer (arange) that newer transformers no longer store.
            "text_encoder": {k: v for k, v in text.items() if not k.endswith("embeddings.position_ids")},
        }
    except KeyError as e:  # diffusers' converters index a few keys directly (e.g. upsampler biases)
        raise CheckpointMismatch(f"checkpoint {ckpt_path}: missing source key {e.args[0]!r}") from e

    # A source key is consumed when its tensor (or a view of it) ended up in a converted dict.
    used = {id(t) for sd in converted.values() for v in sd.values() if v is not None for t in (v, v._base)}
    ignored = set(SCHEDULE_BUFFERS) | {k for k in state if k.startswith(CLIP) and k.endswith("position_ids")}
    unmapped = [k for k, v in state.items() if id(v) not in used and k not in ignored]
    unfilled = [p for name, model in models.items() for p in _unfilled(name, model, converted[name])]
    if unmapped or unfilled:
        parts = [f"source keys not mapped {_listing(unmapped, max_listed)}" if unmapped else "",
                 f"target keys not filled {_listing(unfilled, max_listed)}" if unfilled else ""]
        raise CheckpointMismatch(f"checkpoint {ckpt_path}: " + "; ".join(p for p in parts if p))

    out_dir = Path(out_dir)
    for name, model in models.items():
        model.load_state_dict(converted[name], strict=True)
    if tokenizer_dir is not None:  # the same subfolders, plus model_index.json
        FeatInvPipeline(tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)), scheduler=ddim_scheduler(),
                        **models).save_pretrained(out_dir)
        return out_dir
    for name, model in models.items():
        model.save_pretrained(out_dir / name)
    ddim_scheduler().save_pretrained(out_dir / "scheduler")
    return out_dir
