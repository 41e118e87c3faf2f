"""Capacity plan: the unit cost of every stage, measured on this machine in one run, scaled to the paper's workloads.

    .venv/bin/python benchmarks/capacity.py                                   # every section, ~5 min on 2 idle cores
    .venv/bin/python benchmarks/capacity.py --sections ingest,manipulate,extract
    .venv/bin/python benchmarks/capacity.py --featinv-size tiny               # no full-size FeatInv (~1.5 min less)
    .venv/bin/python benchmarks/capacity.py --gpu-speedup 40                  # another assumed GPU factor

Unit costs are measured on the project's layer-1 code paths (pure functions and modules, no Ray, no
Lance, no MLflow: the per-item work each Ray stage wraps), real architectures with random weights,
float32 on CPU, after one untimed warm-up, as the median of --repeats timed calls (--extract-repeats for
the backbones); wall-clock seconds, with the process CPU seconds beside them:
  ingest       `ingest.original_row`: decode a JPEG, resize + centre-crop to 288, encode PNG; sources
               are the colour photos shipped with scikit-image, scaled to 700 px on the long side and
               JPEG-encoded at quality 90 (Stanford Cars and CUB ship JPEGs of about that size);
  manipulate   `manipulations.stage.variant_row` for each of the 16 direct manipulations (the paper's 12
               from `ManipulateConfig`'s defaults + brightness, contrast, translation, perspective):
               decode the stored PNG, apply the op, encode PNG; the op alone is timed too;
  extract      per registered backbone (`backbones.REGISTRY`, its default layers, the paper's input
               size): `extract.preprocess_batch` (PNG decode + resize/crop, a CPU step) and
               `extract.FeatureExtractor` (forward under inference_mode, float16 conversion, NaN check,
               Arrow packing) on a batch of --extract-batch stored images;
  mapping      per model family and feature shape of the mapping grid: `mapping.models.build_model` +
               `losses.build_loss` (the paper loss) + AdamW: forward, backward and an optimiser step on
               one batch of random pairs, per pair. The batch is chosen per (family, shape) so that a step
               takes about --mapping-step-s (at most --mapping-batch); a step slower than
               --mapping-slow-s at batch 1 is timed once, without warm-up. Closed-form families: the
               sufficient-statistics update per pair and the solve per run;
  featinv      `FeatInvPipeline(..., output_type="latent")` at 1 and 1+k DDIM steps (per step = the difference
               / k, cond + uncond in one forward) and `FeatInvPipeline.decode`, on the MiniSD-shaped UNet/VAE that
               benchmarks/featinv_sampling.py builds (`minisd_shaped_base`, imported from it), ConvNeXt-B
               stage3 maps 1024x9x9; or, with --featinv-size tiny, the tiny test model (say so: useless
               for planning);
  featinv-train one training step of `featinv.train.diffusion_loss` (VAE encode, ControlNet + UNet,
               MSE) + backward + AdamW over the ControlNet, at --featinv-train-batch; the on-the-fly
               ConvNeXt-B conditioning forward is added from the extract section.
The plan multiplies them by the paper's workloads (Stanford Cars 16,185 + CUB 11,788 images x (original
+ 12 manipulations) x 4 backbones; the mapping grid of conf/paper_study.yaml expanded by `grid.expand`;
10,000 FeatInv reconstructions at 50 DDIM steps; FeatInv training on ImageNet, 3 epochs at batch 8) and
prints node-hours on this machine, a GPU column that is an ASSUMED speed-up (nothing is measured on a
GPU here), the storage of every table, and the cluster.yaml worker type of every stage.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, reused by import
from featinv_sampling import minisd_shaped_base, timed  # noqa: E402

from featmap_ray import backbones  # noqa: E402
from featmap_ray.config import (  # noqa: E402
    BackboneRequest,
    DatasetConfig,
    FeatInvTraining,
    ManipulateConfig,
    MappingTraining,
    load_config,
)
from featmap_ray.io import imageio  # noqa: E402
from featmap_ray.manipulations import direct  # noqa: E402
from featmap_ray.stages import extract, ingest  # noqa: E402
from featmap_ray.stages.manipulate import variant_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["ingest", "manipulate", "extract", "mapping", "featinv", "featinv-train"]
PAPER_LOSS = {"mse": 0.3, "median_cos": 0.7}
# Beyond the paper's 12 (ManipulateConfig's defaults): one variant of each other registered op = 16.
EXTRA_OPS = {"brightness": [20], "contrast": [20], "translation": [[32, 32]],
             "perspective": [[[20, 10], [270, 0], [288, 288], [0, 270]]]}
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg"]
EXTRA_FAMILIES = ["additive", "local_nonshared_linear", "ridge", "orthogonal_procrustes"]

# --- the paper's workloads (spec = /work/shared/reference/featmap_featinv_spec.md) ---------------
DATASETS = {"STANFORD_CARS": 16_185, "CUB_200_2011": 11_788}  # spec §1.1
# Training images: Cars' official split; CUB's official split [unverified, spec §1.1]
TRAIN_IMAGES = {"STANFORD_CARS": 8_144, "CUB_200_2011": 5_994}
# Qwen edits for training: imgs_per_class 10 (spec §1.4; §6: Cars 1,960 pairs)
QWEN_TRAIN = {"STANFORD_CARS": 10 * 196, "CUB_200_2011": 10 * 200}
# (10 train + 5 test) per class x prompts generated (Cars 6, CUB 3), spec §1.4, §3
QWEN_EDITS = 196 * 15 * 6 + 200 * 15 * 3
QWEN_S_PER_IMAGE_2xL40 = 30.0  # spec §0: ~30 s per image on 2x L40
FEATINV_RECONSTRUCTIONS = 10_000  # spec §10.7-10.8: 10 ImageNet val images per class
FEATINV_STEPS = 50  # DDIM steps (spec §10.6; FeatInvSampling.steps)
FEATINV_L40_S_PER_IMAGE = 12 * 3600 / 10_000  # spec §10.8: ~12 h per 10k images on one L40
IMAGENET_TRAIN = 1_281_167
FEATINV_EPOCHS, FEATINV_BATCH = 3, 8  # spec §10.4
FEATINV_TRAIN_L40_HOURS = (45 * 2, 60 * 2)  # spec §10.4: 45-60 h on 2x L40 = GPU-hours
CPU_WORKER_VCPUS = 16  # cluster.yaml cpu_worker: m6i.4xlarge


@dataclass
class Timing:
    wall: float  # median seconds per call
    cpu: float  # process CPU seconds of that call
    calls: int  # timed calls
    items: int  # items per call
    warm: bool = True  # False: one call without warm-up (a slow step)

    @property
    def per_item(self) -> float:
        return self.wall / self.items


def measure(fn, repeats: int, items: int = 1, warmup: bool = True, min_total_s: float = 1.0,
            max_repeats: int = 15) -> Timing:
    """Median wall time (the lower middle one) of at least `repeats` calls of fn() after one untimed
    warm-up (`featinv_sampling.timed`: wall and process CPU seconds). Cheap calls are repeated until
    about `min_total_s` is spent (at most `max_repeats`), so a burst of other work on the machine
    moves the median less."""
    if warmup:
        fn()
    runs = [timed(fn, "cpu")]
    while len(runs) < repeats or (sum(r[0] for r in runs) < min_total_s and len(runs) < max_repeats):
        runs.append(timed(fn, "cpu"))
    repeats = len(runs)
    walls = [r[0] for r in runs]
    i = walls.index(statistics.median_low(walls))
    return Timing(walls[i], runs[i][1], repeats, items)


@dataclass
class Results:
    threads: int = 0
    ingest: Timing | None = None
    png_original: list[int] = field(default_factory=list)
    png_variant: list[int] = field(default_factory=list)
    manipulate: dict[str, tuple[Timing, Timing]] = field(default_factory=dict)  # name -> (row, op only)
    preprocess: dict[str, Timing] = field(default_factory=dict)
    extract: dict[str, Timing] = field(default_factory=dict)
    build: dict[str, float] = field(default_factory=dict)
    layers: dict[str, dict[str, tuple[int, int, int]]] = field(default_factory=dict)
    # (family, shape) -> (timing, parameter count)
    mapping: dict[tuple[str, tuple[int, int, int]], tuple[Timing, int]] = field(default_factory=dict)
    solve: dict[str, float] = field(default_factory=dict)
    featinv_size: str = ""
    featinv_step: tuple[float, float] | None = None  # (wall, CPU) seconds per DDIM step of a call
    featinv_fixed: tuple[float, float] | None = None  # per call: text, noise, scheduler
    featinv_decode: tuple[float, float] | None = None  # per call: VAE decode
    featinv_batch: int = 1
    featinv_build: float | None = None
    controlnet_params: int = 0
    featinv_train: Timing | None = None


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n < 1e12 else f"{n / 1e12:,.2f} TB"


def hms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# --- sections ------------------------------------------------------------------------------------

def source_photos() -> list[bytes]:
    """Real photographs (scikit-image's package data), 700 px on the long side, JPEG q90."""
    import skimage.data

    out = []
    for name in PHOTOS:
        img = Image.open(Path(skimage.data.__file__).parent / name).convert("RGB")
        scale = 700 / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run_ingest(res: Results, args) -> list[dict]:
    cfg = DatasetConfig(name="capacity", root="/capacity", image_size=288)
    items = [{"source_id": f"{i:016x}", "split": "train", "class_idx": 0, "class_name": "c", "path": f"p{i}.jpg"}
             for i in range(len(PHOTOS))]
    sources = source_photos()
    rows: list[dict] = []

    def call():
        rows[:] = [ingest.original_row(item, data, cfg) for item, data in zip(items, sources, strict=True)]

    res.ingest = measure(call, args.repeats, items=len(items))
    res.png_original = [len(r["image"]) for r in rows]
    return rows


def run_manipulate(res: Results, args, originals: list[dict]) -> None:
    manipulations = ManipulateConfig().manipulations() + direct.expand(EXTRA_OPS)
    pils = [Image.fromarray(imageio.decode_png_rgb(o["image"])) for o in originals]
    for m in manipulations:
        out: list[dict] = []

        def row_call(m=m, out=out):
            out[:] = [variant_row(o, m, 0) for o in originals]

        def op_call(m=m):
            for i, img in enumerate(pils):
                m.apply(img, np.random.default_rng(i) if m.random else None)

        res.manipulate[m.name] = (measure(row_call, args.repeats, len(originals)),
                                  measure(op_call, args.repeats, len(originals)))
        if m.name in PAPER_VARIANTS:
            res.png_variant += [len(r["image"]) for r in out]


def stored_batch(rows: list[dict], n: int) -> pa.Table:
    picked = [rows[i % len(rows)] for i in range(n)]
    return pa.table({"source_id": [f"{i:016x}" for i in range(n)], "variant": ["original"] * n,
                     "split": ["train"] * n, "class_idx": pa.array([0] * n, pa.int32()),
                     "image": pa.array([r["image"] for r in picked], pa.binary())})


def run_extract(res: Results, args, rows: list[dict]) -> None:
    batch = stored_batch(rows, args.extract_batch)
    pending = frozenset((s, "original") for s in batch["source_id"].to_pylist())
    for name in args.backbones:
        spec = backbones.get_spec(name)
        request = BackboneRequest(name=name, pretrained=False)
        layers = list(spec.default_layers)
        started = time.perf_counter()
        extractor = extract.FeatureExtractor(request, layers, "float16", use_gpu=False, torch_threads=res.threads)
        res.build[name] = time.perf_counter() - started
        pixels = extract.preprocess_batch(batch, spec.input_size, pending)
        res.preprocess[name] = measure(lambda: extract.preprocess_batch(batch, spec.input_size, pending),
                                       args.extract_repeats, args.extract_batch)
        out: list[pa.Table] = []

        def call(out=out, extractor=extractor, pixels=pixels):
            out[:] = [extractor(pixels)]

        res.extract[name] = measure(call, args.extract_repeats, args.extract_batch)
        failed = [r for r in out[0]["error_reason"].to_pylist() if r]
        if failed:
            raise RuntimeError(f"{name}: extraction failed: {failed[:3]}")
        res.layers[name] = {layer: tuple(out[0].schema.field(extract.feature_column(layer)).type.shape)
                            for layer in layers}
        del extractor
        print(f"  extract {name}: {hms(res.extract[name].per_item)} per image", flush=True)


def mapping_shapes() -> list[tuple[int, int, int]]:
    """The (C, H, W) of every (backbone, layer) target of the paper grid, in grid order."""
    from featmap_ray.mapping import grid

    cfg = load_config(ROOT / "conf" / "paper_study.yaml", [])
    shapes = []
    for backbone, layer, _ in grid.targets(cfg):
        spec = backbones.get_spec(backbone)
        shape = backbones.feature_shapes(spec, BackboneRequest(name=backbone, pretrained=False), [layer])[layer]
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def time_training_step(family: str, shape: tuple[int, int, int], args) -> tuple[Timing, int]:
    from featmap_ray.mapping.losses import build_loss
    from featmap_ray.mapping.models import build_model

    training = MappingTraining()
    torch.manual_seed(0)
    model = build_model(family, *shape).train()
    params = sum(p.numel() for p in model.parameters())
    optimiser = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    loss_fn = build_loss(PAPER_LOSS)
    data = {b: (torch.randn(b, *shape), torch.randn(b, *shape)) for b in (1, args.mapping_batch)}

    def step(b: int) -> None:
        x, y = data.setdefault(b, (torch.randn(b, *shape), torch.randn(b, *shape)))
        loss_fn(model(x), y).backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    probe, probe_cpu, _ = timed(lambda: step(1), "cpu")  # also the warm-up
    if probe > args.mapping_slow_s:
        return Timing(probe, probe_cpu, 1, 1, warm=False), params
    b = max(1, min(args.mapping_batch, int(args.mapping_step_s / probe)))
    return measure(lambda: step(b), args.repeats, b, warmup=b > 1), params


def time_closed_form(family: str, shape: tuple[int, int, int], args) -> tuple[Timing, int, float]:
    from featmap_ray.mapping.closed_form import SufficientStats
    from featmap_ray.mapping.models import build_model

    b = args.mapping_batch
    x, y = torch.randn(b, *shape), torch.randn(b, *shape)
    stats = SufficientStats(shape[0])
    timing = measure(lambda: stats.update(x, y), args.repeats, b)
    model = build_model(family, *shape)
    started = time.perf_counter()
    model.fit(stats)
    return timing, sum(p.numel() for p in model.parameters()), time.perf_counter() - started


def run_mapping(res: Results, args) -> None:
    from featmap_ray.mapping.models import MODELS

    shapes = mapping_shapes()
    for shape in shapes:
        for family in args.families:
            timing, params = time_training_step(family, shape, args)
            res.mapping[(family, shape)] = (timing, params)
            print(f"  mapping {family} {'x'.join(map(str, shape))}: {hms(timing.per_item)} per pair "
                  f"(batch {timing.items})", flush=True)
    shape = shapes[0] if (1024, 9, 9) not in shapes else (1024, 9, 9)
    for family in EXTRA_FAMILIES:
        if family not in MODELS:
            continue
        if MODELS[family].closed_form:
            timing, params, solve = time_closed_form(family, shape, args)
            res.solve[family] = solve
        else:
            timing, params = time_training_step(family, shape, args)
        res.mapping[(family, shape)] = (timing, params)


def build_featinv_model(size: str):
    from featmap_ray.featinv.loading import build_featinv, tiny_base_components

    torch.manual_seed(0)
    if size == "full":
        return build_featinv(minisd_shaped_base(), feature_channels=1024, encoder_hidden_channels=512), 1024
    return build_featinv(tiny_base_components(), feature_channels=16, encoder_hidden_channels=32), 16


def run_featinv(res: Results, args, fi_cache: dict) -> None:
    from featmap_ray.featinv.pipeline import seeded_generators

    started = time.perf_counter()
    fi, channels = build_featinv_model(args.featinv_size)
    res.featinv_build = time.perf_counter() - started
    fi_cache["model"] = (fi, channels)
    res.featinv_size, res.featinv_batch = args.featinv_size, args.featinv_batch
    res.controlnet_params = sum(p.numel() for p in fi.controlnet.parameters())
    b, k = args.featinv_batch, args.featinv_extra_steps
    features = torch.randn(b, channels, 9, 9, generator=torch.Generator().manual_seed(1))
    seeds = list(range(100, 100 + b))

    def sample_latents(steps: int) -> torch.Tensor:
        return fi(features, seeded_generators(seeds), num_inference_steps=steps, output_type="latent").images

    fi.set_progress_bar_config(disable=True)
    fi(features, seeded_generators(seeds), num_inference_steps=1)  # warm-up
    t1, c1, latents = timed(lambda: sample_latents(1), "cpu")
    tk, ck, _ = timed(lambda: sample_latents(1 + k), "cpu")
    res.featinv_step = (max(tk - t1, 0.0) / k, max(ck - c1, 0.0) / k)
    res.featinv_fixed = (max(t1 - res.featinv_step[0], 0.0), max(c1 - res.featinv_step[1], 0.0))
    res.featinv_decode = timed(lambda: fi.decode(latents), "cpu")[:2]
    print(f"  featinv ({args.featinv_size}): {hms(res.featinv_step[0])} per DDIM step at batch {b}", flush=True)


def featinv_per_image(res: Results, which: int = 0) -> float:
    """Seconds per reconstruction at the paper's step count (which: 0 wall, 1 CPU)."""
    per_call = FEATINV_STEPS * res.featinv_step[which] + res.featinv_fixed[which] + res.featinv_decode[which]
    return per_call / res.featinv_batch


def run_featinv_train(res: Results, args, fi_cache: dict) -> None:
    from diffusers import DDPMScheduler

    from featmap_ray.stages.featinv_train import diffusion_loss

    if "model" not in fi_cache:
        started = time.perf_counter()
        fi_cache["model"] = build_featinv_model(args.featinv_size)
        res.featinv_build = time.perf_counter() - started
        res.featinv_size = args.featinv_size
        res.controlnet_params = sum(p.numel() for p in fi_cache["model"][0].controlnet.parameters())
    fi, channels = fi_cache["model"]
    controlnet = fi.controlnet
    controlnet.requires_grad_(True).train()
    training = FeatInvTraining()
    optimiser = torch.optim.AdamW(controlnet.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    noise_scheduler = DDPMScheduler.from_config(fi.scheduler.config)
    with torch.no_grad():
        text = fi.encode_prompt([training.prompt, ""])
    b = args.featinv_train_batch
    pixels = torch.randint(0, 256, (b, 288, 288, 3), dtype=torch.uint8)
    features = torch.randn(b, channels, 9, 9)
    state = {"step": 0}

    def step():
        generator = torch.Generator().manual_seed(state["step"])
        state["step"] += 1
        loss = diffusion_loss(fi, controlnet, pixels, features, text, noise_scheduler,
                              training.conditioning_dropout, generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    res.featinv_train = measure(step, max(1, args.featinv_train_repeats), b)
    controlnet.requires_grad_(False).eval()
    print(f"  featinv training ({args.featinv_size}): {hms(res.featinv_train.per_item)} per sample at batch {b}",
          flush=True)


# --- the plan ------------------------------------------------------------------------------------

PAPER_VARIANTS = [m.name for m in ManipulateConfig().manipulations()]


def table(headers: list[str], rows: list[list[str]], align: str) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) if a == "l" else c.rjust(w)  # noqa: E731
                                  for c, w, a in zip(cells, widths, align, strict=True))
    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))


