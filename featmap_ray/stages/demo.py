"""`featmap demo`: the whole study on one config, in one process, with each stage's wall time at the end.

pipeline (ingest -> manipulate -> edit -> extract) -> fit -> evaluate -> analyze -> featinv-train ->
recon-eval -> featinv-viz -> report. Each stage is the command of the same name (its checks just before
it runs, its provenance, its MLflow run), so a second run skips what is stored and up to date.
"""

from __future__ import annotations

import time

from featmap_ray.config import Config
from featmap_ray.stages import (
    analyze,
    base,
    evaluate,
    featinv_train,
    featinv_viz,
    fit,
    pipeline,
    recon_eval,
    report,
)

STEPS = (*pipeline.STEPS, "fit", "evaluate", "analyze", "featinv-train", "recon-eval", "featinv-viz", "report")


STAGES = (fit, evaluate, analyze, featinv_train, recon_eval, featinv_viz, report)  # after the pipeline's


def steps(cfg: Config) -> list[base.Stage]:
    return [*pipeline.steps(cfg), *(m.STAGE for m in STAGES)]


def timings_table(times: list[tuple[str, float]]) -> str:
    """Each stage's wall time and the total, aligned."""
    lines = ["[demo] wall time per stage:"]
    lines += [f"    {name:<14} {seconds:7.1f} s" for name, seconds in times]
    lines.append(f"    {'total':<14} {sum(s for _, s in times):7.1f} s")
    return "\n".join(lines)


def command(cfg: Config) -> str:
    times = []
    for stage in steps(cfg):
        start = time.perf_counter()
        for check in stage.checks:  # here, not up front: featinv-train makes what recon-eval checks for
            check(cfg)
        result = stage.run(cfg)
        if result is not None:
            print(result, flush=True)
        times.append((stage.name, time.perf_counter() - start))
    return timings_table(times)


def serve_hint(cfg: Config) -> str:
    return (f"The page and API with the demo's trained FeatInv: featmap serve --config <this config>, then "
            f"http://127.0.0.1:{cfg.serve.port}/")


STAGE = base.Stage(
    "demo", "the whole study on one config, with each stage's wall time", command,
    details="pipeline -> fit -> evaluate -> analyze -> featinv-train -> recon-eval -> featinv-viz -> report: what "
            "`make demo` runs on conf/demo.yaml. Each stage checks its inputs just before it runs.",
    keys=tuple(dict.fromkeys(key for m in (pipeline, *STAGES) for key in m.STAGE.keys)),
    checks=pipeline.STAGE.checks, steps=STEPS, reads=("dataset.root",),
    writes=("images", "features", "runs", "results", "featinv", "featinv_viz", "reports", "errors"),
    shows_runs_page=True, epilogue=serve_hint)
