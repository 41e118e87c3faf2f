"""MLflow: where runs go (the config check for object stores, the SQLite default, a tracking server),
the experiment's kind and runs page, the study -> stage -> mapping run hierarchy, and the Lance
tables a run read as its dataset inputs. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pyarrow as pa
import pytest
import yaml

from featmap_ray import cli
from featmap_ray.config import Config, ConfigError, load_config
from featmap_ray.io import tables, tracking
from featmap_ray.stages import info
from tests import ray_cluster


def _cfg(tmp_path: Path, **mlflow) -> Config:
    return Config.model_validate({"storage": str(tmp_path / "store"), "dataset": {"name": "t", "root": str(tmp_path)},
                                  "mapping": {"study": "s"}, "mlflow": mlflow})


def _features_table(cfg: Config, appends: int = 0) -> str:
    """A small features/bb/l table at version 1 + appends."""
    uri = tables.Store(cfg.storage).layout.features("bb", "l")
    lance.write_dataset(pa.table({"source_id": ["a"]}), uri)
    for i in range(appends):
        lance.write_dataset(pa.table({"source_id": [f"b{i}"]}), uri, mode="append")
    return uri


def _inputs(client, run_id: str) -> dict[str, tuple[str, str, str, str]]:
    """name -> (digest, source type, source uri, context) of a run's dataset inputs."""
    run = client.get_run(run_id)
    return {i.dataset.name: (i.dataset.digest, i.dataset.source_type, json.loads(i.dataset.source)["uri"],
                             {t.key: t.value for t in i.tags}.get(tracking.CONTEXT_TAG))
            for i in run.inputs.dataset_inputs}


# -- where runs go ----------------------------------------------------------------------------------

def test_object_store_storage_needs_a_tracking_uri(tmp_path, capsys):
    base = ["dataset.name=t", "dataset.root=/data", "storage=s3://bucket/featmap"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base)
    message = str(err.value)
    assert "mlflow.tracking_uri must be set" in message and "s3://bucket/featmap" in message
    assert "http://HOST:5000" in message and "sqlite:////abs/path/mlflow.db" in message  # the two fixes
    server = load_config(None, [*base, "mlflow.tracking_uri=http://mlflow:5000"])
    assert tracking.tracking_uri(server) == "http://mlflow:5000"
    assert tracking.artifact_location(server) is None  # the server's --artifacts-destination decides
    one_machine = load_config(None, [*base, "mlflow.tracking_uri=sqlite:////abs/mlflow.db"])
    assert tracking.artifact_location(one_machine) == "s3://bucket/featmap/mlartifacts"
    # The CLI stops at the config (exit 2), before Ray or any write.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"storage": "s3://bucket/featmap", "dataset": {"name": "t", "root": "/data"}}))
    assert cli.main(["info", "--config", str(path)]) == 2
    assert "mlflow.tracking_uri must be set" in capsys.readouterr().err


