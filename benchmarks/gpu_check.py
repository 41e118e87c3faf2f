"""GPU run-book: four measurements on one CUDA GPU in one command, under 8 minutes, nothing downloaded.

    make gpu-check                                        # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --dry-run    # the same code paths, tiny models on CPU (in make test)
    .venv/bin/python benchmarks/gpu_check.py --parts featinv,editor

Every model has random weights and is built from a config in code (timm, diffusers and transformers
classes of the real architectures); the Hugging Face libraries are put offline before they are imported.
The parts, each with a time budget printed before it starts and its wall time after:
  extract   benchmarks/extract_throughput.py: the extract job (Ray Data, decode -> forward -> Lance) against
            the bare forward loop on ConvNeXt-B @ 288, both in bfloat16 autocast with channels-last model and
            inputs (extract.compute_dtype, extract.channels_last);
  featinv   benchmarks/featinv_sampling.py: batched sampling against the reference's one-image loop on an
            SD-1.x-shaped UNet/VAE + FeatInv ControlNet at 256 px (MiniSD) and 512 px (SD-1.5), float16;
  editor    one denoising step (cond + uncond: true CFG) of a Qwen-Image-Edit-shaped transformer
            (diffusers' QwenImageTransformer2DModel at its defaults, Qwen-Image's 60 layers, ~20 B
            parameters) in bfloat16 at the pipeline's 1024x1024 working area: built on the meta device,
            materialised on the GPU with `to_empty`; fewer layers when it does not fit (said, and the time
            scaled to 60 layers); step time and CUDA peak memory;
  serve     benchmarks/serve_throughput.py: dynamic batching against max_batch_size 1 with ConvNeXt-B and the
            256 px SD-shaped FeatInv on GPU replicas (the random base saved to a temporary folder first).
--dry-run runs every part on CPU with tiny models and sizes; what needs CUDA (peak memory) is skipped
with the reason printed. A part that fails prints its error; the others still run; the exit status is 1.
"""

from __future__ import annotations

import os
import time

STARTED = time.monotonic()  # the whole run, imports included, is what must stay under 8 minutes

# Before any Hugging Face import: a missing file is an error, never a download.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, reused by import
import extract_throughput  # noqa: E402
import featinv_sampling  # noqa: E402
import serve_throughput  # noqa: E402

PARTS = ["extract", "featinv", "editor", "serve"]
# Seconds per part on the GPU, 7 minutes in all: the sizes below are chosen to fit (from public H100/A100
# figures, docs/benchmarks/gpu-run-book.md); the rest of the 8 minutes is imports and Ray's start.
BUDGET_S = {"extract": 120, "featinv": 120, "editor": 60, "serve": 120}
# The dry run on 2 CPU cores: Ray's start, the extract job's actor and Serve's six replicas (each importing
# torch) are most of it.
DRY_BUDGET_S = {"extract": 60, "featinv": 15, "editor": 10, "serve": 120}


@dataclass(frozen=True)
class Sizes:
    """What each part runs: the GPU run's real sizes, or the dry run's tiny ones."""

    device: str
    extract_images: int
    extract_batch: int
    extract_model_kwargs: dict | None  # None: ConvNeXt-B
    featinv_full_size: bool
    featinv_image_sizes: tuple[int, ...]
    featinv_batch: int
    featinv_steps: int
    featinv_dtype: torch.dtype
    editor_transformer: dict  # QwenImageTransformer2DModel kwargs ({}: its defaults, Qwen-Image's)
    editor_pixels: int  # side of the square working area
    editor_text_tokens: int
    editor_steps: int  # per edit, for the projected edit time
    serve_args: list[str]  # serve_throughput's CLI
    serve_full_size: bool


GPU = Sizes(device="cuda", extract_images=1024, extract_batch=64, extract_model_kwargs=None,
            featinv_full_size=True, featinv_image_sizes=(256, 512), featinv_batch=8, featinv_steps=25,
            featinv_dtype=torch.float16, editor_transformer={},
            # 1024x1024: the pipeline's own ~1 MP working area; ~256 prompt tokens: Qwen2.5-VL's 196 tokens of
            # the 384x384 reference image plus the instruction and the chat template.
            editor_pixels=1024, editor_text_tokens=256, editor_steps=10,
            serve_args=["--requests", "64", "--concurrency", "16", "--steps", "10", "--rounds", "2",
                        "--max-batch", "16", "--wait-s", "0.2"], serve_full_size=True)
