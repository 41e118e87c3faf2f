"""Classifier tails on tiny random timm models, and probability metrics against scipy/numpy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONES, tiny_backbone

from featmap_ray import backbones
from featmap_ray.config import BackboneRequest
from featmap_ray.evaluation.classifier import (
    ClassifierUnavailable,
    classifier_tail,
    probability_metrics,
)


def _model(name: str, **model_kwargs):
    spec = backbones.get_spec(name)
    request = BackboneRequest(**tiny_backbone(name))
    request = request.model_copy(update={"model_kwargs": {**request.model_kwargs, **model_kwargs}})
    return spec, backbones.build_model(spec, request)


def _check_tails(spec, model, layers):
    x = torch.randn(2, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        taps = backbones.forward_taps(model, spec, layers, x)
        assert not torch.allclose(logits[0], logits[1])  # the two images are told apart
        for layer in layers:
            tail = classifier_tail(model, spec, layer)
            torch.testing.assert_close(tail(taps[layer]), logits, atol=1e-4, rtol=0, msg=layer)
            # the logits really come from the given features
            assert not torch.allclose(tail(taps[layer].flip(0)), logits, atol=1e-4)


@pytest.mark.parametrize("name", ["convnext_base", "swinv2_base", "resnet50"])
def test_tail_of_every_registered_layer_reproduces_the_logits(name):
    spec, model = _model(name)
    _check_tails(spec, model, list(spec.taps))


def test_tail_uses_a_finetuned_head_of_any_size():
    spec, model = _model("convnext_base", num_classes=7)
    _check_tails(spec, model, ["stage1", "stage3"])
    stored = torch.randn(1, 64, 9, 9).half()  # features as stored: the tail computes in the model's dtype
    assert classifier_tail(model, spec, "stage3")(stored).shape == (1, 7)


def test_resnet_tail_from_earlier_taps():
    # not registered layers, but the same rule: stem activation (index 0) and layer2 (index 2)
    spec = dataclasses.replace(backbones.get_spec("resnet50"), input_size=64, taps={"stem": 0, "layer2": 2})
    _, model = _model("resnet50")
    _check_tails(spec, model, ["stem", "layer2"])


def test_finetuned_checkpoint_keeps_its_head(tmp_path):
    from safetensors.torch import save_file

    spec, source = _model("convnext_base", num_classes=7)
    torch.nn.init.normal_(source.head.fc.weight)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "ft.safetensors"))
    request = BackboneRequest(name="convnext_base", checkpoint=str(tmp_path / "ft.safetensors"),
                              model_kwargs={**TINY_BACKBONES["convnext_base"], "num_classes": 7})
    loaded = backbones.build_model(spec, request)
    features = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(classifier_tail(loaded, spec, "stage3")(features),
                                   classifier_tail(source, spec, "stage3")(features))


def test_unavailable_and_bad_input_are_explained():
    spec, model = _model("dinov3_vitb16")
    with pytest.raises(ClassifierUnavailable, match="CLS/register tokens"):
        classifier_tail(model, spec, "final")
    generic = backbones.get_spec("resnet18")
    with pytest.raises(ClassifierUnavailable, match="features_only"):
        classifier_tail(backbones.build_model(generic, BackboneRequest(name="resnet18", pretrained=False)), generic, "stage4")
    spec, model = _model("convnext_base")
    with pytest.raises(ValueError, match="no layer 'stage7'"):
        classifier_tail(model, spec, "stage7")
    with pytest.raises(ValueError, match=r"expected \[B, 32, H, W\]"):
        classifier_tail(model, spec, "stage2")(torch.zeros(1, 64, 18, 18))


# ---- probability metrics ----

def reference_metrics(p_orig, p_edit, p_mapped, labels) -> dict[str, float]:
    """From the definitions, row by row; top-k by rank = number of strictly larger probabilities."""
    probs = {"orig": p_orig, "edit": p_edit, "mapped": p_mapped}
    k5 = min(5, p_orig.shape[1])
    n = len(labels)

    def in_top(p, cls, k):
        return np.sum(p > p[cls]) < k

    out = {}
    for name, p in probs.items():
        out[f"top1_label_{name}"] = np.mean([in_top(p[i], labels[i], 1) for i in range(n)])
        out[f"top5_label_{name}"] = np.mean([in_top(p[i], labels[i], k5) for i in range(n)])
        h = np.array([-sum(v * np.log(v) for v in p[i] if v > 0) / np.log(p.shape[1]) for i in range(n)])
        out[f"entropy_{name}_mean"], out[f"entropy_{name}_std"] = h.mean(), h.std()
    for a, b in (("orig", "mapped"), ("edit", "mapped"), ("orig", "edit")):
        out[f"agree_top1_{a}_{b}"] = np.mean([probs[a][i].argmax() == probs[b][i].argmax() for i in range(n)])
    for other in ("mapped", "edit"):
        out[f"agree_top5_orig_{other}"] = np.mean([in_top(probs[other][i], p_orig[i].argmax(), k5) for i in range(n)])
    for a, b in (("orig", "edit"), ("orig", "mapped"), ("edit", "mapped")):
        jsd = np.array([_jsd_bits_row(probs[a][i], probs[b][i]) for i in range(n)])
        out[f"jsd_{a}_{b}_mean"], out[f"jsd_{a}_{b}_std"] = jsd.mean(), jsd.std()
    for other in ("edit", "mapped"):
        d = np.abs(p_orig.max(1) - probs[other].max(1))
        out[f"maxprob_diff_{other}_mean"], out[f"maxprob_diff_{other}_std"] = d.mean(), d.std()
    out["n_samples"] = n
    return out


def _jsd_bits_row(p: np.ndarray, q: np.ndarray) -> float:
    """½ KL(p‖m) + ½ KL(q‖m) in bits, m = (p + q)/2, with 0 log 0 = 0."""
    m = (p + q) / 2
    return sum(0.5 * a * np.log2(a / mi) for pq in (p, q) for a, mi in zip(pq, m) if a > 0)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("n_classes", [12, 3])  # 3 < 5: "top-5" is top-3
def test_probability_metrics_match_definitions(n_classes):
    rng = np.random.default_rng(1)
    logits = 2.0 * rng.normal(size=(40, n_classes))
    p_orig = _softmax(logits)
    p_edit = _softmax(logits + 1.5 * rng.normal(size=logits.shape))
    p_mapped = _softmax(logits + 0.7 * rng.normal(size=logits.shape))
    labels = np.where(rng.random(40) < 0.6, logits.argmax(1), rng.integers(0, n_classes, 40))
    got = probability_metrics(torch.tensor(p_orig, dtype=torch.float32), p_edit, p_mapped, torch.tensor(labels))
    want = reference_metrics(p_orig, p_edit, p_mapped, labels)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    if n_classes == 3:
        assert got["top5_label_edit"] == 1.0 and got["agree_top5_orig_mapped"] == 1.0
    else:  # the metrics are not trivially saturated
        assert 0 < got["agree_top1_orig_edit"] < got["agree_top1_orig_mapped"] < 1


def test_jsd_and_entropy_bounds():
    uniform = np.full((2, 8), 1 / 8)
    one_hot = np.eye(8)[[0, 3]]
    other = np.eye(8)[[5, 6]]  # disjoint from one_hot
    labels = np.array([0, 3])

    m = probability_metrics(one_hot, one_hot, one_hot, labels)
    assert m["jsd_orig_mapped_mean"] == 0.0 and m["entropy_orig_mean"] == pytest.approx(0.0, abs=1e-9)
    m = probability_metrics(one_hot, other, uniform, labels)
    assert m["jsd_orig_edit_mean"] == 1.0 and m["jsd_orig_edit_std"] == 0.0  # disjoint supports: exactly 1 bit
    assert m["entropy_mapped_mean"] == pytest.approx(1.0, abs=1e-9)
    assert m["maxprob_diff_mapped_mean"] == pytest.approx(1 - 1 / 8)
    # symmetric, and <= 1 on random and sparse inputs
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.full(8, 0.1), size=50)
    q = rng.dirichlet(np.full(8, 0.1), size=50)
    pq = probability_metrics(p, q, q, rng.integers(0, 8, 50))
    qp = probability_metrics(q, p, p, rng.integers(0, 8, 50))
    assert pq["jsd_orig_edit_mean"] == pytest.approx(qp["jsd_orig_edit_mean"], abs=1e-12)
    assert pq["jsd_orig_edit_std"] == pytest.approx(qp["jsd_orig_edit_std"], abs=1e-12)
    assert 0 < pq["jsd_orig_edit_mean"] <= pq["jsd_orig_edit_mean"] + pq["jsd_orig_edit_std"] <= 1


def test_probability_metrics_reject_bad_input():
    p = np.full((4, 6), 1 / 6)
    labels = np.arange(4)
    with pytest.raises(ValueError, match=r"p_mapped: expected probabilities \[N, K\].*K = 6"):
        probability_metrics(p, p, np.full((4, 5), 0.2), labels)
    with pytest.raises(ValueError, match="p_edit: expected softmax probabilities"):
        probability_metrics(p, 2 * p, p, labels)
    with pytest.raises(ValueError, match=r"labels: expected integer class indices in \[0, 6\)"):
        probability_metrics(p, p, p, np.array([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="N = 4"):
        probability_metrics(p, p, p[:3], labels[:3])


# ---- evaluation of mapping models on the task's device ----

def test_task_device_is_cuda_only_with_a_ray_gpu_that_torch_can_use(monkeypatch):
    import ray

    from featmap_ray.stages.evaluate import task_device

    assert task_device() == torch.device("cpu")  # this machine: no GPU
    for gpu_ids, cuda, want in [([], False, "cpu"), ([0], False, "cpu"), ([], True, "cpu"), (["0"], True, "cuda")]:
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "get_gpu_ids", lambda ids=gpu_ids: ids)
        monkeypatch.setattr(torch.cuda, "is_available", lambda ok=cuda: ok)
        assert task_device() == torch.device(want), (gpu_ids, cuda)


def _np_feature_summary(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean over samples of the per-sample feature metrics, from the definitions: per-position
    cosine, its median by the upper rule (element ⌊n/2⌋ of the sorted cosines), mean, 5 % quantile; MSE."""
    p = pred.reshape(*pred.shape[:2], -1)
    t = target.reshape(*target.shape[:2], -1)
    cos = np.sort((p * t).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1)), axis=1)
    return {"cos_median_upper": cos[:, cos.shape[1] // 2].mean(), "cos_mean": cos.mean(),
            "cos_q05": np.quantile(cos, 0.05, axis=1).mean(), "mse": ((p - t) ** 2).mean(), "n_samples": len(p)}


class Flip(torch.nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.flip(-1)


def test_score_models_batch_by_batch_matches_the_definitions():
    from featmap_ray.stages.evaluate import score_models, task_device

    spec, model = _model("convnext_base")
    tail = classifier_tail(model, spec, "stage2")  # 32 × 18 × 18: an even number of positions
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 32, 18, 18, generator=gen)
    y = x.flip(-1) + 0.5 * torch.randn(5, 32, 18, 18, generator=gen)
    labels = torch.randint(0, 10, (5,), generator=gen).numpy()
    conv = torch.nn.Conv2d(32, 32, 1)
    models = [({"model": "identity"}, torch.nn.Identity()), ({"model": "conv"}, conv),
              ({"model": "flip"}, Flip())]
    rows = score_models(models, x, y, labels, tail, batch_size=2, device=task_device())  # 5 pairs: batches 2, 2, 1

    with torch.no_grad():
        mapped = {"identity": x, "conv": conv(x), "flip": x.flip(-1)}
        p = {name: _softmax(tail(t).double().numpy()) for name, t in {"x": x, "y": y, **mapped}.items()}
    assert [r["model"] for r in rows] == ["identity", "conv", "flip"]
    for row in rows:
        name = row["model"]
        want = {**_np_feature_summary(mapped[name].double().numpy(), y.double().numpy()),
                **reference_metrics(p["x"], p["y"], p[name], labels)}
        assert set(row) == {"model", *want}
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
    assert rows[2]["cos_median_upper"] > rows[0]["cos_median_upper"]  # the flip is the better map
    assert next(conv.parameters()).device.type == "cpu"

    no_tail = score_models(models[:1], x, y, labels, None, batch_size=3)
    assert set(no_tail[0]) == {"model", "cos_median_upper", "cos_mean", "cos_q05", "mse", "n_samples"}
    assert no_tail[0]["cos_median_upper"] == pytest.approx(rows[0]["cos_median_upper"], rel=1e-9)
