"""What a command prints (docs/concepts/pipeline.md: What a command prints): progress, the stages' summaries, featmap's own
warnings and errors, and the log file's name; the logs of Ray and the other libraries go to
<storage>/logs/<command>-<timestamp>.log, and `-v` shows them as well.

The probe command below logs through a library's logger in a Ray task (forwarded to the driver), in
the driver through a library logger and a logger Ray configured itself, warns, and writes to file
descriptor 2 as native code does; each must land where the definition says."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from pathlib import Path

import pytest
import yaml

from featmap_ray import cli
from featmap_ray.io.files import Location
from featmap_ray.stages import base, console
from tests.conftest import write_image

needs_ray = pytest.mark.usefixtures("ray_session")

WORKER = "probe: a library logger in a Ray task"
DRIVER = "probe: a library logger in the driver"
RAY_DRIVER = "probe: Ray's own logger in the driver"
WARNING = "probe: a Python warning"
NATIVE = "probe: native code on file descriptor 2"
FEATMAP = "probe: featmap warns the user"
SUMMARY = "[probe] the stage's summary"
LIBRARY_MARKS = (WORKER, DRIVER, RAY_DRIVER, WARNING)


def _logs(storage: str) -> list[Path]:
    return sorted((Path(storage) / "logs").glob("probe-*.log"))


def _probe(cfg) -> str:
    import ray

    @ray.remote
    def task() -> None:
        logging.getLogger("mlflow.probe").warning(WORKER)

    ray.get(task.remote())
    logging.getLogger("mlflow.probe").warning(DRIVER)  # propagates to the root logger
    logging.getLogger("ray.data.probe").warning(RAY_DRIVER)  # Ray Data's own console handler
    warnings.warn(WARNING, UserWarning, stacklevel=1)
    os.write(2, (NATIVE + "\n").encode())
    logging.getLogger("featmap_ray.stages.probe").warning(FEATMAP)
    deadline = time.monotonic() + 60  # the worker's line reaches the driver asynchronously
    while not any(WORKER in p.read_text() for p in _logs(cfg.storage)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return SUMMARY


@pytest.fixture
def probe(monkeypatch, tmp_path):
    stages = base.registry()
    stage = base.Stage("probe", "logs through every channel", _probe)
    monkeypatch.setattr(base, "registry", lambda: {**stages, "probe": stage})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": str(tmp_path / "store"),
                                      "dataset": {"name": "t", "root": str(tmp_path)}}))
    return str(config), str(tmp_path / "store")


@needs_ray
def test_library_logs_go_to_the_log_file_and_not_to_the_console(probe, capfd):
    config, storage = probe
    assert cli.main(["probe", "--config", config]) == 0
    out, err = capfd.readouterr()
    [path] = _logs(storage)
    text = path.read_text()
    assert SUMMARY in out and FEATMAP in err
    assert f"logs of Ray, MLflow and the other libraries: {path}" in err  # the first line says where
    for mark in (*LIBRARY_MARKS, NATIVE):
        assert mark not in out + err, mark
        assert mark in text, mark
    assert FEATMAP in text and SUMMARY not in text  # the file has the logs, not the results


@needs_ray
def test_verbose_shows_the_library_logs_on_the_console_too(probe, capfd):
    config, storage = probe
    assert cli.main(["probe", "-v", "--config", config]) == 0
    out, err = capfd.readouterr()
    [path] = _logs(storage)
    text = path.read_text()
    assert SUMMARY in out
    for mark in (*LIBRARY_MARKS, NATIVE, FEATMAP):
        assert mark in out + err, mark
    for mark in (*LIBRARY_MARKS, FEATMAP):  # native code's output goes to the console only
        assert mark in text, mark


@needs_ray
def test_a_stage_keeps_its_summary_and_ray_data_its_logs(tmp_path, capfd):
    write_image(tmp_path / "data" / "c" / "x.png")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": str(tmp_path / "store"),
                                      "dataset": {"name": "t", "root": str(tmp_path / "data"), "image_size": 64}}))
    assert cli.main(["ingest", "--config", str(config)]) == 0
    out, err = capfd.readouterr()
    [path] = (tmp_path / "store" / "logs").glob("ingest-*.log")
    assert "[ingest] rows written:" in out and "skipped as already stored: 0" in out
    assert "Execution plan of Dataset" in path.read_text() and "Execution plan" not in out + err
    assert not re.search(r"^\[?\d{4}[-/]\d\d[-/]\d\d", out + err, re.M), out + err  # no log record at all


def test_a_command_that_fails_its_checks_writes_no_log(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    (tmp_path / "empty").mkdir()
    config.write_text(yaml.safe_dump({"storage": str(tmp_path / "store"),
                                      "dataset": {"name": "t", "root": str(tmp_path / "empty")}}))
    assert cli.main(["ingest", "--config", str(config)]) == 1
    assert "no image files" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_an_object_store_root_gets_the_log_copied_at_the_end(monkeypatch, capsys):
    copied = {}
    monkeypatch.setattr(Location, "upload", lambda self, local: copied.update({self.uri: Path(local).read_text()}))
    with console.Console("probe") as out:
        path = out.open("s3://bucket/root")
        logging.getLogger("mlflow.probe").warning(DRIVER)
    assert path.parent == Path(console.tempfile.gettempdir()) / "featmap-logs"
    assert list(copied) == [f"s3://bucket/root/logs/{path.name}"] and DRIVER in copied[f"s3://bucket/root/logs/{path.name}"]
    assert "(copied to s3://bucket/root/logs/" in capsys.readouterr().err
    assert path.exists()  # stays, for a killed command's log
    path.unlink()


def test_an_embedded_ray_is_started_so_that_it_has_nothing_to_warn_about(monkeypatch, tmp_path):
    from featmap_ray.stages import runtime
    from tests.conftest import make_config

    monkeypatch.setattr(runtime, "_explicit_token_auth", lambda: None)  # Ray's own config: not here
    monkeypatch.setattr(runtime, "_ours", {})
    names = ("RAY_worker_maximum_startup_concurrency", "RAY_API_SERVER_ADDRESS")
    for name in names:  # recorded, so that what the calls set is undone after the test
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    cpus = (os.cpu_count() or 1) + 6
    training = runtime._local_instance_settings(make_config(tmp_path, tmp_path, ray={"num_cpus": cpus}), state_api=True)
    assert training["include_dashboard"] and training["dashboard_host"] == "127.0.0.1"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{training['dashboard_port']}"
    assert os.environ["RAY_worker_maximum_startup_concurrency"] == str(cpus)
    # A later Ray of the same process, without training and with the cores' CPUs: nothing left over.
    cores = make_config(tmp_path, tmp_path, ray={"num_cpus": os.cpu_count() or 1})
    later = runtime._local_instance_settings(cores, state_api=False)
    assert not later["include_dashboard"] and later["dashboard_port"] is None
    assert not any(name in os.environ for name in names)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")  # the user's: kept
    mine = runtime._local_instance_settings(cores, state_api=True)
    assert mine["dashboard_port"] is None and os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1"
