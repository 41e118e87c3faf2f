"""What the service serves, for `GET /models`: the backbone and layer, the FeatInv models and the mapping runs,
with their MLflow run ids and metrics. Read once when the ingress starts; MLflow being unreachable
leaves the ids empty (with the reason) rather than stopping the service."""

from __future__ import annotations

from typing import Any

from featmap_ray import backbones
from featmap_ray.config import Config
from featmap_ray.featinv.data import featinv_backbone
from featmap_ray.serve import models


def mapping_run_keys(cfg: Config) -> list[str]:
    """The runs of `mapping.study` the service may apply: `serve.mapping_runs`, or every finished run
    (None). A listed run that is not finished, or maps another backbone/layer, is a config error; a
    stale one (`base.run_staleness`: fitted on features that changed since) stops the service from
    starting, named, rather than serving maps of features that are no longer stored."""
    from featmap_ray.mapping.artefacts import finished_runs, read_info, runs_root
    from featmap_ray.stages import base

    keys = cfg.serve.mapping_runs
    if keys is None:
        keys = sorted(p.name for p in finished_runs(cfg))
    request, layer = featinv_backbone(cfg)
    for key in keys:
        info = read_info(runs_root(cfg) / key)
        if info is None:
            raise ValueError(f"serve.mapping_runs: {key!r} is not a finished run of study {cfg.mapping.study!r} "
                             f"(no run.json in {runs_root(cfg) / key})")
        spec = info["spec"]
        if (spec["backbone"], spec["layer"]) != (request.name, layer):
            raise ValueError(f"serve.mapping_runs: {key!r} maps {spec['backbone']}/{spec['layer']}, the service "
                             f"inverts {request.name}/{layer}")
    base.refuse_stale_runs(cfg.storage, [runs_root(cfg) / key for key in keys])
    return list(keys)


def check(cfg: Config) -> None:
    """Before anything starts: every allowed FeatInv model resolves (MLflow URIs: their run and
    artefacts exist; nothing is downloaded) and every allowed mapping run is finished, fits and is not
    stale."""
    for source in models.allowed_models(cfg).values():
        models.mlflow_run_id(cfg, source)
    mapping_run_keys(cfg)


def feature_shape(cfg: Config) -> tuple[int, int, int]:
    request, layer = featinv_backbone(cfg)
    return backbones.feature_shapes(backbones.get_spec(request.name), request, [layer])[layer]


def _mlflow_runs(cfg: Config, keys: list[str]) -> tuple[dict[str, Any], str | None]:
    """run key -> its MLflow run (tag featmap.run), and an error message when MLflow cannot be read."""
    from mlflow import MlflowClient

    from featmap_ray.io import tracking

    try:
        exp = tracking.find_experiment_id(cfg)
        if exp is None:
            return {}, None
        client = MlflowClient(tracking.tracking_uri(cfg))
        runs = {}
        for key in keys:  # MLflow's search has no IN for tags
            found = client.search_runs([exp], filter_string=f"tags.`featmap.run` = '{key}'", max_results=1)
            if found:
                runs[key] = found[0]
        return runs, None
    except Exception as e:  # an unreachable server: the service still serves, /models says why
        return {}, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def describe(cfg: Config, mapping_keys: list[str], requested: dict[str, str | None]) -> dict[str, Any]:
    """The body of `GET /models`: `cfg`'s model sources are the pinned versions (`models.pinned`), `requested`
    what the config asked for (an alias)."""
    from mlflow import MlflowClient

    from featmap_ray.io import tracking
    from featmap_ray.mapping.artefacts import read_info, runs_root

    request, layer = featinv_backbone(cfg)
    spec = backbones.get_spec(request.name)
    featinv = []
    errors = []
    for name, source in models.allowed_models(cfg).items():
        entry = {"name": name, "source": source or "fresh from the base UNet",
                 "requested": requested.get(name, source), "base_model": cfg.featinv.base_model,
                 "mlflow_run_id": None, "metrics": {}}
        try:
            run_id = models.mlflow_run_id(cfg, source)
            if run_id is not None:
                entry.update(mlflow_run_id=run_id,
                             metrics=dict(MlflowClient(tracking.tracking_uri(cfg)).get_run(run_id).data.metrics))
        except Exception as e:  # see _mlflow_runs
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        featinv.append(entry)
    runs, error = _mlflow_runs(cfg, mapping_keys)
    mapping = []
    for key in mapping_keys:
        run_spec = read_info(runs_root(cfg) / key)["spec"]
        run = runs.get(key)
        mapping.append({"name": key, "manipulation": run_spec["manipulation"], "model": run_spec["model"],
                        "mlflow_run_id": run.info.run_id if run else None,
                        "metrics": dict(run.data.metrics) if run else {}})
    s = cfg.serve
    return {
        "backbone": {"name": request.name, "layer": layer, "input_size": spec.input_size,
                     "feature_shape": list(feature_shape(cfg)), "pretrained": request.pretrained},
        "featinv": featinv,
        "mapping_study": cfg.mapping.study,
        "mapping_runs": mapping,
        "defaults": {"model": models.DEFAULT, "seeds": s.seeds, "steps": s.steps,
                     "guidance": cfg.featinv.sampling.guidance, "control_scale": cfg.featinv.sampling.control_scale},
        "limits": s.limits.model_dump(),
        "mlflow_errors": errors + ([f"mapping runs: {error}"] if error else []),
    }
