"""Mapping runs: Ray Train against a bare PyTorch loop, and a grid with and without concurrency.

    .venv/bin/python benchmarks/mapping_throughput.py --pairs 512 --epochs 5 --grid-runs 24

Writes feature tables with a known affine ground truth (1024x9x9 float16, the ConvNeXt-B stage3
shape) in a temporary storage root, then measures in one run:
  ours      one `linear` mapping run through `fit_run` (TorchTrainer, 1 worker, pairs read from
            Lance through Ray Data): training samples per second over the epochs, from the
            per-epoch times the run records (validation excluded), and end to end (worker start,
            data setup and publishing included);
  bare      the same pairs loaded into memory up front (not timed), the same model, loss,
            optimiser, batch and accumulation in a plain loop;
  grid      wall time of a study of `--grid-runs` small runs with the default concurrency and
            with `max_concurrent=1`.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from featmap_ray import runtime
from featmap_ray.config import Config
from featmap_ray.mapping import fit, synthetic
from featmap_ray.mapping.losses import build_loss
from featmap_ray.mapping.models import build_model
from featmap_ray.mapping.grid import RunSpec
from featmap_ray.mapping.train import fit_run

LOSS = {"mse": 0.3, "median_cos": 0.7}


def config(storage: str, epochs: int, **mapping) -> Config:
    return Config.model_validate({
        "storage": storage, "dataset": {"name": "t", "root": storage},
        "mapping": {"study": "bench", "targets": [{"backbone": "convnext_base", "layers": ["stage3"], "normalise": False}],
                    "losses": {"paper": LOSS},
                    "training": {"max_epochs": epochs, "patience": epochs, "val_fraction": 0.05, "max_train_pairs": None},
                    # the worker gets every core, like the bare loop (Ray sets its torch threads to its CPUs)
                    "resources": {"cpus_per_worker": os.cpu_count(), **mapping.pop("resources", {})},
                    **mapping},
    })


def bare_loop(x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, accumulate: int) -> float:
    model = build_model("linear", *x.shape[1:])
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    loss_fn = build_loss(LOSS)
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for step, i in enumerate(range(0, len(x), batch), 1):
            idx = order[i:i + batch]
            loss = loss_fn(model(x[idx].float()), y[idx].float())
            (loss / accumulate).backward()
            if step % accumulate == 0:
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
    return epochs * len(x) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512, help="training pairs (95%% train, 5%% validation)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--grid-runs", type=int, default=24, help="runs in the grid comparison (0: skip)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as storage:
        shape = (1024, 9, 9)
        synthetic.write_tables(storage, n_train=args.pairs, n_test=8, shape=shape, dtype="float16",
                               manipulations={"hue_shift_60": synthetic.affine_manipulation(shape[0])})
        cfg = config(storage, args.epochs)
        runtime.init_ray(cfg)
        spec = RunSpec("t", "bench", "convnext_base", "stage3", "hue_shift_60", "linear", "paper", LOSS, False, False)
        started = time.perf_counter()
        result = fit_run(cfg, spec)
        end_to_end = time.perf_counter() - started
        import json
        from pathlib import Path

        info = json.loads(Path(result["dir"], "run.json").read_text())
        n_train = info["train_pairs"]
        # Per-epoch time minus validation is not recorded separately; epoch_seconds includes the
        # (5 %) validation pass, which makes ours slightly pessimistic.
        epoch_seconds = sum(h["epoch_seconds"] for h in info["history"])
        ours = args.epochs * n_train / epoch_seconds
        ours_e2e = args.epochs * n_train / end_to_end

        x, y = synthetic.read_pairs(storage, "hue_shift_60", split="train")
        torch.manual_seed(0)
        bare = bare_loop(x[:n_train], y[:n_train], args.epochs, cfg.mapping.training.batch_size,
                         cfg.mapping.training.accumulate)

        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
              f"{torch.get_num_threads()}")
        print(f"linear map 1024x9x9, {n_train} training pairs, {args.epochs} epochs, batch 32 x 2")
        print(f"  bare PyTorch loop (in memory)   {bare:8.1f} samples/s")
        print(f"  Ray Train run, per epoch        {ours:8.1f} samples/s   ratio {ours / bare:.2f}")
        print(f"  Ray Train run, end to end       {ours_e2e:8.1f} samples/s   ratio {ours_e2e / bare:.2f} "
              f"({end_to_end:.1f} s incl. worker start-up)")

        if args.grid_runs:
            manipulations = [f"m{i}" for i in range(args.grid_runs)]
            small = (64, 4, 4)
            synthetic.write_tables(storage + "/grid", n_train=64, n_test=4, shape=small,
                                   manipulations={m: synthetic.affine_manipulation(small[0], seed=i)
                                                  for i, m in enumerate(manipulations)})
            times = {}
            for label, limit in (("concurrent (default)", None), ("sequential", 1)):
                gcfg = config(storage + "/grid", 3, study=f"grid{limit}",
                              datasets={"t": {"g": {"manipulations": manipulations, "models": ["linear"]}}},
                              resources={"max_concurrent": limit, "cpus_per_worker": 1})
                started = time.perf_counter()
                summary = fit.run_study(gcfg)
                times[label] = time.perf_counter() - started
                assert not summary.failed, summary.failed
                print(f"  grid of {args.grid_runs} runs, {label:22s} {times[label]:7.1f} s "
                      f"(max_concurrent={grid.max_concurrent(gcfg)})")
            print(f"  grid speed-up with concurrency  {times['sequential'] / times['concurrent (default)']:.2f}x")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
