"""Batched DDIM sampling of FeatInv: feature maps in, 256×256 images out.

Reference behaviour (FeatInv's gradio_featinv_convnext.py + ddim_hacked.py) kept: DDIM with eta 0,
classifier-free guidance on the text only (the feature control is applied in both branches),
ε̂ = ε_u + s·(ε_c − ε_u) with s = 1.75. Two things differ, both by design:
- cond and uncond share one ControlNet and one UNet forward per step (batch 2B) instead of two
  forwards, and B feature maps are sampled together;
- each item's initial latent comes from its own `torch.Generator().manual_seed(seed)`, so an image
  depends only on its features and seed, never on the batch it was sampled in (the reference draws
  from the global CUDA RNG, so its exact noise is not reproduced).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler

from featmap_ray.featinv.model import FeatInvComponents

# The reference's sampling text: prompt "a high-quality, detailed, and professional image" + ", " + a_prompt "".
PROMPT = "a high-quality, detailed, and professional image, "


def encode_prompts(components: FeatInvComponents, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden states (len(prompts), 77, D), padded to max_length like the reference's FrozenCLIPEmbedder."""
    tokenizer = components.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return components.text_encoder(ids.to(components.text_encoder.device))[0]


def initial_latents(components: FeatInvComponents, seeds: Sequence[int], generator_device: str = "cpu") -> torch.Tensor:
    """x_T for each seed, N(0, I) of shape (4, L, L), each from its own generator."""
    shape = (1, components.unet.config.in_channels, components.latent_size, components.latent_size)
    noise = [torch.randn(shape, generator=torch.Generator(generator_device).manual_seed(int(seed)),
                         device=generator_device, dtype=torch.float32) for seed in seeds]
    return torch.cat(noise).to(components.device, components.unet.dtype)


def _predict_noise(components: FeatInvComponents, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                   features: torch.Tensor, control_scale: float) -> torch.Tensor:
    """ε̂ of the frozen UNet with the ControlNet's 13 residuals added."""
    down, mid = components.controlnet(latents, t, encoder_hidden_states=text, controlnet_cond=features,
                                      conditioning_scale=control_scale, return_dict=False)
    return components.unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid, return_dict=False)[0]


def _guided_noise(components: FeatInvComponents, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor | None, features: torch.Tensor, guidance: float, control_scale: float,
                  batch_cfg: bool) -> torch.Tensor:
    if uncond is None:  # guidance 1: ε_u + 1·(ε_c − ε_u) = ε_c
        return _predict_noise(components, latents, t, cond, features, control_scale)
    if batch_cfg:
        eps_uncond, eps_cond = _predict_noise(components, torch.cat([latents, latents]), t,
                                              torch.cat([uncond, cond]), torch.cat([features, features]),
                                              control_scale).chunk(2)
    else:
        eps_cond = _predict_noise(components, latents, t, cond, features, control_scale)
        eps_uncond = _predict_noise(components, latents, t, uncond, features, control_scale)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@torch.inference_mode()
def sample_latents(components: FeatInvComponents, features: torch.Tensor, seeds: Sequence[int], *, steps: int = 50,
                   guidance: float = 1.75, prompt: str = PROMPT, negative_prompt: str = "",
                   control_scale: float = 1.0, batch_cfg: bool = True, generator_device: str = "cpu") -> torch.Tensor:
    """DDIM (eta 0) from x_T to x_0 in latent space: (B, 4, L, L), not yet divided by the VAE scaling factor."""
    components.controlnet.check_features(features)
    if len(seeds) != features.shape[0]:
        raise ValueError(f"seeds: expected one per feature map ({features.shape[0]}), got {len(seeds)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch = features.shape[0]
    features = features.to(components.device, components.controlnet.dtype)
    # A private scheduler: set_timesteps mutates it, and one FeatInvComponents may serve many callers.
    scheduler = DDIMScheduler.from_config(components.scheduler.config)
    scheduler.set_timesteps(steps, device=components.device)

    cond = encode_prompts(components, [prompt]).expand(batch, -1, -1)
    uncond = None if guidance == 1.0 else encode_prompts(components, [negative_prompt]).expand(batch, -1, -1)
    latents = initial_latents(components, seeds, generator_device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = _guided_noise(components, latents, t, cond, uncond, features, guidance, control_scale, batch_cfg)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    return latents


@torch.inference_mode()
def decode_latents(components: FeatInvComponents, latents: torch.Tensor) -> np.ndarray:
    """VAE-decode latents to uint8 HWC images: [−1, 1] → ×127.5 + 127.5, rounded, clipped."""
    images = components.vae.decode(latents / components.vae.config.scaling_factor, return_dict=False)[0]
    images = (images.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def reconstruct(components: FeatInvComponents, features: torch.Tensor, seeds: Sequence[int], *, steps: int = 50,
                guidance: float = 1.75, prompt: str = PROMPT, negative_prompt: str = "", control_scale: float = 1.0,
                batch_cfg: bool = True, generator_device: str = "cpu") -> np.ndarray:
    """Images (B, S, S, 3) uint8 for B feature maps (B, C, h, w), one seed per map."""
    latents = sample_latents(components, features, seeds, steps=steps, guidance=guidance, prompt=prompt,
                             negative_prompt=negative_prompt, control_scale=control_scale, batch_cfg=batch_cfg,
                             generator_device=generator_device)
    return decode_latents(components, latents)


def reconstruct_reference_loop(components: FeatInvComponents, feature: torch.Tensor, seed: int,
                               **kwargs) -> np.ndarray:
    """One image (S, S, 3) the reference's way: batch 1, separate cond and uncond forwards per step."""
    if feature.ndim != 4 or feature.shape[0] != 1:
        raise ValueError(f"feature: expected one map of shape (1, C, H, W), got {tuple(feature.shape)}")
    return reconstruct(components, feature, [seed], batch_cfg=False, **kwargs)[0]
