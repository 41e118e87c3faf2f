"""Dataset folders -> the `images` table: originals, resized and centre-cropped, stored as PNG.

Layouts (`dataset.layout`, detected when "auto"):
  featmap        <root>/images/<split>/<class>/<file>   (Stanford Cars, CUB as FeatMap sorts them)
  split_folders  <root>/<split>/<class>/<file>
  imagefolder    <root>/<class>/<file>                  (torchvision ImageFolder; one split)
In the split layouts, files directly inside a split folder form one implicit class named after
the dataset (LSUN-Bedroom). Ids are assigned here, from the path relative to the root, so they
are stable across re-runs and unique across classes and splits; file names need no renaming.
Class subsets and per-class samples are chosen in sorted order with seeded draws, never in
directory-listing order.

Provenance (stages/base.py): the originals are one group of the images table, `original`, made by
`dataset.image_size` and the resize/crop rule. Another size refuses before writing (or, with
`--overwrite`, deletes and recomputes the originals; other datasets' originals in the same table then
come back when their ingest runs again). A second dataset writes alongside: its name is part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from featmap_ray.config import Config, DatasetConfig
from featmap_ray.io import imageio, tables
from featmap_ray.seeding import derive_seed
from featmap_ray.stages import base

log = logging.getLogger(__name__)
NAME = "ingest"
BATCH_SCHEMA = tables.with_error_columns(tables.IMAGES_SCHEMA)
BUILTIN = "builtin:skimage"  # dataset.root of the embedded demo
# How an original's pixels are made from its file (recorded in the provenance: another rule is other pixels).
# Only the crop is resampled (imageio.resize_center_crop): torchvision's pixels up to a rare level of rounding,
# so originals made by the older whole-image resize are refused as made by another rule, not mixed with these.
RESIZE_RULE = "torchvision Resize(image_size, bilinear, antialias) + CenterCrop(image_size), crop resampled"


@dataclass(frozen=True)
class SourceImage:
    source_id: str
    split: str
    class_name: str
    class_idx: int
    path: str  # file system path (or URI) of the source file


def source_id(dataset: str, relpath: str) -> str:
    return hashlib.sha1(f"{dataset}/{relpath}".encode()).hexdigest()[:16]


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local folder or a URI such as s3://bucket/cars."""
    return pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)


def _scheme(root: str) -> str:
    return root.split("://")[0] + "://" if "://" in root else ""


def _layout(cfg: DatasetConfig, relpaths: list[PurePosixPath]) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    if any(len(p.parts) > 2 and p.parts[0] == "images" and p.parts[1] in cfg.splits for p in relpaths):
        return "featmap"
    if any(len(p.parts) > 1 and p.parts[0] in cfg.splits for p in relpaths):
        return "split_folders"
    return "imagefolder"


def _place(cfg: DatasetConfig, layout: str, rel: PurePosixPath) -> tuple[str, str] | None:
    """(split, class name) of a file, or None when it lies outside the layout."""
    parts = rel.parts
    if layout == "featmap":
        if len(parts) < 3 or parts[0] != "images":
            return None
        parts = parts[1:]
    if layout in ("featmap", "split_folders"):
        if len(parts) < 2 or parts[0] not in cfg.splits:
            return None
        split, rest = parts[0], parts[1:]
    else:
        split, rest = cfg.default_split, parts
    return split, (rest[0] if len(rest) > 1 else cfg.name)


def discover(cfg: DatasetConfig, root: str) -> list[SourceImage]:
    """List the dataset's image files and choose classes and images reproducibly."""
    fs, base = _filesystem(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"dataset.root {root} is not a folder")
    extensions = {e.lower() for e in cfg.extensions}
    files = [
        f for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if f.type == pafs.FileType.File and PurePosixPath(f.path).suffix.lower() in extensions
    ]
    relpaths = sorted(PurePosixPath(f.path).relative_to(PurePosixPath(base)) for f in files)
    layout = _layout(cfg, relpaths)
    by_class: dict[tuple[str, str], list[PurePosixPath]] = defaultdict(list)
    outside = 0
    for rel in relpaths:
        place = _place(cfg, layout, rel)
        if place is None:
            outside += 1
        else:
            by_class[place].append(rel)
    if outside:
        log.warning("%d image files under %s lie outside the %s layout and are ignored", outside, root, layout)

    all_classes = sorted({c for _, c in by_class})
    if cfg.classes is not None:
        missing = sorted(set(cfg.classes) - set(all_classes))
        if missing:
            raise ValueError(f"dataset.classes names classes not found under {root}: {missing}")
        chosen = set(cfg.classes)
    else:
        chosen = set(all_classes if cfg.num_classes < 0 else all_classes[: cfg.num_classes])
    class_idx = {c: i for i, c in enumerate(all_classes)}  # index among ALL classes: stable labels

    images = []
    for (split, cls), rels in sorted(by_class.items()):
        if cls not in chosen:
            continue
        if cfg.images_per_class is not None and len(rels) > cfg.images_per_class:
            rng = np.random.default_rng(derive_seed(cfg.seed, split, cls))
            rels = [rels[i] for i in sorted(rng.choice(len(rels), cfg.images_per_class, replace=False))]
        for rel in rels:
            path = _scheme(root) + str(PurePosixPath(base) / rel)
            images.append(SourceImage(source_id(cfg.name, str(rel)), split, cls, class_idx[cls], path))
    log.info("found %d images in %d of %d classes (%s layout) under %s", len(images), len(chosen), len(all_classes), layout, root)
    return images


