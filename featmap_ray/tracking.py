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