def test_sqlite_default_lives_under_the_storage_root(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/store/mlflow.db"
    assert tracking.tracking_uri(cfg).startswith("sqlite:////")  # absolute: Tune trials change directory
    assert tracking.artifact_location(cfg) == (tmp_path / "store" / "mlartifacts").as_uri()
    monkeypatch.chdir(tmp_path)
    assert _cfg(tmp_path, tracking_uri="sqlite:///rel/m.db").mlflow.tracking_uri == f"sqlite:///{tmp_path}/rel/m.db"

    assert tracking.find_experiment_id(cfg) is None
    assert not (tmp_path / "store").exists()  # looking creates nothing
    from mlflow import MlflowClient

    exp_id = tracking.experiment_id(cfg)
    assert tracking.find_experiment_id(cfg) == exp_id == tracking.experiment_id(cfg)
    client = MlflowClient(tracking.tracking_uri(cfg))
    exp = client.get_experiment(exp_id)
    assert exp.tags[tracking.KIND_TAG] == "custom_model_development"
    assert exp.artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()
    # An experiment made without the tag (by an older version, or by hand) gets it.
    old = client.create_experiment("older")
    assert tracking.experiment_id(_cfg(tmp_path, experiment="older")) == old
    assert client.get_experiment(old).tags[tracking.KIND_TAG] == "custom_model_development"


def test_runs_page_url_and_describe(tmp_path):
    cfg = _cfg(tmp_path)
    assert tracking.runs_page_url(cfg, "7") == "http://127.0.0.1:5000/#/experiments/7/runs"
    assert tracking.ui_command(cfg) == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/store/mlflow.db"
    server = _cfg(tmp_path, tracking_uri="http://mlflow.internal:5000/")
    assert tracking.runs_page_url(server, "3") == "http://mlflow.internal:5000/#/experiments/3/runs"
    assert tracking.ui_command(server) is None

    text = info.describe(cfg)
    assert "no experiment 'featmap' yet" in text and not (tmp_path / "store").exists()
    exp_id = tracking.experiment_id(cfg)
    text = info.describe(cfg)
    assert f"  mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)}\n" in text
    assert text.endswith(f"  MLflow runs: http://127.0.0.1:5000/#/experiments/{exp_id}/runs")
    assert tracking.runs_page_line(cfg).startswith(f"[mlflow] runs: http://127.0.0.1:5000/#/experiments/{exp_id}/runs")
    down = _cfg(tmp_path, tracking_uri=f"http://127.0.0.1:{ray_cluster.free_ports(1)[0]}")  # nothing listens there
    assert f"  MLflow runs: {down.mlflow.tracking_uri} (cannot read {down.mlflow.tracking_uri}: " in info.describe(down)


# -- the runs of a study ----------------------------------------------------------------------------

def test_study_parent_holds_one_run_per_stage_and_the_mapping_runs_under_fit(tmp_path):

    cfg = _cfg(tmp_path)
    uri = _features_table(cfg, appends=1)  # version 2
    fit = tracking.study_stage_run(cfg, "fit", [tracking.table_input(cfg, uri, 1)])  # planned on version 1
    client, child = tracking.child_run(cfg, "t--g--bb--l--hue--linear--mse", {"backbone": "bb", "layer": "l"},
                                       parent=fit, params={"lr": 0.1}, digest="d1")
    artefacts = tmp_path / "model"
    artefacts.mkdir()
    (artefacts / "run.json").write_text("{}")
    tracking.finish_child_run(client, child, {"final_val_loss": 0.5}, artefacts)
    tracking.end_stage_run(cfg, fit, {"fitted": 1})
    evaluate = tracking.study_stage_run(cfg, "evaluate", tracking.table_inputs(cfg, [uri, f"{cfg.storage}/none.lance"]),
                                        context="evaluation")
    tracking.end_stage_run(cfg, evaluate, {"rows": 3})

    runs = {r.info.run_name: r for r in client.search_runs([tracking.experiment_id(cfg)])}
    assert set(runs) == {"s", "s:fit", "s:evaluate", "t--g--bb--l--hue--linear--mse"}
    parent = runs["s"]
    assert parent.data.tags["featmap.level"] == "study" and parent.data.tags["featmap.study"] == "s"
    assert parent.info.status == "FINISHED"
    for stage in ("fit", "evaluate"):
        run = runs[f"s:{stage}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.data.tags["stage"] == stage
        assert run.info.status == "FINISHED"
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert runs["t--g--bb--l--hue--linear--mse"].data.tags["mlflow.parentRunId"] == fit
    assert client.get_run(fit).data.metrics == {"fitted": 1.0}
    # Inputs: the features table at the version each run read (the digest), its URI as the source.
    assert _inputs(client, fit) == {"features/bb/l": ("1", "local", uri, "training")}
    assert _inputs(client, evaluate) == {"features/bb/l": ("2", "local", uri, "evaluation")}  # missing table left out
    assert _inputs(client, child) == {"features/bb/l": ("2", "local", uri, "training")}

    # A re-run reuses the study and stage runs; a failing stage marks itself and the study FAILED.
    again = tracking.study_stage_run(cfg, "fit", [tracking.table_input(cfg, uri)])
    assert again == fit and client.get_run(fit).info.status == "RUNNING"
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    tracking.end_stage_run(cfg, fit, {}, status="FAILED", error="ValueError: boom")
    assert client.get_run(fit).info.status == client.get_run(parent.info.run_id).info.status == "FAILED"
    assert client.get_run(fit).data.tags["error"] == "ValueError: boom"
    assert {"1", "2"} == {i.dataset.digest for i in client.get_run(fit).inputs.dataset_inputs}
    assert len(client.search_runs([tracking.experiment_id(cfg)])) == 4

    # A folder no MLflow source knows (the demo's builtin photographs) is still recorded by URI.
    tracking.log_table_inputs(client, evaluate, [tracking.TableInput("demo", "builtin:skimage")], "input")
    digest, kind, source, context = _inputs(client, evaluate)["demo"]
    assert (kind, source, context) == ("uri", "builtin:skimage", "input") and len(digest) == 8  # MLflow's hash


# -- a tracking server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port: SQLite backend, proxied artefacts in a local folder.
    Yields (url, artifacts destination); stopped by PID at the end."""
    root = tmp_path_factory.mktemp("mlflow_server")
    server, url = ray_cluster.start_mlflow(root, ray_cluster.clean_env(), str(root / "artifacts"))
    yield url, root / "artifacts"
    server.stop()


def test_find_experiment_id_asks_a_tracking_server_without_creating_anything(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    url, _ = mlflow_server
    cfg = _cfg(tmp_path, tracking_uri=url, experiment="looked_up")
    assert tracking.find_experiment_id(cfg) is None
    assert MlflowClient(url).get_experiment_by_name("looked_up") is None  # looking created nothing
    exp_id = tracking.experiment_id(cfg)
    assert tracking.find_experiment_id(cfg) == exp_id


def test_stage_runs_log_through_a_tracking_server(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    url, dest = mlflow_server
    cfg = _cfg(tmp_path, tracking_uri=url)
    uri = _features_table(cfg)
    exp_id = tracking.experiment_id(cfg)
    assert tracking.runs_page_url(cfg) == f"{url}/#/experiments/{exp_id}/runs"
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# s\n")
    run_id = tracking.study_stage_run(cfg, "report", tracking.table_inputs(cfg, [uri]), context="evaluation")
    tracking.end_stage_run(cfg, run_id, {"figures": 0}, artefacts=report)

    client = MlflowClient(url)
    exp = client.get_experiment(exp_id)
    assert exp.tags[tracking.KIND_TAG] == "custom_model_development"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "s:report"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "s" and parent.data.tags["featmap.level"] == "study"
    assert _inputs(client, run_id) == {"features/bb/l": ("1", "local", uri, "evaluation")}
    assert {"report.md", "config.yaml"} <= {a.path for a in client.list_artifacts(run_id)}
    # Proxied: the artefacts went through the server into its destination, not under the storage root.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert (dest / exp_id / run_id / "artifacts" / "report.md").read_text() == "# s\n"
    assert not (tmp_path / "store" / "mlartifacts").exists() and not (tmp_path / "store" / "mlflow.db").exists()


def test_sqlite_with_a_bucket_storage_root_keeps_artefacts_in_the_bucket(s3_server, tmp_path):
    """One machine, storage in S3 (moto on loopback): the database is the configured SQLite file,
    artefacts go to <storage>/mlartifacts in the bucket (written by the MLflow client, boto3)."""
    import boto3
    from mlflow import MlflowClient

    boto3.client("s3").create_bucket(Bucket="featmap-mlflow")
    cfg = Config.model_validate({"storage": "s3://featmap-mlflow/featmap", "dataset": {"name": "t", "root": "/data"},
                                 "mapping": {"study": "s"},
                                 "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    uri = _features_table(cfg)
    exp_id = tracking.experiment_id(cfg)
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# s\n")
    run_id = tracking.study_stage_run(cfg, "report", tracking.table_inputs(cfg, [uri]), context="evaluation")
    tracking.end_stage_run(cfg, run_id, {"figures": 0}, artefacts=report)

    client = MlflowClient(tracking.tracking_uri(cfg))
    assert client.get_experiment(exp_id).artifact_location == "s3://featmap-mlflow/featmap/mlartifacts"
    assert _inputs(client, run_id) == {"features/bb/l": ("1", "s3", uri, "evaluation")}
    assert {"report.md", "config.yaml"} <= {a.path for a in client.list_artifacts(run_id)}
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="featmap-mlflow",
                                                                 Prefix="featmap/mlartifacts/")["Contents"]}
    assert f"featmap/mlartifacts/{run_id}/artifacts/report.md" in keys


# -- models: weight folders logged to runs, registered, and found again by URI -----------------------

@pytest.mark.parametrize("server", [False, True], ids=["sqlite", "server"])
def test_a_model_folder_is_registered_and_found_again_by_its_uris(tmp_path, request, server):
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path, **({"tracking_uri": request.getfixturevalue("mlflow_server")[0]} if server else {}))
    folder = tmp_path / "cn"
    folder.mkdir()
    files = {"config.json": b"{}", "weights.bin": bytes(range(256))}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    client = MlflowClient(tracking.tracking_uri(cfg))
    run_id = client.create_run(tracking.experiment_id(cfg)).info.run_id

    first = tracking.register_model(cfg, run_id, str(folder), "cn/step_1", "featinv-t", {"step": "1"})
    assert (first.uri, first.run_id, first.registered) == (f"runs:/{run_id}/cn/step_1", run_id, "models:/featinv-t/1")
    # The same artefacts again (a re-run that trained no further): the same version, no new one.
    assert tracking.register_model(cfg, run_id, str(folder), "cn/step_1", "featinv-t", {"step": "1"}) == first
    second = tracking.register_model(cfg, run_id, str(folder), "cn/step_2", "featinv-t", {"step": "2"})
    assert second.registered == "models:/featinv-t/2"
    assert client.get_model_version("featinv-t", "2").tags == {"step": "2"}
    client.set_registered_model_alias("featinv-t", "best", "1")

    for i, (uri, registered) in enumerate([(first.uri, None), ("models:/featinv-t/1", "models:/featinv-t/1"),
                                           ("models:/featinv-t@best", "models:/featinv-t/1")]):
        source = tracking.model_source(cfg, uri)
        assert (source.uri, source.run_id, source.registered) == (uri, run_id, registered)
        local = Path(tracking.download_model(cfg, source, str(tmp_path / f"download{i}")))
        assert {p.name: p.read_bytes() for p in local.iterdir()} == files
    assert str(tracking.model_source(cfg, "models:/featinv-t@best")) == f"models:/featinv-t/1 (MLflow run {run_id})"
    assert tracking.model_source(cfg, "models:/featinv-t/latest").registered == "models:/featinv-t/2"  # the highest
    plain = tracking.model_source(cfg, "s3://bucket/cn")  # a folder: nothing to look up
    assert (str(plain), plain.artifact_uri, plain.run_id) == ("s3://bucket/cn", "s3://bucket/cn", None)

    for uri, message in [("models:/nope/1", "nope"), ("models:/nope/latest", "'nope' has no version"),
                         ("models:/featinv-t/9", "version=9"),
                         ("models:/featinv-t@worst", "alias worst"), (f"runs:/{'0' * 32}/cn", "0" * 32),
                         (f"runs:/{run_id}/nothere", "no artefacts under 'nothere'")]:
        with pytest.raises(tracking.ModelNotFound, match=message) as err:
            tracking.model_source(cfg, uri)
        assert str(err.value).startswith(uri) and tracking.tracking_uri(cfg) in str(err.value)
    with pytest.raises(ValueError, match="expected runs:/<run_id>/<artifact path>, models:/<name>/<version>"):
        tracking.model_source(cfg, "models:/featinv-t")
