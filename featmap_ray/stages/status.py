"""`featmap status`: every stage's outputs under the storage root against this config — up to date,
stale (which setting or input changed), missing, or partial (n of m) — like `dvc status`. Reads only
table metadata, key counts and run.json files; starts no Ray and writes nothing."""

from __future__ import annotations

from featmap_ray.config import Config
from featmap_ray.stages import base


def report(cfg: Config) -> str:
    lines = [f"storage root: {cfg.storage}"]
    for stage in base.registry().values():
        if stage.status is None:
            continue
        try:
            lines += [str(s) for s in stage.status(cfg)]
        except (FileNotFoundError, ValueError) as e:  # e.g. an input table not there yet
            lines.append(str(base.OutputStatus(stage.name, "-", "missing", str(e).splitlines()[0])))
    lines.append("up to date: made by these settings; stale: re-run the stage with --overwrite (or use another "
                 "storage root); missing / partial: run the stage (it resumes).")
    return "\n".join(lines)


STAGE = base.Stage("status", "what is up to date, stale (and why), missing or partial (no Ray)", report,
                   details="For every stage output under the storage root, compares the settings it was made with "
                           "(its provenance) to this config's, and counts what is there against what the config "
                           "asks for.",
                   keys=("storage", "dataset", "manipulate", "edit", "extract", "mapping", "evaluate", "featinv"),
                   starts_ray=False)
