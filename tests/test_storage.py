"""The storage layer behaves the same on a local folder and on an S3 bucket (moto's server on loopback)."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from featmap_ray.io import tables
from featmap_ray.io.files import POINTER, Location, is_remote


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return Location(tmp_path / "root")
    return Location(request.getfixturevalue("s3_bucket")) / "root"


def test_names_and_normalisation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location("rel/x").uri == str(tmp_path / "rel" / "x")  # relative: against the CWD, made absolute
    assert Location(f"file://{tmp_path}/a").uri == f"{tmp_path}/a"
    remote = Location("s3://bucket/pre/fix/")
    assert remote.uri == "s3://bucket/pre/fix" and remote.path == "bucket/pre/fix"
    assert (remote / "a" / "b.json").uri == "s3://bucket/pre/fix/a/b.json"
    assert remote.name == "fix" and remote.parent.uri == "s3://bucket/pre"
    assert is_remote("gs://b/x") and not is_remote("/tmp/x") and not is_remote("file:///tmp/x")
    with pytest.raises(ValueError, match="object store"):
        remote.local_path


def test_files_round_trip_and_missing_files_are_named(root):
    f = root / "a" / "b.json"
    assert not f.exists()
    with pytest.raises(FileNotFoundError, match=str(f)):
        f.read_bytes()
    f.write_json({"x": [1, 2]})
    assert f.exists() and f.is_file() and not (root / "a").is_file()
    assert f.read_json() == {"x": [1, 2]}
    f.write_text("replaced")
    assert f.read_text() == "replaced"


def test_listing_glob_and_delete(root):
    for rel in ["r1/run.json", "r1/model.bin", "r2/model.bin", "r3/run.json", "r3/deeper/run.json", "top.json"]:
        (root / rel).write_bytes(rel.encode())
    assert [p.name for p in root.iterdir()] == ["r1", "r2", "r3", "top.json"]
    assert [str(p) for p in root.glob("*/run.json")] == [str(root / "r1/run.json"), str(root / "r3/run.json")]
    assert root.glob("*.json") == [root / "top.json"]
    (root / "r1").delete()
    (root / "top.json").delete()
    (root / "never").delete()  # nothing there: no error
    assert [p.name for p in root.iterdir()] == ["r2", "r3"]
    assert Location(str(root / "missing")).iterdir() == [] and (root / "missing").glob("*") == []


def test_publish_makes_a_new_version_current_only_on_success(root):
    target = root / "report"
    assert target.current() is None
    with target.publish() as out:
        (out / "old.png").write_bytes(b"old")
        (out / "report.md").write_text("v1")
    first = target.current()
    with pytest.raises(RuntimeError):
        with target.publish() as out:
            (out / "report.md").write_text("half")
            raise RuntimeError("crash while writing")
    assert target.current() == first and (first / "report.md").read_text() == "v1"
    assert [p.name for p in target.iterdir()] == [POINTER, first.name]  # the failed version left nothing
    with target.publish() as out:
        (out / "sub").mkdir()
        (out / "sub" / "fig.png").write_bytes(b"new")
        (out / "report.md").write_text("v2")
    second = target.current()
    assert [p.name for p in second.iterdir()] == ["report.md", "sub"]  # old.png went with v1
    assert (second / "sub" / "fig.png").read_bytes() == b"new" and (second / "report.md").read_text() == "v2"
    assert (first / "report.md").read_text() == "v1"  # kept for a reader still reading it
    with target.publish() as out:
        (out / "report.md").write_text("v3")
    third = target.current()
    assert [p.name for p in target.iterdir()] == [POINTER, second.name, third.name]  # v1 went after v3 was current


def test_an_older_version_finished_late_does_not_replace_a_newer_one(root):
    target = root / "model"
    with target.publish() as slow:  # started first ...
        (slow / "w").write_bytes(b"slow")
        with target.publish() as fast:  # ... and overtaken by a writer that started later
            (fast / "w").write_bytes(b"fast")
        newer = target.current()
    assert target.current() == newer and (newer / "w").read_bytes() == b"fast"
    assert [p.name for p in target.iterdir()] == [POINTER, newer.name]


def test_upload_local_copy_and_copy_between_stores(root, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "w.bin").write_bytes(b"\x00\x01")
    (src / "c.json").write_text("{}")
    (root / "up").upload(src)
    with (root / "up").local_copy() as local:
        assert (local / "d" / "w.bin").read_bytes() == b"\x00\x01" and (local / "c.json").read_text() == "{}"
    if not root.is_local:
        assert not local.exists()  # the temporary download is gone
    dest = Location(tmp_path / "copied")
    (root / "up").copy_to(dest)
    assert (dest / "d" / "w.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        with (root / "absent").local_copy():
            pass


def test_a_mapping_run_published_to_the_store_loads_with_the_same_weights(root):
    from featmap_ray.mapping import artefacts, grid

    spec = grid.RunSpec(dataset="d", group="g", backbone="b", layer="l", manipulation="m", model="linear",
                        loss_name="mse", loss={"mse": 1.0}, apply_transform=False, normalise=True)
    norm = {"mean": [0.5, -1.0], "std": [2.0, 3.0]}
    torch.manual_seed(0)
    model = artefacts.build_mapping(spec, (2, 3, 3), norm)
    out = root / "runs" / spec.key
    artefacts.publish(out, model, {"spec": spec.to_dict(), "shape": [2, 3, 3], "norm": norm, "digest": "x"})
    loaded, loaded_spec, info = artefacts.load_run(out)
    assert loaded_spec == spec and info["digest"] == "x"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    copy = root / "best"
    artefacts.copy_run(out, copy)
    assert artefacts.read_info(copy)["digest"] == "x"
    assert artefacts.read_info(root / "runs" / "none") is None


# -- concurrent writers -----------------------------------------------------------------------------

KEYS = [(f"s{i:03d}", v) for i in range(40) for v in ("original", "rotation_90")]
SCHEMA = tables.feature_schema((2, 2, 2), "float16", {})


def _rows(writer: int, keys) -> pa.Table:
    values = np.full((len(keys), 2, 2, 2), writer, np.float16)
    return pa.table({"source_id": [k[0] for k in keys], "variant": [k[1] for k in keys],
                     "split": ["train"] * len(keys), "class_idx": pa.array([0] * len(keys), pa.int32()),
                     "feature": tables.tensor_array(values)}).cast(SCHEMA)


def _write(uri: str, writer: int, barrier, env: dict) -> None:
    os.environ.update(env)
    order = list(KEYS) if writer % 2 == 0 else list(reversed(KEYS))  # overlapping, in other orders
    barrier.wait()  # all writers start together
    for start in range(0, len(order), 10):
        tables.commit_new_rows(uri, _rows(writer, order[start:start + 10]))


@pytest.mark.slow  # writer processes
def test_concurrent_writers_of_overlapping_keys_leave_exactly_one_row_per_key(root):
    import lance

    uri = str(root / "features.lance")
    tables.ensure_table(uri, SCHEMA)
    ctx = multiprocessing.get_context("spawn")  # Lance is not fork-safe; separate processes, like two jobs
    barrier = ctx.Barrier(4)
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    writers = [ctx.Process(target=_write, args=(uri, w, barrier, env)) for w in range(4)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(timeout=300)
    assert [p.exitcode for p in writers] == [0] * 4
    table = lance.dataset(uri).to_table()
    keys = list(zip(table["source_id"].to_pylist(), table["variant"].to_pylist(), strict=True))
    assert len(keys) == len(KEYS) and set(keys) == set(KEYS)
    # Each row is whole: one writer's values throughout.
    values = tables.tensor_numpy(table["feature"]).reshape(len(keys), -1)
    assert (values == values[:, :1]).all()


def test_a_table_created_without_primary_key_metadata_gets_it(tmp_path):
    import lance

    uri = str(tmp_path / "old.lance")
    plain = pa.schema([pa.field(f.name, f.type, f.nullable) for f in SCHEMA])  # as older versions wrote it
    lance.write_dataset(plain.empty_table(), uri, schema=plain)
    tables.ensure_table(uri, SCHEMA)
    fields = lance.dataset(uri).schema
    assert all(fields.field(k).metadata.get(b"lance-schema:unenforced-primary-key") == b"true" for k in tables.KEY)
    assert tables.commit_new_rows(uri, _rows(0, KEYS[:4])) == 4 and tables.commit_new_rows(uri, _rows(1, KEYS[:6])) == 2
