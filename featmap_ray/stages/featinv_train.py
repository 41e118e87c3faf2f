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
from featmap_ray.stages import base

if TYPE_CHECKING:
    from featmap_ray.featinv.pipeline import FeatInvPipeline

NAME = "featinv-train"
STATE_FILE = "training_state.pt"
SAMPLES = 2  # feature maps in the logged sample grid
PREPROCESS_BATCH = 64  # rows per decode / image-lookup task


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


def training_dataset(cfg: Config):
    """The Ray Dataset of training rows: `pixels` (+ `feature` when read from the features table)."""
    tr = cfg.featinv.training
    request, layer = data.featinv_backbone(cfg)
    size = backbones.get_spec(request.name).input_size
    st = tables.Store(cfg.storage)
    where = data.selection(tr.split, tr.variants)
    if tr.features_source == "on_the_fly":
        uri, columns, udf, kwargs = st.layout.images, ["image"], decode_views, {"size": size}
    else:
        uri, columns = st.layout.features(request.name, layer), ["source_id", "variant", "feature"]
        udf, kwargs = attach_views, {"storage": cfg.storage, "size": size}
    if st.count(uri, filter=where) == 0:
        raise FileNotFoundError(f"no training rows in {uri}" + (f" where {where}" if where else "") + ": run `featmap "
                                "ingest` / `featmap extract` first, or check featinv.training.split / variants")
    return base.read_ray(uri, columns=columns, filter=where).map_batches(
        udf, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=PREPROCESS_BATCH)


def ingest_config():
    """How Ray Train feeds `training_dataset` to the workers: in the table's order, so an epoch's batches
    (and the batches a resumed run skips) do not depend on which read task finished first."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


# -- One training step (plain torch) ----------------------------------------------------------

def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The random stream of one step on one worker: a resumed run draws what an uninterrupted one would."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def conditioning(batch: dict[str, torch.Tensor], probe: metrics.BackboneProbe | None, hflip: bool,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(views uint8 NHWC, feature maps NCHW float32). With a backbone `probe`: its maps of the views,
    each view first flipped horizontally with probability 0.5 when `hflip`. Without: the stored maps."""
    pixels = batch["pixels"]
    if probe is None:
        return pixels, batch["feature"].float()
    if hflip:
        flip = torch.rand(len(pixels), generator=generator, device=generator.device) < 0.5
        pixels = torch.where(flip.to(pixels.device)[:, None, None, None], pixels.flip(2), pixels)
    return pixels, probe.features(pixels).clone()  # a normal tensor: inference tensors cannot enter autograd


