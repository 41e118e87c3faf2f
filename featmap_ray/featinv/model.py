"""FeatInv on diffusers: the feature encoder, the feature-conditioned ControlNet and the frozen base model.

FeatInv (Neukirch et al. 2025) is a ControlNet on MiniSD (Stable Diffusion 1.4 finetuned at 256×256)
whose conditioning input is a backbone's feature map instead of an image. The only new module is
the conditioning embedding (`FeatureEncoder`): the map is resized to the latent grid (32×32) and
passed through a shallow CNN to the UNet's first width (320), then added after `conv_in`, exactly
where diffusers' `ControlNetModel` adds its pixel-space embedding. Everything else is diffusers.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import register_to_config
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The reference's text "a high-quality, detailed, and professional image" + ", " + a_prompt "".
PROMPT = "a high-quality, detailed, and professional image, "
BASE_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "unet")
DEFAULT_BASE = "lambdalabs/miniSD-diffusers"

BaseComponents = tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel]


class FeatureMismatch(ValueError):
    """A feature map does not fit the FeatInv model (layout, channels, spatial size or values)."""


class BaseModelNotFound(FileNotFoundError):
    """The Stable Diffusion base model is not available locally."""


class FeatureEncoder(nn.Module):
    """Feature map (B, C, h, w) -> ControlNet conditioning embedding (B, out_channels, L, L).

    The reference's FeatInvInputHintBlock: bilinear resize to the latent grid (which also
    downsamples maps larger than it), conv3×3 → SiLU → conv3×3 → SiLU → zero-initialised conv3×3.
    `pooled=True` is the paper's pooled variant: the channel means are tiled over the grid.
    """

    def __init__(self, feature_channels: int, latent_size: int = 32, hidden_channels: int = 512,
                 out_channels: int = 320, pooled: bool = False):
        super().__init__()
        self.latent_size = latent_size
        self.pooled = pooled
        # Reference names: input_hint_block.block.1 / .3 / .5.
        self.conv_in = nn.Conv2d(feature_channels, hidden_channels, kernel_size=3, padding=1)
        self.conv_mid = nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1)
        self.conv_out = nn.Conv2d(hidden_channels, out_channels, kernel_size=3, padding=1)
        # Zero output: an untrained ControlNet leaves the base model's prediction unchanged.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def to_grid(self, features: torch.Tensor) -> torch.Tensor:
        """The feature map resampled (or pooled and tiled) onto the latent grid."""
        features = features.to(self.conv_in.weight.dtype)
        size = (self.latent_size, self.latent_size)
        if self.pooled:
            return features.mean(dim=(2, 3), keepdim=True).expand(-1, -1, *size)
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(self.to_grid(features)))
        x = F.silu(self.conv_mid(x))
        return self.conv_out(x)


def _with_controlnet_arguments(init):
    """Give `init(self, *, own..., **controlnet_kwargs)` the signature own + ControlNetModel's arguments.

    diffusers' config machinery reads the `__init__` signature both to record a model's arguments
    (`register_to_config`) and to pick them out of config.json again (`from_pretrained`); a bare
    `**kwargs` would silently drop every ControlNet argument on reload.
    """
    own = inspect.signature(init).parameters
    inherited = inspect.signature(ControlNetModel.__init__).parameters
    params = [p for p in own.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in inherited.items()
               if name != "self" and name not in own]
    init.__signature__ = inspect.Signature(params)
    return init


class FeatInvControlNetModel(ControlNetModel):
    """diffusers' ControlNet with FeatInv's feature encoder as `controlnet_cond_embedding`.

    The forward is ControlNetModel's: `controlnet_cond` is the raw NCHW feature map; outputs are
    the 12 down residuals and the mid residual, scaled by `conditioning_scale`. `backbone`, `layer`,
    `feature_height` and `feature_width` are bookkeeping that `check_features` enforces.
    """

    @register_to_config
    @_with_controlnet_arguments
    def __init__(self, *, feature_channels: int = 1024, latent_size: int = 32, encoder_hidden_channels: int = 512,
                 pooled: bool = False, backbone: str | None = None, layer: str | None = None,
                 feature_height: int | None = None, feature_width: int | None = None,
                 conditioning_channels: int | None = None, **controlnet_kwargs):
        if conditioning_channels not in (None, feature_channels):
            raise ValueError(f"conditioning_channels ({conditioning_channels}) must equal feature_channels "
                             f"({feature_channels}) for a FeatInv ControlNet")
        super().__init__(conditioning_channels=feature_channels, **controlnet_kwargs)
        self.controlnet_cond_embedding = FeatureEncoder(
            feature_channels, latent_size, encoder_hidden_channels, self.config.block_out_channels[0], pooled)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, *, feature_channels: int, latent_size: int | None = None,
                  pooled: bool = False, backbone: str | None = None, layer: str | None = None,
                  feature_height: int | None = None, feature_width: int | None = None,
                  encoder_hidden_channels: int = 512) -> FeatInvControlNetModel:
        """A ControlNet whose trunk is a copy of `unet`'s encoder and middle (the reference's tool_add_control).

        The feature encoder is freshly initialised (last conv zero) and the 13 zero convs are zero,
        so the new model's residuals are all zero.
        """
        accepted = inspect.signature(ControlNetModel.__init__).parameters
        architecture = {k: v for k, v in unet.config.items() if k in accepted}
        controlnet = cls(feature_channels=feature_channels, latent_size=latent_size or unet.config.sample_size,
                         encoder_hidden_channels=encoder_hidden_channels, pooled=pooled, backbone=backbone,
                         layer=layer, feature_height=feature_height, feature_width=feature_width, **architecture)
        # Copy by name, like tool_add_control: every ControlNet weight that the UNet also has.
        missing, _ = controlnet.load_state_dict(unet.state_dict(), strict=False)
        new = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
        not_copied = [k for k in missing if not k.startswith(new)]
        if not_copied:
            raise ValueError(f"UNet lacks ControlNet trunk weights {not_copied[:5]} ({len(not_copied)} keys)")
        return controlnet

    def describe(self) -> str:
        """'backbone/layer' for messages."""
        return f"{self.config.backbone or '?'}/{self.config.layer or '?'}"

    def check_features(self, features: torch.Tensor) -> None:
        """Raise FeatureMismatch unless `features` is a finite (B, C, H, W) map this model was trained on."""
        channels = self.config.feature_channels
        where = self.describe()
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            shape = tuple(features.shape) if hasattr(features, "shape") else type(features).__name__
            raise FeatureMismatch(f"features for {where}: expected a 4-D NCHW tensor (B, {channels}, H, W), "
                                  f"got {shape}")
        shape = tuple(features.shape)
        if shape[1] != channels:
            hint = " (channels-last? convert to NCHW)" if shape[-1] == channels else ""
            raise FeatureMismatch(f"features: expected {channels} channels for {where}, got {shape[1]} "
                                  f"(shape {shape}){hint}")
        expected = (self.config.feature_height, self.config.feature_width)
        for axis, (got, want) in enumerate(zip(shape[2:], expected)):
            if want is not None and got != want:
                raise FeatureMismatch(f"features for {where}: expected spatial size "
                                      f"{expected[0]}×{expected[1]}, got {shape[2]}×{shape[3]} (axis {axis + 2})")
        if not torch.isfinite(features).all():
            raise FeatureMismatch(f"features for {where} contain NaN or Inf values")


@dataclass
class FeatInvComponents:
    """The frozen base model, the FeatInv ControlNet and the DDIM sampler."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    controlnet: FeatInvControlNetModel
    scheduler: DDIMScheduler

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FeatInvComponents:
        for model in (self.vae, self.text_encoder, self.unet, self.controlnet):
            model.to(device) if dtype is None else model.to(device=device, dtype=dtype)
        return self

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent grid; the feature encoder's output size (= unet sample_size by default)."""
        return self.controlnet.config.latent_size

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels (256 for MiniSD)."""
        return self.latent_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device


def ddim_scheduler() -> DDIMScheduler:
    """The reference's DDIM sampler: LDM 'linear' betas (= scaled_linear), timesteps {981, 961, ..., 1} at 50 steps,
    last step to ᾱ_0 (set_alpha_to_one False), eps prediction, no clipping."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type="epsilon")


