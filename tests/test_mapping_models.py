"""Mapping model families: registry, shapes, gradients, baselines, spatial transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from featmap_ray.manipulations.direct import expand
from featmap_ray.mapping.closed_form import SufficientStats
from featmap_ray.mapping.models import (
    MODELS,
    NotFittedError,
    SpatialThenMap,
    build_model,
    count_parameters,
    is_geometric,
    linear_weights,
    model_hparams,
    model_input,
    spatial_transform,
)

C, H, W = 6, 4, 4
TINY = {"mlp": {"hidden": 8}, "cnn": {"hidden": 8}, "transformer": {"hidden": 8, "num_layers": 2, "num_heads": 2}}
GEOMETRIC = ["rotation_90", "rotation_180", "rotation_270", "mirror_h", "mirror_v"]


def _build(name: str, **extra):
    """A tiny, ready-to-use model of every family (closed-form ones fitted on random pairs)."""
    model = build_model(name, C, H, W, manipulation="rotation_90", **{**TINY.get(name, {}), **extra})
    if model.closed_form:
        x = torch.randn(8, C, H, W)
        model.fit(SufficientStats(C).update(model_input(model, x), 2 * x + 1))
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_family_keeps_shape_and_trains_if_trainable(name):
    model = _build(name)
    assert (model.channels, model.height, model.width) == (C, H, W)
    x = torch.randn(3, C, H, W)
    out = model(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    params = [p for p in model.parameters() if p.requires_grad]
    if not model.trainable:
        assert not params
        return
    assert params
    out.square().mean().backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert sum(p.grad.abs().sum() for p in params) > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rebuild_from_build_config_loads_state(name):
    model = _build(name).eval()
    clone = build_model(**model.build_config).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, C, H, W)
    torch.testing.assert_close(clone(x), model(x))


def test_build_model_errors():
    with pytest.raises(ValueError, match=r"unknown mapping model 'lin'; registered: .*linear"):
        build_model("lin", C, H, W)
    with pytest.raises(ValueError, match=r"mlp: unknown hyper-parameter\(s\) 'hiden'; accepted: dropout, hidden"):
        build_model("mlp", C, H, W, hiden=8)
    with pytest.raises(ValueError, match="accepted: none"):
        build_model("linear", C, H, W, hidden=8)
    with pytest.raises(ValueError, match="'hidden' must be int"):
        build_model("mlp", C, H, W, hidden=8.0)
    with pytest.raises(ValueError, match="dropout must be in"):
        build_model("cnn", C, H, W, dropout=1.0)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        build_model("cnn", C, H, W, kernel_size=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        build_model("transformer", C, H, W, hidden=10, num_heads=4)
    with pytest.raises(ValueError, match="positional must be"):
        build_model("transformer", C, H, W, positional="sinusoidal")
    with pytest.raises(ValueError, match="channels must be a positive int"):
        build_model("linear", 0, H, W)
    with pytest.raises(ValueError, match="needs a manipulation"):
        build_model("spatial_only", C, H, W)
    with pytest.raises(ValueError, match="needs a geometric manipulation"):
        build_model("linear", C, H, W, manipulation="grayscale", apply_transform=True)
    with pytest.raises(ValueError, match="4×5 map into 5×4"):
        build_model("linear", C, 4, 5, manipulation="rotation_90", apply_transform=True)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 6, 4, 4\)"):
        build_model("linear", C, H, W)(torch.zeros(1, C, H, W + 1))
    with pytest.raises(ValueError, match="'positional' must be str"):
        build_model("transformer", C, H, W, positional=True)
    # Ray Tune samples numpy scalars: accepted and stored as the declared Python type.
    model = build_model("mlp", C, H, W, hidden=np.int64(8), dropout=np.float32(0.5))
    assert model.net[0].out_features == 8 and model.net[2].p == 0.5 and type(model.net[2].p) is float
    assert model_hparams("transformer") == {"hidden": 512, "num_layers": 4, "num_heads": 8, "dropout": 0.2,
                                            "positional": "none"}
    with pytest.raises(ValueError, match="unknown mapping model"):
        model_hparams("nope")


# Spec §6.2 table (transformer minus the reference's unused pre_norm LayerNorm(512): 1,024 values).
@pytest.mark.parametrize(("channels", "linear", "mlp", "cnn", "transformer"), [
    (128, 16_512, 131_712, 1_181_568, 8_543_872 - 1_024),
    (256, 65_792, 262_912, 2_361_600, 8_675_072 - 1_024),
    (512, 262_656, 525_312, 4_721_664, 8_937_472 - 1_024),
    (1024, 1_049_600, 1_050_112, 9_441_792, 9_462_272 - 1_024),
])
def test_parameter_counts_match_reference(channels, linear, mlp, cnn, transformer):
    expected = {"linear": linear, "mlp": mlp, "cnn": cnn, "transformer": transformer,
                "ridge": linear, "orthogonal_procrustes": linear, "additive": channels,
                "local_nonshared_linear": 9 * 9 * (channels**2 + channels), "identity": 0}
    with torch.device("meta"):
        for name, count in expected.items():
            assert count_parameters(build_model(name, channels, 9, 9)) == count, name


def test_learned_positions_add_embedding_parameters():
    base = count_parameters(build_model("transformer", C, H, W, **TINY["transformer"]))
    learned = build_model("transformer", C, H, W, **TINY["transformer"], positional="learned")
    assert count_parameters(learned) == base + H * W * 8


def test_identity_and_spatial_only_are_exact():
    x = torch.randn(2, C, H, W)
    assert torch.equal(build_model("identity", C, H, W)(x), x)
    assert torch.equal(build_model("spatial_only", C, H, W, manipulation="rotation_90")(x),
                       torch.from_numpy(np.rot90(x.numpy(), k=1, axes=(2, 3)).copy()))
    assert torch.equal(build_model("spatial_only", C, H, W, manipulation="mirror_v")(x), x.flip(2))
    assert torch.equal(build_model("spatial_only", C, H, W, manipulation="grayscale")(x), x)


def _pil_ops():
    return {"rotation_90": lambda im: im.rotate(90), "rotation_180": lambda im: im.rotate(180),
            "rotation_270": lambda im: im.rotate(270), "mirror_h": ImageOps.mirror, "mirror_v": ImageOps.flip}


@pytest.mark.parametrize("size", [5, 6])
def test_spatial_transform_matches_pil_and_project_manipulations(size):
    # "Features" of an image under the identity backbone are its pixels as (C, H, W).
    rng = np.random.default_rng(size)
    img = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))

    def features(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    project_ops = {m.name: m.apply for m in expand({"rotation": [90, 180, 270], "mirror": ["h", "v"]})}
    assert set(project_ops) == set(GEOMETRIC)
    for name in GEOMETRIC:
        expected = spatial_transform(features(img), name)
        assert torch.equal(features(_pil_ops()[name](img)), expected), name
        assert torch.equal(features(project_ops[name](img)), expected), name
    assert not is_geometric("rotation_45")
    assert torch.equal(spatial_transform(features(img), "rotation_45"), features(img))
    assert all(is_geometric(name) for name in GEOMETRIC)


@pytest.mark.parametrize("name", ["linear", "ridge", "transformer"])
def test_apply_wrapper_is_transform_then_inner(name):
    model = _build(name, apply_transform=True).eval()
    assert isinstance(model, SpatialThenMap)
    assert model.trainable == model.inner.trainable and model.closed_form == model.inner.closed_form
    x = torch.randn(2, C, H, W)
    torch.testing.assert_close(model(x), model.inner(torch.rot90(x, 1, dims=(2, 3))))


def test_closed_form_models_fit_and_refuse_before_fit():
    for name in ("ridge", "orthogonal_procrustes"):
        model = build_model(name, C, H, W)
        with pytest.raises(NotFittedError, match="fit"):
            model(torch.zeros(1, C, H, W))
        with pytest.raises(NotFittedError):
            linear_weights(model)
    # Wrapped ridge learns the content change after the exact rotation: y = 3·rot(x) − 1.
    model = build_model("ridge", C, H, W, manipulation="mirror_h", apply_transform=True, gamma=1e-9)
    x = torch.randn(16, C, H, W, dtype=torch.float64)
    y = 3 * x.flip(-1) - 1
    model.fit(SufficientStats(C).update(model_input(model, x), y))
    weight, bias = linear_weights(model)
    torch.testing.assert_close(weight, 3 * torch.eye(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(bias, -torch.ones(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x.float()), y.float(), atol=1e-4, rtol=0)


def test_linear_weights_only_for_shared_affine_families():
    model = build_model("linear", C, H, W)
    weight, bias = linear_weights(model)
    assert weight.shape == (C, C) and bias.shape == (C,)
    x = torch.randn(2, C, H, W)
    torch.testing.assert_close(model(x), torch.einsum("oc,bchw->bohw", weight, x) + bias[:, None, None])
    for name in ("mlp", "additive", "local_nonshared_linear", "identity"):
        assert linear_weights(_build(name)) is None


def test_local_nonshared_linear_maps_each_position_separately():
    model = build_model("local_nonshared_linear", C, 2, 3)
    x = torch.randn(4, C, 2, 3)
    out = model(x)
    for i in range(2):
        for j in range(3):
            expected = x[:, :, i, j] @ model.weight[i, j].T + model.bias[i, j]
            torch.testing.assert_close(out[:, :, i, j], expected)
    bound = (6 / (2 * C)) ** 0.5
    assert model.weight.abs().max() <= bound and model.weight.std() > bound / 3


def test_additive_adds_learned_offset():
    model = build_model("additive", C, H, W)
    x = torch.randn(2, C, H, W)
    assert torch.equal(model(x), x)  # δ starts at zero
    with torch.no_grad():
        model.delta.copy_(torch.arange(C, dtype=torch.float32))
    torch.testing.assert_close(model(x), x + torch.arange(C, dtype=torch.float32)[:, None, None])


def test_transformer_positional_equivariance():
    x = torch.randn(2, C, H, W)
    perm = torch.randperm(H * W, generator=torch.Generator().manual_seed(0))

    def permuted(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2)[:, :, perm].reshape(t.shape)

    plain = build_model("transformer", C, H, W, **TINY["transformer"]).eval()
    torch.testing.assert_close(plain(permuted(x)), permuted(plain(x)), atol=1e-5, rtol=1e-5)
    learned = build_model("transformer", C, H, W, **TINY["transformer"], positional="learned").eval()
    with torch.no_grad():
        learned.pos_embed.normal_()  # trunc-normal std 0.02 is tiny; make the difference plain
    assert (learned(permuted(x)) - permuted(learned(x))).abs().max() > 1e-2


def test_adam_fits_known_linear_map():
    torch.manual_seed(0)
    a = torch.eye(C) + 0.5 * torch.randn(C, C)
    b = torch.randn(C)
    model = build_model("linear", C, H, W)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(250):
        x = torch.randn(16, C, H, W)
        y = torch.einsum("oc,bchw->bohw", a, x) + b[:, None, None]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weight, bias = linear_weights(model)
    identity_error = (torch.eye(C) - a).norm()
    assert (weight - a).norm() < 0.02 * identity_error
    assert (bias - b).norm() < 0.02 * b.norm()
