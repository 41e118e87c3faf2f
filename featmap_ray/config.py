"""Typed run configuration: conf/*.yaml plus `key=value` overrides, validated before any work.

One `Config` object describes a whole run. Unknown keys and wrong types are rejected with the
dotted key path in the message (`ConfigError`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from featmap_ray.manipulations import direct


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


# Image formats (Pillow's names) a reader may be allowed to open. Never EPS (Pillow runs Ghostscript on it),
# FITS, ICNS or ICO: parsers of little use here with a history of hostile-file bugs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
INGEST_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"]
SERVE_FORMATS = ["PNG", "JPEG", "WEBP"]


def _image_formats(formats: list[str]) -> list[str]:
    formats = [f.upper() for f in formats]
    bad = sorted(set(formats) - set(IMAGE_FORMATS))
    if bad or not formats:
        raise ValueError(f"image formats {bad or formats}: choose from {list(IMAGE_FORMATS)} (EPS, FITS, ICNS "
                         "and ICO are never read)")
    return formats


def _folder_name(name: str) -> str:
    # Names become folder and file names (datasets, studies, runs, reports): never `.`, `..`, a hidden name or
    # a path, so that no name reaches outside its folder or onto another's.
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", name) or ".." in name:
        raise ValueError(f"{name!r}: use 1 to 128 letters, digits and _ . - (not starting with '.', no '..')")
    return name


Name = Annotated[str, AfterValidator(_folder_name)]


class _Strict(BaseModel):
    """A config section: unknown keys are rejected, never ignored."""

    model_config = ConfigDict(extra="forbid")


class RayConfig(_Strict):
    """`ray.*`: the Ray cluster a command attaches to, or the embedded local Ray it starts."""

    address: str | None = Field(
        None, description="Address of a running Ray cluster to attach to (passed to `ray.init`); null: `RAY_ADDRESS` "
                          "if set (as inside `ray job submit`), else an embedded local Ray.")
    num_cpus: int = Field(
        8, ge=1, description="Logical CPUs of the embedded local Ray (not used when attaching to a cluster). More than "
                             "the physical cores on purpose: actor pools next to Ray Data tasks deadlock when actors "
                             "hold every logical CPU (ray#44687).")
    object_store_memory_mb: int | None = Field(
        None, ge=75, description="Object store size of the embedded local Ray, in MiB (at least 75); null: Ray's "
                                 "default. Not used when attaching to a cluster.")


class MlflowConfig(_Strict):
    """`mlflow.*`: where every command records its MLflow runs (README: MLflow)."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI. null: `sqlite:///<storage>/mlflow.db` (local storage root only); an "
                          "object-store storage root needs `http://HOST:5000` (a server every node reaches) or an "
                          "absolute SQLite file `sqlite:////abs/mlflow.db`. A relative SQLite path is made absolute "
                          "when the config loads.")
    experiment: str = Field(
        "featmap", description="The MLflow experiment every run is recorded in (created when missing).")

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_sqlite(cls, uri: str | None) -> str | None:
        # A relative SQLite file would move with the CWD (Ray Tune trials and jobs change it).
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
        return uri

    def check_storage(self, storage: str) -> None:
        """An object-store storage root has no default tracking URI: SQLite cannot live in a bucket."""
        if self.tracking_uri is None and "://" in storage:
            raise ValueError(
                f"mlflow.tracking_uri must be set when storage is an object store ({storage}): MLflow's default "
                "SQLite database cannot live there. Set mlflow.tracking_uri=http://HOST:5000 (an MLflow server "
                "every node reaches, for a cluster; see docs/how-to/mlflow.md) or mlflow.tracking_uri=sqlite:////abs/path/"
                "mlflow.db (one machine)")


