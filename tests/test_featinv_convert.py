"""Checkpoint import: a synthetic reference-layout (LDM / ControlNet research code) checkpoint of tiny models.

The test writes our tiny diffusers models out under the reference's key names with its own
diffusers -> LDM naming (written from the LDM module structure, not taken from diffusers), then
checks that the importer consumes every key and rebuilds models that compute the same functions.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from featmap_ray.featinv.convert import CheckpointMismatch, import_ldm_checkpoint
from featmap_ray.featinv.loading import build_featinv, load_base_components, load_featinv, tiny_base_components
from featmap_ray.featinv.model import FeatInvControlNetModel, ddim_scheduler
from featmap_ray.featinv.pipeline import FeatInvPipeline

LAYERS = 1  # layers_per_block of the tiny UNet
BASE = {"image_size": 16, "num_heads": 4, "text_num_heads": 4}  # what the weights cannot tell
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _sub(rules: list[tuple[str, str]], key: str) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise AssertionError(f"test mapping misses {key}")


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def ldm_unet_key(key: str, up_attention: list[bool]) -> str:
    """diffusers UNet/ControlNet key -> LDM openaimodel key (input_blocks / middle_block / output_blocks)."""
    def down(m):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (LAYERS + 1) + j
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"

    def up(m):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * (LAYERS + 1) + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"

    def upsampler(m):
        block = int(m[1])
        # The upsampler follows the resnet (and the attention, when the level has one) of the last layer.
        return f"output_blocks.{block * (LAYERS + 1) + LAYERS}.{2 if up_attention[block] else 1}.conv.{m[2]}"

    return _sub([
        (r"^time_embedding\.linear_1\.(.*)", r"time_embed.0.\1"),
        (r"^time_embedding\.linear_2\.(.*)", r"time_embed.2.\1"),
        (r"^conv_in\.(.*)", r"input_blocks.0.0.\1"),
        (r"^conv_norm_out\.(.*)", r"out.0.\1"),
        (r"^conv_out\.(.*)", r"out.2.\1"),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
         lambda m: f"input_blocks.{(int(m[1]) + 1) * (LAYERS + 1)}.0.op.{m[2]}"),
        (r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", down),
        (r"^mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"),
        (r"^mid_block\.attentions\.0\.(.*)", r"middle_block.1.\1"),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", upsampler),
        (r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", up),
        (r"^controlnet_down_blocks\.(\d+)\.(.*)", r"zero_convs.\1.0.\2"),
        (r"^controlnet_mid_block\.(.*)", r"middle_block_out.0.\1"),
        (r"^controlnet_cond_embedding\.conv_in\.(.*)", r"input_hint_block.block.1.\1"),
        (r"^controlnet_cond_embedding\.conv_mid\.(.*)", r"input_hint_block.block.3.\1"),
        (r"^controlnet_cond_embedding\.conv_out\.(.*)", r"input_hint_block.block.5.\1"),
    ], key)


def ldm_vae_key(key: str, levels: int) -> str:
    """diffusers AutoencoderKL key -> LDM autoencoder key (decoder levels are numbered bottom-up in LDM)."""
    def res(rest):
        return rest.replace("conv_shortcut", "nin_shortcut")

    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    return _sub([
        (r"^(encoder|decoder)\.conv_norm_out\.(.*)", r"\1.norm_out.\2"),
        (r"^(encoder|decoder|quant_conv|post_quant_conv)(\.conv_in|\.conv_out)?\.(weight|bias)$", r"\g<0>"),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{res(m[3])}"),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", r"encoder.down.\1.downsample.conv.\2"),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{res(m[3])}"),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{res(m[3])}"),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)",
         lambda m: f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"),
    ], key)


def reference_checkpoint(fi) -> dict[str, torch.Tensor]:
    """The ControlLDM state dict the reference would save for these models."""
    up_attention = ["CrossAttn" in t for t in fi.unet.config.up_block_types]
    levels = len(fi.vae.config.block_out_channels)
    state = {}
    for key, value in fi.controlnet.state_dict().items():
        state["control_model." + ldm_unet_key(key, up_attention)] = value.clone()
    for key, value in fi.unet.state_dict().items():
        state["model.diffusion_model." + ldm_unet_key(key, up_attention)] = value.clone()
    for key, value in fi.vae.state_dict().items():
        # LDM's VAE mid-block attention uses 1x1 convs where diffusers uses linear layers.
        is_attn_matrix = re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key)
        state["first_stage_model." + ldm_vae_key(key, levels)] = value[:, :, None, None].clone() if is_attn_matrix else value.clone()
    for key, value in fi.text_encoder.state_dict().items():
        # The reference's transformers 4.x CLIPTextModel nests everything under text_model.
        state["cond_stage_model.transformer.text_model." + key] = value.clone()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    betas = ddim_scheduler().betas
    state["betas"] = betas.clone()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0)
    return state


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    fi = build_featinv(tiny_base_components(seed=3), feature_channels=6, encoder_hidden_channels=16)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in fi.controlnet.parameters():  # a "trained" ControlNet: zero convs non-zero
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return fi


@pytest.fixture(scope="module")
def imported_dir(source, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import")
    source.tokenizer.save_pretrained(tmp / "tokenizer_src")
    torch.save({"state_dict": reference_checkpoint(source), "global_step": 10}, tmp / "featinv.ckpt")
    return import_ldm_checkpoint(tmp / "featinv.ckpt", tmp / "out", base_config=BASE, backbone="convnext_base",
                                 layer="stage3", tokenizer_dir=tmp / "tokenizer_src")


@pytest.fixture(scope="module")
def imported(imported_dir):
    return load_featinv(imported_dir / "controlnet", load_base_components(str(imported_dir)))


def test_an_import_with_a_tokenizer_is_a_whole_pipeline(imported_dir, imported):
    pipe = FeatInvPipeline.from_pretrained(imported_dir)
    for name in ("vae", "text_encoder", "unet", "controlnet"):
        ours, theirs = getattr(imported, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert pipe.tokenizer("a photo").input_ids == imported.tokenizer("a photo").input_ids


def test_imported_models_compute_the_same_functions(source, imported):
    gen = torch.Generator().manual_seed(11)
    latents, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    features, t = torch.randn(2, 6, 9, 9, generator=gen), torch.tensor(341)
    with torch.no_grad():
        outputs = []
        for fi in (source, imported):
            down, mid = fi.controlnet(latents, t, encoder_hidden_states=text, controlnet_cond=features,
                                      return_dict=False)
            eps = fi.unet(latents, t, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
            image = fi.vae.decode(latents).sample
            ids = fi.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
            outputs.append([*down, mid, eps, image, fi.text_encoder(ids)[0]])
    assert torch.count_nonzero(outputs[0][0]) > 0  # the features reach the residuals
    # Same weights in other module objects: equal to float32 rounding, not bitwise (kernels depend on
    # memory layout; ~1e-6 apart on AMD EPYC for O(1) outputs), so 1e-5 as in test_featinv_model.
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_imported_config(imported):
    cn = imported.controlnet
    assert type(cn) is FeatInvControlNetModel
    assert (cn.config.feature_channels, cn.config.encoder_hidden_channels, cn.config.latent_size) == (6, 16, 8)
    assert (cn.config.backbone, cn.config.layer) == ("convnext_base", "stage3")
    assert imported.unet.config.attention_head_dim == 4 and imported.vae.config.scaling_factor == 0.18215
    assert imported.image_size == 16


def test_every_key_is_accounted_for(source, tmp_path):
    state = reference_checkpoint(source)
    extra = dict(state, **{"control_model.input_hint_block.block.7.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.ckpt")  # top-level state dict, like tool_add_control's output
    with pytest.raises(CheckpointMismatch, match=r"source keys not mapped 1: control_model\.input_hint_block\.block\.7"):
        import_ldm_checkpoint(tmp_path / "extra.ckpt", tmp_path / "out1", base_config=BASE)

    missing = dict(state)
    del missing["control_model.zero_convs.2.0.weight"]
    del missing["model.diffusion_model.output_blocks.1.0.in_layers.0.bias"]
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointMismatch) as err:
        import_ldm_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out2", base_config=BASE)
    message = str(err.value)
    assert "target keys not filled 2" in message
    assert "controlnet.controlnet_down_blocks.2.weight" in message
    assert "unet.up_blocks.0.resnets.1.norm1.bias" in message
    assert not (tmp_path / "out2").exists()


def test_schedule_and_base_config_are_checked(source, tmp_path):
    state = reference_checkpoint(source)
    state["betas"] = torch.from_numpy(np.linspace(1e-4, 2e-2, 1000))  # the DDPM default schedule
    torch.save(state, tmp_path / "other_schedule.ckpt")
    with pytest.raises(CheckpointMismatch, match="noise schedule"):
        import_ldm_checkpoint(tmp_path / "other_schedule.ckpt", tmp_path / "out", base_config=BASE)
    with pytest.raises(ValueError, match="unknown keys"):
        import_ldm_checkpoint(tmp_path / "other_schedule.ckpt", tmp_path / "out", base_config={"heads": 8})
