"""Train a FeatInv ControlNet with Ray Train: feature maps of stored images -> the images themselves.

The recipe of the reference (and of diffusers' examples/controlnet/train_controlnet.py): frozen
VAE, text encoder and UNet; the ControlNet (DDP over `featinv.training.num_workers` workers)
predicts residuals so that the UNet's noise prediction matches the noise added to the image's
latent (MSE, t uniform, DDPMScheduler with the sampler's betas); AdamW over ControlNet parameters
only; the text is `featinv.training.prompt` (the reference's training prompt, which lacks the
trailing ", " of its sampling text); with probability 0.15 per sample the feature map becomes zeros
and the text "" together.

Data comes through Ray Data from the images table (the stored image in the backbone's view: resized
and centre-cropped to its input size). Feature maps are either computed on the worker's device from
that view (`features_source: on_the_fly`, with an optional horizontal flip applied to the view
before the backbone, so image and map stay aligned) or read from the features table.

Checkpoints (ControlNet in diffusers format + optimiser + step) go to <storage>/featinv/<run_name>;
running again with the same run_name and a larger max_steps continues from the last one, if the same
settings made it (`provenance`: recorded in the ControlNet folder's manifest, featinv.identity); one
made otherwise stops the run before any step, or with `overwrite` the run starts from scratch. The
final ControlNet is published as a new version of <storage>/featinv/<run_name>/controlnet
(`featinv.controlnet` for `featmap reconstruct`; featmap_ray.io.files: versioned folders). Rank 0
logs to MLflow: params, the loss, and sample reconstructions. At the end the driver logs the final
ControlNet as artefacts of that MLflow run (`controlnet/step_<step>`: a resumed run keeps its run, so
each final step has its own folder) and registers them as a version of the model
`featinv.training.registered_model` (default `featinv-<backbone>-<layer>`); the `runs:/` and
`models:/` URIs it prints are `featinv.controlnet` values too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from featmap_ray import backbones
from featmap_ray.config import Config
from featmap_ray.featinv import data, identity, metrics
from featmap_ray.io import tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.layout import Layout
from featmap_ray.stages import base, runtime

if TYPE_CHECKING:
    from featmap_ray.featinv.pipeline import FeatInvPipeline

NAME = "featinv-train"
STATE_FILE = "training_state.pt"
SAMPLES = 2  # feature maps in the logged sample grid
PREPROCESS_BATCH = 64  # rows per decode / image-lookup task
MATERIALIZE_BYTES = 256 * 2**20  # training views up to this size are decoded once (training_dataset)
CACHE_BYTES = 1 * 2**30  # a worker's epoch up to this size is kept in its memory (Epochs)


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or Inf."""


# -- Data (Ray Data, CPU tasks) ---------------------------------------------------------------

