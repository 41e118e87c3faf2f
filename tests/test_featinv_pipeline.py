"""FeatInvPipeline: batched CFG, per-item generators, the DDIM/guidance formulas, outputs, and saving and
loading it as a diffusers pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featmap_ray.featinv.loading import build_featinv, tiny_base_components
from featmap_ray.featinv.model import FeatInvControlNetModel, FeatureMismatch
from featmap_ray.featinv.pipeline import PROMPT, FeatInvPipeline, FeatInvPipelineOutput, seeded_generators

C, H = 8, 5

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def perturb(model: torch.nn.Module, seed: int) -> None:
    """A "trained" ControlNet: weights (zero convs included) moved off their initialisation, so the
    features actually steer the sample."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def fi():
    torch.manual_seed(0)
    pipe = build_featinv(tiny_base_components(seed=0), feature_channels=C, encoder_hidden_channels=16,
                         backbone="convnext_base", layer="stage3")
    perturb(pipe.controlnet, seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def features(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, C, H, H, generator=torch.Generator().manual_seed(seed))


def latents(fi, f, seeds, **kw) -> torch.Tensor:
    return fi(f, seeded_generators(seeds), output_type="latent", **kw).images


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(int)


def test_batched_cfg_equals_two_forwards(fi):
    f = features(3)
    kw = dict(num_inference_steps=4, guidance_scale=1.75)
    batched = latents(fi, f, [5, 6, 7], batch_cfg=True, **kw)
    separate = latents(fi, f, [5, 6, 7], batch_cfg=False, **kw)
    # One forward of batch 2B vs two of batch B: other kernels' accumulation order, float32 rounding apart.
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)


def test_item_depends_only_on_its_features_and_generator(fi):
    f = features(3)
    alone = latents(fi, f[1:2], [100], num_inference_steps=4)
    in_batch = latents(fi, f, [7, 100, 9], num_inference_steps=4)
    # Batch 3 vs batch 1: the same arithmetic on other shapes, equal to float32 rounding.
    torch.testing.assert_close(in_batch[1:2], alone, atol=1e-5, rtol=0)
    # Initial noise (one generator per item, same shape and device): bit for bit, and as documented.
    noise = fi.prepare_latents(3, seeded_generators([7, 100, 9]))
    assert torch.equal(noise[1], fi.prepare_latents(1, seeded_generators([100]))[0])
    assert torch.equal(noise[1:2], torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(100)))
    # Passing those latents is the same as passing the generators.
    torch.testing.assert_close(fi(f, latents=noise, num_inference_steps=4, output_type="latent").images,
                               in_batch, atol=1e-6, rtol=0)
    # The seed and the features both matter.
    assert not torch.allclose(latents(fi, f[1:2], [101], num_inference_steps=4), alone, atol=1e-3)
    assert not torch.allclose(latents(fi, f[0:1], [100], num_inference_steps=4), alone, atol=1e-3)
    images = fi(f, seeded_generators([7, 100, 9]), num_inference_steps=4).images
    single = fi(f[1:2], seeded_generators([100]), num_inference_steps=4, batch_cfg=False).images
    assert len(images) == 3 and images[1].size == (16, 16) and images[1].mode == "RGB"
    # Latents equal to float32 rounding: a pixel may round the other way.
    assert np.abs(pixels(images)[1] - pixels(single)[0]).max() <= 1


