"""Semantic-edit throughput: the `edit` Ray Data job against a bare loop of pipeline calls on the same images.

    .venv/bin/python benchmarks/edit_throughput.py                        # tiny pipeline, CPU, ~2 minutes
    .venv/bin/python benchmarks/edit_throughput.py --working-pixels 16384 --actors 1 --num-gpus 1   # on a GPU

Measured in one run: `--images` originals (the demo's photographs, resized by ingest) are each edited
with one prompt, once by a bare loop (the pipeline loaded once, then one `pipe(...)` call per image with
the same settings, seeds and working size) and once by `edit_stage.run` (Ray Data: task list, actor
pool of `--actors` pipelines, PNG encoding, Lance commits every `--rows-per-commit` edits). Both times
include loading the pipeline; Ray itself is started before either clock. Prints edits/s of both and their
ratio (target >= 0.9). The tiny random QwenImageEditPlusPipeline takes a fraction of a second per edit,
so the job's fixed costs (actor start, first commit) weigh far more here than for the real model's ~18 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

PROMPT = "Add a light layer of snow on every surface, keeping everything else the same."


def _config(storage: str, args):
    from featmap_ray.config import Config

    return Config.model_validate({
        "storage": storage, "dataset": {"name": "bench", "root": "builtin:skimage"},
        "edit": {"model": "tiny", "dtype": args.dtype, "working_pixels": args.working_pixels, "steps": args.steps,
                 "images_per_class": {"train": 1000, "test": 1000}, "num_actors": args.actors,
                 "num_gpus": args.num_gpus, "rows_per_commit": args.rows_per_commit,
                 "prompts": {"bench": [{"name": "Add_snow", "prompt": PROMPT}]}},
    })


def bare_loop(cfg, edits: list[tuple[str, bytes, str]]) -> float:
    """The pipeline loaded once, then one call per image: what a hand-written script does."""
    from PIL import Image

    from featmap_ray.io import imageio
    from featmap_ray.manipulations import semantic
    from featmap_ray.seeding import derive_seed

    edit = cfg.edit
    device = "cuda" if edit.num_gpus > 0 else "cpu"
    t0 = time.perf_counter()
    pipe = semantic.load_pipeline(edit, device)
    for source_id, png, variant in edits:
        generator = torch.Generator("cpu").manual_seed(derive_seed(edit.seed, source_id, variant))
        with torch.inference_mode(), semantic.working_area(pipe, edit.working_pixels):
            pipe(image=Image.fromarray(imageio.decode_png_rgb(png)), prompt=PROMPT, negative_prompt=" ",
                 true_cfg_scale=edit.true_cfg_scale, num_inference_steps=edit.steps, generator=generator).images[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="originals edited (each with one prompt)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (the reference's 10)")
    parser.add_argument("--working-pixels", type=int, default=4096, help="the pipeline's working area")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--num-gpus", type=float, default=0.0, help="per actor; the bare loop uses cuda when > 0")
    parser.add_argument("--rows-per-commit", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import lance
    import ray

    from featmap_ray.io import tables
    from featmap_ray.stages import edit as edit_stage
    from featmap_ray.stages import ingest, runtime

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(tmp, args)
        runtime.init_ray(cfg)
        ingest.run(cfg)
        st = tables.Store(cfg.storage)
        table = lance.dataset(st.layout.images).to_table(columns=["source_id", "image"],
                                                      filter=f"variant = '{tables.ORIGINAL}'")
        originals = sorted(zip(table["source_id"].to_pylist(), table["image"].to_pylist(), strict=True))
        # More edits than originals: each original under several ids (a planned edit per repeat).
        repeats = -(-args.images // len(originals))
        cfg = cfg.model_copy(update={"edit": cfg.edit.model_copy(update={"repeats": repeats})})
        n = len(originals) * repeats

        loop_s = bare_loop(cfg, [(sid, png, cfg.edit.variant("Add_snow", k)) for sid, png in originals
                                 for k in range(repeats)])
        t0 = time.perf_counter()
        summary = edit_stage.run(cfg)
        job_s = time.perf_counter() - t0
        assert summary.failed == 0 and sum(summary.written.values()) == n, summary
        ray.shutdown()

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"tiny QwenImageEditPlusPipeline {args.dtype}, {args.steps} steps, working area {args.working_pixels} px, "
          f"true_cfg_scale 4.5, {args.actors} actor(s), num_gpus {args.num_gpus}")
    print(f"{n} edits   bare loop {loop_s:7.1f} s  {n / loop_s:6.2f} edits/s")
    print(f"{n} edits   edit job  {job_s:7.1f} s  {n / job_s:6.2f} edits/s   (Ray Data actor pool, Lance commits "
          f"every {args.rows_per_commit})")
    print(f"ratio job / bare loop: {loop_s / job_s:.2f}")


if __name__ == "__main__":
    main()
