"""FeatInv as a diffusers pipeline: feature maps in, images out.

    pipe = FeatInvPipeline.from_pretrained("path/to/featinv-pipeline")
    seeds = [100, 101]
    images = pipe(features, generator=seeded_generators(seeds), num_inference_steps=50).images

Sampling is the reference's (FeatInv's gradio_featinv_convnext.py + ddim_hacked.py): DDIM with eta 0,
classifier-free guidance on the text only (the feature control is applied in both branches),
ε̂ = ε_u + s·(ε_c − ε_u) with s = 1.75. Two things differ, both by design:
- cond and uncond share one ControlNet and one UNet forward per step (batch 2B) instead of two
  forwards (`batch_cfg=False` is the reference's two forwards), and B feature maps are sampled together;
- with a list of generators, one per feature map, each item's initial latent is drawn from its own
  generator, so an image depends only on its features and generator, never on the batch it was
  sampled in (the reference draws from the global CUDA RNG, so its exact noise is not reproduced).
  `seeded_generators(seeds)` gives the CPU generators that the reconstruct job uses: a row's seed
  means the same image whatever device or batch it is sampled on.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from featmap_ray.featinv.model import FeatInvControlNetModel

if TYPE_CHECKING:
    from featmap_ray.io.tracking import ModelSource

# The reference's sampling text: prompt "a high-quality, detailed, and professional image" + ", " + a_prompt "".
PROMPT = "a high-quality, detailed, and professional image, "
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class FeatInvPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, a float array (B, S, S, 3) or tensor (B, 3, S, S) in [0, 1], or the
    final latents (B, 4, L, L), by `output_type`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def seeded_generators(seeds: Sequence[int], device: str = "cpu") -> list[torch.Generator]:
    """One generator per seed: `torch.Generator(device).manual_seed(seed)`. CPU generators (the default)
    draw the same noise on every device, which is what a stored reconstruction's seed refers to."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images (B, 3, S, S) in [−1, 1] → uint8 (B, S, S, 3): ×127.5 + 127.5, rounded, clipped."""
    images = (images.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


class FeatInvPipeline(DiffusionPipeline):
    """FeatInv: a frozen Stable Diffusion 1.x (VAE, CLIP text encoder and tokenizer, UNet), the FeatInv
    ControlNet conditioned on a backbone's feature maps, and the DDIM sampler (`model.ddim_scheduler()`).

    `save_pretrained(dir)` writes every component; `FeatInvPipeline.from_pretrained(dir)` reads them
    back (model_index.json names the ControlNet's class by its module, `featmap_ray.featinv.model`).
    A Stable Diffusion folder plus a ControlNet also loads:
    `FeatInvPipeline.from_pretrained(sd_dir, controlnet=FeatInvControlNetModel.from_pretrained(cn_dir),
    scheduler=ddim_scheduler())`.
    """

    # The ControlNet runs between every text-encoder call and UNet call; as in diffusers' Stable
    # Diffusion ControlNet pipeline it stays out of the chain, so offloading does not move it every step.
    model_cpu_offload_seq = "text_encoder->unet->vae"
    # Where the ControlNet came from (a folder, or an MLflow run / model version): set by
    # `loading.featinv_pipeline`, None for a pipeline made otherwise.
    source: ModelSource | None = None

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, controlnet: FeatInvControlNetModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              controlnet=controlnet, scheduler=scheduler)

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

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """CLIP last hidden states (len(prompts), 77, D), padded to max_length like the reference's
        FrozenCLIPEmbedder."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self._execution_device))[0]

    def prepare_latents(self, batch: int, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """x_T ~ N(0, I), (batch, 4, L, L): drawn in float32 (with a list, item i from generator i), then cast."""
        shape = (batch, self.unet.config.in_channels, self.latent_size, self.latent_size)
        noise = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        return noise.to(self.unet.dtype)

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, features: torch.Tensor,
                      conditioning_scale: float) -> torch.Tensor:
        """ε̂ of the frozen UNet with the ControlNet's 13 residuals added."""
        down, mid = self.controlnet(latents, t, encoder_hidden_states=text, controlnet_cond=features,
                                    conditioning_scale=conditioning_scale, return_dict=False)
        return self.unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    def _guided_noise(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                      features: torch.Tensor, guidance_scale: float, conditioning_scale: float,
                      batch_cfg: bool) -> torch.Tensor:
        if uncond is None:  # guidance 1: ε_u + 1·(ε_c − ε_u) = ε_c
            return self.predict_noise(latents, t, cond, features, conditioning_scale)
        if batch_cfg:
            eps_uncond, eps_cond = self.predict_noise(torch.cat([latents, latents]), t, torch.cat([uncond, cond]),
                                                      torch.cat([features, features]), conditioning_scale).chunk(2)
        else:
            eps_cond = self.predict_noise(latents, t, cond, features, conditioning_scale)
            eps_uncond = self.predict_noise(latents, t, uncond, features, conditioning_scale)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor,
               output_type: str = "pil") -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """VAE-decode final latents (as `output_type="latent"` returns them) into `output_type` images."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "latent":
            return latents
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        if output_type == "pil":
            return [PIL.Image.fromarray(image) for image in to_uint8(images)]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return images if output_type == "pt" else images.permute(0, 2, 3, 1).cpu().numpy()

    def check_inputs(self, features, generator, latents, num_inference_steps: int, output_type: str) -> torch.Tensor:
        """The features as a tensor, after the ControlNet's checks (FeatureMismatch) and the other arguments'."""
        if isinstance(features, np.ndarray):
            features = torch.from_numpy(features)
        self.controlnet.check_features(features)
        batch = features.shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: expected one per feature map ({batch}), got a list of {len(generator)}")
        expected = (batch, self.unet.config.in_channels, self.latent_size, self.latent_size)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(f"latents: expected shape {expected}, got {tuple(latents.shape)}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        return features

    @torch.no_grad()
    def __call__(self, features: torch.Tensor | np.ndarray,
                 generator: torch.Generator | list[torch.Generator] | None = None, *,
                 num_inference_steps: int = 50, guidance_scale: float = 1.75,
                 controlnet_conditioning_scale: float = 1.0, prompt: str = PROMPT, negative_prompt: str = "",
                 latents: torch.Tensor | None = None, eta: float = 0.0, output_type: str = "pil",
                 return_dict: bool = True, batch_cfg: bool = True) -> FeatInvPipelineOutput | tuple:
        """Images for B feature maps (B, C, H, W) of the backbone layer the ControlNet was trained on.

        generator: a list of B generators (item i's initial latent comes from generator i only; see
            `seeded_generators`), one generator for the whole batch, or None (torch's global RNG).
        latents: the initial latents x_T (B, 4, L, L) instead of drawing them.
        guidance_scale: text-only classifier-free guidance; 1 skips the unconditional branch.
        controlnet_conditioning_scale: multiplies the 13 ControlNet residuals (0 ignores the features).
        eta: DDIM's eta (0 = deterministic, the reference).
        output_type: "pil" (8-bit images), "np" / "pt" (floats in [0, 1]) or "latent".
        batch_cfg: cond and uncond in one forward of batch 2B (False: two forwards, the reference's way).
        Raises FeatureMismatch for maps of the wrong layout, channels, size, or with NaN / Inf.
        """
        features = self.check_inputs(features, generator, latents, num_inference_steps, output_type)
        batch, device = features.shape[0], self._execution_device
        features = features.to(device, self.controlnet.dtype)
        # A private scheduler: set_timesteps mutates it, and one pipeline may serve concurrent callers.
        scheduler = self.scheduler.__class__.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        step_parameters = inspect.signature(scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_parameters}

        cond = self.encode_prompt([prompt]).expand(batch, -1, -1)
        uncond = None if guidance_scale == 1.0 else self.encode_prompt([negative_prompt]).expand(batch, -1, -1)
        if latents is None:
            latents = self.prepare_latents(batch, generator)
        latents = latents.to(device, self.unet.dtype) * scheduler.init_noise_sigma
        with self.progress_bar(total=len(scheduler.timesteps)) as progress:
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(latents, t)
                eps = self._guided_noise(model_input, t, cond, uncond, features, guidance_scale,
                                         controlnet_conditioning_scale, batch_cfg)
                latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
                progress.update()
        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        return FeatInvPipelineOutput(images=images) if return_dict else (images,)