def ddim_reference(fi, f, seed, steps, guidance, negative_prompt=""):
    """The reference DDIM sampler written out: eta 0, uniform timesteps, text-only CFG, float64 update."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1 - betas)
    timesteps = np.arange(0, 1000, 1000 // steps)[::-1] + 1
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        cond = fi.encode_prompt([PROMPT])
        uncond = fi.encode_prompt([negative_prompt])

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


@pytest.mark.parametrize("guidance", [1.0, 1.75, 8.0])  # 1.0: the unconditional branch is skipped
def test_ddim_and_guidance_match_independent_computation(fi, guidance):
    f = features(1, seed=3)
    ours = latents(fi, f, [42], num_inference_steps=2, guidance_scale=guidance)
    # float32 sampling against a float64 DDIM update on the same float32 networks.
    torch.testing.assert_close(ours, ddim_reference(fi, f, 42, steps=2, guidance=guidance), atol=2e-5, rtol=1e-5)


def test_negative_prompt_and_conditioning_scale(fi):
    f = features(1, seed=4)
    base = latents(fi, f, [1], num_inference_steps=2)
    blurry = latents(fi, f, [1], num_inference_steps=2, negative_prompt="blurry")
    torch.testing.assert_close(blurry, ddim_reference(fi, f, 1, steps=2, guidance=1.75, negative_prompt="blurry"),
                               atol=2e-5, rtol=1e-5)
    assert not torch.allclose(blurry, base, atol=1e-4)
    # Conditioning scale 0 switches the ControlNet off: the features no longer matter.
    off = latents(fi, f, [1], num_inference_steps=2, controlnet_conditioning_scale=0.0)
    torch.testing.assert_close(latents(fi, features(1, seed=9), [1], num_inference_steps=2,
                                       controlnet_conditioning_scale=0.0), off)
    assert not torch.allclose(off, base, atol=1e-4)


def test_output_types(fi):
    f = features(2).half()  # stored features may be float16
    final = latents(fi, f, [3, 4], num_inference_steps=3)
    with torch.no_grad():
        decoded = fi.vae.decode(final / 0.18215).sample.double()
    expected_pil = np.clip(np.round(decoded.permute(0, 2, 3, 1).numpy() * 127.5 + 127.5), 0, 255)
    out = fi(f, seeded_generators([3, 4]), num_inference_steps=3)
    assert isinstance(out, FeatInvPipelineOutput)
    # Two sampling calls give latents equal to float32 rounding, so a pixel may round the other way.
    assert np.abs(pixels(out.images) - expected_pil).max() <= 1
    unit = fi(f, seeded_generators([3, 4]), num_inference_steps=3, output_type="np").images
    assert unit.shape == (2, 16, 16, 3) and unit.dtype == np.float32
    np.testing.assert_allclose(unit, (decoded.permute(0, 2, 3, 1).numpy() / 2 + 0.5).clip(0, 1), atol=1e-5)
    tensor = fi(f, seeded_generators([3, 4]), num_inference_steps=3, output_type="pt", return_dict=False)[0]
    assert tensor.shape == (2, 3, 16, 16)
    torch.testing.assert_close(tensor.permute(0, 2, 3, 1).numpy(), unit, atol=1e-5, rtol=0)
    assert np.abs(pixels(fi.decode(final)) - pixels(out.images)).max() <= 1


def test_bad_inputs(fi):
    with pytest.raises(FeatureMismatch, match="expected 8 channels for convnext_base/stage3"):
        fi(torch.randn(1, 3, H, H), num_inference_steps=1)
    with pytest.raises(FeatureMismatch, match="channels-last"):
        fi(torch.randn(1, H, H, C), num_inference_steps=1)
    bad = features(1)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FeatureMismatch, match="NaN"):
        fi(bad, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"one per feature map \(2\), got a list of 1"):
        fi(features(2), seeded_generators([0]), num_inference_steps=1)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        fi(features(1), num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type must be one of"):
        fi(features(1), num_inference_steps=1, output_type="uint8")
    with pytest.raises(ValueError, match=r"latents: expected shape \(1, 4, 8, 8\)"):
        fi(features(1), latents=torch.zeros(1, 4, 4, 4), num_inference_steps=1)


def test_progress_bar_shows_the_steps_and_can_be_disabled(fi, capsys):
    try:
        fi.set_progress_bar_config()
        fi(features(1), num_inference_steps=3, output_type="latent")
        assert "3/3" in capsys.readouterr().err
    finally:
        fi.set_progress_bar_config(disable=True)
    fi(features(1), num_inference_steps=3, output_type="latent")
    assert capsys.readouterr().err == ""


def test_save_pretrained_and_from_pretrained_round_trip(fi, tmp_path):
    fi.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "FeatInvPipeline"
    assert index["controlnet"] == ["featmap_ray.featinv.model", "FeatInvControlNetModel"]
    loaded = FeatInvPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.controlnet) is FeatInvControlNetModel
    assert loaded.controlnet.config.backbone == "convnext_base" and loaded.image_size == 16
    for name in ("vae", "text_encoder", "unet", "controlnet"):
        ours, theirs = getattr(fi, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    def settings(scheduler):  # without diffusers' bookkeeping (`_use_default_values`, ...)
        return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}

    assert type(loaded.scheduler) is type(fi.scheduler) and settings(loaded.scheduler) == settings(fi.scheduler)
    assert loaded.tokenizer([PROMPT, "a cat"]).input_ids == fi.tokenizer([PROMPT, "a cat"]).input_ids
    f = features(2, seed=5)
    # Same weights in other module objects: equal to float32 rounding, not bitwise (kernels depend on
    # memory layout; ~1e-6 apart on AMD EPYC), as in test_featinv_model.
    torch.testing.assert_close(latents(loaded, f, [8, 9], num_inference_steps=3),
                               latents(fi, f, [8, 9], num_inference_steps=3), atol=1e-5, rtol=0)
