"""FeatInv model: feature encoder, ControlNet initialisation and I/O, scheduler, base-model loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featmap_ray.featinv.loading import (
    build_featinv,
    load_base_components,
    load_featinv,
    tiny_base_components,
)
from featmap_ray.featinv.model import (
    FeatInvControlNetModel,
    FeatureEncoder,
    FeatureMismatch,
    ddim_scheduler,
)
from featmap_ray.pretrained import WeightsNotFound

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def bilinear_resize(x: np.ndarray, size: int) -> np.ndarray:
    """Independent bilinear resize of (C, H, W) with half-pixel centres (align_corners=False, no antialias)."""
    def taps(n_in: int):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    (r0, r1, wr), (c0, c1, wc) = taps(x.shape[1]), taps(x.shape[2])
    rows = x[:, r0] * (1 - wr)[None, :, None] + x[:, r1] * wr[None, :, None]
    return rows[:, :, c0] * (1 - wc)[None, None, :] + rows[:, :, c1] * wc[None, None, :]


@pytest.fixture(scope="module")
def base():
    return tiny_base_components(seed=0)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every weight (zero convs included) off its initialisation, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


# Real channel counts and grids of the backbone families FeatMap/FeatInv tap (spec §4.1, §10.2, addendum).
FAMILIES = {
    "convnext_stage3": (1024, 9, 9),
    "convnext_stage0_downsampled": (128, 72, 72),
    "swinv2_stage3": (1024, 12, 12),
    "dinov3_final": (768, 14, 14),
    "resnet50_final": (2048, 7, 7),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_encoder_output_shape_per_backbone_family(family):
    channels, h, w = FAMILIES[family]
    encoder = FeatureEncoder(channels, latent_size=32, hidden_channels=16, out_channels=320)
    features = torch.randn(2, channels, h, w)
    assert encoder.to_grid(features).shape == (2, channels, 32, 32)
    assert encoder(features).shape == (2, 320, 32, 32)


@pytest.mark.parametrize("h", [9, 72])  # upsampled (ConvNeXt stage3) and downsampled (stage0) grids
def test_encoder_grid_is_bilinear_resize(h):
    features = torch.randn(1, 3, h, h, generator=torch.Generator().manual_seed(h))
    grid = FeatureEncoder(3, latent_size=32, hidden_channels=8).to_grid(features)[0].numpy()
    np.testing.assert_allclose(grid, bilinear_resize(features[0].double().numpy(), 32), atol=1e-5)


def test_pooled_encoder_sees_only_channel_means():
    gen = torch.Generator().manual_seed(1)
    encoder = FeatureEncoder(6, latent_size=8, hidden_channels=8, out_channels=4, pooled=True)
    perturb(encoder, seed=2)
    features = torch.randn(1, 6, 5, 5, generator=gen)
    grid = encoder.to_grid(features)
    means = features.mean(dim=(2, 3))
    assert grid.shape == (1, 6, 8, 8)
    torch.testing.assert_close(grid, means[:, :, None, None].expand(-1, -1, 8, 8))
    # Same channel means, other spatial arrangement -> same embedding; other means -> different.
    shuffled = features.flatten(2)[:, :, torch.randperm(25, generator=gen)].reshape(1, 6, 5, 5)
    torch.testing.assert_close(encoder(shuffled), encoder(features))
    assert not torch.allclose(encoder(features + 1.0), encoder(features))


def test_untrained_controlnet_leaves_base_unet_unchanged(base):
    torch.manual_seed(0)
    fi = build_featinv(base, feature_channels=8, encoder_hidden_channels=16, backbone="convnext_base", layer="stage3")
    cn, unet = fi.controlnet, fi.unet
    assert isinstance(cn.controlnet_cond_embedding, FeatureEncoder)
    assert cn.config.conditioning_channels == 8 and cn.config.latent_size == unet.config.sample_size
    # The trunk is the UNet's encoder + middle (tool_add_control); the base is frozen.
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        ours, theirs = getattr(cn, name).state_dict(), getattr(unet, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not any(p.requires_grad for m in (fi.unet, fi.vae, fi.text_encoder) for p in m.parameters())

    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 77, 32, generator=gen)
    features = torch.randn(2, 8, 9, 9, generator=gen)
    t = torch.tensor(501)
    with torch.no_grad():
        down, mid = cn(latents, t, encoder_hidden_states=text, controlnet_cond=features, return_dict=False)
        assert len(down) == 1 + 2 * 1 + 1 and mid.shape[1] == 64  # conv_in + (res + down), res ; mid
        assert all(torch.count_nonzero(r) == 0 for r in (*down, mid))  # zero convs: exactly 0 on any CPU
        controlled = unet(latents, t, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        plain = unet(latents, t, text).sample
    # Adding zero residuals is exact, but the two forwards run on differently allocated activations,
    # and CPU kernels may pick another path for another alignment (~1e-6 differences seen on AMD EPYC).
    torch.testing.assert_close(controlled, plain, rtol=1e-5, atol=1e-5)


def test_controlnet_save_load_round_trip(base, tmp_path):
    torch.manual_seed(0)
    fi = build_featinv(base, feature_channels=8, encoder_hidden_channels=16, pooled=False, backbone="swinv2_base",
                       layer="stage3", feature_height=12, feature_width=12)
    perturb(fi.controlnet, seed=4)
    fi.controlnet.save_pretrained(tmp_path / "cn")
    loaded = load_featinv(tmp_path / "cn", base)
    cn = loaded.controlnet
    assert type(cn) is FeatInvControlNetModel
    # What a round trip guarantees: the same weights, bit for bit.
    saved, reloaded = fi.controlnet.state_dict(), cn.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    for key, value in dict(feature_channels=8, latent_size=8, encoder_hidden_channels=16, pooled=False,
                           backbone="swinv2_base", layer="stage3", feature_height=12, feature_width=12,
                           conditioning_channels=8, cross_attention_dim=32).items():
        assert cn.config[key] == value, key
    assert list(cn.config.block_out_channels) == [32, 64]
    gen = torch.Generator().manual_seed(5)
    args = (torch.randn(1, 4, 8, 8, generator=gen), torch.tensor(21), torch.randn(1, 77, 32, generator=gen))
    features = torch.randn(1, 8, 12, 12, generator=gen)
    with torch.no_grad():
        before = fi.controlnet(*args, controlnet_cond=features, return_dict=False)
        after = cn(*args, controlnet_cond=features, return_dict=False)
    assert torch.count_nonzero(before[1]) > 0
    # Two module objects with identical weights: their outputs agree to float32 rounding, not bitwise
    # (kernel choice depends on memory layout; ~1e-6 apart on AMD EPYC). Residuals here are O(1).
    for a, b in zip((*before[0], before[1]), (*after[0], after[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_load_featinv_rejects_controlnet_of_another_unet(base, tmp_path):
    torch.manual_seed(0)
    build_featinv(base, feature_channels=8, encoder_hidden_channels=16).controlnet.save_pretrained(tmp_path / "cn")
    other = tiny_base_components(seed=0, cross_attention_dim=64)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        load_featinv(tmp_path / "cn", other)


def test_check_features_errors(base):
    cn = build_featinv(base, feature_channels=8, encoder_hidden_channels=16, backbone="convnext_base",
                       layer="stage3", feature_height=9, feature_width=9).controlnet
    cn.check_features(torch.randn(2, 8, 9, 9))
    with pytest.raises(FeatureMismatch, match=r"expected 8 channels for convnext_base/stage3, got 4"):
        cn.check_features(torch.randn(2, 4, 9, 9))
    with pytest.raises(FeatureMismatch, match="channels-last"):
        cn.check_features(torch.randn(2, 9, 9, 8))
    with pytest.raises(FeatureMismatch, match="4-D NCHW"):
        cn.check_features(torch.randn(8, 9, 9))
    with pytest.raises(FeatureMismatch, match=r"9×9, got 12×12"):
        cn.check_features(torch.randn(1, 8, 12, 12))
    bad = torch.randn(1, 8, 9, 9)
    bad[0, 3, 2, 2] = float("nan")
    with pytest.raises(FeatureMismatch, match="NaN"):
        cn.check_features(bad)
    bad[0, 3, 2, 2] = float("inf")
    with pytest.raises(FeatureMismatch, match="NaN or Inf"):
        cn.check_features(bad)


def test_ddim_scheduler_matches_reference_sampler():
    scheduler = ddim_scheduler()
    # LDM "linear" schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2.
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), alphas_cumprod, rtol=1e-5)
    scheduler.set_timesteps(50)
    # DDIM "uniform" discretisation: {0, 20, ..., 980} + 1, run from 981 down to 1.
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))
    # The last step goes to alpha_bar at index 0, not 1 (set_alpha_to_one False).
    assert scheduler.final_alpha_cumprod.item() == pytest.approx(alphas_cumprod[0], rel=1e-6)
    assert scheduler.config.prediction_type == "epsilon" and not scheduler.config.clip_sample


def test_components_geometry(base):
    fi = build_featinv(base, feature_channels=8, encoder_hidden_channels=16)
    assert fi.vae_scale_factor == 2 and fi.latent_size == 8 and fi.image_size == 16


def test_load_base_components_round_trip(base, tmp_path):
    vae, text_encoder, tokenizer, unet = base
    for name, model in zip(("vae", "text_encoder", "tokenizer", "unet"), base):
        model.save_pretrained(tmp_path / name)
    loaded = load_base_components(str(tmp_path))
    for ours, theirs in ((loaded[0], vae), (loaded[1], text_encoder), (loaded[3], unet)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded[2]("a cat").input_ids == tokenizer("a cat").input_ids


def test_load_base_components_missing(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(WeightsNotFound, match="no-such-model") as err:
        load_base_components(str(missing))
    assert "huggingface-cli download lambdalabs/miniSD-diffusers" in str(err.value)
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(WeightsNotFound, match=r"\['vae', 'text_encoder', 'tokenizer'\]"):
        load_base_components(str(tmp_path / "partial"))
    with pytest.raises(WeightsNotFound, match="not-an-org/not-a-model.*cache"):
        load_base_components("not-an-org/not-a-model")
