"""FeatInv sampling: batched CFG, per-item seeds, the DDIM/guidance formulas, image conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featmap_ray.featinv.loading import build_featinv, tiny_base_components
from featmap_ray.featinv.model import FeatureMismatch
from featmap_ray.featinv.sample import (
    PROMPT,
    decode_latents,
    encode_prompts,
    initial_latents,
    reconstruct,
    reconstruct_reference_loop,
    sample_latents,
)

C, H = 8, 5


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def fi():
    torch.manual_seed(0)
    components = build_featinv(tiny_base_components(seed=0), feature_channels=C, encoder_hidden_channels=16)
    # A "trained" ControlNet: weights (zero convs included) moved off their zero initialisation,
    # so the features actually steer the sample.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in components.controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return components


def features(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, C, H, H, generator=torch.Generator().manual_seed(seed))


def test_batched_cfg_equals_two_forwards(fi):
    f = features(3)
    kw = dict(steps=4, guidance=1.75)
    batched = sample_latents(fi, f, [5, 6, 7], batch_cfg=True, **kw)
    separate = sample_latents(fi, f, [5, 6, 7], batch_cfg=False, **kw)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)


def test_item_depends_only_on_its_features_and_seed(fi):
    f = features(3)
    alone = sample_latents(fi, f[1:2], [100], steps=4)
    in_batch = sample_latents(fi, torch.stack([f[0], f[1], f[2]]), [7, 100, 9], steps=4)
    torch.testing.assert_close(in_batch[1:2], alone, atol=1e-5, rtol=0)
    # RNG output (one generator per seed, same shape and device): bit for bit.
    assert torch.equal(initial_latents(fi, [7, 100, 9])[1], initial_latents(fi, [100])[0])
    # The seed and the features both matter.
    assert not torch.allclose(sample_latents(fi, f[1:2], [101], steps=4), alone, atol=1e-3)
    assert not torch.allclose(sample_latents(fi, f[0:1], [100], steps=4), alone, atol=1e-3)
    images = reconstruct(fi, f, [7, 100, 9], steps=4)
    single = reconstruct_reference_loop(fi, f[1:2], 100, steps=4)
    assert single.shape == (16, 16, 3)
    assert np.abs(images[1].astype(int) - single.astype(int)).max() <= 1


def ddim_reference(fi, f, seed, steps, guidance, negative_prompt=""):
    """The reference DDIM sampler written out: eta 0, uniform timesteps, text-only CFG, float64 update."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1 - betas)
    timesteps = np.arange(0, 1000, 1000 // steps)[::-1] + 1
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        cond = encode_prompts(fi, [PROMPT])
        uncond = encode_prompts(fi, [negative_prompt])

        def eps(x, t, text):
            down, mid = fi.controlnet(x.float(), torch.tensor(t), encoder_hidden_states=text, controlnet_cond=f,
                                      return_dict=False)
            return fi.unet(x.float(), torch.tensor(t), text, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample.double()

        for i, t in enumerate(timesteps):
            a_t = alpha_bar[t]
            a_prev = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else alpha_bar[0]
            e_c, e_u = eps(x, int(t), cond), eps(x, int(t), uncond)
            e = e_u + guidance * (e_c - e_u)
            x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e
    return x.float()


@pytest.mark.parametrize("guidance", [1.0, 1.75, 8.0])
def test_ddim_and_guidance_match_independent_computation(fi, guidance):
    f = features(1, seed=3)
    ours = sample_latents(fi, f, [42], steps=2, guidance=guidance)
    torch.testing.assert_close(ours, ddim_reference(fi, f, 42, steps=2, guidance=guidance), atol=2e-5, rtol=1e-5)


def test_negative_prompt_and_control_scale(fi):
    f = features(1, seed=4)
    base = sample_latents(fi, f, [1], steps=2)
    torch.testing.assert_close(sample_latents(fi, f, [1], steps=2, negative_prompt="blurry"),
                               ddim_reference(fi, f, 1, steps=2, guidance=1.75, negative_prompt="blurry"),
                               atol=2e-5, rtol=1e-5)
    assert not torch.allclose(sample_latents(fi, f, [1], steps=2, negative_prompt="blurry"), base, atol=1e-4)
    # control_scale 0 switches the ControlNet off: the features no longer matter.
    off = sample_latents(fi, f, [1], steps=2, control_scale=0.0)
    torch.testing.assert_close(sample_latents(fi, features(1, seed=9), [1], steps=2, control_scale=0.0), off)
    assert not torch.allclose(off, base, atol=1e-4)


def test_output_images(fi):
    f = features(2).half()  # stored features may be float16
    latents = sample_latents(fi, f, [3, 4], steps=3)
    images = reconstruct(fi, f, [3, 4], steps=3)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    with torch.no_grad():
        decoded = fi.vae.decode(latents / 0.18215).sample.permute(0, 2, 3, 1).double().numpy()
    expected = np.clip(np.round(decoded * 127.5 + 127.5), 0, 255)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    # Two sampling calls give latents equal to float32 rounding, so a pixel may round the other way.
    assert np.abs(decode_latents(fi, latents).astype(int) - images.astype(int)).max() <= 1


def test_bad_inputs(fi):
    with pytest.raises(FeatureMismatch, match="expected 8 channels"):
        reconstruct(fi, torch.randn(1, 3, H, H), [0], steps=1)
    with pytest.raises(FeatureMismatch, match="channels-last"):
        reconstruct(fi, torch.randn(1, H, H, C), [0], steps=1)
    with pytest.raises(ValueError, match="one per feature map"):
        reconstruct(fi, features(2), [0], steps=1)
    with pytest.raises(ValueError, match=r"\(1, C, H, W\)"):
        reconstruct_reference_loop(fi, features(2), 0, steps=1)
