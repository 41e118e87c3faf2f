"""The only module that talks to Lance: table locations, explicit schemas, keyed idempotent writes.

Layout under one storage root (a local folder or an object-store URI):

    images.lance                      originals and manipulated variants, key (source_id, variant)
    features/<backbone>/<layer>.lance one (C, H, W) tensor per image variant, same key
    errors.lance                      what failed and why, key (stage, target, key): `target` is the table or
                                      artefact the row was meant for, `key` that table's key values
    reconstructions/<backbone>/<layer>.lance  FeatInv images of feature maps, key (source_id, variant, generator, seed)

Stages write through `KeyedLanceSink`, a Ray Data datasink whose every write task inserts its rows
with one Lance `merge_insert` commit that skips keys already stored. A table's key columns are its
(unenforced) primary key, so Lance's commit detects two writers inserting the same key at once
(two jobs on overlapping inputs, a retried task): the later commit is retried against the earlier
one's rows, and every key ends with exactly one row. A table only ever holds complete rows; a
killed job leaves the rows it committed, and re-running the stage skips those keys.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lance
import numpy as np
import pyarrow as pa

from featmap_ray.layout import Layout

KEY = ("source_id", "variant")
ORIGINAL = "original"  # the variant name of the resized, unmanipulated image
# Field metadata that makes key columns a table's primary key: Lance then checks concurrent
# merge_inserts for keys inserted twice (without it, both commits succeed and duplicate the key).
PRIMARY_KEY = {"lance-schema:unenforced-primary-key": "true"}
# How often a merge_insert that lost a race is redone against the newer table version.
COMMIT_RETRIES = 50


def key_field(name: str) -> pa.Field:
    return pa.field(name, pa.string(), nullable=False, metadata=PRIMARY_KEY)

IMAGES_SCHEMA = pa.schema(
    [
        key_field("source_id"),
        key_field("variant"),  # "original" or a manipulation name
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("class_idx", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("family", pa.string()),  # original / geometric / photometric / mask / semantic
        pa.field("params", pa.string()),  # JSON
        pa.field("seed", pa.int64()),  # the seed a random manipulation drew from; null otherwise
        pa.field("image", pa.binary()),  # lossless PNG of what the backbone will see
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("source_path", pa.string()),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        key_field("stage"),
        key_field("target"),  # the table or artefact under the storage root (Layout.name), e.g. "features/x/y"
        key_field("key"),  # the target's key columns of the row, joined by "/" (key_string)
        pa.field("source_id", pa.string()),
        pa.field("variant", pa.string()),
        pa.field("path", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("message", pa.string()),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC")),
    ]
)

RECONSTRUCTION_KEY = ("source_id", "variant", "generator", "seed")


def reconstructions_schema() -> pa.Schema:
    """Schema of a reconstructions table (what made each generator's rows: its provenance, stages.base)."""
    return pa.schema(
        [
            key_field("source_id"),
            key_field("variant"),
            key_field("generator"),  # what produced the map: "extracted" or a mapping
            pa.field("seed", pa.int64(), nullable=False, metadata=PRIMARY_KEY),  # of the initial latent
            pa.field("split", pa.string()),
            pa.field("class_idx", pa.int32()),
            pa.field("image", pa.binary()),  # PNG of the reconstruction
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("cos_median_lower", pa.float32()),  # median (torch's lower) over positions: source vs recon map
            pa.field("source_top1", pa.int32()),  # classifier top-1 of the stored source image (null: none)
            pa.field("top1_match", pa.bool_()),  # the reconstruction's top-1 is the source's top-1
            pa.field("top5_match", pa.bool_()),  # the source's top-1 is in the reconstruction's top-5
        ],
    )


# Columns a stage's batches carry besides the table columns: null when the row succeeded.
ERROR_COLUMNS = ("error_reason", "error_message")


def feature_schema(shape: Sequence[int], dtype: str, metadata: dict[str, Any]) -> pa.Schema:
    """Schema of one features table: key, labels and a canonical Arrow fixed-shape (C, H, W) tensor."""
    value_type = {"float16": pa.float16(), "float32": pa.float32()}[dtype]
    return pa.schema(
        [
            key_field("source_id"),
            key_field("variant"),
            pa.field("split", pa.string()),
            pa.field("class_idx", pa.int32()),
            pa.field("feature", pa.fixed_shape_tensor(value_type, list(shape))),
        ],
        metadata={"featmap": json.dumps(metadata, sort_keys=True)},
    )


def tensor_array(values: np.ndarray) -> pa.ExtensionArray:
    """(N, C, H, W) array -> Arrow `fixed_shape_tensor` column, readable without Ray (N may be 0)."""
    values = np.ascontiguousarray(values)
    tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), list(values.shape[1:]))
    storage = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), int(np.prod(values.shape[1:])))
    return pa.ExtensionArray.from_storage(tensor_type, storage)


def tensor_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow `fixed_shape_tensor` column -> (N, C, H, W) numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()