def _freeze(*models: nn.Module) -> None:
    for model in models:
        model.requires_grad_(False)
        model.eval()


def build_featinv(base: BaseComponents, *, feature_channels: int, pooled: bool = False, backbone: str | None = None,
                  layer: str | None = None, feature_height: int | None = None, feature_width: int | None = None,
                  encoder_hidden_channels: int = 512) -> FeatInvComponents:
    """A new (untrained) FeatInv model on a frozen base: the ControlNet is initialised from the UNet."""
    vae, text_encoder, tokenizer, unet = base
    _freeze(vae, text_encoder, unet)
    controlnet = FeatInvControlNetModel.from_unet(
        unet, feature_channels=feature_channels, pooled=pooled, backbone=backbone, layer=layer,
        feature_height=feature_height, feature_width=feature_width, encoder_hidden_channels=encoder_hidden_channels)
    controlnet.eval()
    return FeatInvComponents(vae, text_encoder, tokenizer, unet, controlnet, ddim_scheduler())


def load_featinv(controlnet_dir: str | Path, base: BaseComponents) -> FeatInvComponents:
    """A trained FeatInv ControlNet (a `save_pretrained` folder) on a frozen base."""
    vae, text_encoder, tokenizer, unet = base
    controlnet = FeatInvControlNetModel.from_pretrained(str(controlnet_dir), low_cpu_mem_usage=False)
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block", "down_block_types"):
        if list(_as_list(controlnet.config[key])) != list(_as_list(unet.config[key])):
            raise ValueError(f"ControlNet {controlnet_dir} was built for a UNet with {key}={controlnet.config[key]}, "
                             f"the base UNet has {unet.config[key]}")
    _freeze(vae, text_encoder, unet, controlnet)
    return FeatInvComponents(vae, text_encoder, tokenizer, unet, controlnet, ddim_scheduler())


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---------------------------------------------------------------------------------------------
# Base model: real weights from disk / the HF cache, or tiny random models built from configs.

