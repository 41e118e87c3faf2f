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
    model_config = ConfigDict(extra="forbid")


class RayConfig(_Strict):
    address: str | None = None  # None: RAY_ADDRESS if set, else an embedded local instance
    # Logical CPUs of the embedded instance. More than the physical cores on purpose: actor
    # pools plus Ray Data tasks deadlock when actors hold every logical CPU (ray#44687).
    num_cpus: int = Field(8, ge=1)
    object_store_memory_mb: int | None = Field(None, ge=75)


class MlflowConfig(_Strict):
    # None: sqlite:///<storage>/mlflow.db for a local storage root. An object-store root needs one:
    # an MLflow server (http://HOST:5000, for a cluster) or an absolute SQLite file (sqlite:////abs/mlflow.db).
    tracking_uri: str | None = None
    experiment: str = "featmap"

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
    name: Name
    # A folder (local path or URI such as s3://bucket/cars), or "builtin:skimage" for the
    # photographs bundled with scikit-image (the embedded demo).
    root: str
    layout: Literal["auto", "featmap", "split_folders", "imagefolder"] = "auto"
    splits: list[str] = ["train", "test"]
    default_split: str = "train"  # split given to images of a layout without split folders
    num_classes: int = Field(-1, ge=-1)  # first N classes in sorted order; -1 = all
    classes: list[str] | None = None  # explicit class subset (overrides num_classes)
    images_per_class: int | None = Field(None, ge=1)  # seeded sample per (split, class)
    seed: int = 0
    image_size: int = Field(288, ge=16)
    min_side: int = Field(32, ge=1)  # smaller images are recorded as errors, not upsampled
    max_pixels: int = Field(89_478_485, ge=1)  # PIL's default decompression-bomb limit
    max_aspect: float = Field(10.0, ge=1)  # longer side / shorter side, from the header; beyond: an error row
    formats: list[str] = INGEST_FORMATS  # Pillow format names read, by content (add "PPM" for .ppm/.pgm files)
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"]

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, root: str) -> str:
        return root if root.startswith("builtin:") or "://" in root else str(Path(root).expanduser().resolve())

    @field_validator("formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        return _image_formats(formats)


class ManipulateConfig(_Strict):
    seed: int = 0  # base of the per-(source_id, manipulation) seeds
    batch_size: int = Field(16, ge=1)
    ops: dict[str, Any] = Field(
        default_factory=lambda: {
            "rotation": [90, 180, 270],
            "mirror": ["h", "v"],
            "noise": [40],
            "mask": direct.PAPER_MASKS,
            "hue_shift": [60],
            "grayscale": True,
        }
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

    name: Name  # e.g. Turn_on_headlights
    prompt: str

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt


class EditConfig(_Strict):
    """`featmap edit`: semantic edits of the originals by a diffusers image-editing pipeline, on an actor
    pool, as new variants of the images table (docs/how-to/semantic-edits.md). Defaults are the reference's (spec §3)."""

    # A hub id resolved in the local Hugging Face cache or a local folder in diffusers layout (the pipeline
    # class comes from its model_index.json), or "tiny": a random tiny QwenImageEditPlusPipeline (tests, demos).
    model: str = "Qwen/Qwen-Image-Edit-2511"
    prompts: dict[str, list[EditPrompt]] = {}  # dataset name -> its prompts; a dataset without any gets no edits
    prefix: Name = "qwen"  # variant id <prefix>:<name>:<repeat>
    repeats: int = Field(1, ge=1)  # edits per (image, prompt), each with its own seed
    # Originals edited per (split, class), a seeded choice (the reference: the first 10 train, 5 test); a
    # split not named gets none, a count above a class's size takes all of it.
    images_per_class: dict[str, int] = {"train": 10, "test": 5}
    seed: int = 42  # base of the per-(source_id, variant) seeds
    steps: int = Field(10, ge=1)
    true_cfg_scale: float = Field(4.5, ge=0)  # real classifier-free guidance when > 1 (with negative_prompt)
    negative_prompt: str = " "  # the reference's single space; an empty value becomes one, as there
    guidance_scale: float | None = 1.0  # only guidance-distilled transformers use it; diffusers ignores it otherwise
    # The pipeline's working area in pixels: None is its own (~1024x1024 at the input's aspect ratio); a
    # number scales every size the pipeline derives (output, VAE and vision-language inputs) to that area.
    working_pixels: int | None = Field(None, ge=1024)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    batch_size: int = Field(1, ge=1)  # edits per pipeline call (QwenImageEditPlusPipeline takes one)
    num_actors: int = Field(1, ge=1)  # pipelines, one per actor, loaded once each
    # GPUs per actor: 0 runs on CPU, 0.5 puts two pipelines on one GPU, 2 spreads one pipeline over two
    # GPUs (device_map "balanced", needs accelerate).
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = {}  # custom Ray resources per actor, e.g. {gpu_80gb: 1} (cluster.yaml)
    torch_threads: int | None = Field(None, ge=1)  # CPU actors; None: all cores of the node
    vae_tiling: bool = True  # the reference decodes with VAE slicing and tiling
    rows_per_commit: int = Field(4, ge=1)  # edited images per Lance commit: the resume granularity

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
    name: str  # a registry name (convnext_base, swinv2_base, dinov3_vitb16, resnet50) or any timm model
    layers: list[str] | None = None  # None: the registry's default layers
    pretrained: bool = True
    checkpoint: str | None = None  # local weight file; overrides the Hugging Face hub id
    model_kwargs: dict[str, Any] = {}  # passed to timm.create_model (tiny test variants)
    init_seed: int = 0  # seeds random initialisation when pretrained is false

    @model_validator(mode="after")
    def _checkpoint_needs_pretrained(self) -> BackboneRequest:
        if self.checkpoint and not self.pretrained:
            raise ValueError(f"backbone {self.name}: checkpoint is set but pretrained is false")
        return self


class ExtractConfig(_Strict):
    backbones: list[BackboneRequest] = [BackboneRequest(name="convnext_base")]
    batch_size: int = Field(32, ge=1)
    num_actors: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)  # per actor; 0 runs on CPU
    dtype: Literal["float16", "float32"] = "float16"
    # The forward's precision, not the stored dtype: float32, or torch.autocast in bfloat16/float16 (GPU actors'
    # tensor cores). Other precision, other features: a setting of the tables (recorded unless float32).
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    channels_last: bool = False  # NHWC model and inputs: faster GPU convolutions, the same maps up to rounding
    torch_threads: int | None = Field(None, ge=1)  # CPU actors; None: all cores of the node
    rows_per_commit: int = Field(64, ge=1)  # rows per Lance fragment/commit: the resume granularity


class MappingGroup(_Strict):
    """One manipulation group of a study: every manipulation x every model family."""

    manipulations: list[str] = Field(..., min_length=1)
    models: list[str] = Field(..., min_length=1)
    # Geometric "apply" group: the exact feature-map rotation/flip first, the model learns the rest.
    apply_transform: bool = False


class MappingTarget(_Strict):
    """The (backbone, layer) feature maps a study maps, with the normalisation choice for them."""

    backbone: str
    layers: list[str] = Field(..., min_length=1)
    # Per-channel standardisation with statistics of all training originals, on inputs and
    # targets, inverted on outputs (the paper: on for ConvNeXt stage0-2, off for stage3).
    normalise: bool = True


class MappingTraining(_Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(32, ge=1)
    accumulate: int = Field(2, ge=1)  # optimiser step every N batches (effective batch 64)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(6, ge=1)  # early stopping on val_loss
    min_delta: float = Field(1e-3, ge=0)
    plateau_patience: int = Field(8, ge=1)  # ReduceLROnPlateau
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    min_lr: float = Field(1e-6, ge=0)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_train_pairs: int | None = Field(8000, ge=1)  # seeded subset per manipulation; None = all
    seed: int = 42  # model initialisation, the split, and every epoch's batch order


class MappingResources(_Strict):
    # Ray Train workers per fused group (DDP). At least 1: Train's local mode neither persists
    # checkpoints nor runs inside Tune trials.
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    # Runs that read the same pairs (one dataset, backbone, layer, manipulation) train together in
    # one Ray Train run; at most this many models per group (None: all of them; 1: one run per trial).
    models_per_group: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)  # groups at once; None = what the cluster fits
    max_failures: int = Field(1, ge=0)  # restarts of a group (Train workers, Tune trial) from its last checkpoint
    checkpoint_every: int = Field(1, ge=1)  # epochs between checkpoints (and whenever a model finishes)
    pair_cache_mb: int = Field(4096, ge=0)  # a worker holds its pairs in memory up to this size, else streams them
    driver_cpus: float = Field(0.5, gt=0)  # the Tune trial that drives a group's TorchTrainer
    driver_resources: dict[str, float] = {}  # e.g. {"head": 0.01} to keep drivers on a non-spot node


class SweepConfig(_Strict):
    """Ray Tune search over one family's hyper-parameters, on one (backbone, layer, manipulation)."""

    model: str = "mlp"
    backbone: str | None = None  # None: the first mapping target
    layer: str | None = None
    manipulation: str = "hue_shift_60"
    apply_transform: bool = False  # geometric manipulations: the exact spatial transform first
    num_samples: int = Field(8, ge=1)
    # name -> {type: loguniform|uniform|choice|randint, ...}: lr, hidden, num_layers, dropout,
    # loss weights (loss.<term>) ...
    space: dict[str, dict[str, Any]] = {
        "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
        "hidden": {"type": "choice", "values": [128, 256, 512]},
        "dropout": {"type": "uniform", "low": 0.0, "high": 0.4},
    }
    grace_period: int = Field(2, ge=1)  # ASHA: epochs before a trial may be stopped
    reduction_factor: int = Field(3, ge=2)


class MappingConfig(_Strict):
    study: Name = "study"  # MLflow parent run, run folder
    targets: list[MappingTarget] = []  # empty: every extracted (backbone, layer)
    # dataset name -> group name -> group; empty: the paper's groups on this config's dataset.
    datasets: dict[str, dict[str, MappingGroup]] = {}
    losses: dict[str, str | dict[str, float]] = {"paper": {"mse": 0.3, "median_cos": 0.7}}
    loss_options: dict[str, dict[str, Any]] = {}  # per loss term, e.g. {huber: {delta: 0.5}}
    model_hparams: dict[str, dict[str, Any]] = {}  # per family, e.g. {transformer: {positional: learned}}
    training: MappingTraining = MappingTraining()
    resources: MappingResources = MappingResources()
    sweep: SweepConfig = SweepConfig()
    refit: bool = False  # re-train runs that already finished instead of skipping them


class ReconEvalConfig(_Strict):
    """`featmap recon-eval`: mapping runs judged as images through FeatInv (FeatMap §7; docs/concepts/recon-eval.md).
    FeatInv's model, sampling settings and (backbone, layer) are featinv.*."""

    runs: list[str] | None = None  # run keys of mapping.study; None: every finished run of FeatInv's (backbone, layer)
    subset_size: int = Field(100, ge=1)  # held-out sources per (dataset, manipulation): a seeded choice
    seed: int = 42  # the subset's and the noise control's seeds
    # The backbone whose features judge two images (per-position cosine): the reference always uses
    # ConvNeXt-B stage3, also for SwinV2 runs and other layers.
    judge: BackboneRequest = BackboneRequest(name="convnext_base")
    judge_layer: str = "stage3"
    noise_control: bool = True  # also reconstruct the original + noise of the mapping's per-position change norm
    lpips_weights: str | None = None  # a local AlexNet state dict for LPIPS; None: no LPIPS columns
    batch_size: int = Field(4, ge=1)  # pairs per actor call (each 2-4 feature maps for FeatInv)
    num_actors: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    rows_per_commit: int = Field(8, ge=1)


class EvaluateConfig(_Strict):
    split: str = "test"
    max_pairs: int | None = Field(None, ge=1)  # seeded subset of test pairs per run; None = all
    batch_size: int = Field(64, ge=1)
    # The classifier whose head runs on mapped features: None = each backbone as extracted
    # (its timm head); a fine-tuned one via checkpoint + model_kwargs {num_classes: N}.
    classifier: BackboneRequest | None = None
    truncation_ranks: list[int] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    analysis_samples: int = Field(200, ge=1)  # test originals for the weight-vs-bias measures
    seed: int = 42
    reconstruction: ReconEvalConfig = ReconEvalConfig()



class FeatInvSampling(_Strict):
    """The reconstruct job: which feature maps, how they are sampled, where it runs."""

    steps: int = Field(50, ge=1)  # DDIM steps, eta 0
    guidance: float = Field(1.75, ge=0)  # text-only classifier-free guidance (paper: 1.75 unpooled, 8 pooled)
    seed: int = 100  # the reference samples every image with seed 100; sample i of a map uses seed + i
    num_samples: int = Field(1, ge=1)  # reconstructions per feature map
    prompt: str = "a high-quality, detailed, and professional image, "  # the reference's text, trailing ", " included
    negative_prompt: str = ""
    control_scale: float = Field(1.0, ge=0)  # multiplies the 13 ControlNet residuals
    split: str | None = None  # feature maps of this split only; None = every split
    variants: list[str] | None = ["original"]  # None = every variant
    # A finished run of mapping.study (its key): reconstruct its mapped maps of the split's held-out
    # pairs (split default "test") instead of stored maps, to compare with the real manipulated image.
    mapping_run: str | None = None
    limit: int | None = Field(None, ge=1)  # the first N (source_id, variant) keys in sorted order
    batch_size: int = Field(8, ge=1)
    num_actors: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)  # per actor; 0 runs on CPU
    rows_per_commit: int = Field(16, ge=1)


