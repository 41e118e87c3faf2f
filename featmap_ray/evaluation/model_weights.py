"""Where the weights of the study's models come from, in words the report shows, and what random weights
make of the numbers that depend on them.

Derived from the config alone (plus the manifest a trained FeatInv ControlNet carries, read by the caller):
nothing is loaded, so a report states its models even where their weights are not on the machine. A model
is `random` when nothing trained it: an untrained backbone, classifier, editor or judge, the tiny random
Stable Diffusion base, or a fresh ControlNet. A report section whose numbers depend on a random model opens
with `caveat`'s line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from featmap_ray import backbones
from featmap_ray.config import BackboneRequest, Config
from featmap_ray.evaluation.classifier import classifier_request
from featmap_ray.manipulations import semantic

# featinv.base_model values that are not a folder or hub id (featmap_ray.featinv.loading.base_components):
TINY_BASE = "tiny"  # tiny random Stable Diffusion parts, built with seed TINY_BASE_SEED
TINY_BASE_SEED = 0
TRAINED_BASE = "trained"  # the tiny base the study trains on its stored images

# The keys of the models, as report sections name what they depend on.
EDITOR, FEATINV_BASE, CONTROLNET, JUDGE = "editor", "featinv.base_model", "featinv.controlnet", "judge"


def backbone_key(name: str) -> str:
    return f"backbone:{name}"


def backbones_in(keys: Iterable[str]) -> list[str]:
    """The names of the backbones among model keys."""
    return sorted({key.removeprefix("backbone:") for key in keys if key.startswith("backbone:")})


def classifier_key(backbone: str) -> str:
    return f"classifier:{backbone}"


@dataclass(frozen=True)
class ModelWeights:
    """One model of the study and where its weights come from."""

    role: str  # what it does in the study, e.g. "backbone convnext_base"
    setting: str  # the config key that chooses it
    weights: str  # "random weights (...)", "pretrained (...)", "trained by this study: ..." (or "unknown: ...")
    random: bool  # nothing trained it
    # What random weights make of the numbers computed with it (shown only when `random`).
    consequence: str


def _random(seed: int, what: str = "") -> str:
    return f"random weights (initialised with seed {seed}{': ' + what if what else ''})"


def _request_weights(request: BackboneRequest) -> tuple[str, bool]:
    """(words, random) of a timm backbone request: its checkpoint file or timm's pretrained tag."""
    if not request.pretrained:
        return _random(request.init_seed), True
    spec = backbones.REGISTRY.get(request.name)  # any other name is itself the timm id
    return f"pretrained ({request.checkpoint or (spec.timm_name if spec else request.name)})", False


def _unknown(role: str) -> ModelWeights:
    """A model of the results that this config does not name (the results were made with another config)."""
    return ModelWeights(role, "not in extract.backbones", "unknown: this config does not name it", False, "")


def _backbones(cfg: Config, others: Iterable[str]) -> dict[str, ModelWeights]:
    models = {}
    for i, request in enumerate(cfg.extract.backbones):
        weights, random = _request_weights(request)
        models[backbone_key(request.name)] = ModelWeights(
            f"backbone {request.name}", f"extract.backbones[{i}]", weights, random,
            f"the features of an untrained network, not what a trained {request.name} encodes")
    return models | {backbone_key(n): _unknown(f"backbone {n}") for n in others if backbone_key(n) not in models}


def _classifiers(cfg: Config, others: Iterable[str]) -> dict[str, ModelWeights]:
    """The classifier of each backbone's features (evaluate.classifier, else the backbone's own head)."""
    models = {}
    for i, request in enumerate(cfg.extract.backbones):
        chosen = classifier_request(cfg, request.name)
        setting = "evaluate.classifier" if chosen is cfg.evaluate.classifier else f"extract.backbones[{i}] (its head)"
        weights, random = _request_weights(chosen)
        models[classifier_key(request.name)] = ModelWeights(
            f"classifier of {request.name} features", setting, weights, random,
            "its predictions carry no class information")
    return models | {classifier_key(n): _unknown(f"classifier of {n} features") for n in others
                     if classifier_key(n) not in models}