DRY = Sizes(device="cpu", extract_images=4, extract_batch=2,
            extract_model_kwargs=serve_throughput.TINY_CONVNEXT["model_kwargs"],
            featinv_full_size=False, featinv_image_sizes=(16,), featinv_batch=2, featinv_steps=2,
            featinv_dtype=torch.float32,
            # The tiny editor pipeline's transformer (featmap_ray.manipulations.semantic.tiny_pipeline).
            editor_transformer=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
            editor_pixels=64, editor_text_tokens=8, editor_steps=10,
            serve_args=["--requests", "4", "--concurrency", "2", "--steps", "2", "--rounds", "1",
                        "--max-batch", "2", "--wait-s", "0.2"], serve_full_size=False)


def free_gpu_memory() -> None:
    """What the driver cached goes back to the GPU before the next part (Serve's replicas need it)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# extract: ConvNeXt-B @ 288, the job against the bare loop

def part_extract(sizes: Sizes, storage: str) -> None:
    n, bs, device = sizes.extract_images, sizes.extract_batch, sizes.device
    extract_throughput.build_images(storage, n, bs, device)  # starts this process's Ray: not timed
    rows, build_s, _ = extract_throughput.measure(storage, n, ["stage3"], bs, device, all_layers=False,
                                                  model_kwargs=sizes.extract_model_kwargs, compute="bfloat16",
                                                  channels_last=True)
    model = "ConvNeXt-B" if sizes.extract_model_kwargs is None else f"tiny ConvNeXt {sizes.extract_model_kwargs}"
    print(f"{model} @ 288, layer stage3, {n} images, batch {bs}, bfloat16 autocast, channels-last, float16 storage; "
          f"driver model build {build_s:.2f} s")
    seconds = dict(rows)
    bare = seconds[f"bare batched (bs {bs})"]
    for label, s in rows:
        print(f"  {label:<24} {s:8.2f} s {n / s:9.1f} img/s   ratio to bare batched {bare / s:5.2f}")
    print(f"  extract job / bare loop: {bare / seconds['ours (stage3)']:.2f} "
          f"(job: decode, preprocess, forward, Lance write, actor start; bare: forward only, images in memory)")


# ---------------------------------------------------------------------------------------------
# featinv: batched sampling against the reference's one-image loop

def part_featinv(sizes: Sizes) -> None:
    for image_size in sizes.featinv_image_sizes:
        torch.manual_seed(0)
        fi, channels, side = featinv_sampling.build(sizes.featinv_full_size, sizes.device, sizes.featinv_dtype,
                                                    image_size)
        results, diff = featinv_sampling.measure(fi, channels, side, sizes.featinv_batch, sizes.featinv_steps,
                                                 sizes.device)
        shape = "SD-1.x-shaped UNet/VAE" if sizes.featinv_full_size else "tiny SD-shaped model"
        print(f"FeatInv, {shape}, {fi.image_size} px, features {channels}x{side}x{side}, {sizes.featinv_steps} "
              f"DDIM steps, CFG 1.75, {str(sizes.featinv_dtype).removeprefix('torch.')}, batch {sizes.featinv_batch}")
        for name, (seconds, _, _) in results.items():
            print(f"  {name:<44} {seconds:8.2f} s {sizes.featinv_batch / seconds:9.2f} img/s "
                  f"{sizes.featinv_steps * sizes.featinv_batch / seconds:8.1f} image-steps/s")
        ref, ours = results[featinv_sampling.REFERENCE][0], list(results.values())[-1][0]
        print(f"  batched / reference loop: {ref / ours:.2f}x; largest pixel difference {diff}")
        del fi
        free_gpu_memory()


# ---------------------------------------------------------------------------------------------
# editor: a Qwen-Image-Edit-shaped transformer step, built on the meta device

def empty_transformer(config: dict, layers: int | None = None):
    """QwenImageTransformer2DModel with bfloat16 parameters on the meta device (no memory; accelerate's
    init_empty_weights keeps buffers and plain tensors, like the float32 RoPE tables, real). bfloat16 from
    the start: float32 weights would need twice the GPU memory before a cast."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with init_empty_weights():
            return QwenImageTransformer2DModel(**{**config, **({} if layers is None else {"num_layers": layers})})
    finally:
        torch.set_default_dtype(default)


def layers_that_fit(config: dict, free_bytes: int, reserve_bytes: int) -> tuple[int, int]:
    """(layers, of how many) whose bfloat16 weights fit in free_bytes, keeping reserve_bytes for activations."""
    full = empty_transformer(config)
    blocks = sum(p.numel() for p in full.transformer_blocks.parameters())
    per_layer, rest = blocks // len(full.transformer_blocks), sum(p.numel() for p in full.parameters()) - blocks
    fit = (free_bytes - reserve_bytes - 2 * rest) // (2 * per_layer)
    return max(1, min(len(full.transformer_blocks), int(fit))), len(full.transformer_blocks)