def print_units(res: Results) -> None:
    print("\n(a) Unit costs on this machine (wall clock, median; CPU = process CPU seconds of that call)")
    rows = []
    if res.ingest:
        t = res.ingest
        rows.append(["ingest", "decode JPEG + resize/crop 288 + PNG", "image", hms(t.per_item),
                     f"{t.cpu / t.items:.3f}",
                     f"{t.items} imgs x {t.calls}"])
    if res.manipulate:
        for label, names in (("paper 12", PAPER_VARIANTS), ("all 16", list(res.manipulate))):
            names = [n for n in names if n in res.manipulate]
            row = statistics.mean(res.manipulate[n][0].per_item for n in names)
            op = statistics.mean(res.manipulate[n][1].per_item for n in names)
            cpu = statistics.mean(res.manipulate[n][0].cpu / res.manipulate[n][0].items for n in names)
            rows.append([f"manipulate ({label})", f"PNG decode + op + PNG encode (op alone {hms(op)})", "variant",
                         hms(row), f"{cpu:.3f}", f"mean of {len(names)} ops; the op is {op / row:.0%} of it"])
    for name, t in res.extract.items():
        p = res.preprocess[name]
        spec = backbones.get_spec(name)
        rows.append([f"extract {name}", f"{spec.input_size}px, {'+'.join(res.layers[name])}; fwd+fp16+Arrow "
                     f"(+ {hms(p.per_item)} PNG decode/resize)", "image", hms(t.per_item), f"{t.cpu / t.items:.3f}",
                     f"batch {t.items}, build {res.build[name]:.1f} s"])
    for (family, shape), (t, params) in res.mapping.items():
        what = ("SufficientStats.update" if family in res.solve else "fwd + bwd + AdamW, paper loss")
        note = f"batch {t.items}" + ("" if t.warm else ", 1 step, no warm-up")
        if family != "linear" and ("linear", shape) in res.mapping and family not in res.solve:
            note += f", {t.per_item / res.mapping[('linear', shape)][0].per_item:.1f}x linear"
        if family in res.solve:
            note += f", solve {res.solve[family]:.2f} s/run"
        rows.append([f"mapping {family}", f"{'x'.join(map(str, shape))}, {params / 1e6:.2f} M params; {what}",
                     "pair", hms(t.per_item), f"{t.cpu / t.items:.3f}", note])
    if res.featinv_step is not None:
        size = "MiniSD-shaped, 256px" if res.featinv_size == "full" else "TINY test model (not for planning)"
        b = res.featinv_batch
        rows.append(["featinv sample", f"{size}; 1 DDIM step, cond+uncond in 1 fwd", "step x image",
                     hms(res.featinv_step[0] / b), f"{res.featinv_step[1] / b:.2f}", f"batch {b}, (t(1+k) - t(1))/k"])
        rows.append(["featinv sample", "fixed per call: text, noise, scheduler; VAE decode", "image",
                     hms((res.featinv_fixed[0] + res.featinv_decode[0]) / b),
                     f"{(res.featinv_fixed[1] + res.featinv_decode[1]) / b:.2f}",
                     f"decode {hms(res.featinv_decode[0] / b)}, build {res.featinv_build:.0f} s"])
        rows.append(["featinv sample", f"= one reconstruction at {FEATINV_STEPS} steps", "image",
                     hms(featinv_per_image(res)), f"{featinv_per_image(res, 1):.1f}", ""])
    if res.featinv_train is not None:
        t = res.featinv_train
        size = "MiniSD-shaped" if res.featinv_size == "full" else "TINY test model (not for planning)"
        rows.append(["featinv train", f"{size}; VAE enc + ControlNet/UNet fwd+bwd + AdamW "
                     f"({res.controlnet_params / 1e6:.0f} M params)", "sample", hms(t.per_item),
                     f"{t.cpu / t.items:.2f}",
                     f"batch {t.items}, median of {t.calls}"])
    table(["stage", "what is measured", "unit", "seconds", "CPU s", "notes"], rows, "lllrrl")

    print("\nStorage per item")
    rows = []
    if res.png_original:
        rows.append(["images: original, PNG 288x288 RGB", f"{statistics.mean(res.png_original):,.0f}",
                     f"min {min(res.png_original):,} max {max(res.png_original):,}, {len(res.png_original)} photos"])
    if res.png_variant:
        rows.append(["images: paper variant, PNG 288x288", f"{statistics.mean(res.png_variant):,.0f}",
                     f"min {min(res.png_variant):,} max {max(res.png_variant):,}, mean of 12 ops"])
    rows.append(["images: raw RGB 288x288 (upper bound)", f"{288 * 288 * 3:,}", "uncompressed"])
    for name, layers in res.layers.items():
        for layer, (c, h, w) in layers.items():
            rows.append([f"features/{name}/{layer}", f"{c * h * w * 2:,}", f"{c}x{h}x{w} float16 (+~110 B keys/row)"])
    table(["table row", "bytes", "notes"], rows, "lrl")


