"""The demo's FeatInv reconstructs: trained by `featmap featinv-train` from random weights (a tiny Stable
Diffusion base on the images first, then the ControlNet), its reconstructions of stored feature maps carry
the coarse colour and layout of their own source image, and a second run trains nothing."""

import io

import lance
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featmap_ray.io import tables
from featmap_ray.stages import extract, featinv_train, ingest, reconstruct
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("ray_session")

IMAGES = 8


def planted_image(i: int) -> np.ndarray:
    """64×64: four flat quadrants, each a colour of a seeded palette, so images differ in colour and layout."""
    colours = np.random.default_rng(100 + i).integers(0, 256, (2, 2, 3), dtype=np.uint8)
    return np.kron(colours, np.ones((32, 32, 1), dtype=np.uint8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i in range(IMAGES):
        path = root / "images" / "train" / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(planted_image(i)).save(path)
    # As conf/demo.yaml, smaller: 32 px, 8 images; the briefly trained ControlNet sampled at control_scale 3.
    featinv = {"base_model": "trained", "encoder_hidden_channels": 32, "sampling": {"steps": 20, "control_scale": 3.0},
               "base_training": {"image_size": 32, "latent_size": 4, "vae_width": 16, "vae_steps": 150,
                                 "unet_steps": 250, "batch_size": 8},
               "training": {"run_name": "demo-like", "features_source": "table", "split": None, "lr": 3e-3,
                            "batch_size": 8, "max_steps": 500, "log_every": 10, "sample_every": 1000,
                            "checkpoint_every": 1000}}
    cfg = make_config(tmp_path_factory.mktemp("store"), root, featinv=featinv)
    ingest.run(cfg)
    extract.run(cfg)
    summary = featinv_train.run(cfg)
    cfg.featinv.controlnet = summary.controlnet
    reconstruct.run(cfg)
    return cfg, summary


def _small(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> float (N, 3, 32, 32) in [0, 1], area-averaged."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(x, size=(32, 32), mode="area")


def test_reconstructions_match_their_own_source_and_differ(trained):
    cfg, _ = trained
    uri = tables.Store(cfg.storage).layout.reconstructions("convnext_base", "stage3")
    rows = lance.dataset(uri).to_table(columns=["source_id", "image"]).to_pylist()
    sources = {r["source_id"]: r for r in lance.dataset(tables.Store(cfg.storage).layout.images).to_table(
        columns=["source_id", "image"], filter="variant = 'original'").to_pylist()}
    assert len(rows) == len(sources) == IMAGES
    order = sorted(sources)
    truth = _small([np.asarray(Image.open(io.BytesIO(sources[s]["image"])).convert("RGB")) for s in order])
    by_source = {r["source_id"]: np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows}
    made = _small([by_source[s] for s in order])
    distances = ((made[:, None] - truth[None]) ** 2).mean(dim=(2, 3, 4))  # reconstruction × source
    own = (distances.argmin(dim=1) == torch.arange(IMAGES)).sum().item()
    # Chance finds 1 of 8 (an untrained ControlNet: one image for every map); 5 or more of 8 by chance has
    # probability 1.3e-3.
    assert own >= 5, (own, distances)
    # Different maps give different images (an untrained ControlNet gives one image for all: RMS ~0.003).
    pairwise = ((made[:, None] - made[None]) ** 2).mean(dim=(2, 3, 4)).sqrt()
    assert pairwise[~torch.eye(IMAGES, dtype=torch.bool)].min() > 0.03, pairwise


def test_a_second_run_trains_nothing(trained):
    cfg, first = trained
    versions = (featinv_train.Layout(cfg.storage).featinv_controlnet("demo-like").current(),
                featinv_train.Layout(cfg.storage).featinv_base("demo-like").current())
    again = featinv_train.run(cfg)
    assert again.up_to_date and again.step == first.step
    assert (featinv_train.Layout(cfg.storage).featinv_controlnet("demo-like").current(),
            featinv_train.Layout(cfg.storage).featinv_base("demo-like").current()) == versions
