"""MLflow helpers: where runs go, the experiment, the runs of a study, and the tables a run read.

Where: `mlflow.tracking_uri`, else `sqlite:///<storage>/mlflow.db` for a local storage root (an
object-store root has no such default: the config asks for a server or an absolute SQLite file).
Artefacts: with an MLflow server (`http(s)://`) the server chooses (`mlflow server
--artifacts-destination ...` proxies them, so workers need neither a shared disk nor storage
credentials); otherwise `<storage>/mlartifacts`, on local disk or in the object store.

The experiment (`mlflow.experiment`) is tagged `mlflow.experimentKind = custom_model_development`,
so MLflow 3's UI opens it on its runs, not on the GenAI overview; `runs_page_url` is that page.

Runs of a study (`mapping.study`), each found again by its `featmap.run` tag and reused on re-run:

    <study>                        the study's parent run              featmap.level = study
      <study>:fit | :sweep         one run per stage ...               featmap.level = stage
        <mapping run key>          ... the mapping runs under fit/sweep featmap.level = mapping
      <study>:evaluate | :analyze | :report

The pipeline stages (ingest, manipulate, extract) and FeatInv's runs are runs of their own
(`stage_run`). Every stage run records the Lance tables it read as MLflow dataset inputs: name = the
table's path under the storage root, source = its URI, digest = the table version read.

Models: a folder of weights is logged as run artefacts and registered as a model version
(`register_model`); `model_source` resolves a folder, `runs:/...` or `models:/...` URI to what to
download and the run that made it, and `download_model` fetches it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from featmap_ray.config import Config
from featmap_ray.layout import Layout

log = logging.getLogger(__name__)

KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"  # MLflow 3's UI: the runs page, not the GenAI overview
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves
CONTEXT_TAG = "mlflow.data.context"


def tracking_uri(cfg: Config) -> str:
    """mlflow.tracking_uri, else `sqlite:///<storage>/mlflow.db` (absolute on purpose: MLflow >= 3.13
    refuses ./mlruns, and Tune trials change directory). An object-store storage root raises."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    cfg.mlflow.check_storage(cfg.storage)  # raises ValueError naming the fix
    return f"sqlite:///{Layout(cfg.storage).mlflow_db}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_location(cfg: Config) -> str | None:
    """Where a new experiment keeps its artefacts: the server's choice (None) for an MLflow server,
    else `<storage>/mlartifacts` (a file URI, or under the object-store root, written by the
    MLflow client itself: boto3 for s3://)."""
    if is_server(tracking_uri(cfg)):
        return None
    if "://" in cfg.storage:
        return f"{cfg.storage.rstrip('/')}/mlartifacts"
    return Path(cfg.storage, "mlartifacts").as_uri()


def _client(cfg: Config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(cfg))


@contextlib.contextmanager
def fluent_tracking(cfg: Config) -> Iterator[None]:
    """mlflow's fluent API (`mlflow.start_run`, `mlflow.log_metrics`, ...) records to `tracking_uri(cfg)`
    inside the block. Not through `mlflow.set_tracking_uri`: that also exports MLFLOW_TRACKING_URI into
    os.environ, for every process started afterwards (Ray workers, commands run from this one) to
    inherit. mlflow offers no other way, so this sets the module state its fluent API reads."""
    from mlflow.tracking._tracking_service import utils

    previous = utils._tracking_uri
    utils._tracking_uri = tracking_uri(cfg)
    try:
        yield
    finally:
        utils._tracking_uri = previous


def experiment_id(cfg: Config) -> str:
    """The experiment's id, creating it (tagged, with its artefact location) when missing."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.mlflow.experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(cfg), tags={KIND_TAG: KIND})
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def find_experiment_id(cfg: Config) -> str | None:
    """The experiment's id, None if it does not exist yet; never creates anything (no mlflow.db, no
    experiment). An unreachable server or unreadable database raises RuntimeError, quickly."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    try:
        if is_server(uri):
            return _server_experiment_id(uri, cfg.mlflow.experiment)
        exp = _client(cfg).get_experiment_by_name(cfg.mlflow.experiment)
    except Exception as e:
        raise RuntimeError(f"cannot read {uri}: {str(e).splitlines()[0][:200]}") from e
    return exp.experiment_id if exp is not None else None


