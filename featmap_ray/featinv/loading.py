"""Loading FeatInv models: the frozen Stable Diffusion base, a FeatInv ControlNet on it, and the model a config selects.

The base is a Stable Diffusion 1.x in diffusers layout (a local folder, or a hub id resolved from the
local Hugging Face cache; missing weights are an error, never a silent fallback) or tiny random
SD-shaped models built from configs (tests, demos, benchmarks). The ControlNet is either new
(initialised from the base UNet, `build_featinv`) or a saved one (`load_featinv`): a folder (local
or in the object store), or an MLflow model URI (`runs:/<run_id>/<path>`, `models:/<name>/<version>`,
`models:/<name>@<alias>`), downloaded to a temporary folder. `featinv_pipeline` puts the two together
the way `featinv.*` in the config says; the reconstruct and training jobs and the service use it.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from featmap_ray import backbones, pretrained, seeding
from featmap_ray.config import Config
from featmap_ray.featinv.data import featinv_backbone
from featmap_ray.featinv.model import FeatInvControlNetModel, ddim_scheduler
from featmap_ray.featinv.pipeline import FeatInvPipeline
from featmap_ray.io import tracking
from featmap_ray.io.files import Location
from featmap_ray.layout import Layout

BASE_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "unet")
DEFAULT_BASE = "lambdalabs/miniSD-diffusers"

BaseComponents = tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel]


def _freeze(*models: nn.Module) -> None:
    for model in models:
        model.requires_grad_(False)
        model.eval()


def build_featinv(base: BaseComponents, *, feature_channels: int, pooled: bool = False, backbone: str | None = None,
                  layer: str | None = None, feature_height: int | None = None, feature_width: int | None = None,
                  encoder_hidden_channels: int = 512) -> FeatInvPipeline:
    """A new (untrained) FeatInv model on a frozen base: the ControlNet is initialised from the UNet."""
    vae, text_encoder, tokenizer, unet = base
    _freeze(vae, text_encoder, unet)
    controlnet = FeatInvControlNetModel.from_unet(
        unet, feature_channels=feature_channels, pooled=pooled, backbone=backbone, layer=layer,
        feature_height=feature_height, feature_width=feature_width, encoder_hidden_channels=encoder_hidden_channels)
    controlnet.eval()
    return FeatInvPipeline(vae, text_encoder, tokenizer, unet, controlnet, ddim_scheduler())


def load_featinv(controlnet_dir: str | Path, base: BaseComponents) -> FeatInvPipeline:
    """A trained FeatInv ControlNet (a `save_pretrained` folder) on a frozen base."""
    vae, text_encoder, tokenizer, unet = base
    controlnet = FeatInvControlNetModel.from_pretrained(str(controlnet_dir), low_cpu_mem_usage=False)
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block", "down_block_types"):
        if list(_as_list(controlnet.config[key])) != list(_as_list(unet.config[key])):
            raise ValueError(f"ControlNet {controlnet_dir} was built for a UNet with {key}={controlnet.config[key]}, "
                             f"the base UNet has {unet.config[key]}")
    _freeze(vae, text_encoder, unet, controlnet)
    return FeatInvPipeline(vae, text_encoder, tokenizer, unet, controlnet, ddim_scheduler())


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---------------------------------------------------------------------------------------------
# Base model: real weights from disk / the HF cache, or tiny random models built from configs.

def resolve_base_dir(path: str | Path, local_files_only: bool) -> Path:
    """The folder of a Stable Diffusion base model (a local folder, or a hub id in the HF cache)."""
    return pretrained.local_model_dir(path, what="Stable Diffusion base model", default_id=DEFAULT_BASE,
                                      required=BASE_SUBFOLDERS, local_files_only=local_files_only)


def load_base_components(path: str | Path, *, local_files_only: bool = True) -> BaseComponents:
    """(vae, text_encoder, tokenizer, unet) of a Stable Diffusion 1.x in diffusers layout.

    `path` is a local directory or a hub id resolved from the local HF cache (downloaded only when
    `local_files_only=False`). Missing weights raise WeightsNotFound; never falls back to random.
    """
    root = resolve_base_dir(path, local_files_only)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", low_cpu_mem_usage=False)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", low_cpu_mem_usage=False)
    return vae, text_encoder, tokenizer, unet


def tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The real SD tokenizer class with a byte-level vocabulary and no merges (every byte is a token)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length)


def random_base_components(*, unet: dict, vae: dict, text_encoder: dict, seed: int = 0) -> BaseComponents:
    """Randomly initialised (vae, text_encoder, tokenizer, unet) from diffusers/transformers configs, offline.

    The tokenizer is `tiny_tokenizer()`; `text_encoder` is a CLIPTextConfig dict whose vocabulary
    and special ids are set to match it. The global RNG state is left untouched.
    """
    tokenizer = tiny_tokenizer()
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **text_encoder)
    with seeding.seeded_torch(seed):
        models = AutoencoderKL(**vae), CLIPTextModel(text_config), UNet2DConditionModel(**unet)
    for model in models:
        model.eval()
    vae_model, text_model, unet_model = models
    return vae_model, text_model, tokenizer, unet_model


def tiny_base_components(seed: int = 0, sample_size: int = 8, cross_attention_dim: int = 32, image_size: int | None = None,
                         vae_width: int = 32) -> BaseComponents:
    """Tiny SD-1.x-shaped random models for tests, demos and benchmarks: latent 4×sample_size², images
    image_size² (default twice the latent side); the VAE has one block per halving, vae_width channels in
    its first and twice that in the others."""
    image_size = image_size or 2 * sample_size
    halvings = (image_size // sample_size).bit_length() - 1
    vae_blocks = (vae_width,) + (2 * vae_width,) * halvings
    unet = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                cross_attention_dim=cross_attention_dim, norm_num_groups=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_blocks, layers_per_block=1,
               down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
               up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
               norm_num_groups=32 if vae_width % 32 == 0 else 8, sample_size=image_size)
    text_encoder = dict(hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
                        num_hidden_layers=2, num_attention_heads=4, projection_dim=cross_attention_dim)
    return random_base_components(unet=unet, vae=vae, text_encoder=text_encoder, seed=seed)


def untrained_base(cfg: Config) -> BaseComponents:
    """The random tiny base that `featinv.base_model: trained` starts from (featinv.base_training)."""
    bt = cfg.featinv.base_training
    return tiny_base_components(seed=bt.seed, sample_size=bt.latent_size, image_size=bt.image_size,
                                vae_width=bt.vae_width)


# ---------------------------------------------------------------------------------------------
# From the configuration to the model (the reconstruct and training jobs).

def trained_base(cfg: Config) -> Location:
    """Where `featinv.base_model: trained` is: the base featinv-train trains first for run featinv.training.run_name."""
    return Layout(cfg.storage).featinv_base(cfg.featinv.training.run_name)


def base_components(cfg: Config) -> BaseComponents:
    """(vae, text_encoder, tokenizer, unet) of featinv.base_model: random tiny models for "tiny", the tiny base
    trained on this store for "trained", else Stable Diffusion at that folder or hub id."""
    name = cfg.featinv.base_model
    if name == "tiny":
        return tiny_base_components(seed=0)
    if name == "trained":
        folder = trained_base(cfg)
        if folder.current() is None:
            raise FileNotFoundError(f"featinv.base_model is 'trained', but no base model was trained at {folder}: "
                                    "run `featmap featinv-train` first (it trains the base, then the ControlNet)")
        with folder.resolved().local_copy() as local:
            return load_base_components(local)
    return load_base_components(name)


@contextlib.contextmanager
def local_folder(cfg: Config, source: tracking.ModelSource) -> Iterator[str]:
    """A local copy of a model's folder while the context lasts (diffusers reads local folders)."""
    if tracking.is_model_uri(source.uri):
        with tempfile.TemporaryDirectory() as tmp:
            yield tracking.download_model(cfg, source, tmp)
    else:
        # A folder featmap published (featmap featinv-train) holds versions behind a pointer; any other
        # (a diffusers `save_pretrained`, a training checkpoint, a download) is read as it is.
        folder = Location(source.uri)
        with folder.resolved().local_copy() as local:
            yield local