def grid_plan() -> tuple[list, dict]:
    from featmap_ray.mapping import grid

    cfg = load_config(ROOT / "conf" / "paper_study.yaml", [])
    tr = cfg.mapping.training
    runs = grid.expand(cfg)

    def train_pairs(run) -> int:
        n = (QWEN_TRAIN if run.group == "qwen" else TRAIN_IMAGES)[run.dataset]
        n = min(n, tr.max_train_pairs or n)
        return n - max(1, math.ceil(tr.val_fraction * n))

    return runs, {"train_pairs": train_pairs, "epochs": tr.max_epochs, "patience": tr.patience,
                  "groups": len(grid.fused_groups(runs))}


def print_plan(res: Results, args) -> None:
    images = sum(DATASETS.values())
    variants = images * (1 + len(PAPER_VARIANTS))
    full_featinv = res.featinv_step is not None and res.featinv_size == "full"
    speedup, why = args.gpu_speedup, "--gpu-speedup"
    if speedup is None:
        if full_featinv:
            speedup, why = featinv_per_image(res) / FEATINV_L40_S_PER_IMAGE, (
                f"this machine's FeatInv s/image / the paper's L40 figure ({FEATINV_L40_S_PER_IMAGE:.2f} s/image)")
        else:
            speedup, why = 50.0, "a round guess (no full-size FeatInv measurement to anchor it)"
    core_ratio = CPU_WORKER_VCPUS / res.threads

    print(f"\n(b) Scaled plan: Stanford Cars {DATASETS['STANFORD_CARS']:,} + CUB {DATASETS['CUB_200_2011']:,} = "
          f"{images:,} images; x (original + {len(PAPER_VARIANTS)} manipulations) = {variants:,} image variants")
    print(f"    node-h: hours of this {res.threads}-core machine from the measured wall clock; 'idle est.' from the "
          f"process CPU seconds / {res.threads} threads (what an idle machine would take if every core were busy)")
    print(f"    ingest and manipulate are single-threaded (PIL): node-h = wall / {res.threads} (one task per core)")
    print(f"    cpu_worker node-h: node-h / {core_ratio:.0f} (m6i.4xlarge, {CPU_WORKER_VCPUS} vCPU; assumes linear "
          "scaling per core, NOT measured)")
    print(f"    GPU node-h: node-h / S, S = {speedup:.0f} = {why}. ASSUMED, NOT MEASURED HERE (no GPU was lent).")
    rows: list[list[str]] = []

    def add(stage, worker, label, n, unit, storage="", paper="", gpu=True):
        """unit: (wall, CPU) seconds per unit of work, or None when not measured."""
        if unit is None:
            rows.append([stage, worker, label, "not measured", "", "", "", storage, paper])
            return
        # gpu=False stages are single-threaded (PIL): a node runs one such task per core.
        hours, idle = n * unit[0] / (1 if gpu else res.threads) / 3600, n * unit[1] / res.threads / 3600
        other = f"{hours / core_ratio:,.1f} cpu_worker" if not gpu else f"{hours / speedup:,.1f}"
        rows.append([stage, worker, label, hms(unit[0]), f"{hours:,.1f}", f"{idle:,.1f}", other, storage, paper])

    def per(t: Timing) -> tuple[float, float]:
        return t.per_item, t.cpu / t.items

    png = None
    if res.png_original and res.png_variant:
        png = images * (statistics.mean(res.png_original) + len(PAPER_VARIANTS) * statistics.mean(res.png_variant))
    add("ingest", "cpu_worker", f"{images:,} images", images, per(res.ingest) if res.ingest else None,
        gb(images * statistics.mean(res.png_original)) if res.png_original else "", gpu=False)
    man = None
    if res.manipulate:
        man = tuple(statistics.mean(per(res.manipulate[n][0])[i] for n in PAPER_VARIANTS) for i in (0, 1))
    n_man = images * len(PAPER_VARIANTS)
    add("manipulate (12 direct)", "cpu_worker", f"{n_man:,} variants", n_man, man,
        gb(png - images * statistics.mean(res.png_original)) if png else "", gpu=False)
    add("edit (Qwen, semantic)", "gpu_worker*", f"{QWEN_EDITS:,} edits", QWEN_EDITS, None, "",
        f"{QWEN_EDITS * QWEN_S_PER_IMAGE_2xL40 / 3600:,.0f} h on 2x L40 (30 s/img)")
    total_feat = 0
    for name in res.extract:
        unit = tuple(a + b for a, b in zip(per(res.extract[name]), per(res.preprocess[name]), strict=True))
        nbytes = variants * sum(c * h * w * 2 for c, h, w in res.layers[name].values())
        total_feat += nbytes
        add(f"extract {name}", "gpu_worker", f"{variants:,} variants", variants, unit, gb(nbytes))

    if res.mapping:
        runs, g = grid_plan()
        by_family: dict[str, list] = {}
        shapes = {}
        for name in sorted({r.backbone for r in runs}):
            layers = sorted({r.layer for r in runs if r.backbone == name})
            shapes.update({(name, k): v for k, v in backbones.feature_shapes(
                backbones.get_spec(name), BackboneRequest(name=name, pretrained=False), layers).items()})
        for r in runs:
            by_family.setdefault(r.model, []).append(r)
        for family, fruns in by_family.items():
            pair_epochs = sum(g["train_pairs"](r) for r in fruns) * g["epochs"]
            wall = cpu = 0.0
            ckpt, missing = 0, False
            for r in fruns:
                key = (family, shapes[(r.backbone, r.layer)])
                if key not in res.mapping:
                    missing = True
                    continue
                t, params = res.mapping[key]
                wall += t.per_item * g["train_pairs"](r) * g["epochs"]
                cpu += t.cpu / t.items * g["train_pairs"](r) * g["epochs"]
                ckpt += params * 4
            add(f"mapping {family}", "gpu_worker", f"{len(fruns)} runs, {pair_epochs / 1e6:,.1f} M pair-epochs",
                pair_epochs, None if missing else (wall / pair_epochs, cpu / pair_epochs),
                "" if missing else gb(ckpt) + " weights")
        pairs = sum(g["train_pairs"](r) for r in runs)
        print(f"    mapping grid: conf/paper_study.yaml -> grid.expand = {len(runs)} runs "
              f"({', '.join(f'{f} {len(v)}' for f, v in by_family.items())}) in {g['groups']} fused groups; "
              f"{pairs / len(runs):,.0f} training pairs per run on average (min(train images, max_train_pairs) "
              f"minus {MappingTraining().val_fraction:.0%} validation), {g['epochs']} epochs = max_epochs (upper "
              f"bound: early stopping, patience {g['patience']}, usually ends sooner; hours scale linearly); "
              "s/unit = per pair-epoch, mean over the family's runs")
    implied = []
    if res.featinv_step is not None:
        label = "featinv reconstruct" + ("" if full_featinv else " (TINY model!)")
        unit = (featinv_per_image(res), featinv_per_image(res, 1))
        add(label, "gpu_worker", f"{FEATINV_RECONSTRUCTIONS:,} images x {FEATINV_STEPS} steps", FEATINV_RECONSTRUCTIONS,
            unit, "", f"{FEATINV_RECONSTRUCTIONS * FEATINV_L40_S_PER_IMAGE / 3600:.0f} h on 1x L40")
        if full_featinv:
            implied.append(f"FeatInv sampling {unit[0] / FEATINV_L40_S_PER_IMAGE:.0f}x")
    if res.featinv_train is not None:
        steps = IMAGENET_TRAIN // FEATINV_BATCH * FEATINV_EPOCHS
        samples = steps * FEATINV_BATCH
        cond = per(res.extract["convnext_base"]) if "convnext_base" in res.extract else (0.0, 0.0)
        label = "featinv train" + ("" if res.featinv_size == "full" else " (TINY model!)")
        unit = tuple(a + b for a, b in zip(per(res.featinv_train), cond, strict=True))
        add(label, "gpu_worker", f"{steps:,} steps x {FEATINV_BATCH}", samples, unit,
            gb(res.controlnet_params * 4 * 3) + " ckpt+Adam",
            f"{FEATINV_TRAIN_L40_HOURS[0]}-{FEATINV_TRAIN_L40_HOURS[1]} GPU-h (2x L40, 45-60 h)")
        if res.featinv_size == "full":
            low, high = (samples * unit[0] / 3600 / h for h in FEATINV_TRAIN_L40_HOURS[::-1])
            implied.append(f"FeatInv training {low:.0f}-{high:.0f}x (batch {res.featinv_train.items} here, 8 there)")
    table(["stage", "worker type", "workload", "s/unit", "node-h", "idle est.", "cpu_worker / GPU node-h (assumed)",
           "storage", "paper's own GPU figure"], rows, "lllrrrrrl")
    if implied:
        print(f"    this machine / the paper's L40, implied per stage: {'; '.join(implied)} "
              "(one S does not fit all stages)")
    if png:
        print(f"    storage: images table {gb(png)} (PNG, {variants:,} rows), features tables {gb(total_feat)} "
              f"({len(res.extract)} backbones, default layers, float16, {variants:,} rows each) = "
              f"{total_feat / png:.0f}x the images")
    print("    * edit needs ~57 GB of GPU memory (bf16 Qwen-Image-Edit, spec §3): more than cluster.yaml's gpu_worker "
          "(g5.xlarge, 24 GB A10G) holds; not measured here.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    parser.add_argument("--backbones", default=",".join(backbones.REGISTRY), help="registered backbones to extract")
    parser.add_argument("--extract-batch", type=int, default=8)
    parser.add_argument("--extract-repeats", type=int, default=2, help="timed batches per backbone (median)")
    parser.add_argument("--families", default="linear,mlp,cnn,transformer",
                        help="families timed at every grid shape (others: 1024x9x9 only)")
    parser.add_argument("--mapping-batch", type=int, default=8, help="largest batch for a mapping step")
    parser.add_argument("--mapping-step-s", type=float, default=0.5, help="aim for steps of about this long")
    parser.add_argument("--mapping-slow-s", type=float, default=2.0,
                        help="a step slower than this at batch 1 is timed once, without warm-up")
    parser.add_argument("--featinv-size", choices=["full", "tiny"], default="full")
    parser.add_argument("--featinv-batch", type=int, default=1)
    parser.add_argument("--featinv-extra-steps", type=int, default=3, help="k: sampling timed at 1 and 1+k steps")
    parser.add_argument("--featinv-train-batch", type=int, default=1)
    parser.add_argument("--featinv-train-repeats", type=int, default=1)
    parser.add_argument("--gpu-speedup", type=float, default=None,
                        help="assumed GPU-node / this-machine speed ratio "
                             "(default: anchored on the paper's FeatInv figure)")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    args.backbones = [b for b in args.backbones.split(",") if b]
    args.families = [f for f in args.families.split(",") if f]
    torch.set_num_threads(args.threads)
    res = Results(threads=args.threads)
    started = time.perf_counter()
    print(f"capacity plan on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {args.threads} threads, float32, random weights; load average "
          f"{open('/proc/loadavg').read().split()[0]} at start", flush=True)
    if float(open("/proc/loadavg").read().split()[0]) > os.cpu_count():
        print("  WARNING: the load average exceeds the core count: other work shares the CPU, wall-clock numbers "
              "are inflated (see the 'idle est.' column)", flush=True)

    # ingest gives the stored originals every later image section uses
    originals = run_ingest(res, args)
    if "manipulate" in sections:
        run_manipulate(res, args, originals)
    if "extract" in sections:
        run_extract(res, args, originals)
    if "mapping" in sections:
        run_mapping(res, args)
    fi_cache: dict = {}
    if "featinv" in sections:
        run_featinv(res, args, fi_cache)
    if "featinv-train" in sections:
        run_featinv_train(res, args, fi_cache)
    if "ingest" not in sections:
        res.ingest, res.png_original = None, []
    if "manipulate" not in sections:
        res.manipulate, res.png_variant = {}, []

    print_units(res)
    print_plan(res, args)
    print(f"\nmeasured in {time.perf_counter() - started:.0f} s; load average "
          f"{open('/proc/loadavg').read().split()[0]} at the end (other work on the machine slows every number)")


if __name__ == "__main__":
    main()