class FeatInvTraining(_Strict):
    run_name: Name = "featinv"  # checkpoints in <storage>/featinv/<run_name>
    # The ControlNet the run starts from: a folder or an MLflow model URI to fine-tune; None = fresh from the
    # base UNet. (featinv.controlnet is the model the other commands use: it may name this run's output.)
    init_from: str | None = None
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(8, ge=1)  # per worker
    max_steps: int = Field(10_000, ge=1)  # a re-run with a larger value continues from the last checkpoint
    # The reference's training text (spec §10.4); unlike sampling.prompt it has no trailing ", ".
    prompt: str = "a high-quality, detailed, and professional image"
    conditioning_dropout: float = Field(0.15, ge=0, le=1)  # feature map -> zeros and prompt -> "" together
    # "on_the_fly": the backbone runs on the training worker (allows flip augmentation, like the
    # reference); "table": the maps stored by `featmap extract`.
    features_source: Literal["table", "on_the_fly"] = "on_the_fly"
    hflip: bool = True  # on_the_fly only: flip half the images before feature extraction
    split: str | None = "train"  # None = every split
    variants: list[str] | None = None  # image variants to train on; None = all (originals and manipulations)
    shuffle_buffer: int = Field(256, ge=1)  # rows in Ray Data's local shuffle buffer
    log_every: int = Field(10, ge=1)  # steps per logged (mean) loss
    sample_every: int = Field(1000, ge=1)  # steps per logged grid of sample reconstructions
    sample_steps: int = Field(20, ge=1)  # DDIM steps of those samples
    checkpoint_every: int = Field(1000, ge=1)
    num_workers: int = Field(1, ge=1)  # Ray Train workers (DDP); local mode (0) would not persist checkpoints
    use_gpu: bool = False
    seed: int = 0
    # The MLflow registered model that receives the final ControlNet of every run; None = featinv-<backbone>-<layer>.
    registered_model: Name | None = None