def key_string(*values: Any) -> str:
    """A row's key (its key columns' values, in order) as one string: the errors table's `key`."""
    return "/".join(map(str, values))


def sql_list(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class SchemaMismatch(ValueError):
    """An existing table was written with a different schema than this run produces."""


def open_table(uri: str) -> lance.LanceDataset | None:
    try:
        return lance.dataset(uri)
    except (ValueError, FileNotFoundError, OSError):
        return None


def ensure_table(uri: str, schema: pa.Schema) -> None:
    """Create an empty table with `schema`, or check that an existing one matches it (and mark its
    key columns as the primary key if an older version of this project created it without)."""
    ds = open_table(uri)
    if ds is None:
        try:
            lance.write_dataset(schema.empty_table(), uri, schema=schema, mode="create")
            return
        except OSError:  # created by a concurrent writer in the meantime
            ds = open_table(uri)
            if ds is None:
                raise
    check_schema(uri, schema)
    unmarked = {f.name: PRIMARY_KEY for f in schema if f.metadata and f.metadata.get(b"lance-schema:unenforced-primary-key")
                and not (ds.schema.field(f.name).metadata or {}).get(b"lance-schema:unenforced-primary-key")}
    if unmarked:
        ds.update_field_metadata(unmarked)


PROVENANCE = "featmap:provenance"  # schema metadata key: {group: provenance} (featmap_ray.stages.base)


def read_provenance(table: str | lance.LanceDataset) -> dict[str, dict[str, Any]]:
    """The provenance recorded in a table's schema metadata, per group ({} when none)."""
    ds = open_table(table) if isinstance(table, str) else table
    raw = None if ds is None else (ds.schema.metadata or {}).get(PROVENANCE.encode())
    return json.loads(raw) if raw else {}


def write_provenance(uri: str, groups: dict[str, dict[str, Any]]) -> None:
    """Record (add or replace) these groups' provenance in the table's schema metadata: one commit."""
    ds = lance.dataset(uri)
    recorded = read_provenance(ds)
    merged = {**recorded, **groups}
    if merged != recorded:
        ds.update_schema_metadata({PROVENANCE: json.dumps(merged, sort_keys=True)})


def delete_rows(uri: str, filter: str | None) -> None:
    """Delete the rows `filter` selects (None: every row) in one commit."""
    lance.dataset(uri).delete(filter or "true")


def check_schema(uri: str, schema: pa.Schema) -> None:
    """Raise SchemaMismatch if the table at `uri` exists with another schema."""
    ds = open_table(uri)
    if ds is not None and not ds.schema.remove_metadata().equals(schema.remove_metadata()):
        raise SchemaMismatch(
            f"table {uri} exists with schema\n  {ds.schema.remove_metadata()}\n"
            f"but this run writes\n  {schema.remove_metadata()}\n"
            "(a different layer shape or dtype?) Use another storage root or delete the table."
        )


class Store:
    """Lance tables under one storage root."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.layout = Layout(self.root)

    # -- reading -----------------------------------------------------------------------------
    def open(self, uri: str) -> lance.LanceDataset | None:
        return open_table(uri)

    def count(self, uri: str, filter: str | None = None) -> int:
        ds = self.open(uri)
        return 0 if ds is None else ds.count_rows(filter=filter)

    def keys(self, uri: str, filter: str | None = None) -> set[tuple[str, str]]:
        ds = self.open(uri)
        return set() if ds is None else set(row_keys(ds.to_table(columns=list(KEY), filter=filter)))

    def rows(self, uri: str, keys: Iterable[tuple[str, str]], columns: list[str]) -> pa.Table:
        """The rows of the (source_id, variant) `keys` that the table holds: key columns + `columns`."""
        wanted = set(keys)
        ds = self.open(uri)
        if ds is None or not wanted:
            return pa.table({c: pa.array([], pa.string()) for c in KEY})
        ids = sorted({s for s, _ in wanted})
        table = ds.to_table(columns=[*KEY, *columns], filter=f"source_id IN ({sql_list(ids)})")
        return table.filter(pa.array([k in wanted for k in row_keys(table)], type=pa.bool_()))


    # -- failures ----------------------------------------------------------------------------
    def check_errors_table(self) -> None:
        """Refuse an errors table of the older schema, keyed (stage, key) without the target: a stage
        calls this before it writes anything. (Its rows cannot be given their target afterwards.)"""
        ds = self.open(self.layout.errors)
        if ds is not None and "target" not in ds.schema.names:
            raise SchemaMismatch(
                f"errors table {self.layout.errors} was written by an older featmap (failures keyed (stage, key)); "
                "they are now keyed (stage, target, key). Delete that table (each stage records its failures "
                "again when it retries them) or use another storage root.")

    def record_errors(self, stage: str, target: str, rows: list[dict[str, Any]]) -> None:
        """Upsert failures on (stage, target, key): `target` is the URI of the table (or artefact) the rows
        were meant for, each row's `key` its key in that table (`key_string`). Re-running a stage
        updates a failure, never duplicates it."""
        if not rows:
            return
        self.check_errors_table()
        now = dt.datetime.now(dt.timezone.utc)
        name = self.layout.name(target)
        table = pa.Table.from_pylist([{**r, "stage": stage, "target": name, "recorded_at": now} for r in rows],
                                     schema=ERRORS_SCHEMA)
        ensure_table(self.layout.errors, ERRORS_SCHEMA)
        (lance.dataset(self.layout.errors).merge_insert(["stage", "target", "key"]).when_matched_update_all()
         .when_not_matched_insert_all().conflict_retries(COMMIT_RETRIES).execute(table))

    def clear_errors(self, stage: str, target: str, keys: Iterable[str]) -> None:
        """Forget the failures of (stage, target) whose keys have now succeeded: one read of that pair's
        recorded keys (a filtered scan, usually of nothing) and one delete of those that succeeded."""
        ds = self.open(self.layout.errors)
        if ds is None:
            return
        self.check_errors_table()
        where = f"stage = {sql_list([stage])} AND target = {sql_list([self.layout.name(target)])}"
        recorded = set(ds.to_table(columns=["key"], filter=where)["key"].to_pylist())
        stale = sorted(recorded.intersection(keys))
        if stale:  # a delete commits a table version even when it matches nothing
            ds.delete(f"{where} AND key IN ({sql_list(stale)})")

    def errors(self, stage: str | None = None, target: str | None = None) -> pa.Table:
        """The recorded failures, of one stage and / or one target (a URI under the root) when given."""
        ds = self.open(self.layout.errors)
        if ds is None:
            return ERRORS_SCHEMA.empty_table()
        self.check_errors_table()
        where = [f"{column} = {sql_list([value])}" for column, value in
                 (("stage", stage), ("target", None if target is None else self.layout.name(target)))
                 if value is not None]
        return ds.to_table(filter=" AND ".join(where) or None)


@dataclass(frozen=True)
class Target:
    """One table a stage writes: `columns` maps table columns to differently named batch columns."""

    uri: str
    schema: pa.Schema
    columns: dict[str, str] = field(default_factory=dict)
    key: tuple[str, ...] = KEY  # the columns that identify a row: a key already stored is not written again

    @property
    def batch_key(self) -> tuple[str, ...]:
        """The batch columns that hold the key."""
        return tuple(self.columns.get(c, c) for c in self.key)

    def rows(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:  # e.g. a batch whose forward pass failed carries no feature columns
            return self.schema.empty_table()
        names = self.schema.names
        return batch.select([self.columns.get(n, n) for n in names]).rename_columns(names).cast(self.schema)


class KeyIndex:
    """Point lookups by (source_id, variant) in one version of a table, for a service answering many: the keys
    are read once and sorted, each lookup is a binary search and a `take` of that one row (no scan)."""

    def __init__(self, ds: lance.LanceDataset | None):
        self.ds = ds
        keys = [] if ds is None else row_keys(ds.to_table(columns=list(KEY)))
        # Row offsets in the order of a scan of this version: what `take` expects.
        joined = np.array([f"{s}\0{v}".encode() for s, v in keys], dtype=bytes)
        self.order = np.argsort(joined, kind="stable")
        self.sorted = joined[self.order]

    def __len__(self) -> int:
        return len(self.sorted)

    def row(self, key: tuple[str, str], columns: list[str]) -> pa.Table | None:
        """The row of `key` (its `columns`), or None."""
        wanted = f"{key[0]}\0{key[1]}".encode()
        i = int(np.searchsorted(self.sorted, wanted))
        if i == len(self.sorted) or self.sorted[i] != wanted:
            return None
        return self.ds.take([int(self.order[i])], columns=columns)


def row_keys(table: pa.Table, key: tuple[str, ...] = KEY) -> list[tuple]:
    return list(zip(*(table[c].to_pylist() for c in key), strict=True))


def commit_new_rows(uri: str, table: pa.Table, key: tuple[str, ...] = KEY) -> int:
    """Insert the rows whose keys the table does not hold yet, as one commit; returns their number.

    Deciding at commit time (not only when the stage starts) keeps a retried write task or a
    concurrent run of the same stage from adding duplicates: with the key as the table's primary
    key, a commit that races another inserting the same key fails and is redone (see module doc)."""
    result = (lance.dataset(uri).merge_insert(list(key)).when_not_matched_insert_all()
              .conflict_retries(COMMIT_RETRIES).execute(table))
    return int(result["num_inserted_rows"])


def with_error_columns(schema: pa.Schema) -> pa.Schema:
    """The schema of a stage's output batches: the table's columns plus the failure columns."""
    for name in ERROR_COLUMNS:
        schema = schema.append(pa.field(name, pa.string()))
    return schema


def failure(reason: str, message: str) -> dict[str, str]:
    return {"error_reason": reason, "error_message": message}