def diffusion_loss(pipe: FeatInvPipeline, controlnet: torch.nn.Module, pixels: torch.Tensor,
                   features: torch.Tensor, text: torch.Tensor, noise_scheduler, dropout: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Noise-prediction MSE of the frozen UNet plus the ControlNet's residuals, with joint conditioning dropout.

    `text` holds the embeddings of (prompt, ""); `controlnet` may be DDP-wrapped."""
    device, n = features.device, len(features)
    with torch.no_grad():
        x = metrics.resize_pixels(pixels, pipe.image_size) * 2 - 1
        latents = pipe.vae.encode(x).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
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


# -- The loop on every Ray Train worker -------------------------------------------------------

@contextlib.contextmanager
def _mlflow_run(cfg: Config, run_id: str | None, rank: int) -> Iterator[str | None]:
    """Rank 0: a new MLflow run, or the one of the run being resumed. Other ranks: no logging."""
    if rank != 0:
        yield None
        return
    import mlflow

    from featmap_ray.io import tracking

    if run_id is None:
        st = tables.Store(cfg.storage)  # what training_dataset reads: the images, and the features table
        request, layer = data.featinv_backbone(cfg)
        read = [st.layout.images] + ([st.layout.features(request.name, layer)]
                                  if cfg.featinv.training.features_source == "table" else [])
        with tracking.stage_run(cfg, f"{NAME}:{cfg.featinv.training.run_name}", tracking.table_inputs(cfg, read),
                                context="training") as run:
            yield run.info.run_id
    else:
        with tracking.fluent_tracking(cfg), mlflow.start_run(run_id=run_id):
            yield run_id


# The training settings that decide the weights at a given step: not max_steps (a run given a larger one goes
# on), nor where it logs, samples or checkpoints, nor the device.
TRAINING_SETTINGS = ("lr", "weight_decay", "batch_size", "prompt", "conditioning_dropout", "features_source", "hflip",
                     "split", "variants", "shuffle_buffer", "num_workers", "seed")


def provenance(cfg: Config) -> base.Provenance:
    """What makes a training run's model: the training settings, the model it starts from (featinv.controlnet,
    else a fresh ControlNet) on its base model, the backbone whose maps condition it, and the groups of the
    images (and features) tables it reads."""
    tr = cfg.featinv.training
    request, layer = data.featinv_backbone(cfg)
    st = tables.Store(cfg.storage)
    settings = {**identity.model_identity(cfg), "featinv.backbone": request.model_dump(mode="json", exclude={"layers"}),
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
                return loading.featinv_pipeline(cfg, os.path.join(d, "controlnet")), state
            if not cfg.overwrite:
                run_name = cfg.featinv.training.run_name
                where = Layout(cfg.storage).featinv_run(run_name)
                head = (f"{NAME}: the checkpoint of run {run_name} (step {state['step']}, under {where}) was made "
                        "by other settings; nothing was trained:")
                tail = ("Either use another featinv.training.run_name (or storage root), or pass --overwrite "
                        "(overwrite=true) to train this run again from scratch.")
                raise base.ProvenanceMismatch("\n".join([head, *(f"    {c}" for c in made.changes(stored)), tail]))
    return loading.featinv_pipeline(cfg), {"step": 0, "mlflow_run_id": None}


def train_loop(config: dict) -> None:
    import mlflow
    import ray.train
    import ray.train.torch
    from diffusers import DDPMScheduler

    cfg = Config.model_validate(config["cfg"])
    tr = cfg.featinv.training
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()

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
    shard = ray.train.get_dataset_shard("train")
    losses: list[float] = []
    grid_inputs = None
    with _mlflow_run(cfg, state["mlflow_run_id"], rank) as run_id:
        while step < tr.max_steps:
            batches = 0
            for batch in shard.iter_torch_batches(batch_size=tr.batch_size, device=device, drop_last=True,
                                                  local_shuffle_buffer_size=tr.shuffle_buffer,
                                                  local_shuffle_seed=tr.seed + epoch):
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
                        "batch": values["batch"], "mlflow_run_id": values["mlflow_run_id"]},
                       os.path.join(d, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(values, checkpoint=checkpoint)


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

    def __str__(self) -> str:
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
    """The final model of run featinv.training.run_name: missing, stale (made by other settings, or what it
    read changed since), partial (trained to fewer than max_steps) or up to date."""
    tr = cfg.featinv.training
    final = Layout(cfg.storage).featinv_controlnet(tr.run_name)
    if final.current() is None:
        return [base.OutputStatus(NAME, str(final), "missing")]
    manifest = identity.read_manifest(cfg, tracking.model_source(cfg, str(final)))
    stored = None if manifest is None else base.Provenance.from_json(manifest["provenance"])
    made = provenance(cfg)
    if stored is None or stored.fingerprint != made.fingerprint:
        return [base.OutputStatus(NAME, str(final), "stale", "; ".join(made.changes(stored)[:3]))]
    if manifest["step"] < tr.max_steps:
        return [base.OutputStatus(NAME, str(final), "partial", f"step {manifest['step']} of {tr.max_steps}")]
    return [base.OutputStatus(NAME, str(final), "up to date", f"step {manifest['step']}, weights {manifest['weights']}")]


FEATINV_KEYS = ("featinv", "featinv.training", "featinv.sampling", "featinv.eval", "extract.backbones")

STAGE = base.Stage(
    "featinv-train", "train a FeatInv ControlNet on Ray Train", run,
    details="Checkpoints and the final ControlNet go to <storage>/featinv/<run_name>; a re-run with a larger "
            "max_steps continues from the last checkpoint.",
    keys=(*base.RAY_KEYS, *FEATINV_KEYS), checks=(data.check_featinv,), reads=("images", "features"),
    writes=("featinv",), shows_runs_page=True, status=status)