def materialise(model, device: str) -> None:
    """Meta parameters -> uninitialised memory on device (`to_empty`), then random values: N(0, 0.02) weights,
    zero biases. Timing needs finite values, not trained ones."""
    if next(model.buffers(), None) is not None:  # to_empty would leave them uninitialised too
        raise RuntimeError(f"{type(model).__name__} has buffers: initialise them after to_empty")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    model.eval()


def editor_step(model, sizes: Sizes) -> None:
    """One denoising step as QwenImageEditPlusPipeline runs it: the transformer on the noisy latents followed by
    the reference image's latents, twice (prompt and negative prompt: true CFG)."""
    device, side = sizes.device, sizes.editor_pixels // 16  # VAE /8, then 2x2 patches
    tokens = side * side
    gen = torch.Generator(device).manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 2 * tokens, model.config.in_channels, generator=gen, device=device,
                                  dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, sizes.editor_text_tokens, model.config.joint_attention_dim, generator=gen,
                                          device=device, dtype=torch.bfloat16),
        encoder_hidden_states_mask=torch.ones(1, sizes.editor_text_tokens, device=device, dtype=torch.long),
        timestep=torch.full((1,), 0.5, device=device, dtype=torch.bfloat16),
        img_shapes=[[(1, side, side), (1, side, side)]], return_dict=False)
    with torch.inference_mode():
        for _ in range(2):  # cond, then uncond
            out = model(**inputs)[0]
    extract_throughput.sync(device)
    if not torch.isfinite(out).all():
        raise RuntimeError("the editor transformer gave NaN or Inf")


