"""Semantic edits: a diffusers image-editing pipeline (Qwen-Image-Edit) applied to one image and one prompt.

Pure code, no Ray: which pipeline a config names (checked before any work), how it is loaded (a local
folder or a hub id in the local Hugging Face cache, class from `model_index.json`; "tiny" builds the
real classes with random weights offline), and one edit call with the reference's settings (spec §3).
Each edit draws from its own CPU generator seeded per (source image, variant), so it does not depend
on the actor, the batch or the order that made it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from featmap_ray import pretrained, seeding
from featmap_ray.config import EditConfig

DEFAULT_MODEL = "Qwen/Qwen-Image-Edit-2511"
TINY = "tiny"
TINY_PIPELINE = "QwenImageEditPlusPipeline"
TINY_SEED = 0  # the random weights of the "tiny" pipeline
# The call signature the stage relies on (QwenImageEditPlusPipeline, QwenImageEditPipeline and editors like them).
CALL_PARAMETERS = ("image", "prompt", "negative_prompt", "true_cfg_scale", "num_inference_steps", "guidance_scale",
                   "generator")
# Pipelines that refuse several prompts in one call (diffusers 0.42.1 raises; huggingface/diffusers#12458):
# their parallelism is the actor pool. A list of images there is several references for ONE edit.
ONE_PROMPT_PER_CALL = {"QwenImageEditPlusPipeline"}
# Where diffusers' Qwen edit pipelines derive every working size (output, VAE and vision-language inputs).
SIZE_FUNCTION = "calculate_dimensions"
PIPELINE_AREA = 1024 * 1024


class NonFiniteEdit(ValueError):
    """The pipeline produced NaN or Inf pixels (e.g. float16 overflow)."""


@dataclass(frozen=True)
class EditRequest:
    """One edit: the stored original, the instruction and the seed of its generator."""

    image: Image.Image
    prompt: str
    seed: int


@dataclass(frozen=True)
class PlannedEdit:
    """One variant the edit stage makes of each chosen original of a dataset."""

    variant: str  # <prefix>:<name>:<repeat>
    name: str
    prompt: str
    repeat: int


def planned_edits(edit: EditConfig, dataset: str) -> list[PlannedEdit]:
    return [PlannedEdit(edit.variant(p.name, k), p.name, p.prompt, k)
            for p in edit.prompts.get(dataset, []) for k in range(edit.repeats)]


def pipeline_class_name(edit: EditConfig) -> str:
    """The diffusers pipeline class the config's model uses; WeightsNotFound when the model is not here."""
    if edit.model == TINY:
        return TINY_PIPELINE
    return json.loads((model_dir(edit) / "model_index.json").read_text())["_class_name"]


def model_dir(edit: EditConfig) -> Path:
    """The folder of edit.model (not "tiny"): a local folder or its snapshot in the Hugging Face cache."""
    return pretrained.local_model_dir(edit.model, what="image-editing model (edit.model)", default_id=DEFAULT_MODEL,
                                      required=["model_index.json"])


def weights_identity(edit: EditConfig) -> str:
    """Which weights the edits come from, told apart without reading them (`pretrained.weights_identity`)."""
    return "tiny: random weights from fixed seeds" if edit.model == TINY else pretrained.weights_identity(model_dir(edit))


def check(edit: EditConfig) -> str:
    """Everything about the model that can be checked without loading it, before Ray starts: it is here,
    its class is a diffusers pipeline with the editing call, the batch size and placement suit it."""
    import diffusers

    name = pipeline_class_name(edit)
    cls = getattr(diffusers, name, None)
    if cls is None or not issubclass(cls, diffusers.DiffusionPipeline):
        raise ValueError(f"edit.model {edit.model}: {name!r} is not a pipeline of diffusers {diffusers.__version__}")
    missing = [p for p in CALL_PARAMETERS if p not in inspect.signature(cls.__call__).parameters]
    if missing:
        raise ValueError(f"edit.model {edit.model}: {name}.__call__ lacks {missing}; the edit stage calls an "
                         f"image-editing pipeline with {list(CALL_PARAMETERS)}")
    if edit.batch_size > 1 and name in ONE_PROMPT_PER_CALL:
        raise ValueError(f"edit.batch_size={edit.batch_size}: {name} takes one prompt per call; run more actors "
                         f"(edit.num_actors, fractional edit.num_gpus) instead")
    if edit.working_pixels is not None and not hasattr(sys.modules[cls.__module__], SIZE_FUNCTION):
        raise ValueError(f"edit.working_pixels: {name} does not derive its sizes from {SIZE_FUNCTION}; "
                         f"leave it unset (the pipeline's own size)")
    return name


