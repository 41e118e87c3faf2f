"""The `featmap` entry point: help, exit codes, early failures that write nothing (and start no
Ray), the default config, resume after a kill."""

import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import pytest
import ray
import yaml

from featmap_ray import cli, config
from featmap_ray.io import tables
from featmap_ray.stages import base, runtime
from tests.conftest import write_image

STAGES = base.registry()

REPO = Path(__file__).resolve().parents[1]
needs_ray = pytest.mark.usefixtures("ray_session")


def _config_file(tmp_path, root, **extra) -> str:
    data = {
        "storage": str(tmp_path / "store"),
        "dataset": {"name": "t", "root": str(root), "image_size": 64},
        "manipulate": {"ops": {"rotation": [90]}},
        "extract": {"backbones": [{"name": "convnext_base", "layers": ["stage3"], "pretrained": False,
                                   "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}}]},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@needs_ray
def test_exit_codes(tmp_path, capsys):
    assert cli.main(["ingest", "--config", _config_file(tmp_path, tmp_path), "dataset.nope=1"]) == 2
    assert "dataset.nope: unknown key" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["ingest", "--config", _config_file(tmp_path, tmp_path / "empty")]) == 1
    assert "no image files" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.jpg").write_text("not a jpeg")
    assert cli.main(["ingest", "--config", _config_file(tmp_path, bad)]) == 1  # nothing usable
    assert "no usable images" in capsys.readouterr().err
    assert tables.Store(str(tmp_path / "store")).errors("ingest").num_rows == 2


@needs_ray
def test_missing_pretrained_weights_stop_extract_before_anything_is_written(tmp_path, capsys):
    write_image(tmp_path / "data" / "c" / "x.png")
    config = _config_file(tmp_path, tmp_path / "data")
    assert cli.main(["ingest", "--config", config]) == 0
    before = lance.dataset(str(tmp_path / "store" / "images.lance")).version
    code = cli.main(["extract", "--config", config,
                     "extract.backbones=[{name: resnet50, pretrained: false}, {name: convnext_base}]"])
    assert code == 1
    err = capsys.readouterr().err
    assert "convnext_base.fb_in22k_ft_in1k" in err and "checkpoint" in err
    assert not (tmp_path / "store" / "features").exists()  # not even the first backbone's tables
    assert lance.dataset(str(tmp_path / "store" / "images.lance")).version == before


@pytest.mark.slow
@needs_ray
def test_extract_killed_half_way_resumes_to_exactly_the_expected_rows(tmp_path):
    for i in range(12):
        write_image(tmp_path / "data" / f"c{i % 2}" / f"{i}.png", seed=i)
    # the real-size ConvNeXt-B (random weights) is slow enough on CPU to be killed mid-run
    config = _config_file(tmp_path, tmp_path / "data",
                          extract={"backbones": [{"name": "convnext_base", "layers": ["stage3"], "pretrained": False}],
                                   "batch_size": 2, "rows_per_commit": 2})
    assert cli.main(["ingest", "--config", config]) == 0
    assert cli.main(["manipulate", "--config", config]) == 0
    uri = str(tmp_path / "store" / "features" / "convnext_base" / "stage3.lance")
    proc = subprocess.Popen([sys.executable, "-m", "featmap_ray.cli", "extract", "--config", config],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            ds = tables.open_table(uri)
            if ds is not None and ds.count_rows() >= 2:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    committed = lance.dataset(uri).count_rows()
    assert 2 <= committed < 24, "the job was not interrupted half way"
    assert cli.main(["extract", "--config", config]) == 0
    table = lance.dataset(uri).to_table(columns=["source_id", "variant"])
    keys = list(zip(table["source_id"].to_pylist(), table["variant"].to_pylist()))
    assert len(keys) == len(set(keys)) == 24
    images = lance.dataset(str(tmp_path / "store" / "images.lance")).to_table(columns=["source_id", "variant"])
    assert set(keys) == set(zip(images["source_id"].to_pylist(), images["variant"].to_pylist()))


# -- help -------------------------------------------------------------------------------------------

def test_no_arguments_lists_the_commands(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "required" not in err
    for name, stage in STAGES.items():
        assert f"  {name:<16}{stage.summary}\n" in err  # one line each
    assert "default: conf/demo.yaml" in err


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {name:<16}{stage.summary}\n" in out for name, stage in STAGES.items())
    assert max(map(len, out.splitlines())) <= cli.WIDTH


@pytest.mark.parametrize("name", list(STAGES))
def test_each_command_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: featmap {name} ") and STAGES[name].summary in out
    if name != "featinv-import":
        assert "--config FILE, -c FILE" in out and "default: conf/demo.yaml" in out
        assert "config keys it reads" in out


def _help(name: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_command_help_lists_the_keys_of_the_config_models(capsys):
    """Derived from the pydantic models: every field of a section a command reads is named."""
    text = _help("ingest", capsys)
    assert "dataset: name*, root*, " in text
    assert all(field in text for field in config.DatasetConfig.model_fields)
    text = _help("fit", capsys)
    assert "mapping.training: " + ", ".join(config.MappingTraining.model_fields) in text
    assert "mapping.resources: " + ", ".join(config.MappingResources.model_fields) in text
    assert "mapping.sweep:" not in text  # fit does not read it; sweep does
    assert "mapping.sweep: " + ", ".join(config.SweepConfig.model_fields) in _help("sweep", capsys)
    assert "featinv.sampling: " + ", ".join(config.FeatInvSampling.model_fields) in _help("reconstruct", capsys)
    with pytest.raises(KeyError, match="mapping.nope"):  # a key list naming a missing key fails, never drifts
        cli._key_line("mapping.nope")


def test_config_and_overrides_in_any_order(tmp_path, capsys):
    path = _config_file(tmp_path, tmp_path)
    for argv in (["info", "storage=/x/a", "--config", path, "dataset.name=n"],
                 ["info", "-c", path, "storage=/x/a"],
                 ["-c", path, "info", "storage=/x/a"]):
        assert cli.main(argv) == 0
        assert "storage root: /x/a\n" in capsys.readouterr().out


# -- the default config -----------------------------------------------------------------------------

def test_config_defaults_to_conf_demo_yaml_in_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert "no --config given" in err and "conf/demo.yaml" in err and str(tmp_path) in err
    (tmp_path / "conf").mkdir()
    shutil.copy(REPO / "conf" / "demo.yaml", tmp_path / "conf" / "demo.yaml")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"storage root: {tmp_path / 'featmap_data'}" in out and "no tables yet" in out
    assert not (tmp_path / "featmap_data").exists()  # info writes nothing


def test_job_entry_uses_the_default_config(tmp_path, monkeypatch):
    """A submitted job without --config checks the default's storage (relative in conf/demo.yaml)."""
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    entry = importlib.import_module("_entry")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    shutil.copy(REPO / "conf" / "demo.yaml", tmp_path / "conf" / "demo.yaml")
    assert entry._storage_inside_working_dir([]) == "featmap_data"
    assert entry._storage_inside_working_dir(["storage=/abs/x"]) is None


# -- checks before Ray starts and before anything is written ---------------------------------------

def _one_image(tmp_path) -> list[str]:
    write_image(tmp_path / "data" / "c" / "x.png")
    return [f"dataset.root={tmp_path / 'data'}"]


def _empty(tmp_path) -> list[str]:
    (tmp_path / "empty").mkdir()
    return [f"dataset.root={tmp_path / 'empty'}"]


FAILS_EARLY = [
    ("ingest", lambda t: [f"dataset.root={t / 'missing'}"], "is not a folder", 1),
    ("ingest", _empty, "no image files", 1),
    ("ingest", lambda t: ["dataset.nope=1"], "dataset.nope: unknown key", 2),
    ("manipulate", lambda t: [], "run `featmap ingest` first", 1),
    ("extract", lambda t: ["extract.backbones=[{name: nosuchnet}]"], "unknown backbone 'nosuchnet'", 1),
    ("extract", lambda t: ["extract.backbones=[{name: convnext_base, layers: [stage9], pretrained: false}]"],
     "has no layer(s) ['stage9']", 1),
    ("pipeline", lambda t: [*_one_image(t), "extract.backbones=[{name: convnext_base}]"],
     "pretrained weights for backbone 'convnext_base'", 1),
    ("fit", lambda t: [], "no images table", 1),
    ("study", lambda t: [], "no images table", 1),
    ("sweep", lambda t: ["mapping.sweep.model=nosuch"], "mapping.sweep.model: unknown model family", 1),
    ("sweep", lambda t: ["mapping.sweep.space={nope: {type: choice, values: [1]}}"], "mapping.sweep.space.nope", 1),
    ("evaluate", lambda t: ["mapping.datasets={t: {g: {manipulations: [rotation_90], models: [nosuch]}}}"],
     "unknown model family 'nosuch'", 1),
    ("evaluate", lambda t: ["mapping.targets=[{backbone: nosuchnet, layers: [a]}]"], "unknown backbone", 1),
    ("analyze", lambda t: ["mapping.losses={x: nosuch}"], "mapping.losses.x", 1),
    ("report", lambda t: [], "no evaluations results", 1),
    ("featinv-train", lambda t: ["featinv.layer=stage9"], "has no layer(s) ['stage9']", 1),
    ("reconstruct", lambda t: [f"featinv.base_model={t / 'no_sd'}"], "Stable Diffusion base model", 1),
    ("reconstruct", lambda t: ["featinv.controlnet=models:/featinv-x/1"], "models:/featinv-x/1: no MLflow database", 1),
]


@pytest.mark.parametrize(("command", "overrides", "message", "code"), FAILS_EARLY,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(FAILS_EARLY)])
def test_a_failing_check_stops_before_ray_and_writes_nothing(command, overrides, message, code, tmp_path,
                                                              monkeypatch, capsys):
    def no_ray(cfg):
        raise AssertionError("Ray was started before the checks failed")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    ray_before = ray.is_initialized()
    path = _config_file(tmp_path, tmp_path)
    assert cli.main([command, "--config", path, *overrides(tmp_path)]) == code
    assert message in capsys.readouterr().err
    assert ray.is_initialized() == ray_before
    assert not (tmp_path / "store").exists()  # no mlflow.db, no mlartifacts/, no tables


def test_jobs_come_from_the_registry():
    """jobs/<command>.py are what `python jobs/_entry.py` writes from the registry: one script per command
    that runs on Ray (serve excepted), nothing else. (The documentation's command table is generated from the
    registry when the site is built: docs/hooks.py, checked by tests/test_docs.py.)"""
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        entry = importlib.import_module("_entry")
    finally:
        sys.path.remove(str(REPO / "jobs"))
    expected = entry.scripts()
    assert set(expected) == {f"{n.replace('-', '_')}.py" for n, s in STAGES.items() if s.starts_ray and n != "serve"}
    assert {p.name for p in (REPO / "jobs").glob("[!_]*.py")} == set(expected)
    for file, text in expected.items():
        assert (REPO / "jobs" / file).read_text() == text, f"jobs/{file} is stale: run `python jobs/_entry.py`"


def test_status_on_an_empty_root_says_missing_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """`featmap status` reads only metadata: on a root with nothing yet, every stage output it knows is
    "missing", the command exits 0 without starting Ray, and the root stays empty."""
    monkeypatch.setattr(runtime, "init_ray", lambda cfg: pytest.fail("featmap status started Ray"))
    assert cli.main(["status", "--config", _config_file(tmp_path, tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.startswith("  ")]
    states = {(words[1], words[0]) for words in lines if words and words[0] in ("missing", "stale", "partial", "up")}
    assert ("ingest", "missing") in states and ("extract", "missing") in states and ("fit", "missing") in states
    assert not any(state != "missing" for _, state in states)
    assert not (tmp_path / "store").exists()