def _server_experiment_id(uri: str, name: str) -> str | None:
    """One request to the server's REST API (experiments/get-by-name), without retries and with a
    5 s timeout, passed explicitly: MlflowClient reads both from os.environ only, and retries for
    minutes by default."""
    from mlflow.exceptions import RestException
    from mlflow.utils import rest_utils
    from mlflow.utils.credentials import get_default_host_creds

    endpoint = "/api/2.0/mlflow/experiments/get-by-name"
    response = rest_utils.http_request(get_default_host_creds(uri), endpoint, "GET", max_retries=0, timeout=5,
                                       params={"experiment_name": name})
    try:
        rest_utils.verify_rest_response(response, endpoint)
    except RestException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return response.json()["experiment"]["experiment_id"]


def ui_base(cfg: Config) -> str:
    """The MLflow UI: the server itself, or `mlflow ui --backend-store-uri <uri>` on this machine."""
    uri = tracking_uri(cfg)
    return uri.rstrip("/") if is_server(uri) else LOCAL_UI


def ui_command(cfg: Config) -> str | None:
    """The command that serves the UI for a database (None: the tracking URI is a server)."""
    uri = tracking_uri(cfg)
    return None if is_server(uri) else f"mlflow ui --backend-store-uri {uri}"


def runs_page_url(cfg: Config, exp_id: str | None = None) -> str:
    """`<ui>/#/experiments/<id>/runs`: MLflow 3's UI opens an experiment on an empty GenAI overview
    unless told to show its runs."""
    return f"{ui_base(cfg)}/#/experiments/{exp_id or experiment_id(cfg)}/runs"


def runs_page_line(cfg: Config) -> str:
    """One line for the end of a command that logged: where its runs are."""
    command = ui_command(cfg)
    return f"[mlflow] runs: {runs_page_url(cfg)}" + (f"  (after `{command}`)" if command else "")


# -- inputs: the Lance tables a run read ------------------------------------------------------------

@dataclass(frozen=True)
class TableInput:
    """A table (or folder) a run read: its name, URI and the version read (None: not versioned)."""

    name: str
    uri: str
    version: int | None = None


def table_name(cfg: Config, uri: str) -> str:
    """`features/convnext_base/stage3` for `<storage>/features/convnext_base/stage3.lance`."""
    root = cfg.storage.rstrip("/") + "/"
    return (uri[len(root):] if uri.startswith(root) else uri.rstrip("/").rsplit("/", 1)[-1]).removesuffix(".lance")


def table_input(cfg: Config, uri: str, version: int | None = None) -> TableInput | None:
    """The table at `uri` as an input, at `version` (None: its current version); None when the
    table does not exist."""
    if version is None:
        from featmap_ray.io import tables

        table = tables.Store(cfg.storage).open(uri)
        if table is None:
            return None
        version = table.version
    return TableInput(table_name(cfg, uri), uri, int(version))


def table_inputs(cfg: Config, uris: Iterable[str]) -> list[TableInput]:
    """The existing tables among `uris`, each at its current version."""
    return [t for t in (table_input(cfg, uri) for uri in dict.fromkeys(uris)) if t is not None]


