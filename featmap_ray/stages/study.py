"""`featmap study`: fit -> evaluate -> analyze -> report, each a stage of its own."""

from __future__ import annotations

from featmap_ray.config import Config
from featmap_ray.stages import analyze, base, evaluate, fit, report

STEPS = ("fit", "evaluate", "analyze", "report")


def command(cfg: Config) -> None:
    for module in (fit, evaluate, analyze, report):
        print(module.STAGE.run(cfg), flush=True)


STAGE = base.Stage(
    "study", "fit -> evaluate -> analyze -> report", command,
    keys=(*base.RAY_KEYS, *fit.FIT_KEYS, *evaluate.EVALUATE_KEYS), checks=(fit.validate_study,), steps=STEPS,
    reads=("features",), writes=("runs", "results", "reports", "errors"), shows_runs_page=True)