class DatasetConfig(_Strict):
    """`dataset.*`: the image folder `featmap ingest` reads, which classes and images it takes, and how it stores
    them."""

    name: Annotated[Name, Field(
        description="The dataset's name: part of every source_id, the images table's `dataset` column, the key of "
                    "edit.prompts and the default mapping groups; 1 to 128 letters, digits and _ . - .")]
    root: Annotated[str, Field(
        description="The image folder: a local path (made absolute when the config loads), a URI such as "
                    "s3://bucket/cars, or `builtin:skimage` for the photographs bundled with scikit-image (the demo).")]
    layout: Literal["auto", "featmap", "split_folders", "imagefolder"] = Field(
        "auto", description="Folder layout: `featmap` (<root>/images/<split>/<class>/<file>), `split_folders` "
                            "(<root>/<split>/<class>/<file>), `imagefolder` (<root>/<class>/<file>, all in "
                            "default_split), or `auto` to detect it. Files directly in a split folder form one class "
                            "named after the dataset.")
    splits: list[str] = Field(
        ["train", "test"], description="Split folder names of the split layouts (also used to detect them); files "
                                       "in other folders are ignored.")
    default_split: str = Field(
        "train", description="The split given to every image of the `imagefolder` layout, which has no split folders.")
    num_classes: int = Field(
        -1, ge=-1, description="Ingest the first N classes in sorted order; -1: all. Ignored when `classes` is set.")
    classes: list[str] | None = Field(
        None, description="Explicit class names to ingest (overrides num_classes; a name not found is an error); "
                          "null: num_classes decides.")
    images_per_class: int | None = Field(
        None, ge=1, description="At most this many images per (split, class), a seeded choice (dataset.seed) in "
                                "sorted order; null: all.")
    seed: int = Field(0, description="Seed of the images_per_class sample.")
    image_size: int = Field(
        288, ge=16, description="Side in pixels of the stored originals: the shorter side is resized to it "
                                "(bilinear, antialiased, as torchvision's Resize), then centre-cropped to a square.")
    min_side: int = Field(
        32, ge=1, description="Images whose shorter side is below this many pixels are recorded as errors "
                              "(`too_small`), not upsampled.")
    max_pixels: int = Field(
        89_478_485, ge=1, description="Images with more pixels than this, read from the header before decoding, are "
                                      "recorded as errors (`decompression_bomb`); the default is PIL's "
                                      "decompression-bomb limit.")
    max_aspect: float = Field(
        10.0, ge=1, description="Largest ratio of longer to shorter side, read from the header; beyond it an error row "
                                "(`aspect_ratio`).")
    formats: list[str] = Field(
        INGEST_FORMATS, description="Pillow format names read, recognised by content: any of PNG, JPEG, WEBP, BMP, "
                                    "TIFF, GIF, PPM (add PPM for .ppm/.pgm files); other files are error rows "
                                    "(`format_not_allowed`). EPS, FITS, ICNS and ICO are never read.")
    extensions: list[str] = Field(
        [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"],
        description="File name suffixes (any case) listed as images under root; other files are ignored.")

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, root: str) -> str:
        return root if root.startswith("builtin:") or "://" in root else str(Path(root).expanduser().resolve())

    @field_validator("formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        return _image_formats(formats)


class ManipulateConfig(_Strict):
    """`manipulate.*`: the direct manipulations `featmap manipulate` makes of every original (README:
    Manipulations)."""

    seed: int = Field(0, description="Base of the per-(source_id, manipulation) seeds of random ops (noise).")
    batch_size: int = Field(
        16, ge=1, description="Original images per Ray Data batch of the manipulate job (each gets every pending "
                              "manipulation).")
    ops: dict[str, Any] = Field(
        default_factory=lambda: {
            "rotation": [90, 180, 270],
            "mirror": ["h", "v"],
            "noise": [40],
            "mask": direct.PAPER_MASKS,
            "hue_shift": [60],
            "grayscale": True,
        },
        description="Op -> list of parameters, one variant each (or a bool: true is one variant): rotation (degrees), "
                    "mirror (h/v), noise (sigma, 0-255 scale), mask ({name, points, color}), hue_shift (1/256 turns), "
                    "grayscale (true), brightness/contrast (percent), translation ([tx, ty]), perspective (4 points). "
                    "The default is the paper's set.",
    )

    @field_validator("ops")
    @classmethod
    def _valid_ops(cls, ops: dict[str, Any]) -> dict[str, Any]:
        direct.expand(ops)  # raises ValueError naming the op and the bad value
        return ops

    def manipulations(self) -> list[direct.Manipulation]:
        return direct.expand(self.ops)


class EditPrompt(_Strict):
    """One semantic edit: its short name (in variant ids and study configs) and the full instruction."""

    name: Annotated[Name, Field(
        description="Short name of the edit (e.g. Turn_on_headlights), in its variant ids "
                    "<edit.prefix>:<name>:<repeat>; unique per dataset, 1 to 128 letters, digits and _ . - .")]
    prompt: Annotated[str, Field(description="The full editing instruction given to the pipeline (not blank).")]

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt


class EditConfig(_Strict):
    """`featmap edit`: semantic edits of the originals by a diffusers image-editing pipeline, on an actor
    pool, as new variants of the images table (docs/how-to/semantic-edits.md). Defaults are the reference's (spec §3)."""

    model: str = Field(
        "Qwen/Qwen-Image-Edit-2511",
        description="The image editor: a hub id resolved in the local Hugging Face cache or a local folder in "
                    "diffusers layout (the pipeline class comes from its model_index.json); `tiny`: a random tiny "
                    "QwenImageEditPlusPipeline built offline (tests, the demo).")
    prompts: dict[str, list[EditPrompt]] = Field(
        {}, description="Dataset name -> its list of {name, prompt}; a dataset without prompts gets no edits (and "
                        "`featmap pipeline` skips the edit step).")
    prefix: Name = Field(
        "qwen", description="First part of the edits' variant ids <prefix>:<name>:<repeat>: another prefix keeps "
                            "edits made by other settings apart.")
    repeats: int = Field(
        1, ge=1, description="Edits per (image, prompt), each with its own seed (the <repeat> of the variant id).")
    images_per_class: dict[str, int] = Field(
        {"train": 10, "test": 5},
        description="Split -> originals edited per (split, class), a seeded choice (edit.seed); a split not named "
                    "gets none, a count above a class's size takes all of it (the reference: 10 train, 5 test).")
    seed: int = Field(
        42, description="Seed of the choice of originals, and base of each edit's seed (a digest of seed, source_id "
                        "and variant id).")
    steps: int = Field(10, ge=1, description="Denoising steps per edit (the pipeline's num_inference_steps).")
    true_cfg_scale: float = Field(
        4.5, ge=0, description="Real classifier-free guidance scale, with negative_prompt, when above 1 (two "
                               "transformer passes per step).")
    negative_prompt: str = Field(
        " ", description="Negative prompt of the real classifier-free guidance: the reference's single space; an "
                         "empty value becomes one.")
    guidance_scale: float | None = Field(
        1.0, description="Guidance scale of guidance-distilled transformers; not passed to other pipelines (diffusers "
                         "would ignore it).")
    working_pixels: int | None = Field(
        None, ge=1024, description="The pipeline's working area in pixels: scales every size it derives (output, VAE "
                                   "and vision-language inputs) to that area; null: its own (~1024x1024 at the "
                                   "input's aspect ratio).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Torch dtype the pipeline is loaded in (float32: the demo's tiny editor on CPU).")
    batch_size: int = Field(
        1, ge=1, description="Edits per pipeline call, for pipelines that batch (QwenImageEditPipeline); "
                             "QwenImageEditPlusPipeline takes one prompt per call, so 1 there.")
    num_actors: int = Field(1, ge=1, description="Actors of the edit job, each loading one pipeline once.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per actor: 0 runs on CPU, 0.5 puts two pipelines on one GPU, a whole number above "
                               "1 spreads one pipeline over that many GPUs (device_map balanced, needs accelerate).")
    resources: dict[str, float] = Field(
        {}, description="Custom Ray resources each actor asks for, e.g. {gpu_80gb: 1} (cluster.yaml's "
                        "edit_gpu_worker).")
    torch_threads: int | None = Field(
        None, ge=1, description="Torch threads of a CPU actor; null: all cores of the node.")
    vae_tiling: bool = Field(
        True, description="Decode with VAE slicing and tiling where the VAE has them (as the reference).")
    rows_per_commit: int = Field(
        4, ge=1, description="Edited images per Lance commit: what a killed job keeps, the resume granularity.")

    @field_validator("images_per_class")
    @classmethod
    def _counts(cls, counts: dict[str, int]) -> dict[str, int]:
        bad = {split: n for split, n in counts.items() if n < 0}
        if bad:
            raise ValueError(f"negative counts {bad}")
        return counts

    @field_validator("negative_prompt")
    @classmethod
    def _space_for_empty(cls, negative: str) -> str:
        return negative or " "

    @field_validator("prompts")
    @classmethod
    def _unique_names(cls, prompts: dict[str, list[EditPrompt]]) -> dict[str, list[EditPrompt]]:
        for dataset, items in prompts.items():
            names = [p.name for p in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{dataset}: prompt name(s) {dupes} used twice")
        return prompts

    @model_validator(mode="after")
    def _whole_gpus_to_spread(self) -> EditConfig:
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ValueError(f"num_gpus={self.num_gpus}: above 1 a pipeline spreads over whole GPUs")
        return self

    def variant(self, name: str, repeat: int) -> str:
        return f"{self.prefix}:{name}:{repeat}"


class BackboneRequest(_Strict):
    """A backbone, its layers and its weights: an `extract.backbones` entry, `evaluate.classifier` or
    `evaluate.reconstruction.judge` (README: Backbones and layers, Weights)."""

    name: Annotated[str, Field(
        description="A registry name (convnext_base, convnext_atto, swinv2_base, dinov3_vitb16, resnet50) or any "
                    "timm model name (its layers are then the features_only stages stage0..stageN).")]
    layers: list[str] | None = Field(
        None, description="Layers to tap, e.g. [stage3]; null: the registry's default layers (a timm model's every "
                          "stage).")
    pretrained: bool = Field(
        True, description="Load pretrained weights (timm's Hugging Face weights from the local cache, or "
                          "`checkpoint`); missing ones stop the command, never a random fallback. false: random "
                          "weights seeded by init_seed (tests, demos).")
    checkpoint: str | None = Field(
        None, description="A local weight file (.safetensors or .pth) loaded instead of the Hugging Face weights; "
                          "needs pretrained: true.")
    model_kwargs: dict[str, Any] = Field(
        {}, description="Extra keyword arguments of timm.create_model, over the registry's (smaller test variants; "
                        "{num_classes: N} for a fine-tuned classifier's head).")
    init_seed: int = Field(0, description="Seed of the random initialisation when pretrained is false.")

    @model_validator(mode="after")
    def _checkpoint_needs_pretrained(self) -> BackboneRequest:
        if self.checkpoint and not self.pretrained:
            raise ValueError(f"backbone {self.name}: checkpoint is set but pretrained is false")
        return self


class ExtractConfig(_Strict):
    """`extract.*`: `featmap extract`, the backbones' feature maps of every stored image variant, on a Ray Data
    actor pool."""

    backbones: list[BackboneRequest] = Field(
        [BackboneRequest(name="convnext_base")],
        description="The backbones extracted, one features table per layer; FeatInv, the default mapping targets and "
                    "the service take their backbones from this list.")
    batch_size: int = Field(32, ge=1, description="Images per forward pass (and per decoding batch).")
    num_actors: int = Field(1, ge=1, description="Actors of the extract pool, each loading the model once.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; 0 runs on CPU.")
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="Tensor type the feature maps are stored in.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision of the forward pass, not the stored dtype: float32, or torch.autocast in "
                               "bfloat16/float16 (GPU actors' tensor cores). Other precision, other features: "
                               "recorded with the tables unless float32.")
    channels_last: bool = Field(
        False, description="Run model and inputs in NHWC memory format: faster GPU convolutions, the same maps up to "
                           "rounding.")
    torch_threads: int | None = Field(
        None, ge=1, description="Torch threads of a CPU actor; null: all cores of the node (Ray would otherwise set "
                                "1).")
    rows_per_commit: int = Field(
        64, ge=1, description="Rows per Lance fragment/commit: the resume granularity.")


class MappingGroup(_Strict):
    """One manipulation group of a study: every manipulation x every model family."""

    manipulations: list[str] = Field(
        ..., min_length=1, description="Variant names mapped to (e.g. hue_shift_60, or an edit id "
                                       "qwen:<name>:<repeat>); each must be in the images table.")
    models: list[str] = Field(
        ..., min_length=1, description="Model families trained for every manipulation: linear, additive, "
                                       "local_nonshared_linear, mlp, cnn, transformer, ridge, orthogonal_procrustes, "
                                       "identity, spatial_only.")
    apply_transform: bool = Field(
        False, description="Geometric \"apply\" group: the exact feature-map rotation/flip is applied first, the model "
                           "learns the rest.")


class MappingTarget(_Strict):
    """The (backbone, layer) feature maps a study maps, with the normalisation choice for them."""

    backbone: Annotated[str, Field(
        description="Backbone name, as in extract.backbones (its features tables are read).")]
    layers: list[str] = Field(..., min_length=1, description="Layers of that backbone mapped (at least one).")
    normalise: bool = Field(
        True, description="Per-channel standardisation with statistics of all training originals, on inputs and "
                          "targets, inverted on outputs (the paper: on for ConvNeXt stage0-2, off for stage3).")


class MappingTraining(_Strict):
    """`mapping.training.*`: the optimisation of every mapping run (the paper's by default); every value is part
    of a run's digest."""

    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(32, ge=1, description="Training pairs per batch on each Ray Train worker.")
    accumulate: int = Field(
        2, ge=1, description="Gradient accumulation: an optimiser step every N batches (effective batch 64 with the "
                             "defaults and one worker).")
    max_epochs: int = Field(
        100, ge=1, description="Most epochs a run trains (also ASHA's max_t in a sweep).")
    patience: int = Field(
        6, ge=1, description="Early stopping: epochs without a val_loss improvement larger than min_delta before a "
                             "run stops.")
    min_delta: float = Field(
        1e-3, ge=0, description="Smallest val_loss improvement that resets the early-stopping patience; the best "
                                "epoch is kept regardless.")
    plateau_patience: int = Field(8, ge=1, description="ReduceLROnPlateau's patience, in epochs.")
    plateau_factor: float = Field(
        0.5, gt=0, lt=1, description="ReduceLROnPlateau's factor: the learning rate is multiplied by it on a plateau.")
    min_lr: float = Field(1e-6, ge=0, description="ReduceLROnPlateau's lower bound on the learning rate.")
    val_fraction: float = Field(
        0.05, gt=0, lt=1, description="Fraction of a run's training pairs held out for validation, split by source "
                                      "image (at least one pair).")
    max_train_pairs: int | None = Field(
        8000, ge=1, description="At most this many training-split pairs per run, a seeded subset taken before the "
                                "validation split; null: all.")
    seed: int = Field(
        42, description="Seeds the model's initialisation, the subset, the train/validation split and every epoch's "
                        "batch order.")


class MappingResources(_Strict):
    """`mapping.resources.*`: how `featmap fit` and `featmap sweep` place mapping runs on Ray Train and Ray Tune."""

    num_workers: int = Field(
        1, ge=1, description="Ray Train (DDP) workers per fused group; part of each run's digest (the effective "
                             "batch). At least 1: Train's local mode neither persists checkpoints nor runs inside "
                             "Tune trials.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each Ray Train worker reserves.")
    gpus_per_worker: float = Field(
        0, ge=0, description="GPUs each Ray Train worker reserves (0: CPU); also the GPUs of each `featmap evaluate` "
                             "task.")
    models_per_group: int | None = Field(
        None, ge=1, description="Runs that read the same pairs (one dataset, backbone, layer, manipulation) train "
                                "together in one Ray Train run, at most this many per group; null: all of them, 1: "
                                "one run per Tune trial.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Groups (Tune trials) trained at once; null: what the cluster fits, keeping a CPU free "
                                "for Ray Data.")
    max_failures: int = Field(
        1, ge=0, description="Restarts of a group from its last checkpoint: of its Train workers and of its Tune "
                             "trial.")
    checkpoint_every: int = Field(
        1, ge=1, description="Epochs between a group's checkpoints (one is also written whenever a model finishes).")
    pair_cache_mb: int = Field(
        4096, ge=0, description="A worker holds its shard of pairs in memory up to this many MiB, else streams them "
                                "from Lance batch by batch.")
    driver_cpus: float = Field(
        0.5, gt=0, description="CPUs of the Tune trial that drives a group's TorchTrainer.")
    driver_resources: dict[str, float] = Field(
        {}, description="Custom Ray resources of that driver trial, e.g. {head: 0.01} to keep drivers on a non-spot "
                        "node.")


class SweepConfig(_Strict):
    """Ray Tune search over one family's hyper-parameters, on one (backbone, layer, manipulation)."""

    model: str = Field("mlp", description="The model family tuned (a mapping model family name).")
    backbone: str | None = Field(
        None, description="Backbone of the tuned run, one of the mapping targets; null: the first target's.")
    layer: str | None = Field(
        None, description="Layer of the tuned run, one of the mapping targets; null: the first target's layer.")
    manipulation: str = Field("hue_shift_60", description="The variant the tuned run maps to.")
    apply_transform: bool = Field(
        False, description="Geometric manipulations: the exact spatial transform first, the model learns the rest.")
    num_samples: int = Field(
        8, ge=1, description="Ray Tune's num_samples: trials drawn from the space (each a repetition of any `grid` "
                             "entries).")
    space: dict[str, dict[str, Any]] = Field(
        {
            "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
            "hidden": {"type": "choice", "values": [128, 256, 512]},
            "dropout": {"type": "uniform", "low": 0.0, "high": 0.4},
        },
        description="Search space: name -> {type: loguniform|uniform|randint, low, high} or {type: choice|grid, "
                    "values}; a name is a mapping.training setting, a hyper-parameter of the family (hidden, "
                    "num_layers, dropout, ...) or a loss weight loss.<term>.",
    )
    grace_period: int = Field(2, ge=1, description="ASHA: epochs before a trial may be stopped.")
    reduction_factor: int = Field(3, ge=2, description="ASHA's reduction factor.")


class MappingConfig(_Strict):
    """`mapping.*`: the study, its grid of mapping runs and how they train (`featmap fit`, `sweep`, `study`; README:
    The study)."""

    study: Name = Field(
        "study", description="Name of the study: its MLflow parent run, <storage>/mapping/runs/<study>/, "
                             "results/<study>/ and reports/<study>/.")
    targets: list[MappingTarget] = Field(
        [], description="The (backbone, layers) mapped, each with its normalisation choice; empty: every extracted "
                        "(backbone, layer) of extract.backbones, normalised.")
    datasets: dict[str, dict[str, MappingGroup]] = Field(
        {}, description="Dataset name -> group name -> group; empty: the paper's groups on dataset.name (direct, "
                        "geometric_apply, geometric_learned, and semantic for the dataset's edits).")
    losses: dict[str, str | dict[str, float]] = Field(
        {"paper": {"mse": 0.3, "median_cos": 0.7}},
        description="Named losses, each run of the grid trained with every one: name -> \"mse+median_cos\" (weights 1) "
                    "or {term: weight}; terms mse, huber, median_cos, mean_cos, trimmed_cos, patch_mse, ntxent.")
    loss_options: dict[str, dict[str, Any]] = Field(
        {}, description="Options per loss term, e.g. {huber: {delta: 0.5}}.")
    model_hparams: dict[str, dict[str, Any]] = Field(
        {}, description="Hyper-parameters per model family, e.g. {transformer: {positional: learned}}; an unknown "
                        "family or name is an error.")
    training: MappingTraining = Field(
        MappingTraining(), description="The optimisation of every run (mapping.training.*).")
    resources: MappingResources = Field(
        MappingResources(), description="Ray Train and Tune placement of the runs (mapping.resources.*).")
    sweep: SweepConfig = Field(SweepConfig(), description="`featmap sweep`'s search (mapping.sweep.*).")
    refit: bool = Field(
        False, description="Re-train runs that already finished instead of skipping them (also those made by other "
                           "settings, which are otherwise refused).")


class ReconEvalConfig(_Strict):
    """`featmap recon-eval`: mapping runs judged as images through FeatInv (FeatMap §7; docs/concepts/recon-eval.md).
    FeatInv's model, sampling settings and (backbone, layer) are featinv.*."""

    runs: list[str] | None = Field(
        None, description="Run keys of mapping.study to evaluate; null: every finished run of FeatInv's (backbone, "
                          "layer). A listed run of another layer is an error.")
    subset_size: int = Field(
        100, ge=1, description="Held-out sources per (dataset, manipulation), a seeded choice shared by every model of "
                               "the manipulation.")
    seed: int = Field(42, description="Seed of that choice and of the noise control's noise.")
    judge: BackboneRequest = Field(
        BackboneRequest(name="convnext_base"),
        description="The backbone whose features compare two images (per-position cosine): the reference always uses "
                    "ConvNeXt-B stage3, also for SwinV2 runs and other layers. Its `layers` are not used.")
    judge_layer: str = Field("stage3", description="The judge's layer whose maps are compared.")
    noise_control: bool = Field(
        True, description="Also reconstruct the original map plus noise of the mapping's per-position change norm.")
    lpips_weights: str | None = Field(
        None, description="A local torchvision AlexNet state dict (alexnet-owt-7be5be79.pth) for LPIPS; null: no "
                          "LPIPS columns.")
    batch_size: int = Field(
        4, ge=1, description="Pairs per actor call (each 2-4 feature maps for FeatInv).")
    num_actors: int = Field(1, ge=1, description="Actors of the recon-eval pool, each loading its models once.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; 0 runs on CPU.")
    rows_per_commit: int = Field(
        8, ge=1, description="Rows per Lance commit of results/<study>/reconstructions.lance: the resume granularity.")


class EvaluateConfig(_Strict):
    """`evaluate.*`: held-out evaluation of a study's runs (`featmap evaluate`, `analyze`, `recon-eval`)."""

    split: str = Field(
        "test", description="The held-out split whose pairs evaluate, analyze and recon-eval read.")
    max_pairs: int | None = Field(
        None, ge=1, description="At most this many held-out pairs per (dataset, backbone, layer, manipulation), a "
                                "seeded subset (evaluate.seed), for evaluate and analyze; null: all.")
    batch_size: int = Field(
        64, ge=1, description="Pairs per forward pass of the mapping models and the classifier in `featmap evaluate`.")
    classifier: BackboneRequest | None = Field(
        None, description="The classifier whose head runs on the mapped features of the backbone it names (e.g. a "
                          "fine-tuned one via checkpoint + model_kwargs {num_classes: N}); null, and other backbones: "
                          "the extract.backbones entry with its timm head.")
    truncation_ranks: list[int] = Field(
        [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
        description="Ranks k of the truncated linear maps `featmap analyze` evaluates (ranks at or above the full "
                    "rank are dropped; the full rank is always added).")
    analysis_samples: int = Field(
        200, ge=1, description="Held-out inputs, a seeded sample, of analyze's weight-vs-bias measures.")
    seed: int = Field(42, description="Seed of the max_pairs subset and of the analysis sample.")
    reconstruction: ReconEvalConfig = Field(
        ReconEvalConfig(), description="`featmap recon-eval` (evaluate.reconstruction.*).")


class FeatInvSampling(_Strict):
    """`featinv.sampling.*`: how FeatInv samples (reconstruct, recon-eval, featinv-viz, training's sample grids,
    the service's defaults) and which maps and resources the reconstruct job uses."""

    steps: int = Field(50, ge=1, description="DDIM steps per image (eta 0).")
    guidance: float = Field(
        1.75, ge=0, description="Text-only classifier-free guidance scale (the paper: 1.75 unpooled, 8 pooled).")
    seed: int = Field(
        100, description="Seed of every image (the reference samples every image with 100); sample i of a map uses "
                         "seed + i.")
    num_samples: int = Field(
        1, ge=1, description="Reconstructions per feature map in `featmap reconstruct`.")
    prompt: str = Field(
        "a high-quality, detailed, and professional image, ",
        description="The sampling text: the reference's, trailing \", \" included.")
    negative_prompt: str = Field("", description="Negative text of the classifier-free guidance.")
    control_scale: float = Field(
        1.0, ge=0, description="Multiplies the 13 ControlNet residuals (0 ignores the feature maps).")
    split: str | None = Field(
        None, description="reconstruct: maps of this split only; null: every split (with mapping_run: test).")
    variants: list[str] | None = Field(
        ["original"], description="reconstruct: maps of these image variants only; null: every variant.")
    mapping_run: str | None = Field(
        None, description="reconstruct: a finished run of mapping.study (its key) whose mapped maps of the split's "
                          "held-out pairs are reconstructed instead of stored maps (split default test).")
    limit: int | None = Field(
        None, ge=1, description="reconstruct: only the first N maps ((source_id, variant) keys in sorted order); "
                                "null: all.")
    batch_size: int = Field(8, ge=1, description="Feature maps per FeatInv call (reconstruct's actors, featinv-viz).")
    num_actors: int = Field(1, ge=1, description="Actors of the reconstruct pool, each loading the model once.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per reconstruct actor; 0 runs on CPU. featinv-viz runs on CUDA when above 0.")
    rows_per_commit: int = Field(
        16, ge=1, description="Reconstructions per Lance commit: the resume granularity.")


class FeatInvTraining(_Strict):
    """`featinv.training.*`: `featmap featinv-train`, the FeatInv ControlNet's training on Ray Train (README:
    FeatInv)."""

    run_name: Name = Field(
        "featinv", description="Name of the training run: checkpoints and the final controlnet/ in "
                               "<storage>/featinv/<run_name>, MLflow run featinv-train:<run_name>.")
    init_from: str | None = Field(
        None, description="The ControlNet the run starts from (fine-tuning): a folder or an MLflow model URI; null: "
                          "fresh from the base UNet. (featinv.controlnet is the model the other commands use.)")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate of the ControlNet.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Training images per batch on each worker.")
    max_steps: int = Field(
        10_000, ge=1, description="Optimiser steps of the run; a re-run with a larger value continues from the last "
                                  "checkpoint.")
    prompt: str = Field(
        "a high-quality, detailed, and professional image",
        description="The training text (the reference's, spec §10.4); unlike sampling.prompt it has no trailing "
                    "\", \".")
    conditioning_dropout: float = Field(
        0.15, ge=0, le=1, description="Probability that a training example's feature map becomes zeros and its "
                                      "prompt \"\", together.")
    features_source: Literal["table", "on_the_fly"] = Field(
        "on_the_fly", description="`on_the_fly`: the backbone runs on the training worker (allows flip augmentation, "
                                  "like the reference); `table`: the maps stored by `featmap extract`.")
    hflip: bool = Field(
        True, description="Flip each training image horizontally with probability 0.5: before its features are "
                          "computed (on_the_fly only), and in the base model's training (base_model: trained).")
    split: str | None = Field("train", description="Train on the images of this split; null: every split.")
    variants: list[str] | None = Field(
        None, description="Image variants to train on; null: all (originals and manipulations).")
    shuffle_buffer: int = Field(
        256, ge=1, description="Rows in Ray Data's local shuffle buffer of the training stream.")
    log_every: int = Field(10, ge=1, description="Steps per logged (mean) loss.")
    sample_every: int = Field(
        1000, ge=1, description="Steps per logged grid of sample reconstructions (with featinv.sampling's prompt, "
                                "guidance and control scale).")
    sample_steps: int = Field(20, ge=1, description="DDIM steps of those samples.")
    checkpoint_every: int = Field(
        1000, ge=1, description="Steps between checkpoints (one is also written at max_steps).")
    num_workers: int = Field(
        1, ge=1, description="Ray Train workers (DDP); local mode (0) would not persist checkpoints.")
    use_gpu: bool = Field(
        False, description="One GPU per Train worker; false: CPU, the node's cores shared among the workers.")
    seed: int = Field(
        0, description="Seed of a fresh ControlNet (also the one other commands build when featinv.controlnet is "
                       "null), the data order and every step's random draws.")
    registered_model: Name | None = Field(
        None, description="The MLflow registered model that receives the final ControlNet of every run as a new "
                          "version; null: featinv-<backbone>-<layer>.")


class FeatInvBaseTraining(_Strict):
    """`featinv.base_model: trained`: the tiny Stable Diffusion base that `featmap featinv-train` first trains on
    the stored images (docs/how-to/featinv-training.md: A base trained here), for machines that cannot download a pretrained one. The
    VAE learns to reconstruct the images (MSE + kl_weight·KL), then the UNet to denoise their latents (the
    ControlNet recipe's loss, without a ControlNet). Images, split and variants are featinv.training's."""

    image_size: int = Field(
        64, ge=16, description="Side in pixels of the base model's images (image_size x image_size).")
    latent_size: int = Field(
        8, ge=4, description="Side of the latent grid; image_size / latent_size must be a power of two (at least 2).")
    vae_width: int = Field(
        16, ge=8, multiple_of=8, description="Channels of the VAE's first block, a multiple of 8 (the others double "
                                             "once).")
    vae_steps: int = Field(200, ge=1, description="Optimiser steps of the VAE phase.")
    unet_steps: int = Field(500, ge=1, description="Optimiser steps of the UNet phase.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate of both phases.")
    batch_size: int = Field(16, ge=1, description="Images per batch on each worker.")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term of the VAE loss (MSE + kl_weight·KL).")
    text_dropout: float = Field(
        0.1, ge=0, le=1, description="Probability that the UNet phase's prompt becomes \"\" (what classifier-free "
                                     "guidance samples against).")
    seed: int = Field(0, description="Seed of the initial weights and every training draw.")

    @model_validator(mode="after")
    def _power_of_two_factor(self) -> FeatInvBaseTraining:
        factor = self.image_size // self.latent_size
        if self.image_size % self.latent_size or factor < 2 or factor & (factor - 1):
            raise ValueError(f"image_size / latent_size must be a power of two >= 2, got {self.image_size} / "
                             f"{self.latent_size}")
        return self


class FeatInvEval(_Strict):
    """`featinv.eval.*`: how `featmap reconstruct` scores its reconstructions."""

    fid_inception_weights: str | None = Field(
        None, description="A local torchvision Inception-v3 state dict for FID on its pool features; null: the "
                          "backbone's pooled final features.")


class FeatInvViz(_Strict):
    """`featmap featinv-viz` (spec §10.9, §10.10; docs/concepts/featinv-viz.md): concept steering, interpolation, composition."""

    class_name: str | None = Field(
        None, description="The images: the stored maps of this class's images; null and no source_ids: the first "
                          "class by name. Not together with source_ids.")
    source_ids: list[str] | None = Field(
        None, min_length=1, description="The images: the stored maps of these source ids (instead of a class).")
    variant: str = Field("original", description="The image variant whose maps and images are used.")
    limit: int | None = Field(
        4, ge=1, description="Images steered and shown: the first N source ids (sorted); the decomposition uses all "
                             "selected. null: all.")
    concepts: str | None = Field(
        None, description="Concept bases: a .npy or .safetensors file (local or object store); null: decompose the "
                          "selected maps' feature vectors.")
    n_concepts: int = Field(3, ge=1, description="Decomposition: k-means clusters of the feature vectors, one concept "
                                                  "each.")
    rank: int = Field(4, ge=1, description="Decomposition: dimension of each concept's subspace.")
    seed: int = Field(0, description="Decomposition: seed of the k-means initialisation.")
    factor: float = Field(
        0.25, ge=0, description="Attenuation: phi' = the sum of the other parts + factor x the concept's part.")
    num_seeds: int = Field(
        5, ge=1, description="Reconstructions per map, with seeds featinv.sampling.seed + i.")
    alphas: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
        description="Interpolation grid: phi_alpha = (1 - alpha) phi_A + alpha phi_B for each alpha, each in [0, 1].")
    pair: list[str] | None = Field(
        None, min_length=2, max_length=2, description="[A, B] source ids of the interpolation and the composition; "
                                                      "null: the first two images shown.")
    region: list[int] | None = Field(
        None, min_length=4, max_length=4, description="[row0, row1, col0, col1] of the feature grid, half-open: B's "
                                                      "part of the composition; null: the central half.")

    @field_validator("alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, alphas: list[float]) -> list[float]:
        outside = [a for a in alphas if not 0 <= a <= 1]
        if outside:
            raise ValueError(f"every alpha must lie in [0, 1], got {outside}")
        return alphas


class FeatInvConfig(_Strict):
    """`featinv.*`: FeatInv, feature maps back to images (featinv-train, reconstruct, recon-eval, featinv-viz,
    serve; README: FeatInv)."""

    backbone: str | None = Field(
        None, description="The extract.backbones entry whose maps are inverted (its weights are used); null: the "
                          "first.")
    layer: str | None = Field(None, description="The layer inverted; null: that entry's last layer.")
    base_model: str = Field(
        "lambdalabs/miniSD-diffusers",
        description="Stable Diffusion 1.x in diffusers layout: a local folder or a hub id in the local HF cache; "
                    "`tiny`: random tiny models (tests only); `trained`: the tiny base `featmap featinv-train` first "
                    "trains on this store (featinv.base_training; <storage>/featinv/<run_name>/base).")
    controlnet: str | None = Field(
        None, description="The trained FeatInv ControlNet the other commands use: a folder (local or object store), "
                          "runs:/<run_id>/<path>, models:/<name>/<version>, models:/<name>/latest or "
                          "models:/<name>@<alias>; null: fresh from the base UNet.")
    pooled: bool = Field(
        False, description="The paper's pooled variant: the map's channel means, tiled (for a fresh ControlNet; a "
                           "saved one keeps its own).")
    encoder_hidden_channels: int = Field(
        512, ge=1, description="Width of a fresh ControlNet's feature encoder (the reference's 512).")
    sampling: FeatInvSampling = Field(FeatInvSampling(), description="Sampling (featinv.sampling.*).")
    training: FeatInvTraining = Field(
        FeatInvTraining(), description="`featmap featinv-train` (featinv.training.*).")
    base_training: FeatInvBaseTraining = Field(
        FeatInvBaseTraining(), description="The tiny base trained for base_model: trained (featinv.base_training.*).")
    eval: FeatInvEval = Field(FeatInvEval(), description="Reconstruction scores (featinv.eval.*).")
    viz: FeatInvViz = Field(FeatInvViz(), description="`featmap featinv-viz` (featinv.viz.*).")


class ServeDeployment(_Strict):
    """Ray Serve options of one deployment of the service (docs/how-to/serving.md)."""

    num_replicas: int = Field(1, ge=1, description="Replicas; not used when autoscaling_config is set.")
    ray_actor_options: dict[str, Any] = Field(
        {"num_cpus": 1}, description="Ray actor options of each replica, e.g. {num_cpus: 1, num_gpus: 0.25}; a "
                                     "replica given a GPU, or a share of one, runs its model on CUDA.")
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests a replica handles at once; more wait in the caller's queue.")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, "
                          "...), replacing num_replicas; null: num_replicas.")
    max_batch_size: int = Field(
        16, ge=1, description="@serve.batch: items per model call (backbone, FeatInv and mapping; the ingress does "
                              "not batch).")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="@serve.batch: seconds a partial batch waits for more items.")

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `Deployment.options`."""
        scaling = ({"autoscaling_config": self.autoscaling_config} if self.autoscaling_config
                   else {"num_replicas": self.num_replicas})
        return {"ray_actor_options": self.ray_actor_options, "max_ongoing_requests": self.max_ongoing_requests,
                **scaling}


class ServeLimits(_Strict):
    """What one request may ask for; anything beyond is a 4xx answer naming the limit."""

    max_body_mb: float = Field(
        16.0, gt=0, description="Largest request body in MiB (an upload, its base64 or a feature map), from "
                                "Content-Length before reading and counted for chunked bodies; beyond: 413.")
    max_pixels: int = Field(
        40_000_000, ge=1, description="Most pixels of an uploaded image, from its header before decoding "
                                      "(decompression bombs); beyond: 413.")
    min_side: int = Field(8, ge=1, description="Smallest shorter side in pixels of an uploaded image; below: 400.")
    max_seeds: int = Field(8, ge=1, le=8, description="Most seeds (reconstructions) per request, at most 8.")
    max_steps: int = Field(50, ge=1, description="Most DDIM steps a request may ask for.")
    max_guidance: float = Field(20.0, ge=0, description="Largest guidance scale a request may ask for.")
    max_control_scale: float = Field(4.0, ge=0, description="Largest ControlNet control scale a request may ask for.")
    request_timeout_s: float = Field(
        120.0, gt=0, description="Seconds the whole request may take, body upload and answer included; past it the "
                                 "ingress answers 504 (Ray Serve's own HTTP timeout is set 5 s later).")
    formats: list[str] = Field(
        SERVE_FORMATS, description="Pillow format names of uploaded images (any of PNG, JPEG, WEBP, BMP, TIFF, GIF, "
                                   "PPM; never EPS, FITS, ICNS or ICO); others: 415.")
    max_aspect: float = Field(
        10.0, ge=1, description="Largest ratio of longer to shorter side of an uploaded image, from its header; "
                                "beyond: 400.")
    min_upload_kb_s: float = Field(
        16.0, gt=0, description="Slow uploads (slowloris): after upload_grace_s the body must have arrived at this "
                                "average rate, in KiB/s; else 408.")
    upload_grace_s: float = Field(
        15.0, gt=0, description="Seconds from the route's first read before min_upload_kb_s applies; generous, as on "
                                "a busy node the body reaches the ingress late.")

    @field_validator("formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        return _image_formats(formats)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


class ServeConfig(_Strict):
    """`featmap serve`: FeatInv over HTTP (docs/concepts/service.md, docs/how-to/serving.md)."""

    host: str = Field(
        "127.0.0.1", description="Address Serve's HTTP proxy binds; loopback unless said otherwise, as the service "
                                 "has no authentication.")
    allowed_hosts: list[str] = Field(
        [], description="More Host header values (names or addresses, no port) the service answers, against DNS "
                        "rebinding; the bind address and, for a loopback or wildcard bind, localhost, 127.0.0.1 and "
                        "::1 are always allowed.")
    docs: bool = Field(
        True, description="Serve /docs (Swagger UI, from the package's own files) and /openapi.json; false switches "
                          "both off.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of Serve's HTTP proxy.")
    app_name: Name = Field("featmap", description="Name of the Ray Serve application.")
    route_prefix: str = Field(
        "/", pattern=r"^/", description="HTTP route prefix the application is served under (starts with /).")
    featinv_models: dict[Name, str] = Field(
        {}, description="The allow-list of FeatInv models requests may name: name -> a ControlNet folder (local or "
                        "object store), runs:/<run id>/<path>, models:/<name>/<version> or models:/<name>@<alias> "
                        "(resolved once at start-up). \"default\" is always there: featinv.controlnet, or a fresh "
                        "model from the base UNet.")
    mapping_runs: list[str] | None = Field(
        [], description="Run keys of mapping.study that the mapped route may apply (finished, of the served backbone "
                        "and layer); null: every finished run at start-up.")
    steps: int = Field(
        20, ge=1, description="Default DDIM steps of a request (within limits.max_steps); guidance, control scale and "
                              "prompt default to featinv.sampling's.")
    seeds: list[int] = Field(
        [100], min_length=1, description="Default seeds of a request, one reconstruction each (within "
                                         "limits.max_seeds).")
    limits: ServeLimits = Field(ServeLimits(), description="What one request may ask for (serve.limits.*).")
    # Logical CPUs add up to 2 by default, so that `serve run` fits a 2-core machine's default Ray; the
    # ingress and mapping replicas wait on I/O or do little work.
    ingress: ServeDeployment = Field(
        ServeDeployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25}),
        description="The ingress deployment (FastAPI: validation, routing, the page); 0.25 CPU and 64 ongoing "
                    "requests by default.")
    backbone: ServeDeployment = Field(
        ServeDeployment(ray_actor_options={"num_cpus": 0.5}),
        description="The backbone deployment (image -> the served layer's feature map and logits); 0.5 CPU by "
                    "default.")
    featinv: ServeDeployment = Field(
        ServeDeployment(), description="Each FeatInv deployment, one per allow-listed model; 1 CPU by default.")
    mapping: ServeDeployment = Field(
        ServeDeployment(ray_actor_options={"num_cpus": 0.25}),
        description="The mapping deployment (applies a run of mapping_runs to a map); 0.25 CPU by default.")

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ServeConfig:
        if self.steps > self.limits.max_steps or len(self.seeds) > self.limits.max_seeds:
            raise ValueError(f"steps ({self.steps}) and the number of seeds ({len(self.seeds)}) must be within "
                             f"limits.max_steps ({self.limits.max_steps}) and limits.max_seeds ({self.limits.max_seeds})")
        return self


class Config(_Strict):
    """The whole run configuration: a conf/*.yaml file plus key=value overrides (README: Configuration)."""

    storage: str = Field(
        "featmap_data", description="Root of every table and artefact: a local folder (made absolute when the config "
                                    "loads) or an object-store URI such as s3://bucket/prefix or gs://bucket/prefix "
                                    "(README: Storage).")
    overwrite: bool = Field(
        False, description="Recompute outputs that were made by other settings (same as --overwrite); false: a stage "
                           "refuses before writing anything when what is stored was made by other settings.")
    ray: RayConfig = Field(RayConfig(), description="The Ray cluster or embedded instance (ray.*).")
    mlflow: MlflowConfig = Field(MlflowConfig(), description="Where runs are recorded (mlflow.*).")
    dataset: Annotated[DatasetConfig, Field(
        description="The dataset `featmap ingest` reads (dataset.*; name and root are required).")]
    manipulate: ManipulateConfig = Field(
        ManipulateConfig(), description="The direct manipulations of `featmap manipulate` (manipulate.*).")
    edit: EditConfig = Field(EditConfig(), description="The semantic edits of `featmap edit` (edit.*).")
    extract: ExtractConfig = Field(
        ExtractConfig(), description="The backbones and `featmap extract` (extract.*).")
    mapping: MappingConfig = Field(MappingConfig(), description="The study's mapping runs (mapping.*).")
    evaluate: EvaluateConfig = Field(
        EvaluateConfig(), description="Evaluation, analysis and reconstruction evaluation (evaluate.*).")
    featinv: FeatInvConfig = Field(FeatInvConfig(), description="FeatInv (featinv.*).")
    serve: ServeConfig = Field(ServeConfig(), description="The HTTP service of `featmap serve` (serve.*).")

    @model_validator(mode="after")
    def _absolute_storage(self) -> Config:
        # Resolved once, here: Ray Tune trials and job working dirs change the process CWD.
        if "://" not in self.storage:
            self.storage = str(Path(self.storage).expanduser().resolve())
        return self

    @model_validator(mode="after")
    def _mlflow_store_for_the_storage(self) -> Config:
        self.mlflow.check_storage(self.storage)
        return self

    @model_validator(mode="after")
    def _featinv_backbone_is_extracted(self) -> Config:
        names = [b.name for b in self.extract.backbones]
        if self.featinv.backbone is not None and self.featinv.backbone not in names:
            raise ValueError(f"featinv.backbone {self.featinv.backbone!r} must name an extract.backbones entry {names}")
        return self

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. extract.batch_size=8)")
        parsed.append((key.strip().split("."), yaml.safe_load(raw) if raw else None))
    return parsed


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
            continue
        got = "" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})"
        lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply `a.b=value` overrides (values parsed as YAML) and validate."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for keys, value in parse_overrides(overrides or []):
        _apply(data, keys, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None
