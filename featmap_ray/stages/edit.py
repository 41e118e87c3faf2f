"""Ray Data stage: chosen originals in `images` -> their semantic edits, appended to `images` (family `semantic`).

For every dataset of the table with prompts in `edit.prompts`, a seeded choice of originals per
(split, class) is edited with every prompt, `edit.repeats` times. An actor pool holds the pipelines
(one per actor, loaded once, `edit.num_gpus` each); the sink commits every `edit.rows_per_commit`
edits, and a re-run computes only the (source_id, variant) keys the table lacks. Edits already stored
under the same variant ids with other settings stop the job before any work.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from featmap_ray import runtime
from featmap_ray.config import Config, EditConfig
from featmap_ray.io import imageio, tables
from featmap_ray.manipulations import semantic
from featmap_ray.seeding import derive_seed
from featmap_ray.stages import base
from featmap_ray.stages.manipulate import BATCH_SCHEMA, CARRIED, failure_row

NAME = "edit"
FAMILY = "semantic"
# One pending edit: the original's labels and pixels, the variant, its instruction and seed.
TASK_SCHEMA = pa.schema([*(tables.IMAGES_SCHEMA.field(k) for k in (*CARRIED, "image", "variant", "seed")),
                         pa.field("prompt", pa.string()), pa.field("name", pa.string()), pa.field("repeat", pa.int32())])


class EditSettingsChanged(ValueError):
    """The images table holds edits under these variant ids that were made with other settings."""


def choose_sources(originals: pa.Table, edit: EditConfig) -> list[str]:
    """The originals to edit: per (dataset, split, class), `images_per_class[split]` of them drawn with a
    seed of (edit.seed, dataset, split, class) from the sorted ids — the same choice whatever the table's order."""
    by_class: dict[tuple, list[str]] = defaultdict(list)
    for row in originals.select(["source_id", "dataset", "split", "class_idx"]).to_pylist():
        by_class[row["dataset"], row["split"], row["class_idx"]].append(row["source_id"])
    chosen = []
    for (dataset, split, cls), ids in sorted(by_class.items()):
        ids, n = sorted(ids), edit.images_per_class.get(split, 0)
        if n < len(ids):
            rng = np.random.default_rng(derive_seed(edit.seed, dataset, split, cls))
            ids = [ids[i] for i in sorted(rng.choice(len(ids), n, replace=False))]
        chosen += ids
    return chosen


def edit_params(plan: semantic.PlannedEdit, settings: dict) -> str:
    """The row's `params`: the prompt, its short name and repeat, and the settings that made it."""
    return json.dumps({"prompt": plan.prompt, "name": plan.name, "repeat": plan.repeat, **settings}, sort_keys=True)


def with_originals(tasks: pa.Table, st: tables.Store) -> pa.Table:
    """Ray Data UDF (CPU): edit tasks -> the same tasks with their original's labels and stored image."""
    originals = {r["source_id"]: r for r in st.rows(st.layout.images, [(sid, tables.ORIGINAL) for sid in
                                                                    tasks["source_id"].to_pylist()],
                                                    columns=[c for c in (*CARRIED, "image") if c != "source_id"]).to_pylist()}
    rows = [{**originals[task["source_id"]], **task} for task in tasks.to_pylist()]
    return pa.Table.from_pylist(rows, schema=TASK_SCHEMA)


class SemanticEditor:
    """Ray Data actor: edit tasks -> image rows (or failure rows). One pipeline per actor, loaded once."""

    def __init__(self, edit: EditConfig, pipeline_class: str, use_gpu: bool):
        self.edit = edit
        self.pipe = semantic.load_pipeline(edit, str(runtime.actor_device(use_gpu, edit.torch_threads)))
        self.settings = semantic.recorded_settings(edit, pipeline_class)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tasks, requests, rows = [], [], []
        for task in batch.to_pylist():
            try:
                image = Image.fromarray(imageio.decode_png_rgb(task["image"]))
            except Exception as e:  # a stored original that cannot be decoded: recorded, the job goes on
                rows.append(failure_row(task, task["variant"], e))
                continue
            tasks.append(task)
            requests.append(semantic.EditRequest(image, task["prompt"], task["seed"]))
        if requests:
            try:
                edited = semantic.edit_images(self.pipe, requests, self.edit)
            except Exception as e:  # e.g. out of memory or non-finite output: these edits fail, the job goes on
                rows += [failure_row(task, task["variant"], e) for task in tasks]
            else:
                rows += [self._row(task, img) for task, img in zip(tasks, edited, strict=True)]
        return pa.Table.from_pylist(rows, schema=BATCH_SCHEMA)

    def _row(self, task: dict, image: Image.Image) -> dict:
        plan = semantic.PlannedEdit(task["variant"], task["name"], task["prompt"], task["repeat"])
        return {**{k: task[k] for k in CARRIED}, "variant": task["variant"], "family": FAMILY,
                "params": edit_params(plan, self.settings), "seed": task["seed"], "image": imageio.encode_png(image),
                "width": image.width, "height": image.height}


