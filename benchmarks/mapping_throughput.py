"""Mapping runs: one Ray Train run against a bare PyTorch loop, and a grid fused against one run per trial.

    .venv/bin/python benchmarks/mapping_throughput.py                 # --pairs 512 --epochs 5 --grid-pairs 32
    .venv/bin/python benchmarks/mapping_throughput.py --grid-runs 0   # the single run only

Writes feature tables with a known affine ground truth (1024x9x9 float16, the ConvNeXt-B stage3
shape) in a temporary storage root, then measures in one run:
  bare      the training pairs held in memory (loaded before timing), a `linear` map, the paper
            loss, AdamW, batch 32 x accumulation 2, a shuffled order per epoch: a plain loop;
  ours      the same run through `train.fit_group` (a TorchTrainer worker with every core, the pairs
            read from Lance by offset, per-epoch validation, checkpoints, MLflow logging,
            publishing): per epoch (the training passes, from the epoch times the run records) and
            end to end (planning, MLflow run, Train controller and worker start-up, all epochs,
            publishing; the MLflow database exists already, as in any study after `featmap pipeline`);
  grid      a study of 3 manipulations x 8 model families (24 runs, `--grid-pairs` training pairs,
            `--grid-epochs` epochs each) with `featmap fit`'s defaults: fused (one Ray Train run per
            manipulation, 3 in all) against `mapping.resources.models_per_group=1` (one Tune trial and
            Ray Train run per model, 24 in all). Both schedule as many groups at once as the machine holds.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from featmap_ray.config import Config
from featmap_ray.io import tracking
from featmap_ray.mapping import artefacts
from featmap_ray.mapping.losses import build_loss
from featmap_ray.mapping.models import build_model
from featmap_ray.stages import fit, runtime, synthetic
from featmap_ray.stages import mapping_train as train

LOSS = {"mse": 0.3, "median_cos": 0.7}
FAMILIES = ["linear", "additive", "local_nonshared_linear", "mlp", "cnn", "transformer", "ridge",
            "orthogonal_procrustes"]


def config(storage: str, epochs: int, study: str, **mapping) -> Config:
    return Config.model_validate({
        "storage": storage, "dataset": {"name": "t", "root": storage},
        "mapping": {"study": study, "targets": [{"backbone": "convnext_base", "layers": ["stage3"], "normalise": False}],
                    "losses": {"paper": LOSS},
                    "training": {"max_epochs": epochs, "patience": epochs, "val_fraction": 0.05, "max_train_pairs": None},
                    **mapping},
    })


def bare_loop(x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, accumulate: int) -> float:
    """Training samples per second of the plain loop."""
    model = build_model("linear", *x.shape[1:])
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    loss_fn = build_loss(LOSS)
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        step = 0
        for step, i in enumerate(range(0, len(x), batch), 1):
            idx = order[i:i + batch]
            loss = loss_fn(model(x[idx].float()), y[idx].float())
            (loss / accumulate).backward()
            if step % accumulate == 0:
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
        if step % accumulate:
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
    return epochs * len(x) / (time.perf_counter() - started)


def single_run(storage: str, pairs: int, epochs: int) -> None:
    shape = (1024, 9, 9)
    synthetic.write_tables(storage, n_train=pairs, n_test=8, shape=shape, dtype="float16",
                           manipulations={"hue_shift_60": synthetic.affine_manipulation(shape[0])})
    # The worker gets every core, like the bare loop (Ray sets a worker's torch threads to its CPUs).
    cfg = config(storage, epochs, "bench", datasets={"t": {"g": {"manipulations": ["hue_shift_60"], "models": ["linear"]}}},
                 resources={"cpus_per_worker": os.cpu_count()})
    runtime.init_ray(cfg)
    tracking.experiment_id(cfg)  # the database of an existing study; its creation is not a run's cost
    [spec] = fit.validate_study(cfg)

    started = time.perf_counter()
    plan = train.plan_group(cfg, [spec])
    result = train.fit_group(cfg, plan)
    end_to_end = time.perf_counter() - started
    assert not result.failed, result.failed
    info = artefacts.read_info(plan.runs[0].out_dir)
    n_train = info["train_pairs"]
    ours = epochs * n_train / sum(h["epoch_seconds"] for h in info["history"])
    ours_e2e = epochs * n_train / end_to_end

    x, y = plan.train.read(np.arange(n_train))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(0)
    bare = bare_loop(x, y, epochs, cfg.mapping.training.batch_size, cfg.mapping.training.accumulate)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}")
    print(f"linear map 1024x9x9 float16, {n_train} training pairs, {epochs} epochs, batch 32 x 2")
    print(f"  bare PyTorch loop (in memory)   {bare:8.1f} samples/s")
    print(f"  Ray Train run, per epoch        {ours:8.1f} samples/s   ratio {ours / bare:.2f}")
    print(f"  Ray Train run, end to end       {ours_e2e:8.1f} samples/s   ratio {ours_e2e / bare:.2f} "
          f"({end_to_end:.1f} s for {epochs * n_train / bare:.1f} s of bare training)")


def grid(storage: str, runs: int, pairs: int, epochs: int) -> None:
    shape = (1024, 9, 9)
    manipulations = [f"m{i}" for i in range(max(1, runs // len(FAMILIES)))]
    synthetic.write_tables(storage, n_train=pairs, n_test=4, shape=shape, dtype="float16",
                           manipulations={m: synthetic.affine_manipulation(shape[0], seed=i)
                                          for i, m in enumerate(manipulations)})
    times = {}
    for label, per_group in (("fused", None), ("one run per trial", 1)):
        cfg = config(storage, epochs, f"grid-{per_group or 'fused'}",
                     datasets={"t": {"g": {"manipulations": manipulations, "models": FAMILIES}}},
                     training={"max_epochs": epochs, "patience": epochs, "max_train_pairs": None, "val_fraction": 0.1},
                     resources={"models_per_group": per_group})
        runtime.init_ray(cfg)
        tracking.experiment_id(cfg)
        started = time.perf_counter()
        summary = fit.run_study(cfg)
        times[label] = time.perf_counter() - started
        assert not summary.failed and len(summary.fitted) == len(manipulations) * len(FAMILIES), summary
        print(f"  grid of {len(summary.fitted)} runs, {label:18s} {times[label]:7.1f} s  ({summary.groups} Ray Train "
              f"runs, up to {fit.max_concurrent(cfg)} at once)")
    print(f"  fused speed-up                   {times['one run per trial'] / times['fused']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512, help="pairs of the single run (95%% train, 5%% validation)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--grid-runs", type=int, default=24, help="runs in the grid (8 families per manipulation; 0: skip)")
    parser.add_argument("--grid-pairs", type=int, default=32, help="pairs per manipulation in the grid")
    parser.add_argument("--grid-epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as storage:
        if args.pairs:
            single_run(storage + "/single", args.pairs, args.epochs)
        if args.grid_runs:
            grid(storage + "/grid", args.grid_runs, args.grid_pairs, args.grid_epochs)


if __name__ == "__main__":
    main()