def decode_views(batch: pa.Table, size: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: stored PNGs -> the backbone's view, uint8 (N, size, size, 3)."""
    return {"pixels": np.stack([data.backbone_view(png, size) for png in batch["image"].to_pylist()])}


def attach_views(batch: pa.Table, storage: str, size: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: stored feature maps + the views of their images (looked up by key)."""
    keys = list(zip(batch["source_id"].to_pylist(), batch["variant"].to_pylist(), strict=True))
    views = data.stored_views(tables.Store(storage), keys, size)
    have = [i for i, k in enumerate(keys) if k in views]  # a map without its image cannot be a training pair
    features = tables.tensor_numpy(batch["feature"])[have]
    pixels = np.stack([views[keys[i]] for i in have]) if have else np.zeros((0, size, size, 3), np.uint8)
    return {"pixels": pixels, "feature": features}


def training_dataset(cfg: Config, pixels_only: bool = False):
    """The Ray Dataset of training rows: `pixels` (+ `feature` when read from the features table, unless
    `pixels_only`: the base model's training)."""
    tr = cfg.featinv.training
    request, layer = data.featinv_backbone(cfg)
    size = backbones.get_spec(request.name).input_size
    st = tables.Store(cfg.storage)
    where = data.selection(tr.split, tr.variants)
    if tr.features_source == "on_the_fly" or pixels_only:
        uri, columns, udf, kwargs = st.layout.images, ["image"], decode_views, {"size": size}
    else:
        uri, columns = st.layout.features(request.name, layer), ["source_id", "variant", "feature"]
        udf, kwargs = attach_views, {"storage": cfg.storage, "size": size}
    rows = st.count(uri, filter=where)
    if rows == 0:
        raise FileNotFoundError(f"no training rows in {uri}" + (f" where {where}" if where else "") + ": run `featmap "
                                "ingest` / `featmap extract` first, or check featinv.training.split / variants")
    dataset = base.read_ray(uri, columns=columns, filter=where).map_batches(
        udf, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=PREPROCESS_BATCH)
    # A small training set is decoded once and held in Ray's object store: else every epoch reads and decodes
    # it again, which costs more than training on it when an epoch is a few steps (the demo).
    return dataset.materialize() if rows * size * size * 3 <= MATERIALIZE_BYTES else dataset


def ingest_config():
    """How Ray Train feeds `training_dataset` to the workers: in the table's order, so an epoch's batches
    (and the batches a resumed run skips) do not depend on which read task finished first."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


class Epochs:
    """A worker's training batches, epoch by epoch, in an order that depends only on the seed and the epoch.

    Epoch 0 streams from Ray Data (local shuffle seeded by `seed`). When its rows fit in CACHE_BYTES they are
    kept in memory, and each later epoch is a seeded permutation of them (seed + epoch): an epoch of a few
    steps (the demo) would otherwise cost more in Ray Data's per-epoch start than in training. Larger data
    streams every epoch (local shuffle seeded by seed + epoch). A resumed run that starts past epoch 0 first
    reads epoch 0 to fill the memory, so it trains on what an uninterrupted run would."""

    def __init__(self, shard, batch_size: int, shuffle_buffer: int, seed: int, device, kept: bool = False):
        """`kept`: the run being resumed kept epoch 0 in memory (its checkpoint says so)."""
        self.shard, self.batch_size, self.shuffle_buffer, self.seed, self.device = (
            shard, batch_size, shuffle_buffer, seed, device)
        self.kept = kept
        self.rows: dict[str, torch.Tensor] | None = None  # epoch 0's rows, when they fit

    def _stream(self, epoch: int, keep: bool) -> Iterator[dict[str, torch.Tensor]]:
        parts: list[dict[str, torch.Tensor]] | None = [] if keep else None
        size = 0
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, device=self.device,
                                                   local_shuffle_buffer_size=self.shuffle_buffer,
                                                   local_shuffle_seed=self.seed + epoch):
            if parts is not None:
                size += sum(t.numel() * t.element_size() for t in batch.values())
                if size <= CACHE_BYTES:
                    parts.append(batch)
                else:
                    parts = None  # too large to keep: every epoch streams
            if len(next(iter(batch.values()))) == self.batch_size:  # full batches only (the last may be short)
                yield batch
        if parts:
            self.rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if epoch > 0 and self.rows is None and self.kept:
            for _ in self._stream(0, keep=True):  # a resumed run: epoch 0's rows, as an uninterrupted run kept them
                pass
        if epoch == 0 or self.rows is None:
            yield from self._stream(epoch, keep=epoch == 0)
            return
        n = len(next(iter(self.rows.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).to(self.device)
        for start in range(0, n - self.batch_size + 1, self.batch_size):
            index = order[start:start + self.batch_size]
            yield {k: v[index] for k, v in self.rows.items()}


# -- One training step (plain torch) ----------------------------------------------------------

def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The random stream of one step on one worker: a resumed run draws what an uninterrupted one would."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def flipped(pixels: torch.Tensor, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Each view flipped horizontally with probability 0.5 when `hflip` (uint8 NHWC)."""
    if not hflip:
        return pixels
    flip = torch.rand(len(pixels), generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(pixels.device)[:, None, None, None], pixels.flip(2), pixels)


def conditioning(batch: dict[str, torch.Tensor], probe: metrics.BackboneProbe | None, hflip: bool,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(views uint8 NHWC, feature maps NCHW float32). With a backbone `probe`: its maps of the views,
    each view first flipped horizontally with probability 0.5 when `hflip`. Without: the stored maps."""
    pixels = batch["pixels"]
    if probe is None:
        return pixels, batch["feature"].float()
    pixels = flipped(pixels, hflip, generator)
    return pixels, probe.features(pixels).clone()  # a normal tensor: inference tensors cannot enter autograd


def image_batch(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NHWC views -> the model's images: float NCHW in [-1, 1] at size × size."""
    return metrics.resize_pixels(pixels, size) * 2 - 1


def noised_latents(vae, pixels: torch.Tensor, size: int, noise_scheduler,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, the noise added, timesteps): the frozen VAE's latents of the images, noised at t uniform."""
    with torch.no_grad():
        latents = vae.encode(image_batch(pixels, size)).latent_dist.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator,
                      device=latents.device)
    return noise_scheduler.add_noise(latents, noise, t), noise, t


def diffusion_loss(pipe: FeatInvPipeline, controlnet: torch.nn.Module, pixels: torch.Tensor,
                   features: torch.Tensor, text: torch.Tensor, noise_scheduler, dropout: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Noise-prediction MSE of the frozen UNet plus the ControlNet's residuals, with joint conditioning dropout.

    `text` holds the embeddings of (prompt, ""); `controlnet` may be DDP-wrapped."""
    device, n = features.device, len(features)
    noisy, noise, t = noised_latents(pipe.vae, pixels, pipe.image_size, noise_scheduler, generator)
    drop = torch.rand(n, generator=generator, device=device) < dropout
    features = features * ~drop[:, None, None, None]
    encoder_states = text[drop.long()]
    down, mid = controlnet(noisy, t, encoder_hidden_states=encoder_states, controlnet_cond=features, return_dict=False)
    pred = pipe.unet(noisy, t, encoder_hidden_states=encoder_states, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)[0]
    return F.mse_loss(pred.float(), noise.float())


def sample_grid(pipe: FeatInvPipeline, cfg: Config, features: torch.Tensor, pixels: torch.Tensor) -> np.ndarray:
    """Views (top row) over their reconstructions (bottom row), uint8 HWC."""
    from featmap_ray.featinv.pipeline import seeded_generators

    # The grid previews what `featmap reconstruct` will make of these maps, so it samples with
    # featinv.sampling's prompt (trailing ", "), guidance and control scale. The reference's ImageLogger
    # instead samples with the batch's training text at CFG 9.0 (spec §10.4, cldm.py log_images).
    s = cfg.featinv.sampling
    pipe.controlnet.eval()
    images = pipe(features, seeded_generators([s.seed] * len(features)),
                  num_inference_steps=cfg.featinv.training.sample_steps, guidance_scale=s.guidance, prompt=s.prompt,
                  negative_prompt=s.negative_prompt, controlnet_conditioning_scale=s.control_scale).images
    pipe.controlnet.train()
    views = (metrics.resize_pixels(pixels, pipe.image_size) * 255).round().byte()
    views = views.permute(0, 2, 3, 1).cpu().numpy()
    reconstructions = np.concatenate([np.asarray(image) for image in images], axis=1)
    return np.concatenate([np.concatenate(list(views), axis=1), reconstructions], axis=0)


def worker_device(tr) -> torch.device:
    """The training worker's device. On CPU, the node's cores shared among the workers: Ray sets
    OMP_NUM_THREADS to a worker's CPU count (1), which leaves the other cores idle."""
    import ray.train.torch

    if not tr.use_gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tr.num_workers))
    return ray.train.torch.get_device()


# -- The loop on every Ray Train worker -------------------------------------------------------

@contextlib.contextmanager
def _mlflow_run(cfg: Config, run_id: str | None, rank: int, run_name: str | None = None,
                tables_read: list[str] | None = None) -> Iterator[str | None]:
    """Rank 0: a new MLflow run (`run_name`, default the ControlNet's), or the one of the run being resumed.
    Other ranks: no logging."""
    if rank != 0:
        yield None
        return
    import mlflow

    from featmap_ray.io import tracking

    if run_id is None:
        st = tables.Store(cfg.storage)  # what training_dataset reads: the images, and the features table
        request, layer = data.featinv_backbone(cfg)
        read = tables_read or [st.layout.images] + ([st.layout.features(request.name, layer)]
                                                    if cfg.featinv.training.features_source == "table" else [])
        with tracking.stage_run(cfg, run_name or f"{NAME}:{cfg.featinv.training.run_name}",
                                tracking.table_inputs(cfg, read), context="training") as run:
            yield run.info.run_id
    else:
        with tracking.fluent_tracking(cfg), mlflow.start_run(run_id=run_id):
            yield run_id


# The training settings that decide the weights at a given step: not max_steps (a run given a larger one goes
# on), nor where it logs, samples or checkpoints, nor the device.
TRAINING_SETTINGS = ("lr", "weight_decay", "batch_size", "prompt", "conditioning_dropout", "features_source", "hflip",
                     "split", "variants", "shuffle_buffer", "num_workers", "seed")


def provenance(cfg: Config) -> base.Provenance:
    """What makes a training run's model: the training settings, the model it starts from (featinv.training.init_from,
    else a fresh ControlNet) on its base model, the backbone whose maps condition it, and the groups of the
    images (and features) tables it reads."""
    tr = cfg.featinv.training
    request, layer = data.featinv_backbone(cfg)
    st = tables.Store(cfg.storage)
    settings = {"featinv.training.init_from": identity.controlnet_identity(cfg, tr.init_from),
                "featinv.base_model": identity.base_identity(cfg),
                "featinv.backbone": request.model_dump(mode="json", exclude={"layers"}),
                "featinv.layer": layer,
                **{f"featinv.training.{k}": v for k, v in tr.model_dump(mode="json", include=set(TRAINING_SETTINGS)).items()}}
    read = [st.layout.images] + ([st.layout.features(request.name, layer)] if tr.features_source == "table" else [])
    inputs = {key: fingerprint for uri in read for key, fingerprint in (
        base.current_fingerprints(cfg.storage, uri) if tr.variants is None
        else base.input_fingerprints(cfg.storage, uri, tr.variants)).items()}
    return base.Provenance(settings, inputs)


def _load(cfg: Config, made: base.Provenance) -> tuple[FeatInvPipeline, dict]:
    """The FeatInv model and the training state: from the run's last checkpoint when the same settings
    (`made`) made it, else new. A checkpoint made by other settings stops the run (ProvenanceMismatch,
    before any step), unless `overwrite`: then the run starts again from scratch."""
    import ray.train

    from featmap_ray.featinv import loading

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            manifest = Path(d, "controlnet", identity.MANIFEST)
            stored = base.Provenance.from_json(json.loads(manifest.read_text())["provenance"]) if manifest.exists() else None
            if stored is not None and stored.fingerprint == made.fingerprint:
                return loading.featinv_model(cfg, os.path.join(d, "controlnet")), state
            if not cfg.overwrite:
                run_name = cfg.featinv.training.run_name
                where = Layout(cfg.storage).featinv_run(run_name)
                head = (f"{NAME}: the checkpoint of run {run_name} (step {state['step']}, under {where}) was made "
                        "by other settings; nothing was trained:")
                tail = ("Either use another featinv.training.run_name (or storage root), or pass --overwrite "
                        "(overwrite=true) to train this run again from scratch.")
                raise base.ProvenanceMismatch("\n".join([head, *(f"    {c}" for c in made.changes(stored)), tail]))
    return loading.featinv_model(cfg, cfg.featinv.training.init_from), {"step": 0, "mlflow_run_id": None}


def train_loop(config: dict) -> None:
    import mlflow
    import ray.train
    import ray.train.torch
    from diffusers import DDPMScheduler

    cfg = Config.model_validate(config["cfg"])
    tr = cfg.featinv.training
    rank = ray.train.get_context().get_world_rank()
    device = worker_device(tr)

    # Models: the frozen base, the trainable ControlNet, the backbone for on-the-fly maps.
    made = provenance(cfg)
    pipe, state = _load(cfg, made)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # the sample grids' bars would interleave with Ray Train's output
    controlnet = pipe.controlnet
    controlnet.requires_grad_(True).train()
    ddp_controlnet = ray.train.torch.prepare_model(controlnet, move_to_device=False)  # DDP with > 1 worker
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the sampler's betas
    with torch.no_grad():
        text = pipe.encode_prompt([tr.prompt, ""])  # index 1: the dropped-out text
    probe = None
    if tr.features_source == "on_the_fly":
        probe = metrics.BackboneProbe(*data.featinv_backbone(cfg), device)

    step = start_step = int(state["step"])
    # Where the data order stopped: the epoch, and how many of its batches were trained on (a checkpoint
    # of an older featmap-ray records neither: its epoch is read again from the start).
    epoch, trained_in_epoch = int(state.get("epoch", 0)), int(state.get("batch", 0))
    data_epochs = Epochs(ray.train.get_dataset_shard("train"), tr.batch_size, tr.shuffle_buffer, tr.seed, device,
                         kept=bool(state.get("kept_in_memory")))
    losses: list[float] = []
    grid_inputs = None
    with _mlflow_run(cfg, state["mlflow_run_id"], rank) as run_id:
        while step < tr.max_steps:
            batches = 0
            for batch in data_epochs.batches(epoch):
                batches += 1
                if batches <= trained_in_epoch:
                    continue  # trained on before the checkpoint this run resumed from
                generator = step_generator(tr.seed, rank, step, device)
                pixels, features = conditioning(batch, probe, tr.hflip, generator)
                if grid_inputs is None:
                    grid_inputs = features[:SAMPLES].clone(), pixels[:SAMPLES].clone()
                loss = diffusion_loss(pipe, ddp_controlnet, pixels, features, text, noise_scheduler,
                                      tr.conditioning_dropout, generator)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"featinv training: the loss is {loss.item()} at step {step + 1} (worker {rank}); stopped. "
                        f"The last checkpoint stays in {Layout(cfg.storage).featinv_run(tr.run_name)}. Lower "
                        "featinv.training.lr or check the training images and feature maps.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                losses.append(loss.item())

                if rank == 0 and (step % tr.log_every == 0 or step == tr.max_steps):
                    mlflow.log_metric("loss", float(np.mean(losses[-tr.log_every:])), step=step)
                if rank == 0 and step % tr.sample_every == 0:
                    mlflow.log_image(sample_grid(pipe, cfg, *grid_inputs), f"samples/step_{step:07d}.png")
                if step % tr.checkpoint_every == 0 or step == tr.max_steps:
                    _save(controlnet, optimizer, rank, {"step": step, "epoch": epoch, "batch": batches,
                                                        "kept_in_memory": data_epochs.rows is not None,
                                                        "start_step": start_step, "mlflow_run_id": run_id,
                                                        "loss": float(np.mean(losses[-tr.log_every:]))},
                          made, tr.run_name)
                if step >= tr.max_steps:
                    break
            if batches == 0:
                raise ValueError(f"featinv training: worker {rank} got no batch of {tr.batch_size} rows; the training "
                                 "data has fewer rows than featinv.training.batch_size × num_workers")
            epoch, trained_in_epoch = epoch + 1, 0


def _save(controlnet, optimizer: torch.optim.Optimizer, rank: int, values: dict, made: base.Provenance,
          run_name: str) -> None:
    """Report the step's metrics with a checkpoint (written by rank 0; every rank must call this). The
    ControlNet's folder holds its manifest (featinv.identity): what made it, its run and step."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            controlnet.save_pretrained(os.path.join(d, "controlnet"))
            identity.write_manifest(Path(d, "controlnet"), made.to_json(), run_name=run_name, step=values["step"])
            torch.save({"optimizer": optimizer.state_dict(), "step": values["step"], "epoch": values["epoch"],
                        "batch": values["batch"], "kept_in_memory": values["kept_in_memory"],
                        "mlflow_run_id": values["mlflow_run_id"]},
                       os.path.join(d, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(values, checkpoint=checkpoint)


# -- The tiny base model (featinv.base_model: trained) -----------------------------------------------

def vae_loss(vae: torch.nn.Module, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """The VAE's reconstruction MSE of images in [-1, 1] from a sampled latent, plus kl_weight × its KL to N(0, I)."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    return F.mse_loss(reconstruction.float(), images.float()) + kl_weight * posterior.kl().mean()


def unet_loss(vae, unet: torch.nn.Module, pixels: torch.Tensor, size: int, text: torch.Tensor, noise_scheduler,
              text_dropout: float, generator: torch.Generator) -> torch.Tensor:
    """The UNet's noise-prediction MSE on the frozen VAE's latents; the text becomes "" (text[1]) with
    probability `text_dropout` per image. `unet` may be DDP-wrapped."""
    noisy, noise, t = noised_latents(vae, pixels, size, noise_scheduler, generator)
    drop = torch.rand(len(noisy), generator=generator, device=noisy.device) < text_dropout
    pred = unet(noisy, t, encoder_hidden_states=text[drop.long()], return_dict=False)[0]
    return F.mse_loss(pred.float(), noise.float())


def latent_scale(vae, batches: list[torch.Tensor], size: int) -> float:
    """1 / the standard deviation of the VAE's latent means over `batches` (every worker's, when distributed):
    the factor that gives the UNet unit-variance latents (Stable Diffusion's scaling_factor, found the LDM way)."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(image_batch(p, size)).latent_dist.mean.float() for p in batches])
    moments = torch.stack([latents.sum(), latents.pow(2).sum(), torch.tensor(float(latents.numel()))])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(moments)
    total, squares, count = moments.tolist()
    mean = total / count
    return float(1.0 / max(squares / count - mean * mean, 1e-12) ** 0.5)


def endless_batches(data_epochs: Epochs) -> Iterator[torch.Tensor]:
    """The training images in batches, epoch after epoch."""
    for epoch in itertools.count():
        batches = 0
        for batch in data_epochs.batches(epoch):
            batches += 1
            yield batch["pixels"]
        if batches == 0:
            raise ValueError(f"featinv base training: no batch of {data_epochs.batch_size} images: the training data "
                             "has fewer rows than featinv.base_training.batch_size × num_workers")




BASE_SETTINGS = ("prompt", "split", "variants", "hflip", "num_workers")


def base_provenance(cfg: Config) -> base.Provenance:
    """What makes the trained base: featinv.base_training, the training text, images and flips of
    featinv.training, the view size of FeatInv's backbone, and the images table's groups it reads."""
    tr = cfg.featinv.training
    request, _ = data.featinv_backbone(cfg)
    settings = {"featinv.base_training": cfg.featinv.base_training.model_dump(mode="json"),
                "view size": backbones.get_spec(request.name).input_size,
                **{f"featinv.training.{k}": v for k, v in tr.model_dump(mode="json", include=set(BASE_SETTINGS)).items()}}
    uri = tables.Store(cfg.storage).layout.images
    inputs = (base.current_fingerprints(cfg.storage, uri) if tr.variants is None
              else base.input_fingerprints(cfg.storage, uri, tr.variants))
    return base.Provenance(settings, inputs)


def base_train_loop(config: dict) -> None:
    """A Ray Train worker: the random tiny base's VAE learns the training images, then its UNet their latents."""
    import mlflow
    import ray.train
    from diffusers import DDPMScheduler

    from featmap_ray.featinv import loading
    from featmap_ray.featinv.model import ddim_scheduler

    cfg = Config.model_validate(config["cfg"])
    tr, bt = cfg.featinv.training, cfg.featinv.base_training
    rank = ray.train.get_context().get_world_rank()
    device = worker_device(tr)
    vae, text_encoder, tokenizer, unet = (m.to(device) if isinstance(m, torch.nn.Module) else m
                                          for m in loading.untrained_base(cfg))
    ids = tokenizer([tr.prompt, ""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        text = text_encoder(ids.to(device))[0]  # index 1: the dropped-out text
    noise_scheduler = DDPMScheduler.from_config(ddim_scheduler().config)  # the sampler's betas
    batches = endless_batches(Epochs(ray.train.get_dataset_shard("train"), bt.batch_size, 256, bt.seed, device))
    phases = (("vae", vae, bt.vae_steps), ("unet", unet, bt.unet_steps))
    with _mlflow_run(cfg, None, rank, run_name=f"{NAME}:{tr.run_name}:base",
                     tables_read=[tables.Store(cfg.storage).layout.images]):
        if rank == 0:
            mlflow.log_params({f"base_training.{k}": v for k, v in bt.model_dump().items()})
        step = 0
        for phase, model, steps in phases:
            if phase == "unet":  # the latents the UNet learns: unit variance, like Stable Diffusion's
                vae.register_to_config(scaling_factor=latent_scale(vae, [next(batches) for _ in range(4)],
                                                                   bt.image_size))
            model.requires_grad_(True).train()
            trained = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP with > 1 worker
            optimizer = torch.optim.AdamW(model.parameters(), lr=bt.lr, weight_decay=0.0)
            losses = []
            for _ in range(steps):
                generator = step_generator(bt.seed, rank, step, device)
                pixels = flipped(next(batches), tr.hflip, generator)
                if phase == "vae":
                    loss = vae_loss(trained, image_batch(pixels, bt.image_size), bt.kl_weight, generator)
                else:
                    loss = unet_loss(vae, trained, pixels, bt.image_size, text, noise_scheduler, bt.text_dropout,
                                     generator)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"featinv base training: the {phase} loss is {loss.item()} at step {step + 1} "
                                        f"(worker {rank}); lower featinv.base_training.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                losses.append(loss.item())
                if rank == 0 and step % tr.log_every == 0:
                    mlflow.log_metric(f"{phase}_loss", float(np.mean(losses[-tr.log_every:])), step=step)
            model.requires_grad_(False).eval()
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                folder = Path(d, "base")
                for name, part in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer),
                                   ("unet", unet)):
                    part.save_pretrained(folder / name)
                identity.write_manifest(folder, config["provenance"], run_name=tr.run_name, step=step)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": step, "loss": float(np.mean(losses[-tr.log_every:]))}, checkpoint=checkpoint)


@dataclass
class BaseSummary:
    folder: str
    state: str  # "trained" or "up to date"
    step: int
    loss: float | None = None  # the UNet's mean loss over the last log_every steps

    def __str__(self) -> str:
        if self.state == "up to date":
            return f"[{NAME}] base model: up to date ({self.folder}, step {self.step}); not trained again"
        return f"[{NAME}] base model: trained {self.step} steps (VAE, then UNet; UNet loss {self.loss:.4f})\n  {self.folder}"


def train_base(cfg: Config) -> BaseSummary:
    """`featinv.base_model: trained`: the tiny base of run featinv.training.run_name, trained unless the published
    one was made by the same settings from the same images. One made otherwise stops the run (nothing is
    trained), unless `overwrite`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from featmap_ray.featinv import loading

    tr = cfg.featinv.training
    folder = loading.trained_base(cfg)
    made = base_provenance(cfg)
    manifest = identity.trained_base_manifest(cfg)
    if manifest is not None:
        stored = base.Provenance.from_json(manifest["provenance"])
        if stored.fingerprint == made.fingerprint:
            return BaseSummary(str(folder), "up to date", manifest["step"])
        if not cfg.overwrite:
            raise base.ProvenanceMismatch("\n".join([
                f"{NAME}: the base model at {folder} was made by other settings; nothing was trained:",
                *(f"    {c}" for c in made.changes(stored)),
                ("Either use another featinv.training.run_name (or storage root), or pass --overwrite (overwrite=true) "
                 "to train it again (and then the ControlNet).")]))
    tracking.experiment_id(cfg)  # created once by the driver, not raced by workers
    trainer = TorchTrainer(
        base_train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "provenance": made.to_json()},
        datasets={"train": training_dataset(cfg, pixels_only=True)},
        dataset_config=ingest_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu),
        run_config=ray.train.RunConfig(name=f"{tr.run_name}.base", storage_path=str(Layout(cfg.storage).featinv_runs)),
    )
    try:
        runtime.start_autoscaling_coordinator()  # before the Train controller asks it
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        cause = first_worker_error(e)
        if cause is e:
            raise
        raise cause from e
    with result.checkpoint.as_directory() as d, folder.publish() as out:
        shutil.copytree(os.path.join(d, "base"), out, dirs_exist_ok=True)
    m = result.metrics or {}
    return BaseSummary(str(folder), "trained", int(m.get("step", 0)), m.get("loss"))


# -- The driver ---------------------------------------------------------------------------------

@dataclass
class TrainSummary:
    run_name: str
    start_step: int  # the step this invocation started from (> 0 when it resumed)
    step: int
    loss: float | None  # mean loss over the last log_every steps of the latest checkpoint
    controlnet: str  # the final ControlNet, diffusers format: featinv.controlnet for `featmap reconstruct`
    checkpoint: str
    mlflow_run_id: str | None
    registered: tracking.ModelSource | None = None  # the final ControlNet in MLflow: run artefacts, model version
    up_to_date: bool = False  # the published ControlNet was made by these settings: nothing was trained

    def __str__(self) -> str:
        if self.up_to_date:
            return f"[{NAME}] run {self.run_name}: up to date at step {self.step}; not trained again\n  ControlNet: {self.controlnet}"
        loss = "n/a" if self.loss is None else f"{self.loss:.4f}"
        text = (f"[{NAME}] run {self.run_name}: steps {self.start_step} -> {self.step}, loss {loss}\n"
                f"  ControlNet: {self.controlnet}\n  checkpoint: {self.checkpoint}")
        if self.registered is not None:
            text += f"\n  MLflow: {self.registered.registered} ({self.registered.uri})"
        return text


def registered_model_name(cfg: Config) -> str:
    """featinv.training.registered_model, else `featinv-<backbone>-<layer>`."""
    request, layer = data.featinv_backbone(cfg)
    return cfg.featinv.training.registered_model or f"featinv-{request.name}-{layer}"


def first_worker_error(error: Exception) -> Exception:
    """The exception a training worker raised (Ray Train wraps it in a WorkerGroupError), else `error`."""
    failures = list((getattr(error, "worker_failures", None) or {}).values())
    return failures[0] if failures else error


def publish_controlnet(final: Location, controlnet: str) -> None:
    """The ControlNet in the local folder `controlnet` (diffusers format) as the new published version
    of `final`, the folder `featinv.controlnet` names (readers resolve its version: featinv.loading)."""
    with final.publish() as out:
        shutil.copytree(controlnet, out, dirs_exist_ok=True)


def run(cfg: Config) -> TrainSummary:
    import ray.train
    from ray.train.torch import TorchTrainer

    from featmap_ray.io import tracking

    tr = cfg.featinv.training
    request, _ = data.featinv_backbone(cfg)  # a bad backbone, layer or weight file fails here
    backbones.check_weights(backbones.get_spec(request.name), request)
    if cfg.featinv.base_model == "trained":
        print(train_base(cfg), flush=True)
    state = controlnet_status(cfg)
    if state.state == "up to date":  # made by these settings from these inputs, to max_steps: nothing to do
        return TrainSummary(tr.run_name, tr.max_steps, tr.max_steps, None, state.output, "", None, up_to_date=True)
    dataset = training_dataset(cfg)
    tracking.experiment_id(cfg)  # created once by the driver, not raced by workers
    storage = str(Layout(cfg.storage).featinv_runs)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json")},
        datasets={"train": dataset},
        dataset_config=ingest_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu),
        run_config=ray.train.RunConfig(name=tr.run_name, storage_path=storage,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    try:
        runtime.start_autoscaling_coordinator()  # before the Train controller asks it
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        cause = first_worker_error(e)  # e.g. NonFiniteLoss or WeightsNotFound, with its own message
        if cause is e:
            raise
        raise cause from e
    if result.checkpoint is None:
        raise RuntimeError(f"featinv training run {tr.run_name} reported no checkpoint (max_steps {tr.max_steps})")
    final = Layout(cfg.storage).featinv_controlnet(tr.run_name)
    m = result.metrics or {}
    step, run_id, registered = int(m.get("step", 0)), m.get("mlflow_run_id"), None
    with result.checkpoint.as_directory() as d:
        publish_controlnet(final, os.path.join(d, "controlnet"))
        if run_id is not None:
            registered = tracking.register_model(cfg, run_id, os.path.join(d, "controlnet"),
                                                 f"controlnet/step_{step:07d}", registered_model_name(cfg),
                                                 {"run_name": tr.run_name, "step": str(step)})
    return TrainSummary(tr.run_name, int(m.get("start_step", step)), step, m.get("loss"), str(final),
                        result.checkpoint.path, run_id, registered)



def status(cfg: Config) -> list[base.OutputStatus]:
    """The trained base (`featinv.base_model: trained`), then the final ControlNet of the run."""
    return [*base_status(cfg), controlnet_status(cfg)]


def controlnet_status(cfg: Config) -> base.OutputStatus:
    """The final model of run featinv.training.run_name: missing, stale (made by other settings, or what it
    read changed since), partial (trained to fewer than max_steps) or up to date."""
    tr = cfg.featinv.training
    final = Layout(cfg.storage).featinv_controlnet(tr.run_name)
    if final.current() is None:
        return base.OutputStatus(NAME, str(final), "missing")
    manifest = identity.read_manifest(cfg, tracking.model_source(cfg, str(final)))
    stored = None if manifest is None else base.Provenance.from_json(manifest["provenance"])
    made = provenance(cfg)
    if stored is None or stored.fingerprint != made.fingerprint:
        return base.OutputStatus(NAME, str(final), "stale", "; ".join(made.changes(stored)[:3]))
    if manifest["step"] < tr.max_steps:
        return base.OutputStatus(NAME, str(final), "partial", f"step {manifest['step']} of {tr.max_steps}")
    return base.OutputStatus(NAME, str(final), "up to date", f"step {manifest['step']}, weights {manifest['weights']}")


def base_status(cfg: Config) -> list[base.OutputStatus]:
    """The trained base of `featinv.base_model: trained` (nothing for another base model)."""
    if cfg.featinv.base_model != "trained":
        return []
    from featmap_ray.featinv import loading

    folder = loading.trained_base(cfg)
    manifest = identity.trained_base_manifest(cfg)
    if manifest is None:
        return [base.OutputStatus(NAME, str(folder), "missing")]
    stored = base.Provenance.from_json(manifest["provenance"])
    made = base_provenance(cfg)
    if stored.fingerprint != made.fingerprint:
        return [base.OutputStatus(NAME, str(folder), "stale", "; ".join(made.changes(stored)[:3]))]
    return [base.OutputStatus(NAME, str(folder), "up to date")]


def check_training(cfg: Config) -> None:
    """Before Ray starts: the backbone, the ControlNet training starts from (featinv.training.init_from) and the
    base model (one featinv-train trains itself need not exist yet)."""
    data.check_sources(cfg, cfg.featinv.training.init_from, base_must_exist=False)


FEATINV_KEYS = ("featinv", "featinv.training", "featinv.sampling", "featinv.eval", "extract.backbones")

STAGE = base.Stage(
    "featinv-train", "train a FeatInv ControlNet on Ray Train", run,
    details="Checkpoints and the final ControlNet go to <storage>/featinv/<run_name>; a re-run with a larger "
            "max_steps continues from the last checkpoint.",
    keys=(*base.RAY_KEYS, *FEATINV_KEYS, "featinv.base_training"), checks=(check_training,), reads=("images", "features"),
    writes=("featinv",), shows_runs_page=True, status=status)