def original_row(item: dict, data: bytes, cfg: DatasetConfig) -> dict:
    """Decode, fix orientation and mode, resize + centre-crop, encode as PNG. Raises ImageDecodeError."""
    img = imageio.decode_image(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_aspect=cfg.max_aspect,
                               formats=cfg.formats, source=item["path"])
    img = imageio.resize_center_crop(img, cfg.image_size)
    return {
        "source_id": item["source_id"], "variant": tables.ORIGINAL, "dataset": cfg.name, "split": item["split"],
        "class_idx": item["class_idx"], "class_name": item["class_name"], "family": tables.ORIGINAL,
        "params": json.dumps({"size": cfg.image_size}), "seed": None, "image": imageio.encode_png(img),
        "width": img.width, "height": img.height, "source_path": item["path"],
    }


def load_originals(batch: pa.Table, cfg: DatasetConfig, root: str) -> pa.Table:
    """Ray Data UDF: SourceImage rows -> image rows; unreadable files become failure rows."""
    fs, _ = _filesystem(root)
    rows = []
    for item in batch.to_pylist():
        try:
            with fs.open_input_file(item["path"].removeprefix(_scheme(root))) as f:
                data = f.read()
            rows.append(original_row(item, data, cfg))
        except Exception as e:  # corrupt, unreadable, vanished: recorded, and the job goes on
            reason = e.reason if isinstance(e, imageio.ImageDecodeError) else type(e).__name__
            rows.append({"source_id": item["source_id"], "variant": tables.ORIGINAL, "source_path": item["path"],
                         **tables.failure(reason, str(e))})
    return pa.Table.from_pylist(rows, schema=BATCH_SCHEMA)


def source_root(cfg: Config) -> str:
    """Where the dataset's image folders are: dataset.root, or the demo photographs' folder under the root."""
    if cfg.dataset.root == BUILTIN:
        return str(tables.Store(cfg.storage).layout.sources("skimage"))
    return cfg.dataset.root


def resolve_root(cfg: Config) -> str:
    """`source_root`, with the demo photographs unpacked there first."""
    root = source_root(cfg)
    if cfg.dataset.root == BUILTIN:
        from featmap_ray import demo_data

        demo_data.materialize(root)
    return root


def originals_group(cfg: Config) -> base.Group:
    """The originals and what makes their pixels: the size and the resize rule. The dataset is part of the
    key (its name is in each source_id and row), so another dataset's originals go alongside in this group;
    the choice of images (classes, samples) only decides which keys exist."""
    settings = {"image_size": cfg.dataset.image_size, "resize": RESIZE_RULE}
    return base.Group(tables.ORIGINAL, base.Provenance(settings), base.group_filter("variant", tables.ORIGINAL))


def run(cfg: Config) -> base.StageSummary:
    import ray.data

    st = tables.Store(cfg.storage)
    root = resolve_root(cfg)
    items = discover(cfg.dataset, root)
    if not items:
        raise FileNotFoundError(f"no image files ({', '.join(cfg.dataset.extensions)}) found under {root}")
    targets = [tables.Target(st.layout.images, tables.IMAGES_SCHEMA)]
    overwritten = base.reconcile(NAME, [(targets[0], [originals_group(cfg)])], overwrite=cfg.overwrite)
    done = {s for s, _ in st.keys(st.layout.images, filter=f"variant = '{tables.ORIGINAL}'")}
    pending = [asdict(i) for i in items if i.source_id not in done]
    ds = None
    if pending:
        ds = ray.data.from_items(pending).map_batches(
            load_originals, fn_kwargs={"cfg": cfg.dataset, "root": root}, batch_size=16, batch_format="pyarrow")
    return base.write_stage(st, NAME, ds, targets, rows_per_commit=256, skipped=len(items) - len(pending),
                            overwritten=sum(m.rows for m in overwritten))


def status(cfg: Config) -> list[base.OutputStatus]:
    """The originals against this config; partial counts this dataset's image files (when its folder can be
    listed: the demo's photographs once ingest has unpacked them)."""
    st = tables.Store(cfg.storage)
    try:
        expected = {tables.ORIGINAL: len(discover(cfg.dataset, source_root(cfg)))}
    except FileNotFoundError:
        expected = None
    return [base.table_status(NAME, st.layout.images, [originals_group(cfg)], expected)]


def check_dataset(cfg: Config) -> None:
    """dataset.root is a folder holding image files of the configured classes (the builtin demo
    photographs are unpacked by ingest itself)."""
    root = cfg.dataset.root
    if not root.startswith("builtin:") and not discover(cfg.dataset, root):
        raise FileNotFoundError(f"no image files ({', '.join(cfg.dataset.extensions)}) under dataset.root {root}")


def command(cfg: Config) -> str:
    from featmap_ray.io import tracking

    return base.run_pipeline_stage(cfg, NAME, [tracking.TableInput(cfg.dataset.name, cfg.dataset.root)],
                                   lambda: [run(cfg)])


STAGE = base.Stage(
    NAME, "image folders -> images.lance (originals, resized and centre-cropped)", command,
    details="Lists the image files under dataset.root, decodes, resizes and centre-crops them; unreadable files "
            "become rows of errors.lance. A re-run adds only what is missing.",
    keys=(*base.RAY_KEYS, "dataset"), checks=(check_dataset,), reads=("dataset.root",), writes=("images", "errors"),
    epilogue=base.describe_tables, status=status)
