"""FeatInv sampling throughput: batched sampling against the reference's one-image loop, same model and device.

    .venv/bin/python benchmarks/featinv_sampling.py                          # tiny model, CPU, < 1 min
    .venv/bin/python benchmarks/featinv_sampling.py --device cuda --full-size --dtype float16
    .venv/bin/python benchmarks/featinv_sampling.py --device cuda --full-size --image-size 512 --dtype float16

Measured in one run, after one untimed warm-up of each path:
  reference     one image per call, cond and uncond as two ControlNet + UNet forwards per step
                (`FeatInvPipeline(..., batch_cfg=False)` on one map, what featinv_reconstructor does), B calls;
  batch, 2 fwd  B feature maps per call, cond and uncond still separate (2 forwards per step);
  batch, 1 fwd  B feature maps per call, cond and uncond in one forward of batch 2B (the default).
Random weights: the tiny SD-shaped test model (16×16 images), or with --full-size a MiniSD-shaped
UNet/VAE (256×256 images, latent 4×32×32, ConvNeXt-sized 1024×9×9 features; --image-size 512: SD-1.5's
512×512, latent 4×64×64, same architecture) with a 2-layer CLIP text model of width 768. Also prints
the largest pixel difference between the batched and the reference images (same seeds: they should
agree up to float rounding).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from featmap_ray.featinv.loading import build_featinv, random_base_components, tiny_base_components
from featmap_ray.featinv.pipeline import seeded_generators

REFERENCE = "reference (B=1, 2 fwd/step)"


def minisd_shaped_base(seed: int = 0, image_size: int = 256):
    """SD-1.x UNet/VAE with random weights, at MiniSD's 256×256 or SD-1.5's 512×512 (the same architecture);
    a 2-layer CLIP text model of width 768 (SD's has 12: the prompt is encoded once per call)."""
    unet = dict(sample_size=image_size // 8, cross_attention_dim=768, attention_head_dim=8,
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=image_size,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12)
    return random_base_components(unet=unet, vae=vae, text_encoder=text, seed=seed)


def timed(fn, device: str) -> tuple[float, float, np.ndarray]:
    """Wall-clock and process CPU seconds of fn() (CPU time stays meaningful on a shared machine)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    images = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu, images


def build(full_size: bool, device: str, dtype: torch.dtype, image_size: int = 256):
    """A new FeatInv model on a random base (tiny, or SD-1.x-shaped at image_size) on device in dtype, and the
    (channels, side) of the feature maps it takes."""
    if full_size:
        base, channels, size, hidden = minisd_shaped_base(image_size=image_size), 1024, 9, 512
    else:
        base, channels, size, hidden = tiny_base_components(), 16, 9, 32
    fi = build_featinv(base, feature_channels=channels, encoder_hidden_channels=hidden)
    fi.to(device, None if dtype is torch.float32 else dtype)  # models are built in float32
    fi.set_progress_bar_config(disable=True)
    return fi, channels, size


def measure(fi, channels: int, size: int, batch: int, steps: int, device: str):
    """{path: (seconds, CPU seconds, images)} of the reference loop and both batched paths, after warm-ups,
    and the largest pixel difference between ours and the reference's images."""
    features = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
    seeds = list(range(100, 100 + batch))

    def sample(maps: torch.Tensor, map_seeds: list[int], steps: int = steps, batch_cfg: bool = True) -> np.ndarray:
        images = fi(maps, seeded_generators(map_seeds), num_inference_steps=steps, guidance_scale=1.75,
                    batch_cfg=batch_cfg).images
        return np.stack([np.asarray(image) for image in images])

    def reference():
        return np.concatenate([sample(features[i:i + 1], [s], batch_cfg=False) for i, s in enumerate(seeds)])

    runs = {
        REFERENCE: reference,
        f"batch {batch}, 2 fwd/step": lambda: sample(features, seeds, batch_cfg=False),
        f"batch {batch}, 1 fwd/step (ours)": lambda: sample(features, seeds),
    }
    # Warm-up: first calls pay for kernel selection and allocator growth.
    sample(features[:1], [0], steps=2, batch_cfg=False)
    sample(features, seeds, steps=2, batch_cfg=False)
    sample(features, seeds, steps=2)
    results = {name: timed(fn, device) for name, fn in runs.items()}
    ours = results[list(runs)[-1]][2]
    return results, int(np.abs(ours.astype(int) - results[REFERENCE][2].astype(int)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="MiniSD-shaped UNet/VAE at 256 (for a GPU)")
    parser.add_argument("--image-size", type=int, default=256, choices=[256, 512],
                        help="with --full-size: 256 (MiniSD) or 512 (SD-1.5)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 by default because the tiny model gains nothing from more, and "
                             "OpenMP barriers on a busy machine make timings erratic")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    fi, channels, size = build(args.full_size, args.device, getattr(torch, args.dtype), args.image_size)
    results, diff = measure(fi, channels, size, args.batch, args.steps, args.device)

    print(f"FeatInv sampling, {'SD-1.x-shaped' if args.full_size else 'tiny'} model, {fi.image_size}px images, "
          f"features {channels}×{size}×{size}, {args.steps} DDIM steps, CFG 1.75, {args.dtype}, "
          f"device {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{'path':<32} {'seconds':>8} {'images/s':>9} {'CPU s':>8}")
    for name, (seconds, cpu, _) in results.items():
        print(f"{name:<32} {seconds:8.2f} {args.batch / seconds:9.2f} {cpu:8.2f}")
    (ref_s, ref_cpu, _), (ours_s, ours_cpu, _) = results[REFERENCE], list(results.values())[-1]
    print(f"speed-up of ours over the reference loop: {ref_s / ours_s:.2f}x wall-clock, {ref_cpu / ours_cpu:.2f}x CPU time")
    print(f"largest pixel difference, ours vs reference images: {diff}")


if __name__ == "__main__":
    main()
