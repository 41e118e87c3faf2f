"""MLflow helpers: an absolute tracking URI and artifact root under the storage root, one run per stage."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from featmap_ray.config import Config


def tracking_uri(cfg: Config) -> str:
    # Absolute on purpose: MLflow >= 3.13 refuses ./mlruns, and Tune trials change directory.
    return cfg.mlflow.tracking_uri or f"sqlite:///{cfg.storage}/mlflow.db"


def experiment_id(cfg: Config) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = None if "://" in cfg.storage else Path(cfg.storage, "mlartifacts").as_uri()
    return mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=artifacts)


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:500]  # MLflow caps param values
    return flat


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str) -> Iterator[object]:
    """An MLflow run for one pipeline stage, with the resolved config as params and artefact."""
    import mlflow

    exp = experiment_id(cfg)
    with mlflow.start_run(experiment_id=exp, run_name=stage) as run:
        mlflow.set_tag("stage", stage)
        mlflow.set_tag("dataset", cfg.dataset.name)
        mlflow.log_params(_flatten(cfg.model_dump(mode="json")))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "config.yaml")
            path.write_text(cfg.dump())
            mlflow.log_artifact(str(path))
        yield run


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log a dict of metrics to a run by id (no active run needed: safe from Ray workers and trials)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def child_run(cfg: Config, name: str, tags: dict[str, str], *, parent: str | None, params: dict[str, object],
              digest: str):
    """An MLflow run for one mapping run, nested under `parent`; an unfinished run of the same name
    and digest (a crashed attempt at the same model) is reused, so a resumed run keeps one MLflow
    run. Returns (client, run_id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri(cfg))
    exp = experiment_id(cfg)
    found = client.search_runs([exp], filter_string=f"tags.`featmap.run` = '{name}' AND tags.`featmap.digest` = "
                                                    f"'{digest}' AND attributes.status != 'FINISHED'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return client, run_id
    all_tags = {**tags, "featmap.run": name, "featmap.digest": digest, "mlflow.runName": name}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp, run_name=name, tags=all_tags)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
    return client, run.info.run_id


def finish_child_run(client, run_id: str, metrics: dict[str, float], artefacts: Path) -> None:
    log_metrics(client, run_id, metrics)
    client.log_artifacts(run_id, str(artefacts), artifact_path="mapping")
    client.set_terminated(run_id, status="FINISHED")


def study_run(cfg: Config, kind: str) -> str:
    """The parent MLflow run of a study's `kind` (fit, sweep, evaluate...): one per study, reused
    when the study is re-run, so its mapping runs stay nested under one parent."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    exp = experiment_id(cfg)
    name = f"{cfg.mapping.study}:{kind}"
    found = client.search_runs([exp], filter_string=f"tags.`featmap.run` = '{name}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp, run_name=name, tags={"featmap.run": name, "featmap.study": cfg.mapping.study,
                                                      "stage": kind, "dataset": cfg.dataset.name})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.yaml")
        path.write_text(cfg.dump())
        client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def end_study_run(cfg: Config, run_id: str, metrics: dict[str, float], artefacts: Path | None = None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    log_metrics(client, run_id, metrics)
    if artefacts is not None:
        client.log_artifacts(run_id, str(artefacts))
    client.set_terminated(run_id, status="FINISHED")