class FeatInvBaseTraining(_Strict):
    """`featinv.base_model: trained`: the tiny Stable Diffusion base that `featmap featinv-train` first trains on
    the stored images (docs/how-to/featinv-training.md: A base trained here), for machines that cannot download a pretrained one. The
    VAE learns to reconstruct the images (MSE + kl_weight·KL), then the UNet to denoise their latents (the
    ControlNet recipe's loss, without a ControlNet). Images, split and variants are featinv.training's."""

    image_size: int = Field(64, ge=16)  # generated images are image_size × image_size
    latent_size: int = Field(8, ge=4)  # the latent grid; image_size / latent_size must be a power of two
    vae_width: int = Field(16, ge=8, multiple_of=8)  # channels of the VAE's first block (the others double once)
    vae_steps: int = Field(200, ge=1)
    unet_steps: int = Field(500, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)  # per worker
    kl_weight: float = Field(1e-6, ge=0)
    text_dropout: float = Field(0.1, ge=0, le=1)  # the prompt -> "" (what classifier-free guidance samples against)
    seed: int = 0  # initial weights and every training draw

    @model_validator(mode="after")
    def _power_of_two_factor(self) -> FeatInvBaseTraining:
        factor = self.image_size // self.latent_size
        if self.image_size % self.latent_size or factor < 2 or factor & (factor - 1):
            raise ValueError(f"image_size / latent_size must be a power of two >= 2, got {self.image_size} / "
                             f"{self.latent_size}")
        return self


