"""`featmap pipeline`: ingest -> manipulate -> edit -> extract, each a stage of its own (its MLflow run,
its provenance check); edit runs when edit.prompts has prompts for dataset.name."""

from __future__ import annotations

from featmap_ray.config import Config
from featmap_ray.stages import base, edit, extract, ingest, manipulate

STEPS = ("ingest", "manipulate", "edit", "extract")


def steps(cfg: Config) -> list[base.Stage]:
    """The pipeline's stages for this config: `edit` only when edit.prompts has prompts for the dataset."""
    stages = {s.STAGE.name: s.STAGE for s in (ingest, manipulate, edit, extract)}
    return [stages[name] for name in STEPS if name != "edit" or cfg.edit.prompts.get(cfg.dataset.name)]


def command(cfg: Config) -> None:
    for stage in steps(cfg):
        print(stage.run(cfg), flush=True)


STAGE = base.Stage(
    "pipeline", "ingest -> manipulate -> edit -> extract", command,
    details="edit runs when edit.prompts has prompts for dataset.name.",
    keys=(*base.RAY_KEYS, "dataset", "manipulate", "edit", "extract", "extract.backbones"),
    checks=(ingest.check_dataset, edit.check_model, extract.check_backbones), steps=STEPS,
    reads=("dataset.root",), writes=("images", "features", "errors"), epilogue=base.describe_tables)