def tiny_pipeline(pipeline_class: str = TINY_PIPELINE, seed: int = TINY_SEED):
    """A Qwen image-editing pipeline of the real classes with tiny random parts, built offline: the
    transformer, VAE and text encoder from small configs (as diffusers' own tests build them), a
    Qwen2 tokenizer with a byte-level vocabulary plus Qwen's special tokens, and the Qwen2-VL processor."""
    import diffusers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=specials[0],
                               pad_token=specials[0])
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = dict(zip(specials, tokenizer.convert_tokens_to_ids(specials), strict=True))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    text_config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1e6, "vocab_size": len(tokenizer),
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    with seeding.seeded_torch(seed):
        transformer = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
        vae = diffusers.AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                               temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                               latents_std=[1.0] * 4)
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_config)
    pipe = getattr(diffusers, pipeline_class)(transformer=transformer, vae=vae, text_encoder=text_encoder,
                                              tokenizer=tokenizer, processor=processor,
                                              scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(edit: EditConfig, device: str = "cpu"):
    """The config's editing pipeline, loaded once (one per actor): bfloat16 by default, on `device`, or
    spread over every visible GPU with device_map "balanced" (accelerate) when an actor holds more than one."""
    from diffusers import DiffusionPipeline

    dtype = getattr(torch, edit.dtype)
    if edit.model == TINY:
        pipe = tiny_pipeline().to(device)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        root = model_dir(edit)
        # bfloat16 at load time: loading fp32 then casting needs ~4x the host memory (QwenLM/Qwen-Image#74).
        placement = {"device_map": "balanced"} if edit.num_gpus > 1 else {}
        pipe = DiffusionPipeline.from_pretrained(root, dtype=dtype, low_cpu_mem_usage=True, **placement)
        if not placement:
            pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    if edit.vae_tiling:
        # Each where the VAE has it: diffusers' AutoencoderMixin defines both but raises
        # NotImplementedError for a VAE without that mode, and a VAE outside it may lack either.
        for method in ("enable_slicing", "enable_tiling"):
            if (enable := getattr(pipe.vae, method, None)) is not None:
                with contextlib.suppress(NotImplementedError):
                    enable()
    return pipe


@contextlib.contextmanager
def working_area(pipe, pixels: int | None) -> Iterator[None]:
    """Run the pipeline at `pixels` of working area instead of its own ~1 megapixel: every size it derives
    (output, VAE input, vision-language input) is scaled by the same factor. None changes nothing."""
    if pixels is None:
        yield
        return
    module = sys.modules[type(pipe).__module__]
    derive = getattr(module, SIZE_FUNCTION)
    scale = pixels / PIPELINE_AREA
    setattr(module, SIZE_FUNCTION, lambda area, ratio: derive(area * scale, ratio))
    try:
        yield
    finally:
        setattr(module, SIZE_FUNCTION, derive)


def call_settings(edit: EditConfig) -> dict[str, Any]:
    """The pipeline call's arguments besides images, prompts and generators (no height/width: the
    pipeline's own output size, 1024x1024 for a square input)."""
    return {"negative_prompt": edit.negative_prompt, "true_cfg_scale": edit.true_cfg_scale,
            "guidance_scale": edit.guidance_scale, "num_inference_steps": edit.steps}


def recorded_settings(edit: EditConfig, pipeline_class: str) -> dict[str, Any]:
    """What made an edit, stored with it (with the prompt): a re-run with other settings is refused."""
    return {"model": edit.model, "pipeline": pipeline_class, "dtype": edit.dtype,
            "working_pixels": edit.working_pixels, "vae_tiling": edit.vae_tiling, **call_settings(edit)}


def edit_images(pipe, requests: Sequence[EditRequest], edit: EditConfig) -> list[Image.Image]:
    """Each request's image edited by its prompt, from its own seeded CPU generator. Requests whose images
    have one size go in one call as lists (pipelines that take batches size every output like the first
    input, so other sizes get calls of their own)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, request in enumerate(requests):
        by_size.setdefault(request.image.size, []).append(i)
    edited: list[Image.Image | None] = [None] * len(requests)
    for indices in by_size.values():
        for i, image in zip(indices, _call(pipe, [requests[i] for i in indices], edit), strict=True):
            edited[i] = image
    return edited


def _call(pipe, requests: Sequence[EditRequest], edit: EditConfig) -> list[Image.Image]:
    """One pipeline call for requests with images of one size."""
    generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
    if len(requests) == 1:
        args = {"image": requests[0].image, "prompt": requests[0].prompt, "generator": generators[0]}
    else:
        args = {"image": [r.image for r in requests], "prompt": [r.prompt for r in requests],
                "generator": generators, "negative_prompt": [edit.negative_prompt] * len(requests)}
    settings = call_settings(edit)
    if not getattr(getattr(pipe, "transformer", None), "config", {}).get("guidance_embeds", True):
        del settings["guidance_scale"]  # diffusers ignores it here (with a warning per call): not guidance-distilled
    with torch.inference_mode(), working_area(pipe, edit.working_pixels):
        images = pipe(**{**settings, **args}, num_images_per_prompt=1, output_type="np").images
    if len(images) != len(requests):
        raise RuntimeError(f"{type(pipe).__name__} returned {len(images)} images for {len(requests)} edits")
    if not np.isfinite(images).all():
        raise NonFiniteEdit(f"{type(pipe).__name__} returned NaN or Inf pixels")
    # diffusers' own float -> 8-bit rule (numpy_to_pil)
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]