class FeatInvEval(_Strict):
    # torchvision Inception-v3 state dict (local file) for FID; None: the backbone's pooled final features.
    fid_inception_weights: str | None = None


class FeatInvViz(_Strict):
    """`featmap featinv-viz` (spec §10.9, §10.10; docs/concepts/featinv-viz.md): concept steering, interpolation, composition."""

    # The images: the stored maps of class_name's images, or of these source ids; neither: the first class by name.
    class_name: str | None = None
    source_ids: list[str] | None = Field(None, min_length=1)
    variant: str = "original"
    limit: int | None = Field(4, ge=1)  # images steered and shown (the first N source ids); the concepts use all
    # Concept bases: a .npy / .safetensors file (local or object store); None = decompose the images' vectors.
    concepts: str | None = None
    n_concepts: int = Field(3, ge=1)  # decomposition: k-means clusters of the feature vectors
    rank: int = Field(4, ge=1)  # decomposition: dimension of each concept's subspace
    seed: int = 0  # decomposition: k-means initialisation
    factor: float = Field(0.25, ge=0)  # attenuation: phi' = sum of the other parts + factor * the concept's part
    num_seeds: int = Field(5, ge=1)  # reconstructions per map, seeds featinv.sampling.seed + i
    alphas: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)  # interpolation grid, each in [0, 1]
    pair: list[str] | None = Field(None, min_length=2, max_length=2)  # [A, B] source ids; None = the first two images
    # [row0, row1, col0, col1] of the feature grid, half-open: B's part of the composition; None = the central half.
    region: list[int] | None = Field(None, min_length=4, max_length=4)

    @field_validator("alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, alphas: list[float]) -> list[float]:
        outside = [a for a in alphas if not 0 <= a <= 1]
        if outside:
            raise ValueError(f"every alpha must lie in [0, 1], got {outside}")
        return alphas


class FeatInvConfig(_Strict):
    backbone: str | None = None  # the name of an extract.backbones entry (its weights are used); None = the first
    layer: str | None = None  # None = that entry's last layer
    # Stable Diffusion 1.x in diffusers layout: a local folder or a hub id in the local HF cache; "tiny" for
    # random tiny models (tests only); "trained" for the tiny base `featmap featinv-train` trains on this
    # store first (featinv.base_training; <storage>/featinv/<run_name>/base).
    base_model: str = "lambdalabs/miniSD-diffusers"
    # A trained FeatInv ControlNet: a folder (local or object store), runs:/<run_id>/<path>,
    # models:/<name>/<version> or models:/<name>@<alias>; None = fresh from the base UNet.
    controlnet: str | None = None
    pooled: bool = False  # the paper's pooled variant: the map's channel means, tiled
    encoder_hidden_channels: int = Field(512, ge=1)  # width of the feature encoder (reference 512)
    sampling: FeatInvSampling = FeatInvSampling()
    training: FeatInvTraining = FeatInvTraining()
    base_training: FeatInvBaseTraining = FeatInvBaseTraining()
    eval: FeatInvEval = FeatInvEval()
    viz: FeatInvViz = FeatInvViz()


class ServeDeployment(_Strict):
    """Ray Serve options of one deployment of the service (docs/how-to/serving.md)."""

    num_replicas: int = Field(1, ge=1)  # ignored when autoscaling_config is set
    ray_actor_options: dict[str, Any] = {"num_cpus": 1}  # e.g. {num_cpus: 1, num_gpus: 0.25}
    max_ongoing_requests: int = Field(16, ge=1)  # per replica; more wait in the caller's queue
    # Ray Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...).
    autoscaling_config: dict[str, Any] | None = None
    max_batch_size: int = Field(16, ge=1)  # @serve.batch: items per model call
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long a partial batch waits for more items

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `Deployment.options`."""
        scaling = ({"autoscaling_config": self.autoscaling_config} if self.autoscaling_config
                   else {"num_replicas": self.num_replicas})
        return {"ray_actor_options": self.ray_actor_options, "max_ongoing_requests": self.max_ongoing_requests,
                **scaling}


class ServeLimits(_Strict):
    """What one request may ask for; anything beyond is a 4xx answer naming the limit."""

    max_body_mb: float = Field(16.0, gt=0)  # request body (an upload, its base64 or a feature map)
    max_pixels: int = Field(40_000_000, ge=1)  # image header check before decoding (decompression bombs)
    min_side: int = Field(8, ge=1)  # smaller uploaded images are refused
    max_seeds: int = Field(8, ge=1, le=8)  # reconstructions per request
    max_steps: int = Field(50, ge=1)  # DDIM steps
    max_guidance: float = Field(20.0, ge=0)
    max_control_scale: float = Field(4.0, ge=0)
    # The whole request, body upload included: past it the ingress answers 504 (Ray Serve's own HTTP
    # timeout, a little longer, only catches what the ingress cannot).
    request_timeout_s: float = Field(120.0, gt=0)
    formats: list[str] = SERVE_FORMATS  # uploaded images: Pillow format names (415 otherwise)
    max_aspect: float = Field(10.0, ge=1)  # longer side / shorter side of an uploaded image, from its header
    # Slow uploads (slowloris): after upload_grace_s the body must have arrived at min_upload_kb_s on average.
    min_upload_kb_s: float = Field(16.0, gt=0)
    upload_grace_s: float = Field(15.0, gt=0)  # generous: on a busy node the body reaches the ingress late

    @field_validator("formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        return _image_formats(formats)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


class ServeConfig(_Strict):
    """`featmap serve`: FeatInv over HTTP (docs/concepts/service.md, docs/how-to/serving.md)."""

    host: str = "127.0.0.1"  # loopback unless said otherwise: the service has no authentication
    # Host header values (names or addresses, no port) the service answers, against DNS rebinding; the bind
    # address and, for loopback or a wildcard bind, localhost, 127.0.0.1 and ::1 are always allowed.
    allowed_hosts: list[str] = []
    docs: bool = True  # /docs (Swagger UI, served from the package's own files) and /openapi.json
    port: int = Field(8000, ge=0, le=65535)
    app_name: Name = "featmap"
    route_prefix: str = Field("/", pattern=r"^/")
    # The allow-list of FeatInv models: name -> a ControlNet folder (local or under an object store),
    # runs:/<run id>/<path>, models:/<name>/<version> or models:/<name>@<alias> (MLflow). "default" is always there: featinv.controlnet,
    # or a fresh model from the base UNet. Requests name a model; they never name a path.
    featinv_models: dict[Name, str] = {}
    # Runs of mapping.study the mapped route may apply (their keys); None: every finished run at start-up.
    mapping_runs: list[str] | None = []
    # Defaults of a request's parameters (within `limits`); featinv.sampling's prompt is used.
    steps: int = Field(20, ge=1)
    seeds: list[int] = Field([100], min_length=1)
    limits: ServeLimits = ServeLimits()
    # Logical CPUs add up to 2 by default, so that `serve run` fits a 2-core machine's default Ray; the
    # ingress and mapping replicas wait on I/O or do little work.
    ingress: ServeDeployment = ServeDeployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
    backbone: ServeDeployment = ServeDeployment(ray_actor_options={"num_cpus": 0.5})
    featinv: ServeDeployment = ServeDeployment()
    mapping: ServeDeployment = ServeDeployment(ray_actor_options={"num_cpus": 0.25})

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ServeConfig:
        if self.steps > self.limits.max_steps or len(self.seeds) > self.limits.max_seeds:
            raise ValueError(f"steps ({self.steps}) and the number of seeds ({len(self.seeds)}) must be within "
                             f"limits.max_steps ({self.limits.max_steps}) and limits.max_seeds ({self.limits.max_seeds})")
        return self


class Config(_Strict):
    storage: str = "featmap_data"  # root of every table; a local folder or an object-store URI
    # Recompute outputs that were made by other settings (`--overwrite`); False: a stage refuses
    # before writing anything when what is stored was made by other settings.
    overwrite: bool = False
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    dataset: DatasetConfig
    manipulate: ManipulateConfig = ManipulateConfig()
    edit: EditConfig = EditConfig()
    extract: ExtractConfig = ExtractConfig()
    mapping: MappingConfig = MappingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    featinv: FeatInvConfig = FeatInvConfig()
    serve: ServeConfig = ServeConfig()

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
