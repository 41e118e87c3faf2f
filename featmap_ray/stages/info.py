"""`featmap info`: the tables under the storage root, their row counts, and how to look at them."""

from __future__ import annotations

from featmap_ray import backbones
from featmap_ray.config import Config
from featmap_ray.io import tables
from featmap_ray.stages import base


def describe(cfg: Config) -> str:
    """Where the tables are, how many rows they hold, and how to look at them."""
    from featmap_ray.io import tracking

    st = tables.Store(cfg.storage)
    uris = [st.layout.images]
    for request in cfg.extract.backbones:
        spec = backbones.get_spec(request.name)
        uris += [st.layout.features(spec.name, layer) for layer in backbones.resolve_layers(spec, request.layers)]
    uris.append(st.layout.errors)
    lines = [f"storage root: {cfg.storage}"]
    lines += [f"  {st.count(uri):>7} rows  {uri}" for uri in uris if st.open(uri) is not None] or [
        "  no tables yet: run `featmap pipeline`"]
    lines += [
        "look at them:",
        f"  python -c \"import lance; print(lance.dataset('{st.layout.images}').to_table(columns=['source_id','variant','class_name']).to_pandas())\"",
    ]
    if (command := tracking.ui_command(cfg)) is not None:
        lines.append(f"  {command}")
    try:
        exp = tracking.find_experiment_id(cfg)  # creates nothing
        lines.append(f"  MLflow runs: {tracking.runs_page_url(cfg, exp)}" if exp is not None else
                     f"  MLflow runs: {tracking.ui_base(cfg)} (no experiment {cfg.mlflow.experiment!r} yet)")
    except RuntimeError as e:  # an unreachable server: the rest of the answer still stands
        lines.append(f"  MLflow runs: {tracking.ui_base(cfg)} ({e})")
    return "\n".join(lines)


STAGE = base.Stage("info", "tables, row counts and how to look at them (starts no Ray)", describe,
                   keys=("storage", "extract.backbones", "mlflow"), starts_ray=False)