def _source(uri: str):
    """A dataset source for a URI: MLflow's own for local paths and object stores (s3, gs, ...),
    else a plain one that only records the URI (e.g. builtin:skimage)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource
    from mlflow.exceptions import MlflowException

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
            warnings.simplefilter("ignore")
            return resolve_dataset_source(uri, candidate_sources=[FileSystemDatasetSource])
    except MlflowException:
        return _uri_source_class()(uri)


@functools.cache
def _uri_source_class():
    """A source that only records a URI no MLflow source resolves (built here: mlflow is imported
    only when something is logged)."""
    from mlflow.data.dataset_source import DatasetSource

    class UriSource(DatasetSource):
        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "uri"

        def load(self, **kwargs):
            raise NotImplementedError(f"{self.uri} is recorded, not loadable")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            return cls(str(raw_source))

        def to_dict(self) -> dict:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(source_dict["uri"])

    return UriSource


def log_table_inputs(client, run_id: str, tables: Iterable[TableInput | None], context: str = "training") -> None:
    """Record `tables` as the run's dataset inputs (MLflow's Dataset column: name and digest, the
    digest being the Lance table version read). No data is read. `client` None: the fluent
    tracking URI's client. Logging the same (name, version) again is a no-op."""
    from mlflow import MlflowClient
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    unique = {(t.name, t.version): t for t in tables if t is not None}
    if not unique:
        return
    inputs = [DatasetInput(MetaDataset(_source(t.uri), name=t.name,
                                       digest=None if t.version is None else str(t.version))._to_mlflow_entity(),
                           tags=[InputTag(CONTEXT_TAG, context)])
              for t in unique.values()]
    (client or MlflowClient()).log_inputs(run_id, datasets=inputs)


# -- pipeline stage runs ----------------------------------------------------------------------------

def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:500]  # MLflow caps param values
    return flat


def _log_config(client, run_id: str, cfg: Config) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.yaml")
        path.write_text(cfg.dump())
        client.log_artifact(run_id, str(path))


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, inputs: Iterable[TableInput | None] = (),
              context: str = "input") -> Iterator[object]:
    """An MLflow run (the active run) for one pipeline stage, with the resolved config as params and
    artefact, and the tables it reads as inputs."""
    import mlflow

    exp = experiment_id(cfg)
    # mlflow's own context ends the run FAILED when the block raises.
    with fluent_tracking(cfg), mlflow.start_run(experiment_id=exp, run_name=stage) as run:
        mlflow.set_tags({"stage": stage, "dataset": cfg.dataset.name, "featmap.level": "stage"})
        mlflow.log_params(_flatten(cfg.model_dump(mode="json")))
        client = _client(cfg)
        _log_config(client, run.info.run_id, cfg)
        log_table_inputs(client, run.info.run_id, inputs, context)
        yield run


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log a dict of metrics to a run by id (no active run needed: safe from Ray workers and trials)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


# -- the runs of a study ----------------------------------------------------------------------------

def _find_run(client, exp: str, filters: dict[str, str]):
    condition = " AND ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items())
    found = client.search_runs([exp], filter_string=condition, max_results=1)
    return found[0] if found else None


def study_parent_run(cfg: Config) -> str:
    """The study's parent run (name `<study>`), created once and reused by every stage and re-run."""
    client, exp, study = _client(cfg), experiment_id(cfg), cfg.mapping.study
    found = _find_run(client, exp, {"featmap.run": study, "featmap.level": "study"})
    if found is not None:
        return found.info.run_id
    run = client.create_run(exp, run_name=study, tags={"featmap.run": study, "featmap.level": "study",
                                                        "featmap.study": study, "dataset": cfg.dataset.name})
    _log_config(client, run.info.run_id, cfg)
    return run.info.run_id


def study_stage_run(cfg: Config, stage: str, inputs: Iterable[TableInput | None] = (),
                    context: str = "training") -> str:
    """The run of one stage of the study (`<study>:<stage>`: fit, sweep, evaluate, analyze, report),
    nested under the study's parent run; the run of an earlier attempt (finished or not) is reused
    and set running. Records this attempt's config and the tables it reads. Returns its id."""
    client, exp, study = _client(cfg), experiment_id(cfg), cfg.mapping.study
    parent = study_parent_run(cfg)
    name = f"{study}:{stage}"
    found = _find_run(client, exp, {"featmap.run": name})
    if found is not None:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        if found.data.tags.get("mlflow.parentRunId") != parent:  # a run of an older layout: adopt it
            client.set_tag(run_id, "mlflow.parentRunId", parent)
    else:
        run_id = client.create_run(exp, run_name=name, tags={
            "featmap.run": name, "featmap.level": "stage", "featmap.study": study, "stage": stage,
            "dataset": cfg.dataset.name, "mlflow.parentRunId": parent}).info.run_id
    client.update_run(parent, status="RUNNING")
    _log_config(client, run_id, cfg)
    log_table_inputs(client, run_id, inputs, context)
    return run_id


