"""Ray Data stage: the originals in `images` -> their manipulated variants, appended to `images`.

Only (source_id, manipulation) pairs not yet stored are computed, so a re-run resumes. A random
manipulation draws from a seed derived from (manipulate.seed, source_id, manipulation), so the
result does not depend on worker count or processing order.

Provenance (stages/base.py): each manipulation is one group of the images table (its variant), made by
its op and parameter, `manipulate.seed` when the op is random, and the `original` group it read.
Another parameter or seed, or originals made by other settings, refuse before writing; `--overwrite`
recomputes exactly those variants. A new manipulation is a new variant, written alongside.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image

from featmap_ray.config import Config
from featmap_ray.io import imageio, tables
from featmap_ray.manipulations.direct import Manipulation
from featmap_ray.seeding import derive_seed
from featmap_ray.stages import base

NAME = "manipulate"
BATCH_SCHEMA = tables.with_error_columns(tables.IMAGES_SCHEMA)
CARRIED = ("source_id", "dataset", "split", "class_idx", "class_name", "source_path")


def variant_row(original: dict, m: Manipulation, base_seed: int) -> dict:
    """Apply one manipulation to one stored original (pure: no Ray)."""
    img = Image.fromarray(imageio.decode_png_rgb(original["image"]))
    seed = derive_seed(base_seed, original["source_id"], m.name) if m.random else None
    out = m.apply(img, None if seed is None else np.random.default_rng(seed))
    return {
        **{k: original[k] for k in CARRIED}, "variant": m.name, "family": m.family, "params": m.params_json(),
        "seed": seed, "image": imageio.encode_png(out), "width": out.width, "height": out.height,
    }


def manipulate_batch(batch: pa.Table, manipulations: dict[str, Manipulation], pending: dict[str, list[str]],
                     base_seed: int) -> pa.Table:
    """Ray Data UDF: original rows -> one row per pending variant (failures as failure rows)."""
    rows = []
    for original in batch.to_pylist():
        for name in pending.get(original["source_id"], ()):
            try:
                rows.append(variant_row(original, manipulations[name], base_seed))
            except Exception as e:  # a broken stored image or op: recorded, the job goes on
                rows.append(failure_row(original, name, e))
    return pa.Table.from_pylist(rows, schema=BATCH_SCHEMA)


def failure_row(original: dict, variant: str, error: Exception) -> dict:
    """The row of a variant that could not be made: the sink records it in the errors table."""
    return {"source_id": original["source_id"], "variant": variant, "source_path": original["source_path"],
            **tables.failure(type(error).__name__, f"{variant} of {original['source_id']}: {error}")}


def variant_groups(cfg: Config, st: tables.Store) -> list[base.Group]:
    """One group of the images table per manipulation: its op and parameter, the base seed when the op is
    random (a deterministic op does not depend on it), and the originals it reads."""
    inputs = base.input_fingerprints(st.root, st.layout.images, [tables.ORIGINAL])
    return [base.Group(m.name, base.Provenance({"op": m.op, "param": m.param,
                                                **({"seed": cfg.manipulate.seed} if m.random else {})}, inputs),
                       base.group_filter("variant", m.name))
            for m in cfg.manipulate.manipulations()]


def run(cfg: Config) -> base.StageSummary:
    st = tables.Store(cfg.storage)
    manipulations = {m.name: m for m in cfg.manipulate.manipulations()}
    originals = [s for s, _ in st.keys(st.layout.images, filter=f"variant = '{tables.ORIGINAL}'")]
    if not originals:
        raise FileNotFoundError(f"no original images in {st.layout.images}: run `featmap ingest` first")
    target = tables.Target(st.layout.images, tables.IMAGES_SCHEMA)
    overwritten = base.reconcile(NAME, [(target, variant_groups(cfg, st))], overwrite=cfg.overwrite)
    done = st.keys(st.layout.images, filter=f"variant != '{tables.ORIGINAL}'")
    pending: dict[str, list[str]] = {}
    for sid in originals:
        todo = [name for name in manipulations if (sid, name) not in done]
        if todo:
            pending[sid] = todo
    n_pending = sum(map(len, pending.values()))
    ds = None
    if pending:
        ds = base.read_ray(st.layout.images, filter=f"variant = '{tables.ORIGINAL}'").map_batches(
            manipulate_batch, batch_size=cfg.manipulate.batch_size, batch_format="pyarrow",
            fn_kwargs={"manipulations": manipulations, "pending": pending, "base_seed": cfg.manipulate.seed})
    skipped = len(originals) * len(manipulations) - n_pending
    return base.write_stage(st, NAME, ds, [target], rows_per_commit=256, skipped=skipped,
                            overwritten=sum(m.rows for m in overwritten))


def status(cfg: Config) -> list[base.OutputStatus]:
    """The variants against this config: each holds one row per stored original when complete."""
    st = tables.Store(cfg.storage)
    groups = variant_groups(cfg, st)
    n_originals = st.count(st.layout.images, filter=base.group_filter("variant", tables.ORIGINAL))
    return [base.table_status(NAME, st.layout.images, groups, {g.name: n_originals for g in groups})]


def command(cfg: Config) -> str:
    return base.run_pipeline_stage(cfg, NAME, base.images_input(cfg), lambda: [run(cfg)])


STAGE = base.Stage(
    NAME, "originals -> manipulated variants in images.lance", command,
    details="Applies every manipulate.ops entry to every original image.",
    keys=(*base.RAY_KEYS, "manipulate"), checks=(base.check_images,), reads=("images",), writes=("images", "errors"),
    epilogue=base.describe_tables, status=status)
