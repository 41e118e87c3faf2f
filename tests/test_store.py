"""Lance tables: tensor round trips (Ray and non-Ray readers), error upserts, schema checks."""

import lance
import numpy as np
import pyarrow as pa
import pytest
import ray.data

from featmap_ray.io import tables
from featmap_ray.stages import base


def _feature_table(n: int, shape=(4, 3, 3)) -> tuple[pa.Table, np.ndarray]:
    values = np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float16)
    schema = tables.feature_schema(shape, "float16", {"layer": "x"})
    table = pa.table({"source_id": [f"s{i}" for i in range(n)], "variant": ["original"] * n, "split": ["train"] * n,
                      "class_idx": pa.array(range(n), pa.int32()), "feature": tables.tensor_array(values)}, schema=schema)
    return table, values


@pytest.mark.usefixtures("ray_session")
def test_feature_tensors_round_trip_through_ray_and_plain_readers(tmp_path):
    table, values = _feature_table(10)
    uri = str(tmp_path / "f.lance")
    rows = ray.data.from_arrow(table).map_batches(
        lambda b: b.append_column("error_reason", pa.nulls(b.num_rows, pa.string()))
                   .append_column("error_message", pa.nulls(b.num_rows, pa.string())),
        batch_format="pyarrow")
    summary = base.write_stage(tables.Store(str(tmp_path)), "t", rows, [tables.Target(uri, table.schema)],
                                rows_per_commit=3, skipped=0)
    assert summary.written == {uri: 10}
    # the same rows again (a retried write task, a second run racing the first): nothing added
    again = base.write_stage(tables.Store(str(tmp_path)), "t", rows, [tables.Target(uri, table.schema)],
                              rows_per_commit=3, skipped=0)
    assert again.written == {uri: 0} and lance.dataset(uri).count_rows() == 10
    # plain pyarrow/lance reader: canonical fixed-shape tensor, exact values, in any order
    back = lance.dataset(uri).to_table()
    order = np.argsort([int(s[1:]) for s in back["source_id"].to_pylist()])
    np.testing.assert_array_equal(tables.tensor_numpy(back["feature"])[order], values)
    assert back.schema.field("feature").type.shape == [4, 3, 3]
    # Ray reader
    batch = ray.data.read_lance(uri).sort("class_idx").take_batch(10)
    np.testing.assert_array_equal(batch["feature"], values)
    # torch reader without Ray (lance.torch flattens fixed-shape tensors)
    from lance.torch.data import LanceDataset

    flat = next(iter(LanceDataset(uri, batch_size=10, columns=["feature"])))
    assert tuple(flat.shape) == (10, 36)


def test_failures_are_upserted_and_cleared(tmp_path):
    st = tables.Store(str(tmp_path))
    images, features = st.layout.images, st.layout.features("b", "x")
    st.record_errors("ingest", images, [{"key": "a/original", "reason": "truncated", "message": "m1"},
                                        {"key": "b/original", "reason": "empty_file", "message": "m2"}])
    st.record_errors("ingest", images, [{"key": "a/original", "reason": "not_an_image", "message": "m3"}])
    st.record_errors("extract:b", features, [{"key": "a/original", "reason": "non_finite", "message": "m4"}])
    rows = {(r["stage"], r["target"], r["key"]): r["reason"] for r in st.errors().to_pylist()}
    assert rows == {("ingest", "images", "a/original"): "not_an_image",
                    ("ingest", "images", "b/original"): "empty_file",
                    ("extract:b", "features/b/x", "a/original"): "non_finite"}
    version = lance.dataset(st.layout.errors).version
    st.clear_errors("ingest", images, ["zzz"])  # nothing recorded to clear: no commit
    assert lance.dataset(st.layout.errors).version == version
    st.clear_errors("ingest", images, ["a/original", "zzz"])
    assert [(r["stage"], r["key"]) for r in st.errors("ingest").to_pylist()] == [("ingest", "b/original")]
    assert st.errors("extract:b", features).num_rows == 1 and st.errors(target=images).num_rows == 1