def end_stage_run(cfg: Config, run_id: str, metrics: dict[str, float], artefacts: Path | None = None,
                  status: str = "FINISHED", error: str | None = None, inputs: Iterable[TableInput | None] = (),
                  context: str = "evaluation") -> None:
    """Metrics (a folder of artefacts, tables read that were known only at the end) on a study's
    stage run, then it and its parent end with `status`."""
    client = _client(cfg)
    log_table_inputs(client, run_id, inputs, context)
    if metrics:
        log_metrics(client, run_id, metrics)
    if artefacts is not None:
        client.log_artifacts(run_id, str(artefacts))
    if error:
        client.set_tag(run_id, "error", error[:5000])
    client.set_terminated(run_id, status=status)
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    if parent:
        client.set_terminated(parent, status=status)


@contextlib.contextmanager
def study_stage(cfg: Config, stage: str, inputs: Iterable[TableInput | None] = (),
                context: str = "training") -> Iterator[str]:
    """`study_stage_run` for the block, which ends it with `end_stage_run`. An exception escaping the
    block ends the run and the study's run FAILED, with the error as a tag (unless the block ended
    them already), so no stage run stays RUNNING after its stage stopped."""
    run_id = study_stage_run(cfg, stage, inputs, context)
    try:
        yield run_id
    except BaseException as e:
        try:
            if _client(cfg).get_run(run_id).info.status == "RUNNING":
                end_stage_run(cfg, run_id, {}, status="FAILED", error=f"{type(e).__name__}: {e}")
        except Exception as failure:  # the stage's own error is the one to raise
            log.warning("could not end MLflow run %s as FAILED: %s", run_id, failure)
        raise


# -- mapping runs (children of a fit or sweep stage run) --------------------------------------------

def child_run(cfg: Config, name: str, tags: dict[str, str], *, parent: str | None, params: dict[str, object],
              digest: str):
    """An MLflow run for one mapping run, nested under `parent` (the fit or sweep stage run); an
    unfinished run of the same name and digest (a crashed attempt at the same model) is reused, so
    a resumed run keeps one MLflow run. Records the features table it reads (`tags` backbone and
    layer) as its input. Returns (client, run_id)."""
    from mlflow.entities import Param

    from featmap_ray.io import tables

    client = _client(cfg)
    exp = experiment_id(cfg)
    found = client.search_runs([exp], filter_string=f"tags.`featmap.run` = '{name}' AND tags.`featmap.digest` = "
                                                    f"'{digest}' AND attributes.status != 'FINISHED'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        all_tags = {**tags, "featmap.run": name, "featmap.digest": digest, "mlflow.runName": name,
                    "featmap.level": "mapping", "featmap.study": cfg.mapping.study}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run_id = client.create_run(exp, run_name=name, tags=all_tags).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
    if "backbone" in tags and "layer" in tags:
        uri = tables.Store(cfg.storage).layout.features(tags["backbone"], tags["layer"])
        log_table_inputs(client, run_id, [table_input(cfg, uri)], "training")
    return client, run_id


def finish_child_run(client, run_id: str, metrics: dict[str, float], artefacts: Path) -> None:
    log_metrics(client, run_id, metrics)
    client.log_artifacts(run_id, str(artefacts), artifact_path="mapping")
    client.set_terminated(run_id, status="FINISHED")


# -- models: weight folders logged to runs and registered -------------------------------------------

