"""Registry shapes at the real architectures' sizes (meta device: no weights, no compute)."""

import pytest

from featmap_ray import backbones
from featmap_ray.config import BackboneRequest


@pytest.mark.parametrize(
    "name, expected",
    [
        ("convnext_base", {"stage0": (128, 72, 72), "stage1": (256, 36, 36), "stage2": (512, 18, 18), "stage3": (1024, 9, 9)}),
        ("swinv2_base", {"stage1": (256, 48, 48), "stage2": (512, 24, 24), "stage3": (1024, 12, 12)}),
        ("dinov3_vitb16", {"block6": (768, 14, 14), "block9": (768, 14, 14), "final": (768, 14, 14)}),
        ("resnet50", {"final": (2048, 7, 7)}),
    ],
)
def test_registered_backbones_have_the_paper_shapes(name, expected):
    spec = backbones.get_spec(name)
    req = BackboneRequest(name=name, pretrained=False)
    assert backbones.feature_shapes(spec, req, list(spec.default_layers)) == expected


def test_any_timm_model_by_name_uses_features_only_stages():
    spec = backbones.get_spec("resnet18")
    assert spec.features_only and spec.default_layers == ("stage0", "stage1", "stage2", "stage3", "stage4")
    shapes = backbones.feature_shapes(spec, BackboneRequest(name="resnet18", pretrained=False), ["stage4"])
    assert shapes == {"stage4": (512, 7, 7)}


def test_unknown_backbone_and_layer_are_named():
    with pytest.raises(ValueError, match="not_a_model"):
        backbones.get_spec("not_a_model")
    with pytest.raises(ValueError, match="stage9.*available"):
        backbones.resolve_layers(backbones.get_spec("convnext_base"), ["stage9"])


def test_missing_pretrained_weights_fail_with_where_to_put_them(tmp_path):
    spec = backbones.get_spec("convnext_base")
    with pytest.raises(backbones.WeightsNotFound) as err:
        backbones.check_weights(spec, BackboneRequest(name="convnext_base"))  # HF_HUB_OFFLINE=1 in tests
    msg = str(err.value)
    assert "convnext_base.fb_in22k_ft_in1k" in msg and "timm/convnext_base.fb_in22k_ft_in1k" in msg and "checkpoint" in msg
    with pytest.raises(backbones.WeightsNotFound, match="w.safetensors"):
        backbones.check_weights(spec, BackboneRequest(name="convnext_base", checkpoint=str(tmp_path / "w.safetensors")))


def test_local_checkpoint_is_loaded_not_random(tmp_path):
    import torch
    from safetensors.torch import save_file

    tiny = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
    spec = backbones.get_spec("convnext_base")
    source = backbones.build_model(spec, BackboneRequest(name="convnext_base", pretrained=False, init_seed=7, model_kwargs=tiny))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    req = BackboneRequest(name="convnext_base", checkpoint=str(path), model_kwargs=tiny)
    backbones.check_weights(spec, req)
    loaded = backbones.build_model(spec, req)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