def featinv_pipeline(cfg: Config, controlnet: str | None = None) -> FeatInvPipeline:
    """The FeatInv model of the config: the ControlNet at `controlnet` or `featinv.controlnet` (a folder or
    an MLflow model URI; the pipeline's `source` says where it came from), else a fresh one made from
    the base UNet."""
    return featinv_model(cfg, controlnet or cfg.featinv.controlnet)


def featinv_model(cfg: Config, where: str | None) -> FeatInvPipeline:
    """The base model of the config with the ControlNet at `where`, or a fresh one made from the base UNet
    when `where` is None (seeded: every worker and actor builds the same)."""
    fi = cfg.featinv
    request, layer = featinv_backbone(cfg)
    base = base_components(cfg)
    if where:
        source = tracking.model_source(cfg, where)
        with local_folder(cfg, source) as local:
            pipe = load_featinv(local, base)
        trained_on = (pipe.controlnet.config.backbone, pipe.controlnet.config.layer)
        if None not in trained_on and trained_on != (request.name, layer):
            raise ValueError(f"FeatInv ControlNet {where} inverts {trained_on[0]}/{trained_on[1]}, but the config "
                             f"selects {request.name}/{layer} (featinv.backbone / featinv.layer)")
        pipe.source = source
        return pipe
    channels, height, width = backbones.feature_shapes(backbones.get_spec(request.name), request, [layer])[layer]
    with seeding.seeded_torch(cfg.featinv.training.seed):
        return build_featinv(base, feature_channels=channels, pooled=fi.pooled, backbone=request.name, layer=layer,
                             feature_height=height, feature_width=width,
                             encoder_hidden_channels=fi.encoder_hidden_channels)