def _editor(cfg: Config) -> ModelWeights:
    model = cfg.edit.model
    tiny = model == semantic.TINY
    weights = _random(semantic.TINY_SEED, f"a tiny {semantic.TINY_PIPELINE}") if tiny else f"pretrained ({model})"
    return ModelWeights("semantic editor", "edit.model", weights, tiny,
                        "the semantic edits are random changes, not what their prompts ask for")


def _featinv_base(cfg: Config) -> ModelWeights:
    name = cfg.featinv.base_model
    if name == TINY_BASE:
        weights = _random(TINY_BASE_SEED, "tiny Stable Diffusion parts")
    elif name == TRAINED_BASE:
        weights = (f"trained by this study: featinv-train run {cfg.featinv.training.run_name} trained a tiny Stable "
                   "Diffusion base on the stored images (VAE, then UNet)")
    else:
        weights = f"pretrained ({name})"
    return ModelWeights("FeatInv base model", "featinv.base_model", weights, name == TINY_BASE,
                        "FeatInv's images come from an untrained diffusion model")


def _controlnet(cfg: Config, manifest: Mapping[str, Any] | None) -> ModelWeights:
    """featinv.controlnet: a fresh one (None), a featinv-train output (its manifest names the run and step),
    or any other saved model."""
    where = cfg.featinv.controlnet
    if not where:
        weights = _random(cfg.featinv.training.seed, "a fresh ControlNet from the base UNet")
    elif manifest is not None and "run_name" in manifest:
        weights = f"trained by this study: featinv-train run {manifest['run_name']}, step {manifest['step']}"
    else:
        digest = f", weights {manifest['weights']}" if manifest and "weights" in manifest else ""
        weights = f"pretrained ({where}{digest})"
    # A fresh ControlNet's zero convolutions add nothing to the UNet: the feature map has no effect.
    return ModelWeights("FeatInv ControlNet", "featinv.controlnet", weights, not where,
                        "its zero convolutions leave the feature map without effect on the reconstructions")


def _judge(cfg: Config) -> ModelWeights:
    rc = cfg.evaluate.reconstruction
    weights, random = _request_weights(rc.judge)
    return ModelWeights(f"recon-eval judge ({rc.judge.name} {rc.judge_layer})", "evaluate.reconstruction.judge",
                        weights, random, "its feature cosines compare an untrained network's features")


def model_weights(cfg: Config, controlnet_manifest: Mapping[str, Any] | None = None,
                  backbones_seen: Iterable[str] = ()) -> dict[str, ModelWeights]:
    """{key: model} of every model the config names: each backbone and the classifier of its features, the
    semantic editor, FeatInv's base model and ControlNet (`controlnet_manifest`: the `featmap_provenance.json`
    of featinv.controlnet, None when it has none) and the recon-eval judge; a backbone of `backbones_seen`
    (those of the results) that the config does not name is "unknown"."""
    others = list(backbones_seen)
    return {**_backbones(cfg, others), **_classifiers(cfg, others), EDITOR: _editor(cfg),
            FEATINV_BASE: _featinv_base(cfg), CONTROLNET: _controlnet(cfg, controlnet_manifest), JUDGE: _judge(cfg)}


def models_table(models: Iterable[ModelWeights]) -> pd.DataFrame:
    """The report's "Models" table: one row per model."""
    return pd.DataFrame([{"model": m.role, "setting": m.setting, "weights": m.weights} for m in models])


def caveat(models: Iterable[ModelWeights]) -> str | None:
    """One line for a section whose numbers depend on `models`: what each random one makes of them; None
    when none is random."""
    random = [m for m in models if m.random]
    if not random:
        return None
    return "**Random weights** (Models, above): " + "; ".join(f"{m.role}: {m.consequence}" for m in random) + "."
