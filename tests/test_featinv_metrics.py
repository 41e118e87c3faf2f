"""Per-image reconstruction metrics against independent computations (no Ray)."""

import numpy as np
import pytest
import torch

from featmap_ray.featinv import metrics


def test_reconstruction_rows_store_the_lower_median_cosine():
    """The per-row cosine of a reconstruction is torch.median's lower middle value (FeatInv's rule),
    through the reconstruct job's own call site, on planted maps of 2×3 = 6 positions (even)."""
    from types import SimpleNamespace

    from PIL import Image

    from featmap_ray.stages import reconstruct

    cosines = np.array([[0.9, -0.2, 0.5, 0.1, 0.7, 0.3],  # sorted: -0.2 0.1 0.3 | 0.5 0.7 0.9
                        [0.0, 0.8, -0.6, 0.4, 0.2, 0.6]])  # sorted: -0.6 0.0 0.2 | 0.4 0.6 0.8
    angles = np.arccos(cosines).reshape(2, 2, 3)
    source = torch.from_numpy(np.stack([np.cos(angles), np.sin(angles)], axis=1)).float()  # (2, 2, 2, 3)
    recon_map = torch.zeros(2, 2, 2, 3)
    recon_map[:, 0] = 2.0  # e_x at every position: the cosine at a position is the planted value

    images = [Image.new("RGB", (8, 8))] * 2
    job = object.__new__(reconstruct.Reconstructor)  # no models: the pipeline and the probe are stand-ins
    job.sampling = SimpleNamespace(steps=1, guidance=1.0, prompt="", negative_prompt="", control_scale=1.0)
    job.pipe = lambda features, generator, **kw: SimpleNamespace(images=images)
    job.store = None
    job.probe = SimpleNamespace(features=lambda pixels: recon_map, has_classifier=False)
    rows = [{"source_id": sid, "variant": "original", "seed": 100} for sid in ("a", "b")]
    job._reconstruct(source, rows)
    assert [r["cos_median_lower"] for r in rows] == pytest.approx([0.3, 0.2], abs=1e-6)  # upper: 0.5, 0.4


def test_classifier_agreement_top1_and_top5():
    source = torch.tensor([[0.0, 9, 0, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 7]])
    recon = torch.tensor([[0.0, 9, 0, 0, 0, 0, 0], [5.5, 9, 8, 7, 6, 5, 0], [9, 8, 7, 6, 5, 4, 3]])
    top1, match1, match5 = metrics.classifier_agreement(source, recon)
    assert top1.tolist() == [1, 0, 6]
    assert match1.tolist() == [True, False, False]
    assert match5.tolist() == [True, True, False]
