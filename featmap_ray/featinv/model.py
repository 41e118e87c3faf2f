"""FeatInv on diffusers: feature encoder, feature-conditioned ControlNet, DDIM sampler.

FeatInv (Neukirch et al. 2025) is a ControlNet on MiniSD (Stable Diffusion 1.4 finetuned at 256×256)
whose conditioning input is a backbone's feature map instead of an image. The only new module is
the conditioning embedding (`FeatureEncoder`): the map is resized to the latent grid (32×32) and
passed through a shallow CNN to the UNet's first width (320), then added after `conv_in`, exactly
where diffusers' `ControlNetModel` adds its pixel-space embedding. Everything else is diffusers.
`pipeline.FeatInvPipeline` holds the frozen base model, the ControlNet and the DDIM sampler;
`loading.py` builds and loads it.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

# ModelMixin is a name of this module on purpose: a saved FeatInvPipeline's model_index.json names the
# ControlNet ["featmap_ray.featinv.model", "FeatInvControlNetModel"], and diffusers' from_pretrained
# finds its loading method by looking up the base class names (ModelMixin, ...) in that module.
from diffusers import ControlNetModel, DDIMScheduler, ModelMixin, UNet2DConditionModel  # noqa: F401
from diffusers.configuration_utils import register_to_config
from torch import nn


class FeatureMismatch(ValueError):
    """A feature map does not fit the FeatInv model (layout, channels, spatial size or values)."""


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


def ddim_scheduler() -> DDIMScheduler:
    """The reference's DDIM sampler: LDM 'linear' betas (= scaled_linear), timesteps {981, 961, ..., 1} at 50 steps,
    last step to ᾱ_0 (set_alpha_to_one False), eps prediction, no clipping."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type="epsilon")
