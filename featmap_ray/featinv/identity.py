"""What a FeatInv model and its sampler are, for provenance: the content of the weights, never a name
that can move (a folder rewritten in place, `models:/<name>@<alias>` pointed at another version).

A ControlNet folder is named by a digest of its files. The folders `featmap featinv-train` writes
(checkpoints, the final model, its MLflow artefacts) carry a manifest, `featmap_provenance.json`, that
holds this digest, the training's provenance and its step, so a reader names a model without
downloading its weights; a folder without one is downloaded and hashed. An MLflow URI also records
the version and run it resolved to. The base model (tens of GB) is named by `pretrained.weights_identity`
("tiny": the random test models, the same everywhere; "trained": the manifest of the base featinv-train
trained on the store).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from featmap_ray import pretrained, seeding
from featmap_ray.config import Config
from featmap_ray.io import tracking
from featmap_ray.io.files import Location

MANIFEST = "featmap_provenance.json"


def folder_digest(folder: Path) -> str:
    """A digest of a ControlNet folder's files (config and weights), by relative path and content; the
    manifest is left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return seeding.fingerprint({p.relative_to(folder).as_posix(): seeding.file_digest(str(p)) for p in files})


def content_digest(uri: str | Location) -> str:
    """A digest of one file's content (a small one: it is read whole), local or in an object store."""
    return hashlib.sha256(Location(uri).read_bytes()).hexdigest()[:16]


def write_manifest(folder: Path, provenance: dict[str, Any], **facts: Any) -> None:
    """Record, in a saved ControlNet folder, its weights' digest, the provenance of what made it and `facts`."""
    manifest = {"weights": folder_digest(folder), "provenance": provenance, **facts}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(cfg: Config, source: tracking.ModelSource) -> dict[str, Any] | None:
    """The manifest of the ControlNet at `source` (a folder or an MLflow URI), None when it has none."""
    if not tracking.is_model_uri(source.uri):
        folder = Location(source.uri)
        path = folder.resolved() / MANIFEST  # a folder featmap published: its published version
        return path.read_json() if path.exists() else None
    from mlflow.exceptions import MlflowException

    manifest = dataclasses.replace(source, artifact_uri=f"{source.artifact_uri.rstrip('/')}/{MANIFEST}")
    with tempfile.TemporaryDirectory(prefix="featmap-") as tmp:
        try:
            return json.loads(Path(tracking.download_model(cfg, manifest, tmp)).read_text())
        except MlflowException:  # none logged with the model
            return None


def pinned_controlnet(cfg: Config) -> str | None:
    """featinv.controlnet with an MLflow alias pinned to the version it names now, so that every process of
    a run loads the model its provenance names (None: a fresh ControlNet). An unknown MLflow run or
    model version fails here (tracking.ModelNotFound), before any work."""
    if not cfg.featinv.controlnet:
        return None
    source = tracking.model_source(cfg, cfg.featinv.controlnet)
    return source.registered or source.uri


def controlnet_identity(cfg: Config, where: str | None) -> str:
    """The ControlNet at `where` (a folder or an MLflow URI; None: a fresh one from the base UNet), in words
    that change exactly when its weights do (the digest first: a long name is shortened at the end)."""
    fi = cfg.featinv
    if not where:  # built the same way by every process: seeded, from the base model's UNet
        return (f"fresh from the base UNet (seed featinv.training.seed {fi.training.seed}, pooled {fi.pooled}, "
                f"encoder_hidden_channels {fi.encoder_hidden_channels})")
    source = tracking.model_source(cfg, where)
    manifest = read_manifest(cfg, source)
    if manifest is None:
        from featmap_ray.featinv.loading import local_folder

        with local_folder(cfg, source) as local:
            weights = folder_digest(Path(local))
    else:
        weights = manifest["weights"]
    words = f"weights {weights}"
    if source.run_id is not None:  # an MLflow URI: the version (an alias resolved) and the run behind it
        words += f" of {source}"
    if manifest is not None and "run_name" in manifest:
        words += f", featinv-train run {manifest['run_name']} step {manifest['step']}"
    return words


def base_identity(cfg: Config) -> str:
    """The Stable Diffusion base model of featinv.base_model: which weights it resolves to."""
    name = cfg.featinv.base_model
    if name == "tiny":  # random tiny models from configs, seed 0
        return name
    from featmap_ray.featinv.loading import resolve_base_dir, trained_base

    if name == "trained":  # its manifest names its weights, as a trained ControlNet's does
        made = trained_base_manifest(cfg)
        if made is None:
            return f"trained: none yet at {trained_base(cfg)}"
        return f"trained: weights {made['weights']}, featinv-train run {made['run_name']} (base)"
    return pretrained.weights_identity(resolve_base_dir(name, local_files_only=True))


def trained_base_manifest(cfg: Config) -> dict[str, Any] | None:
    """The manifest of the base `featinv.base_model: trained` names (None: none trained yet)."""
    from featmap_ray.featinv.loading import trained_base

    folder = trained_base(cfg)
    return None if folder.current() is None else (folder.resolved() / MANIFEST).read_json()


def model_identity(cfg: Config, controlnet: str | None = None) -> dict[str, str]:
    """Settings that name the FeatInv model of the config: the ControlNet at `controlnet` or
    featinv.controlnet, and the base model."""
    return {"featinv.controlnet": controlnet_identity(cfg, controlnet or cfg.featinv.controlnet),
            "featinv.base_model": base_identity(cfg)}


def sampler_settings(cfg: Config) -> dict[str, Any]:
    """Settings that decide a sample besides the model, the feature map and the seed of its initial latent."""
    from featmap_ray.featinv.model import ddim_scheduler

    s = cfg.featinv.sampling
    scheduler = {k: v for k, v in ddim_scheduler().config.items() if not k.startswith("_")}
    return {"featinv.sampling.steps": s.steps, "featinv.sampling.guidance": s.guidance,
            "featinv.sampling.prompt": s.prompt, "featinv.sampling.negative_prompt": s.negative_prompt,
            "featinv.sampling.control_scale": s.control_scale, "scheduler": {"DDIMScheduler": scheduler},
            "initial latents": "one torch.Generator per image, seeded by the image's seed"}