def check_stored_settings(st: tables.Store, plans: list[semantic.PlannedEdit], settings: dict) -> None:
    """Stored edits under these variant ids must have been made with these prompts and settings: a re-run
    that changed them would otherwise mix two kinds of edit under one name."""
    table = st.open(st.layout.images).to_table(columns=["variant", "params"],
                                            filter=f"variant IN ({tables.sql_list(p.variant for p in plans)})")
    expected = {p.variant: json.loads(edit_params(p, settings)) for p in plans}
    for variant, params in sorted(set(zip(table["variant"].to_pylist(), table["params"].to_pylist(), strict=True))):
        stored = json.loads(params)
        changed = sorted(k for k in expected[variant].keys() | stored.keys() if stored.get(k) != expected[variant].get(k))
        if changed:
            raise EditSettingsChanged(
                f"{st.layout.images} holds {variant} edits made with other {changed} "
                f"({', '.join(f'{k}={stored.get(k)!r}' for k in changed)}; this config: "
                f"{', '.join(f'{k}={expected[variant].get(k)!r}' for k in changed)}): use another edit.prefix "
                f"or delete those rows")


def run(cfg: Config) -> base.StageSummary:
    import ray.data

    edit = cfg.edit
    pipeline_class = semantic.check(edit)  # the model is here and suits the settings: before anything is read
    st = tables.Store(cfg.storage)
    originals = st.open(st.layout.images).to_table(columns=["source_id", "dataset", "split", "class_idx"],
                                                filter=f"variant = '{tables.ORIGINAL}'")
    datasets = sorted(set(originals["dataset"].to_pylist()) & set(edit.prompts))
    if not datasets:
        raise ValueError(f"edit.prompts names datasets {sorted(edit.prompts)}, the images table "
                         f"{st.layout.images} holds originals of {sorted(set(originals['dataset'].to_pylist()))}")
    settings = semantic.recorded_settings(edit, pipeline_class)
    plans = {d: semantic.planned_edits(edit, d) for d in datasets}
    check_stored_settings(st, [p for d in datasets for p in plans[d]], settings)
    chosen = choose_sources(originals.filter(pc.is_in(originals["dataset"], pa.array(datasets))), edit)
    dataset_of = dict(zip(originals["source_id"].to_pylist(), originals["dataset"].to_pylist(), strict=True))
    done = st.keys(st.layout.images, filter=f"family = '{FAMILY}'")
    pending = {}
    for sid in chosen:
        todo = [p for p in plans[dataset_of[sid]] if (sid, p.variant) not in done]
        if todo:
            pending[sid] = todo
    n_pending = sum(map(len, pending.values()))
    ds = None
    if pending:
        tasks = [{"source_id": sid, "variant": p.variant, "prompt": p.prompt, "name": p.name, "repeat": p.repeat,
                  "seed": derive_seed(edit.seed, sid, p.variant)} for sid, todo in pending.items() for p in todo]
        # One block per pipeline call: an actor's outputs within one input block leave as one block, so
        # blocks of batch_size tasks let the sink commit every rows_per_commit edits (the resume granularity).
        ds = (
            ray.data.from_items(tasks, override_num_blocks=math.ceil(len(tasks) / edit.batch_size))
            .map_batches(with_originals, batch_size=None, batch_format="pyarrow", fn_kwargs={"st": st})
            .map_batches(SemanticEditor, batch_size=edit.batch_size, batch_format="pyarrow",
                         fn_constructor_args=(edit, pipeline_class, edit.num_gpus > 0),
                         compute=ray.data.ActorPoolStrategy(size=edit.num_actors), num_gpus=edit.num_gpus,
                         resources=edit.resources or None)
        )
    skipped = sum(len(plans[dataset_of[sid]]) for sid in chosen) - n_pending
    return base.write_stage(st, NAME, ds, [tables.Target(st.layout.images, tables.IMAGES_SCHEMA)],
                             rows_per_commit=edit.rows_per_commit, skipped=skipped)
