"""The whole study with its storage root in an S3 bucket (moto's server on loopback), as a user runs
it with `storage=s3://...`: ingest -> manipulate -> extract -> study (fit, evaluate, analyze, report)
-> sweep -> FeatInv training -> reconstruct, tiny models. Every artefact must land in the bucket and
nothing in the working folder."""

from __future__ import annotations

import lance
import pytest
import yaml

from featmap_ray import cli
from featmap_ray.io import tables
from featmap_ray.io.files import Location
from tests.conftest import tiny_backbone, write_image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

STUDY = "s3study"
RUN = "t--direct--convnext_base--stage3--rotation_90--linear--paper"  # the default loss, "paper"


@pytest.fixture(scope="module")
def bucket_study(tmp_path_factory, s3_server):
    import boto3

    bucket = "featmap-e2e"
    boto3.client("s3").create_bucket(Bucket=bucket)
    images = Location(f"s3://{bucket}/sources")  # the image folders are in the bucket too
    local = tmp_path_factory.mktemp("photos")
    for i in range(8):
        write_image(local / "images" / ("test" if i % 4 == 3 else "train") / f"c{i % 2}" / f"{i}.png", seed=i)
    images.upload(local)
    storage = f"s3://{bucket}/featmap"
    workdir = tmp_path_factory.mktemp("cwd")
    config = {
        "storage": storage,
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"},
        "dataset": {"name": "t", "root": str(images), "image_size": 64, "min_side": 8},
        "manipulate": {"ops": {"rotation": [90]}},
        "extract": {"backbones": [tiny_backbone("convnext_base", layers=["stage3"])], "batch_size": 4,
                    "rows_per_commit": 4},
        "mapping": {"study": STUDY, "targets": [{"backbone": "convnext_base", "layers": ["stage3"], "normalise": True}],
                    "datasets": {"t": {"direct": {"manipulations": ["rotation_90"], "models": ["linear"]}}},
                    "training": {"max_epochs": 2, "batch_size": 4, "accumulate": 1},
                    "sweep": {"model": "linear", "manipulation": "rotation_90", "num_samples": 2,
                              "space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}},
        "evaluate": {"truncation_ranks": [1, 2]},
        "featinv": {"base_model": "tiny", "encoder_hidden_channels": 16,
                    "training": {"run_name": "inv", "max_steps": 2, "batch_size": 2, "log_every": 1,
                                 "sample_every": 100, "checkpoint_every": 2},
                    "sampling": {"steps": 2, "batch_size": 4, "rows_per_commit": 4}},
    }
    path = tmp_path_factory.mktemp("conf") / "s3.yaml"
    path.write_text(yaml.safe_dump(config))
    mp = pytest.MonkeyPatch()
    mp.chdir(workdir)  # a relative path written by mistake would land here
    codes = {}
    for command, extra in [("pipeline", []), ("study", []), ("sweep", []), ("featinv-train", []),
                           ("reconstruct", [f"featinv.controlnet={storage}/featinv/inv/controlnet"])]:
        codes[command] = cli.main([command, "--config", str(path), *extra])
    mp.undo()
    return Location(storage), codes, workdir


def test_every_stage_succeeds(bucket_study):
    _, codes, _ = bucket_study
    assert codes == {"pipeline": 0, "study": 0, "sweep": 0, "featinv-train": 0, "reconstruct": 0}


def test_tables_are_in_the_bucket(bucket_study):
    root, _, _ = bucket_study
    st = tables.Store(str(root))
    images = lance.dataset(st.layout.images).to_table(columns=["variant"])
    assert images.num_rows == 16 and set(images["variant"].to_pylist()) == {"original", "rotation_90"}
    assert lance.dataset(st.layout.features("convnext_base", "stage3")).count_rows() == 16
    # every original (featinv.sampling: all splits, variant "original", one seed)
    assert lance.dataset(st.layout.reconstructions("convnext_base", "stage3")).count_rows() == 8
    for name in ("evaluations", "svd", "truncation"):
        assert lance.dataset(st.layout.results(STUDY, name)).count_rows() > 0, name


def test_files_are_in_the_bucket(bucket_study):
    from featmap_ray.mapping import artefacts

    root, _, _ = bucket_study
    runs = root / "mapping" / "runs" / STUDY
    assert [p.name for p in runs.iterdir()] == [RUN]
    model, spec, info = artefacts.load_run(runs / RUN)
    assert spec.key == RUN and len(info["history"]) == 2
    assert (root / "mapping" / "norm" / "t" / "convnext_base" / "stage3.json").read_json()["count"] == 6
    assert artefacts.read_info(root / "mapping" / "sweeps" / STUDY / "best") is not None
    assert (root / "mapping" / "sweeps" / STUDY / "best.json").read_json()["trials"] == 2
    report = (root / "reports" / STUDY).current()  # versioned folders: the published version
    assert "FeatMap study" in (report / "report.md").read_text() and report.glob("*.png")
    assert ((root / "featinv" / "inv" / "controlnet").current() / "config.json").exists()
    assert (root / "mapping" / "tune").iterdir()  # Ray Tune's experiment state


def test_nothing_was_written_to_the_working_folder(bucket_study):
    _, _, workdir = bucket_study
    assert list(workdir.iterdir()) == []
