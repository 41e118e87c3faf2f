"""Ray Data stage: chosen originals in `images` -> their semantic edits, appended to `images` (family `semantic`).

For every dataset of the table with prompts in `edit.prompts`, a seeded choice of originals per
(split, class) is edited with every prompt, `edit.repeats` times. An actor pool holds the pipelines
(one per actor, loaded once, `edit.num_gpus` each); the sink commits every `edit.rows_per_commit`
edits, and a re-run computes only the (source_id, variant) keys the table lacks.

Provenance (stages/base.py): each variant <prefix>:<name>:<repeat> is one group of the images table,
made by the pipeline's weights (a hub snapshot's revision, or a local folder's files), its recorded
settings (`semantic.recorded_settings`: model, pipeline class, dtype, working area, VAE tiling, steps,
guidance, negative prompt), `edit.seed`, the prompt with its name and repeat, and the `original` group it
read. Edits stored under the same variant id with other settings refuse before any work; `--overwrite`
recomputes exactly those variants; another prefix or prompt name writes alongside.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from featmap_ray.config import Config, EditConfig
from featmap_ray.io import imageio, tables
from featmap_ray.manipulations import semantic
from featmap_ray.seeding import derive_seed
from featmap_ray.stages import base, runtime
from featmap_ray.stages.manipulate import BATCH_SCHEMA, CARRIED, failure_row

NAME = "edit"
FAMILY = "semantic"
# One pending edit: the original's labels and pixels, the variant, its instruction and seed.
TASK_SCHEMA = pa.schema([*(tables.IMAGES_SCHEMA.field(k) for k in (*CARRIED, "image", "variant", "seed")),
                         pa.field("prompt", pa.string()), pa.field("name", pa.string()), pa.field("repeat", pa.int32())])


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


@dataclass
class EditPlan:
    """What `edit` makes of the stored originals under this config."""

    plans: dict[str, list[semantic.PlannedEdit]]  # dataset (of the table, with prompts) -> its edits
    chosen: list[str]  # the originals to edit
    dataset_of: dict[str, str]  # source_id -> dataset, of every original
    groups: list[base.Group]  # one per variant, with the settings that make it

    def expected(self) -> dict[str, int]:
        """Rows per variant when every edit is stored."""
        counts: dict[str, int] = defaultdict(int)
        for sid in self.chosen:
            for p in self.plans[self.dataset_of[sid]]:
                counts[p.variant] += 1
        return counts


def plan_edits(cfg: Config, st: tables.Store, pipeline_class: str) -> EditPlan:
    """The edits of every dataset of the images table that has prompts, and each variant's provenance: the
    pipeline's weights and recorded settings, edit.seed, the prompt (with its name and repeat) and the
    originals it reads. One variant id with two prompts (for two datasets) is refused: one group, one prompt."""
    edit = cfg.edit
    originals = st.open(st.layout.images).to_table(columns=["source_id", "dataset", "split", "class_idx"],
                                                filter=f"variant = '{tables.ORIGINAL}'")
    plans = {d: semantic.planned_edits(edit, d) for d in sorted(set(originals["dataset"].to_pylist()) & set(edit.prompts))}
    settings = {**semantic.recorded_settings(edit, pipeline_class), "weights": semantic.weights_identity(edit),
                "seed": edit.seed}
    inputs = base.input_fingerprints(st.root, st.layout.images, [tables.ORIGINAL])
    groups: dict[str, base.Group] = {}
    for dataset, edits in plans.items():
        for p in edits:
            group = base.Group(p.variant, base.Provenance({**settings, "prompt": p.prompt, "name": p.name,
                                                           "repeat": p.repeat}, inputs),
                               base.group_filter("variant", p.variant))
            if groups.setdefault(p.variant, group) != group:
                raise ValueError(f"edit.prompts: {p.name!r} of dataset {dataset} has another prompt than the same "
                                 f"name of another dataset; both would be variant {p.variant}: name them apart")
    chosen = choose_sources(originals.filter(pc.is_in(originals["dataset"], pa.array(list(plans), pa.string()))), edit)
    dataset_of = dict(zip(originals["source_id"].to_pylist(), originals["dataset"].to_pylist(), strict=True))
    return EditPlan(plans, chosen, dataset_of, list(groups.values()))


def run(cfg: Config) -> base.StageSummary:
    import ray.data

    edit = cfg.edit
    pipeline_class = semantic.check(edit)  # the model is here and suits the settings: before anything is read
    st = tables.Store(cfg.storage)
    planned = plan_edits(cfg, st, pipeline_class)
    if not planned.plans:
        raise ValueError(f"edit.prompts names datasets {sorted(edit.prompts)}, the images table {st.layout.images} "
                         f"holds originals of {sorted(set(planned.dataset_of.values()))}")
    target = tables.Target(st.layout.images, tables.IMAGES_SCHEMA)
    overwritten = base.reconcile(NAME, [(target, planned.groups)], overwrite=cfg.overwrite)
    plans, chosen, dataset_of = planned.plans, planned.chosen, planned.dataset_of
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
    return base.write_stage(st, NAME, ds, [target], rows_per_commit=edit.rows_per_commit, skipped=skipped,
                            overwritten=sum(m.rows for m in overwritten))


def status(cfg: Config) -> list[base.OutputStatus]:
    """The semantic variants against this config (none when no dataset of the table has prompts)."""
    if not any(cfg.edit.prompts.values()):
        return []
    st = tables.Store(cfg.storage)
    if st.open(st.layout.images) is None:
        return [base.table_status(NAME, st.layout.images, [])]
    planned = plan_edits(cfg, st, semantic.check(cfg.edit))
    return [base.table_status(NAME, st.layout.images, planned.groups, planned.expected())] if planned.plans else []


def check_prompts(cfg: Config) -> None:
    """edit.prompts names something to do, and edit.model is here and suits the settings."""
    if not any(cfg.edit.prompts.values()):
        raise ValueError("edit.prompts is empty: nothing to edit (give prompts per dataset name; see docs/how-to/semantic-edits.md)")
    check_model(cfg)


def check_model(cfg: Config) -> None:
    """When the dataset has prompts: the edit model is here and suits the settings (also the pipeline's check)."""
    if cfg.edit.prompts.get(cfg.dataset.name):
        semantic.check(cfg.edit)


def command(cfg: Config) -> str:
    return base.run_pipeline_stage(cfg, NAME, base.images_input(cfg), lambda: [run(cfg)])


STAGE = base.Stage(
    NAME, "originals -> semantic edits (Qwen-Image-Edit) in images.lance", command,
    details="Edits a seeded choice of originals per (split, class) with every prompt of edit.prompts for their "
            "dataset, on an actor pool of diffusers image-editing pipelines (one per actor); the edits are variants "
            "<prefix>:<name>:<repeat> of family semantic. A re-run adds only what is missing.",
    keys=(*base.RAY_KEYS, "edit", "edit.prompts"), checks=(base.check_images, check_prompts), reads=("images",),
    writes=("images", "errors"), epilogue=base.describe_tables, status=status)
