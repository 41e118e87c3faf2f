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
    st.record_errors("ingest", [{"key": "a/original", "reason": "truncated", "message": "m1"},
                                {"key": "b/original", "reason": "empty_file", "message": "m2"}])
    st.record_errors("ingest", [{"key": "a/original", "reason": "not_an_image", "message": "m3"}])
    st.record_errors("extract:x", [{"key": "a/original", "reason": "non_finite", "message": "m4"}])
    rows = {(r["stage"], r["key"]): r["reason"] for r in st.errors().to_pylist()}
    assert rows == {("ingest", "a/original"): "not_an_image", ("ingest", "b/original"): "empty_file",
                    ("extract:x", "a/original"): "non_finite"}
    st.clear_errors("ingest", ["a/original", "zzz"])
    assert [(r["stage"], r["key"]) for r in st.errors("ingest").to_pylist()] == [("ingest", "b/original")]
    assert st.errors("extract:x").num_rows == 1


def test_existing_table_with_another_shape_is_refused(tmp_path):
    uri = str(tmp_path / "f.lance")
    tables.ensure_table(uri, tables.feature_schema((4, 3, 3), "float16", {}))
    tables.ensure_table(uri, tables.feature_schema((4, 3, 3), "float16", {"other": "metadata"}))  # fine
    with pytest.raises(tables.SchemaMismatch, match="f.lance"):
        tables.ensure_table(uri, tables.feature_schema((8, 3, 3), "float16", {}))
    with pytest.raises(tables.SchemaMismatch):
        tables.check_schema(uri, tables.feature_schema((4, 3, 3), "float32", {}))
