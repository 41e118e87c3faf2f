"""Ray Tune search over one mapping family's hyper-parameters, with ASHA early stopping.

Each trial is a function that fits a TorchTrainer (the Train V2 pattern) and reports every
epoch to Tune through `TuneReportCallback`; ASHA stops unpromising trials after
`grace_period` epochs. A search-space key is a training setting (lr, weight_decay, batch_size,
...), a hyper-parameter of the family (hidden, num_layers, dropout, ...), or a loss weight
written `loss.<term>` (e.g. loss.mse, loss.median_cos).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from featmap_ray.config import Config, MappingTraining
from featmap_ray.io import tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.layout import Layout
from featmap_ray.mapping import artefacts, grid
from featmap_ray.stages import base, runtime
from featmap_ray.stages import mapping_train as train
from featmap_ray.stages.fit import FIT_KEYS

DOMAINS = ("loguniform", "uniform", "choice", "randint", "grid")


def sweep_root(cfg: Config) -> Location:
    return Layout(cfg.storage).sweeps(cfg.mapping.study)


def base_spec(cfg: Config) -> grid.RunSpec:
    """The run being tuned: the sweep's family on its (backbone, layer, manipulation) and the first loss."""
    from featmap_ray.mapping.models import MODELS

    sw = cfg.mapping.sweep
    if sw.model not in MODELS:
        raise ValueError(f"mapping.sweep.model: unknown model family {sw.model!r}; available: {sorted(MODELS)}")
    targets = grid.targets(cfg)
    backbone, layer, normalise = targets[0]
    if sw.backbone or sw.layer:
        match = [t for t in targets if t[0] == (sw.backbone or backbone) and t[1] == (sw.layer or layer)]
        if not match:
            raise ValueError(f"mapping.sweep: ({sw.backbone}, {sw.layer}) is not a mapping target; "
                             f"targets: {[t[:2] for t in targets]}")
        backbone, layer, normalise = match[0]
    loss_name, loss = next(iter(grid.expand_losses(cfg).items()))
    return grid.RunSpec(cfg.dataset.name, "sweep", backbone, layer, sw.manipulation, sw.model, loss_name, loss,
                         sw.apply_transform, normalise,
                         dict(cfg.mapping.model_hparams.get(sw.model, {})))


