"""The `featmap` entry point: exit codes, early failures that write nothing, resume after a kill."""

import os
import signal
import subprocess
import sys
import time

import lance
import pytest
import yaml

from featmap_ray import cli, store
from tests.conftest import write_image

pytestmark = pytest.mark.usefixtures("ray_session")


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
    assert store.Store(str(tmp_path / "store")).errors("ingest").num_rows == 2


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
            ds = store.open_table(uri)
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
