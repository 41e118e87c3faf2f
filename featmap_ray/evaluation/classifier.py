"""Classifier agreement: classify tapped (or mapped) feature maps with the backbone's own head.

`classifier_tail` turns a timm classifier into the function "feature map at layer L -> logits",
so original, edited and mapped feature maps of that layer can be classified alike.
`probability_metrics` compares the three sets of softmax probabilities (spec §8.3).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy
from torch import nn

from featmap_ray.backbones import BackboneSpec
from featmap_ray.config import BackboneRequest, Config


def classifier_request(cfg: Config, backbone: str) -> BackboneRequest:
    """The classifier for a backbone's features: evaluate.classifier, else the extracted backbone."""
    if cfg.evaluate.classifier is not None and cfg.evaluate.classifier.name == backbone:
        return cfg.evaluate.classifier
    for request in cfg.extract.backbones:
        if request.name == backbone:
            return request
    return BackboneRequest(name=backbone)


class ClassifierUnavailable(ValueError):
    """The logits cannot be computed from this backbone's tapped feature map."""


class ClassifierTail(nn.Module):
    """The rest of a classifier from a tapped NCHW feature map: remaining blocks (which include
    the final norm where the tap precedes it), then the model's own `forward_head`."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], channels: int, channels_last: bool):
        super().__init__()
        self.model = model  # registered so that .to()/.eval() reach the head as well
        self.blocks = nn.Sequential(*blocks)
        self.channels = channels
        self.channels_last = channels_last  # SwinV2 blocks and head work on NHWC

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4 or features.shape[1] != self.channels:
            raise ValueError(f"features: expected [B, {self.channels}, H, W] (NCHW), got {tuple(features.shape)}")
        x = features.to(next(self.model.parameters()).dtype)  # stored features may be float16
        x = x.permute(0, 2, 3, 1) if self.channels_last else x
        return self.model.forward_head(self.blocks(x))


def classifier_tail(model: nn.Module, spec: BackboneSpec, layer: str) -> ClassifierTail:
    """Logits from the NCHW feature map that `forward_taps(model, spec, [layer], x)` returns, such
    that tail(forward_taps(...)[layer]) == model(x). Works for any head (pretrained or fine-tuned,
    any num_classes): the tail shares the given model's modules.

    ConvNeXt: stages k+1..3 -> norm_pre -> head. SwinV2: stages k+1..3 -> final norm -> head on
    NHWC (the last stage's tap is already normed: head only). ResNet: remaining layers -> global
    pool + fc. Raises ClassifierUnavailable for `features_only` models (no head was built) and for
    ViTs such as DINOv3 (the tap is normed with CLS/register tokens dropped, so the token sequence
    the remaining blocks and head need cannot be rebuilt).
    """
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    if layer not in spec.taps:
        raise ValueError(f"backbone {spec.name!r} has no layer {layer!r}; available: {list(spec.taps)}")
    if spec.features_only:
        raise ClassifierUnavailable(
            f"backbone {spec.name!r} is tapped through timm features_only, which builds no classifier "
            "head; register it in featmap_ray.backbones to classify its features")
    index = spec.taps[layer]
    if isinstance(model, ConvNeXt | SwinTransformerV2):
        stages = model.stages if isinstance(model, ConvNeXt) else model.layers
        final_norm = model.norm_pre if isinstance(model, ConvNeXt) else model.norm
        # forward_taps applies the final norm only to the last stage and only when spec.norm is set
        tap_is_normed = spec.norm and index == len(stages) - 1
        blocks = [*stages[index + 1:], *([] if tap_is_normed else [final_norm])]
    elif isinstance(model, ResNet):
        # taps: 0 = stem activation (before the maxpool), i = output of layer{i}
        layers = [model.layer1, model.layer2, model.layer3, model.layer4]
        blocks = [model.maxpool, *layers] if index == 0 else layers[index:]
    else:
        why = ("its taps are normed patch-token grids with the CLS/register tokens dropped, so the token "
               "sequence the remaining blocks and the head need cannot be rebuilt from them"
               if hasattr(model, "cls_token") else "there is no rule for the rest of this architecture")
        raise ClassifierUnavailable(f"backbone {spec.name!r} ({type(model).__name__}): {why}; classifier "
                                    "agreement is available for ConvNeXt, SwinV2 and ResNet backbones")
    channels = model.feature_info[index]["num_chs"]
    return ClassifierTail(model, blocks, channels, channels_last=isinstance(model, SwinTransformerV2))


def _probabilities(name: str, p, n_classes: int | None) -> np.ndarray:
    p = np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2 or (n_classes is not None and p.shape[1] != n_classes):
        raise ValueError(f"{name}: expected probabilities [N, K] with N > 0, K >= 2"
                         f"{'' if n_classes is None else f' and K = {n_classes}'}, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-2):
        raise ValueError(f"{name}: expected softmax probabilities (finite, >= 0, rows summing to 1)")
    return p / p.sum(1, keepdims=True)


def _top_k(p: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-p, axis=1, kind="stable")[:, :k]


def _normalised_entropy(p: np.ndarray) -> np.ndarray:
    return entropy(p, axis=1) / np.log(p.shape[1])


def _jsd_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence in bits, in [0, 1] (scipy's distance, squared)."""
    return np.clip(jensenshannon(p, q, base=2, axis=1) ** 2, 0.0, 1.0)


def probability_metrics(p_orig, p_edit, p_mapped, labels) -> dict[str, float]:
    """Agreement metrics from softmax probabilities [N, K] (numpy or torch) of the original, the
    edited (true target) and the mapped feature maps, with labels [N] (the original's class, as
    the reference). Rows are renormalised to sum to 1. Keys:

    - top{1,5}_label_{orig,edit,mapped}: accuracy against labels;
    - agree_top1_{orig,edit}_mapped, agree_top1_orig_edit: equal argmax;
    - agree_top5_orig_mapped, agree_top5_orig_edit: the original's top-1 among the other's top-5;
    - entropy_{orig,edit,mapped}_{mean,std}: H(p)/ln K with H = -sum p ln p, 0 ln 0 = 0 (scipy.stats.entropy);
    - jsd_{orig_edit,orig_mapped,edit_mapped}_{mean,std}: Jensen–Shannon divergence, bits, [0, 1]
      (scipy.spatial.distance.jensenshannon, base 2, squared);
    - maxprob_diff_{edit,mapped}_{mean,std}: |max p_orig - max p_other|;
    - n_samples.

    "Top-5" is top-min(5, K) when there are fewer than 5 classes. Stds are population stds (ddof 0).
    """
    p_orig = _probabilities("p_orig", p_orig, None)
    n, n_classes = p_orig.shape
    p_edit = _probabilities("p_edit", p_edit, n_classes)
    p_mapped = _probabilities("p_mapped", p_mapped, n_classes)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if p_edit.shape[0] != n or p_mapped.shape[0] != n or labels.shape != (n,):
        raise ValueError(f"expected N = {n} rows everywhere, got p_edit {p_edit.shape}, p_mapped {p_mapped.shape}, "
                         f"labels {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels: expected integer class indices in [0, {n_classes}), got dtype {labels.dtype} "
                         f"and range [{labels.min()}, {labels.max()}]")

    k5 = min(5, n_classes)
    probs = {"orig": p_orig, "edit": p_edit, "mapped": p_mapped}
    top5 = {name: _top_k(p, k5) for name, p in probs.items()}
    top1 = {name: t[:, 0] for name, t in top5.items()}
    out: dict[str, float] = {}
    for name in probs:
        out[f"top1_label_{name}"] = float(np.mean(top1[name] == labels))
        out[f"top5_label_{name}"] = float(np.mean((top5[name] == labels[:, None]).any(1)))
    for a, b in (("orig", "mapped"), ("edit", "mapped"), ("orig", "edit")):
        out[f"agree_top1_{a}_{b}"] = float(np.mean(top1[a] == top1[b]))
    for other in ("mapped", "edit"):
        out[f"agree_top5_orig_{other}"] = float(np.mean((top5[other] == top1["orig"][:, None]).any(1)))

    per_sample = {f"entropy_{name}": _normalised_entropy(p) for name, p in probs.items()}
    for a, b in (("orig", "edit"), ("orig", "mapped"), ("edit", "mapped")):
        per_sample[f"jsd_{a}_{b}"] = _jsd_bits(probs[a], probs[b])
    for other in ("edit", "mapped"):
        per_sample[f"maxprob_diff_{other}"] = np.abs(p_orig.max(1) - probs[other].max(1))
    for key, values in per_sample.items():
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std())
    out["n_samples"] = n
    return out