@pytest.mark.usefixtures("ray_session")
def test_failures_of_two_runs_on_one_image_are_two_rows_and_a_success_clears_only_its_own(tmp_path):
    """recon-eval's table is keyed (run, source_id): its failures are keyed the same way."""
    st = tables.Store(str(tmp_path))
    schema = pa.schema([tables.key_field("run"), tables.key_field("source_id"), pa.field("variant", pa.string()),
                        pa.field("score", pa.float64())])
    target = tables.Target(st.layout.results("study", "reconstructions"), schema, key=("run", "source_id"))

    def evaluate(outcomes: dict[str, str | None]) -> base.StageSummary:  # run -> error reason (None: success)
        rows = [{"run": run, "source_id": "img", "variant": "rotation_90", "score": None if error else 1.0,
                 **(tables.failure(error, f"{run} on img") if error else tables.failure(None, None))}
                for run, error in outcomes.items()]
        return base.write_stage(st, "recon-eval", ray.data.from_items(rows), [target], rows_per_commit=4, skipped=0)

    assert evaluate({"run-a": "non_finite", "run-b": "RuntimeError"}).failed == 2
    errors = st.errors("recon-eval").to_pylist()
    assert {(e["target"], e["key"]): e["reason"] for e in errors} == {
        ("results/study/reconstructions", "run-a/img"): "non_finite",
        ("results/study/reconstructions", "run-b/img"): "RuntimeError"}
    assert evaluate({"run-a": None}).written == {target.uri: 1}
    assert [e["key"] for e in st.errors("recon-eval", target.uri).to_pylist()] == ["run-b/img"]


def test_an_errors_table_of_the_older_schema_is_refused_before_anything_is_written(tmp_path):
    st = tables.Store(str(tmp_path))
    older = pa.schema([tables.key_field("stage"), tables.key_field("key"), pa.field("reason", pa.string())])
    lance.write_dataset(older.empty_table(), st.layout.errors, schema=older)
    with pytest.raises(tables.SchemaMismatch, match="older featmap.*Delete that table"):
        base.write_stage(st, "ingest", None, [tables.Target(st.layout.images, tables.IMAGES_SCHEMA)],
                         rows_per_commit=4, skipped=0)
    assert tables.open_table(st.layout.images) is None


def test_existing_table_with_another_shape_is_refused(tmp_path):
    uri = str(tmp_path / "f.lance")
    tables.ensure_table(uri, tables.feature_schema((4, 3, 3), "float16", {}))
    tables.ensure_table(uri, tables.feature_schema((4, 3, 3), "float16", {"other": "metadata"}))  # fine
    with pytest.raises(tables.SchemaMismatch, match="f.lance"):
        tables.ensure_table(uri, tables.feature_schema((8, 3, 3), "float16", {}))
    with pytest.raises(tables.SchemaMismatch):
        tables.check_schema(uri, tables.feature_schema((4, 3, 3), "float32", {}))


def test_a_key_index_finds_each_stored_row_and_nothing_else(tmp_path):
    """Against the definition: for every key, the row `Store.rows` (a filtered scan) returns; None for keys the
    table does not hold, including ones that share a prefix with stored ones."""
    table, values = _feature_table(50)
    uri = str(tmp_path / "f.lance")
    lance.write_dataset(table.slice(0, 30), uri, schema=table.schema)
    lance.write_dataset(table.slice(30), uri, mode="append")  # two fragments
    st = tables.Store(str(tmp_path))
    index = tables.KeyIndex(st.open(uri))
    assert len(index) == 50
    for i in np.random.default_rng(1).permutation(50):
        key = (f"s{i}", "original")
        row = index.row(key, ["feature"])
        assert row is not None and row.num_rows == 1
        np.testing.assert_array_equal(tables.tensor_numpy(row["feature"])[0], values[i])
        expected = st.rows(uri, [key], ["feature"])
        np.testing.assert_array_equal(tables.tensor_numpy(expected["feature"])[0], values[i])
    for missing in (("s5", "mirror_h"), ("s", "original"), ("s50", "original"), ("s1", "origina"), ("", "")):
        assert index.row(missing, ["feature"]) is None
    assert len(tables.KeyIndex(None)) == 0 and tables.KeyIndex(None).row(("s1", "original"), ["feature"]) is None