def part_editor(sizes: Sizes) -> None:
    config, device = sizes.editor_transformer, sizes.device
    layers = total = len(empty_transformer(config).transformer_blocks)
    # 8 GiB for activations (an estimate: at 8,448 tokens one layer's are a few hundred MB, freed as the next
    # runs; an attention matrix, were SDPA to fall back to its math kernel, would be 3.4 GB).
    if device == "cuda":
        layers, total = layers_that_fit(config, torch.cuda.mem_get_info()[0], reserve_bytes=8 * 2**30)
    while True:
        model = empty_transformer(config, layers)
        params = sum(p.numel() for p in model.parameters())
        try:
            materialise(model, device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            editor_step(model, sizes)  # warm-up: kernel selection, allocator growth
            repeats, start = 3, time.perf_counter()
            for _ in range(repeats):
                editor_step(model, sizes)
            step_s = (time.perf_counter() - start) / repeats
            break
        except torch.OutOfMemoryError:
            if layers == 1:
                raise
            del model
            free_gpu_memory()
            layers //= 2
            print(f"  out of memory: again with {layers} layers")
    tokens = (sizes.editor_pixels // 16) ** 2
    print(f"Qwen-Image-Edit-shaped transformer (QwenImageTransformer2DModel {config or 'defaults'}), bfloat16, "
          f"built on the meta device, materialised on {device}: {layers} layers, {params / 1e9:.2f} B parameters, "
          f"{2 * params / 2**30:.1f} GiB of weights")
    print(f"  working area {sizes.editor_pixels}x{sizes.editor_pixels}: {2 * tokens} image tokens (noisy latents + "
          f"reference image) + {sizes.editor_text_tokens} prompt tokens; one step = cond + uncond forwards")
    print(f"  step time {step_s:.3f} s; transformer time per edit at {sizes.editor_steps} steps "
          f"{sizes.editor_steps * step_s:.1f} s (text encoder and VAE not included)")
    if layers < total:
        print(f"  FEWER LAYERS: {layers} of {total} fit next to the activations; scaled to {total} layers "
              f"(linear in layers): step {step_s * total / layers:.3f} s")
    if device == "cuda":
        print(f"  CUDA peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (weights + activations)")
    else:
        print("  CUDA peak memory: skipped (no CUDA device in a dry run)")
    del model
    free_gpu_memory()


# ---------------------------------------------------------------------------------------------
# serve: dynamic batching against max_batch_size 1

def save_base(sizes: Sizes, folder: Path) -> None:
    """The random SD base (256 px SD-1.x-shaped, or tiny) in diffusers layout: featinv.base_model can name it."""
    from transformers.utils import logging

    from featmap_ray.featinv.loading import tiny_base_components

    logging.disable_progress_bar()  # "Writing model shards" bars in the check's output
    base = featinv_sampling.minisd_shaped_base() if sizes.serve_full_size else tiny_base_components()
    for name, part in zip(("vae", "text_encoder", "tokenizer", "unet"), base, strict=True):
        part.save_pretrained(folder / name)


def part_serve(sizes: Sizes, storage: str) -> None:
    args = serve_throughput.parse_args(sizes.serve_args)
    folder = Path(storage) / "sd_base"
    save_base(sizes, folder)
    overrides: dict = {"featinv": {"base_model": str(folder)}}
    shape = serve_throughput.SHAPE
    if sizes.serve_full_size:
        gpus = {"num_cpus": 1, "num_gpus": 0.25}  # two applications x (backbone, FeatInv) share the one GPU
        overrides = {"extract": {"backbones": [{"name": "convnext_base", "pretrained": False, "layers": ["stage3"]}]},
                     "featinv": {"base_model": str(folder), "encoder_hidden_channels": 512},
                     "serve": {"backbone": {"ray_actor_options": gpus}, "featinv": {"ray_actor_options": gpus}}}
        shape = (1024, 9, 9)
    rows = serve_throughput.measure(args, shape=shape, overrides=overrides)
    models = ("ConvNeXt-B + 256 px SD-shaped FeatInv (float32) on GPU replicas" if sizes.serve_full_size
              else "tiny models on CPU")
    print(f"FeatInv service, {models}: {args.requests} POST /reconstruct/features at concurrency {args.concurrency}, "
          f"{args.steps} DDIM steps, features {'x'.join(map(str, shape))}")
    for mode, (max_batch, throughput, p50, p95) in rows.items():
        print(f"  {mode:<10} max_batch_size {max_batch:>3} {throughput:8.2f} req/s  p50 {p50:6.3f} s  p95 {p95:6.3f} s")
    print(f"  batched / unbatched throughput: {rows['batched'][1] / rows['unbatched'][1]:.2f}x")


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny models and sizes on CPU (the test suite's)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; known: {PARTS}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or --dry-run for the CPU check of the same code")
    sizes, budgets = (DRY, DRY_BUDGET_S) if args.dry_run else (GPU, BUDGET_S)
    if args.dry_run:  # tiny models gain nothing from more threads; OpenMP barriers on a busy CPU cost seconds
        torch.set_num_threads(1)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    name = torch.cuda.get_device_name() if sizes.device == "cuda" else platform.processor() or platform.machine()
    print(f"GPU check{' (DRY RUN: tiny models on CPU; no number below is a GPU figure)' if args.dry_run else ''}: "
          f"{sizes.device} ({name}), {os.cpu_count()} CPUs, torch {torch.__version__}")
    print("All weights are RANDOM (configs built in code, nothing downloaded): timings only, no image is meaningful.")
    print(f"Budget: {sum(budgets[p] for p in parts)} s in all; " + ", ".join(f"{p} {budgets[p]} s" for p in parts))

    import ray

    ray_was_up = ray.is_initialized()
    took, failed = {}, []
    with tempfile.TemporaryDirectory(prefix="featmap_gpu_check_") as storage:
        runners = {"extract": lambda: part_extract(sizes, str(Path(storage, "extract"))),
                   "featinv": lambda: part_featinv(sizes), "editor": lambda: part_editor(sizes),
                   "serve": lambda: part_serve(sizes, str(Path(storage, "serve")))}
        try:
            for part in parts:
                print(f"\n== {part} (budget {budgets[part]} s)", flush=True)
                start = time.perf_counter()
                try:
                    runners[part]()
                except Exception:  # one part's failure (say, out of memory) does not hide the others' numbers
                    traceback.print_exc()
                    failed.append(part)
                free_gpu_memory()
                took[part] = time.perf_counter() - start
                over = " OVER BUDGET" if took[part] > budgets[part] else ""
                print(f"== {part}: {'FAILED' if part in failed else 'done'} in {took[part]:.1f} s "
                      f"of {budgets[part]} s{over}", flush=True)
        finally:
            if not ray_was_up:
                ray.shutdown()  # the Ray the extract part started (the serve part uses it too)
    print(f"\nGPU check {'FAILED: ' + ', '.join(failed) if failed else 'done'}: parts {sum(took.values()):.1f} s "
          f"of {sum(budgets[p] for p in parts)} s budget; {time.monotonic() - STARTED:.1f} s in all "
          f"(imports and Ray's start included)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