def search_space(cfg: Config, spec: grid.RunSpec) -> dict[str, Any]:
    from ray import tune

    from featmap_ray.mapping.losses import LOSSES
    from featmap_ray.mapping.models import model_hparams

    allowed = set(MappingTraining.model_fields) | set(model_hparams(spec.model))
    space = {}
    for key, domain in cfg.mapping.sweep.space.items():
        term = key.removeprefix("loss.")
        if key.startswith("loss.") and term not in LOSSES:
            raise ValueError(f"mapping.sweep.space.{key}: unknown loss term {term!r}; available: {sorted(LOSSES)}")
        if not key.startswith("loss.") and key not in allowed:
            raise ValueError(f"mapping.sweep.space.{key}: not a training setting or a hyper-parameter of "
                             f"{spec.model}; available: {sorted(allowed)} or loss.<term>")
        kind = domain.get("type")
        args = {k: v for k, v in domain.items() if k != "type"}
        try:
            if kind in ("loguniform", "uniform", "randint"):
                space[key] = getattr(tune, kind)(args["low"], args["high"])
            elif kind in ("choice", "grid"):
                space[key] = (tune.choice if kind == "choice" else tune.grid_search)(list(args["values"]))
            else:
                raise ValueError(f"type must be one of {DOMAINS}, got {kind!r}")
        except KeyError as e:
            raise ValueError(f"mapping.sweep.space.{key}: {kind} needs {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"mapping.sweep.space.{key}: {e}") from None
    return space


def trial_spec(spec: grid.RunSpec, params: dict[str, Any], trial_id: str) -> tuple[grid.RunSpec, dict[str, Any]]:
    """The RunSpec of one trial and its training overrides, from the sampled parameters."""
    from featmap_ray.mapping.models import model_hparams

    family = set(model_hparams(spec.model))
    hparams = {**spec.hparams, **{k: v for k, v in params.items() if k in family}}
    loss = {**spec.loss, **{k.removeprefix("loss."): float(v) for k, v in params.items() if k.startswith("loss.")}}
    training = {k: v for k, v in params.items() if k in MappingTraining.model_fields}
    trial = dataclasses.replace(spec, group=f"sweep-{trial_id}", hparams=hparams, loss=loss)
    return trial, training


def trial_plan(cfg: Config, spec: grid.RunSpec, params: dict[str, Any], trial_id: str) -> train.GroupPlan:
    """The one-run group a trial trains: its own Ray Train run and folder under the sweep's root."""
    trial, overrides = trial_spec(spec, params, trial_id)
    return train.plan_group(cfg, [trial], name=f"{cfg.mapping.study}--sweep--{trial_id}",
                            training=train.training_settings(cfg, overrides), out_dirs=[sweep_root(cfg) / trial_id])


def _trial(params: dict[str, Any], cfg_data: dict[str, Any], spec_data: dict[str, Any], parent: str) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from featmap_ray.stages import runtime

    runtime.configure_data_context()
    cfg = Config.model_validate(cfg_data)
    plan = trial_plan(cfg, grid.RunSpec.from_dict(spec_data), params, tune.get_context().get_trial_id())
    result = train.fit_group(cfg, plan, mlflow_parent=parent, callbacks=[TuneReportCallback()])
    if result.failed:
        raise RuntimeError(next(iter(result.failed.values())))


def run_sweep(cfg: Config) -> dict[str, Any]:
    """Search, keep the best trial's model in `<storage>/mapping/sweeps/<study>/best`, return its summary."""
    import ray.train
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from featmap_ray.stages.fit import check_tables, max_concurrent, trial_resources, tune_run_config

    spec = base_spec(cfg)
    space = search_space(cfg, spec)
    check_tables(tables.Store(cfg.storage), [spec])
    check = train.plan_group(cfg, [spec], name="check")  # the pairs exist; normalisation statistics computed once, here
    sw = cfg.mapping.sweep
    # The sweep stage run, under the study's run; each trial's mapping run nests under it.
    with tracking.study_stage(cfg, "sweep",
                              [tracking.table_input(cfg, check.train.uri, check.train.version)]) as parent:
        trainable = tune.with_parameters(tune.with_resources(_trial, trial_resources(cfg)),
                                         cfg_data=cfg.model_dump(mode="json"), spec_data=spec.to_dict(), parent=parent)
        runtime.start_autoscaling_coordinator()  # before the trials' Train controllers ask it
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_loss", mode="min", num_samples=sw.num_samples, max_concurrent_trials=max_concurrent(cfg),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.mapping.training.max_epochs,
                                        grace_period=sw.grace_period, reduction_factor=sw.reduction_factor)),
            run_config=tune_run_config(cfg, "sweep"),
        )
        results = tuner.fit()
        best = results.get_best_result(metric="val_loss", mode="min", scope="all")
        if best is None or best.metrics is None:
            message = f"sweep {cfg.mapping.study}: no trial reported a validation loss ({results.num_errors} errors)"
            tracking.end_stage_run(cfg, parent, {"trials": len(results), "errors": results.num_errors}, status="FAILED",
                                   error=message)
            raise RuntimeError(message)
        trial_id = best.metrics["trial_id"]
        best_dir = sweep_root(cfg) / "best"
        plan = trial_plan(cfg, spec, best.config, trial_id)
        # The trial's last Ray Train checkpoint holds its best epoch, also when ASHA stopped it early.
        # Ray reports the checkpoint's path inside its filesystem (no s3:// scheme): pass the filesystem.
        checkpoint = ray.train.Checkpoint(best.metrics["checkpoint_path"], filesystem=train.train_root(cfg).fs)
        train.publish_from_checkpoint(checkpoint, plan, cfg.mapping.loss_options)
        artefacts.copy_run(plan.runs[0].out_dir, best_dir)
        summary = {"best_trial": trial_id, "best_val_loss": float(best.metrics["best_val_loss"]),
                   "best_config": best.config, "trials": len(results), "errors": results.num_errors, "dir": str(best_dir)}
        (sweep_root(cfg) / "best.json").write_json(summary)
        tracking.end_stage_run(cfg, parent, {"best_val_loss": summary["best_val_loss"], "trials": len(results),
                                             "errors": results.num_errors})
    return summary


def check_space(cfg: Config) -> None:
    """mapping.sweep's search space is valid for its model family (no tables read)."""
    search_space(cfg, base_spec(cfg))


def command(cfg: Config) -> str:
    import json

    return json.dumps(run_sweep(cfg), indent=1, default=str)


STAGE = base.Stage(
    "sweep", "Ray Tune + ASHA over one model family's hyper-parameters", command,
    details="Tunes mapping.sweep.model on one (backbone, layer, manipulation); the best trial's model goes to "
            "<storage>/mapping/sweeps/<study>/best.",
    keys=(*base.RAY_KEYS, *FIT_KEYS, "mapping.sweep"), checks=(check_space,), reads=("features",),
    writes=("sweeps",), shows_runs_page=True)