MODEL_URI = re.compile(r"^(?:runs:/(?P<run>[^/]+)/(?P<path>.+)|"
                       r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+)))$")


class ModelNotFound(FileNotFoundError):
    """An MLflow model URI names a run, artefact path, registered model, version or alias that does not exist."""


def is_model_uri(path: str) -> bool:
    """`runs:/...` or `models:/...` (anything else is a folder: a local path or an object-store URI)."""
    return path.startswith(("runs:/", "models:/"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: `uri` as given; `artifact_uri`, what is downloaded (the folder
    itself, or the run artefacts behind an MLflow URI); the MLflow run that made it and, for a
    registered model, its version (an alias resolved to the version it points at now)."""

    uri: str
    artifact_uri: str
    run_id: str | None = None
    registered: str | None = None  # models:/<name>/<version>

    def __str__(self) -> str:
        if self.run_id is None:
            return self.uri
        return f"{self.registered or self.uri} (MLflow run {self.run_id})"


def model_source(cfg: Config, uri: str) -> ModelSource:
    """Resolve a folder, `runs:/<run_id>/<path>`, `models:/<name>/<version>` (or `/latest`: the highest version)
    or `models:/<name>@<alias>` without downloading anything; an MLflow URI whose run, artefacts or model version do not exist
    raises ModelNotFound."""
    from mlflow.exceptions import MlflowException

    if not is_model_uri(uri):
        return ModelSource(uri, uri)
    match = MODEL_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri!r}: expected runs:/<run_id>/<artifact path>, models:/<name>/<version> or "
                         "models:/<name>@<alias>")
    where = tracking_uri(cfg)
    if where.startswith("sqlite:///") and not Path(where.removeprefix("sqlite:///")).is_file():
        raise ModelNotFound(f"{uri}: no MLflow database at {where}")  # and none is created by looking
    client = _client(cfg)
    try:
        if match["run"]:
            client.get_run(match["run"])
            if not client.list_artifacts(match["run"], match["path"]):
                raise ModelNotFound(f"{uri}: MLflow run {match['run']} has no artefacts under {match['path']!r} "
                                    f"(MLflow at {where})")
            return ModelSource(uri, uri, match["run"])
        name = match["name"]
        if match["version"] == "latest":  # MLflow's meaning: the highest version number
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelNotFound(f"{uri}: the registered model {name!r} has no version (MLflow at {where})")
            version = max(versions, key=lambda v: int(v.version))
        elif match["version"]:
            version = client.get_model_version(name, match["version"])
        else:
            version = client.get_model_version_by_alias(name, match["alias"])
        download = client.get_model_version_download_uri(name, version.version)
        return ModelSource(uri, download, version.run_id, f"models:/{name}/{version.version}")
    except MlflowException as e:
        raise ModelNotFound(f"{uri}: {str(e).splitlines()[0]} (MLflow at {where})") from e


def download_model(cfg: Config, source: ModelSource, dst: str) -> str:
    """Download an MLflow model's artefacts into the folder `dst`; returns the local folder."""
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=source.artifact_uri, tracking_uri=tracking_uri(cfg),
                                               dst_path=dst)


def register_model(cfg: Config, run_id: str, folder: str, artifact_path: str, name: str,
                   tags: dict[str, str]) -> ModelSource:
    """Log the local `folder` as artefacts of run `run_id` under `artifact_path` and register them as a
    version of the model `name` (created when missing). Registering the same artefacts again returns
    their version. A plain artefact folder is registered with `create_model_version`: MLflow 3's
    `mlflow.register_model` accepts runs:/ URIs of logged models only."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    client.log_artifacts(run_id, folder, artifact_path)
    uri = f"runs:/{run_id}/{artifact_path}"
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    versions = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                if v.source == uri]
    version = versions[0] if versions else client.create_model_version(name, uri, run_id=run_id, tags=tags)
    return ModelSource(uri, uri, run_id, f"models:/{name}/{version.version}")
