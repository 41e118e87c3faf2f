"""Throughput of the extract stage against a bare forward loop over the same images and model.

    .venv/bin/python benchmarks/extract_throughput.py --images 64
    .venv/bin/python benchmarks/extract_throughput.py --device cuda --images 1024 --batch-size 64 \
        --compute-dtype bfloat16 --channels-last

Builds an images table of N demo photos (scikit-image originals plus rotations) in a temporary
storage root, then measures in one run:
  ours          `featmap_ray.stages.extract.run` wall clock: decode, preprocess, forward, Lance write,
                actor start and model build included, Ray start-up excluded;
  bare          the same images decoded into memory up front (not timed) and the same model in a
                plain `torch.inference_mode()` loop, forward only, after one warm-up batch;
  unbatched     the bare loop at batch size 1.
ConvNeXt-B (random weights) at 288, float16 storage, float32 compute (--compute-dtype bfloat16 and
--channels-last: autocast and NHWC, in the job and the bare loop alike). Also prints the bytes each
stored feature map takes on disk against its float32 size C*H*W*4.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import lance
import torch

from featmap_ray import backbones
from featmap_ray.config import BackboneRequest, load_config
from featmap_ray.io import tables
from featmap_ray.stages import extract, ingest, manipulate, runtime

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "demo.yaml"
ALL_STAGES = ["stage0", "stage1", "stage2", "stage3"]


def config(storage: str, layers: list[str], batch_size: int, device: str, rotations: list[int],
           model_kwargs: dict | None = None, compute: str = "float32", channels_last: bool = False):
    """model_kwargs: timm's, for a smaller ConvNeXt (the GPU check's dry run); None is ConvNeXt-B."""
    backbone = json.dumps([{"name": "convnext_base", "layers": layers, "pretrained": False,
                            "model_kwargs": model_kwargs or {}}])
    return load_config(CONFIG, [
        f"storage={storage}", "dataset.images_per_class=null", f"manipulate.ops={{rotation: {rotations}}}",
        f"extract.backbones={backbone}", f"extract.batch_size={batch_size}", "extract.dtype=float16",
        f"extract.num_gpus={1 if device == 'cuda' else 0}", f"extract.compute_dtype={compute}",
        f"extract.channels_last={str(channels_last).lower()}",
    ])


def build_images(storage: str, n: int, batch_size: int, device: str) -> None:
    """Ingest the demo photos, add as many rotations as needed, keep the first n rows."""
    cfg = config(storage, ALL_STAGES, batch_size, device, [])
    runtime.init_ray(cfg)
    originals = ingest.run(cfg).written[tables.Store(storage).layout.images]
    rotations = [10 * (i + 1) for i in range(math.ceil(n / originals) - 1)]
    if rotations:
        manipulate.run(config(storage, ALL_STAGES, batch_size, device, rotations))
    st = tables.Store(storage)
    table = st.open(st.layout.images).to_table().sort_by([("source_id", "ascending"), ("variant", "ascending")])
    if table.num_rows < n:
        raise SystemExit(f"only {table.num_rows} images could be built, {n} asked for")
    lance.write_dataset(table.slice(0, n), st.layout.images, mode="overwrite")


def time_ours(storage: str, layers: list[str], batch_size: int, device: str, n: int,
              model_kwargs: dict | None = None, compute: str = "float32", channels_last: bool = False) -> float:
    shutil.rmtree(Path(storage, "features"), ignore_errors=True)  # every key pending
    cfg = config(storage, layers, batch_size, device, [], model_kwargs, compute, channels_last)
    start = time.perf_counter()
    [summary] = extract.run(cfg)
    seconds = time.perf_counter() - start
    if summary.failed or any(written != n for written in summary.written.values()):
        raise SystemExit(f"extract did not store every image:\n{summary}")
    return seconds


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_bare(model, spec, layers: list[str], x: torch.Tensor, batch_size: int, device: str,
              autocast: torch.dtype | None = None) -> float:
    """Forward passes only, after one untimed warm-up batch; `autocast`: compute in that dtype (torch.autocast)."""
    with torch.inference_mode(), torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        backbones.forward_taps(model, spec, layers, x[:batch_size])  # warm-up, not timed
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            backbones.forward_taps(model, spec, layers, x[i:i + batch_size])
        sync(device)
    return time.perf_counter() - start


def measure(storage: str, n: int, layers: list[str], bs: int, device: str, *, all_layers: bool = True,
            model_kwargs: dict | None = None, compute: str = "float32", channels_last: bool = False):
    """On the images `build_images` made: [(label, seconds)] of the job (`layers`, then, with all_layers, the four
    stages) and of the bare loop (batched, then batch size 1), both computing in `compute` (autocast unless
    float32) with channels-last model and inputs if asked; the driver's model build seconds; the feature shapes
    of the four stages."""
    spec = backbones.get_spec("convnext_base")
    request = BackboneRequest(name=spec.name, pretrained=False, model_kwargs=model_kwargs or {})
    shapes = backbones.feature_shapes(spec, request, ALL_STAGES)  # also imports timm, outside the timings

    job = dict(model_kwargs=model_kwargs, compute=compute, channels_last=channels_last)
    rows = [(f"ours ({','.join(layers)})", time_ours(storage, layers, bs, device, n, **job))]
    if all_layers:
        rows.append(("ours (4 layers)", time_ours(storage, ALL_STAGES, bs, device, n, **job)))

    st = tables.Store(storage)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    start = time.perf_counter()
    model = backbones.build_model(spec, request, device).to(memory_format=memory_format)
    build_seconds = time.perf_counter() - start
    images = st.open(st.layout.images).to_table(columns=[*extract.LABELS, "image"])
    keys = frozenset(zip(images["source_id"].to_pylist(), images["variant"].to_pylist()))
    pixels = torch.tensor(tables.tensor_numpy(extract.preprocess_batch(images, spec.input_size, keys)["pixels"]))
    x = backbones.normalise(pixels.to(device), spec).contiguous(memory_format=memory_format)
    autocast = None if compute == "float32" else getattr(torch, compute)
    rows += [(f"bare batched (bs {bs})", time_bare(model, spec, layers, x, bs, device, autocast)),
             ("bare unbatched (bs 1)", time_bare(model, spec, layers, x, 1, device, autocast))]
    return rows, build_seconds, shapes


def dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--layers", default="stage3", help="comma-separated ConvNeXt-B stages")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the forward's precision, job and bare loop (autocast unless float32)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC model and inputs, job and bare loop")
    args = parser.parse_args()
    layers, n, bs, device = args.layers.split(","), args.images, args.batch_size, args.device

    torch.set_num_threads(os.cpu_count() or 1)  # what the extract actor does on CPU
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {device} ({name})\n")

    with tempfile.TemporaryDirectory(prefix="featmap_bench_") as storage:
        build_images(storage, n, bs, device)  # starts Ray: not timed
        rows, build_seconds, shapes = measure(storage, n, layers, bs, device, compute=args.compute_dtype,
                                              channels_last=args.channels_last)
        spec = backbones.get_spec("convnext_base")
        bare_rate = n / dict(rows)[f"bare batched (bs {bs})"]
        print(f"ConvNeXt-B @ {spec.input_size}, layers {','.join(layers)}, batch size {bs}, {args.compute_dtype} "
              f"compute{', channels-last' if args.channels_last else ''}, float16 storage; "
              f"model build {build_seconds:.2f} s (timed once in the driver)\n")
        print("| run | images | seconds | images/s | ratio to bare batched |")
        print("|---|---:|---:|---:|---:|")
        for label, seconds in rows:
            print(f"| {label} | {n} | {seconds:.2f} | {n / seconds:.2f} | {n / seconds / bare_rate:.2f} |")

        # The 4-layer run's tables are the ones on disk now.
        st = tables.Store(storage)
        print("\n| layer | C×H×W | float32 bytes | stored bytes/row | ratio (target ≤ 0.5) |")
        print("|---|---|---:|---:|---:|")
        for layer, (c, h, w) in shapes.items():
            uri = st.layout.features(spec.name, layer)
            stored = dir_bytes(uri) / st.count(uri)
            print(f"| {layer} | {c}×{h}×{w} | {c * h * w * 4} | {stored:.0f} | {stored / (c * h * w * 4):.4f} |")


if __name__ == "__main__":
    main()