def _resolve_base_dir(path: str | Path, local_files_only: bool) -> Path:
    fetch = (f"on a machine with internet run `huggingface-cli download {DEFAULT_BASE} --local-dir DIR` "
             f"(or `hf download ...` with huggingface_hub >= 1.0) and pass DIR, or copy its Hugging Face cache here")
    root = Path(path).expanduser()
    if not root.is_dir():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
            raise BaseModelNotFound(f"Stable Diffusion base model {str(path)!r}: no such directory; {fetch}")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            root = Path(snapshot_download(str(path), local_files_only=local_files_only))
        except (LocalEntryNotFoundError, OSError) as e:
            where = "in the local Hugging Face cache" if local_files_only else "locally or on the hub"
            raise BaseModelNotFound(f"Stable Diffusion base model {str(path)!r}: not a directory and not found "
                                    f"{where} ({type(e).__name__}); {fetch}") from e
    missing = [name for name in BASE_SUBFOLDERS if not (root / name).is_dir()]
    if missing:
        raise BaseModelNotFound(f"Stable Diffusion base model {str(path)!r} at {root} lacks the diffusers "
                                f"subfolder(s) {missing} (need {list(BASE_SUBFOLDERS)}); {fetch}")
    return root


def load_base_components(path: str | Path, *, local_files_only: bool = True) -> BaseComponents:
    """(vae, text_encoder, tokenizer, unet) of a Stable Diffusion 1.x in diffusers layout.

    `path` is a local directory or a hub id resolved from the local HF cache (downloaded only when
    `local_files_only=False`). Missing weights raise BaseModelNotFound; never falls back to random.
    """
    root = _resolve_base_dir(path, local_files_only)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", low_cpu_mem_usage=False)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", low_cpu_mem_usage=False)
    return vae, text_encoder, tokenizer, unet


def tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The real SD tokenizer class with a byte-level vocabulary and no merges (every byte is a token)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length)


def random_base_components(*, unet: dict, vae: dict, text_encoder: dict, seed: int = 0) -> BaseComponents:
    """Randomly initialised (vae, text_encoder, tokenizer, unet) from diffusers/transformers configs, offline.

    The tokenizer is `tiny_tokenizer()`; `text_encoder` is a CLIPTextConfig dict whose vocabulary
    and special ids are set to match it. The global RNG state is left untouched.
    """
    tokenizer = tiny_tokenizer()
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **text_encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = AutoencoderKL(**vae), CLIPTextModel(text_config), UNet2DConditionModel(**unet)
    for model in models:
        model.eval()
    vae_model, text_model, unet_model = models
    return vae_model, text_model, tokenizer, unet_model


def tiny_base_components(seed: int = 0, sample_size: int = 8, cross_attention_dim: int = 32) -> BaseComponents:
    """Tiny SD-1.x-shaped random models (latent 4×8×8, images 16×16) for tests, demos and benchmarks."""
    unet = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                cross_attention_dim=cross_attention_dim, norm_num_groups=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               norm_num_groups=32, sample_size=2 * sample_size)
    text_encoder = dict(hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
                        num_hidden_layers=2, num_attention_heads=4, projection_dim=cross_attention_dim)
    return random_base_components(unet=unet, vae=vae, text_encoder=text_encoder, seed=seed)
