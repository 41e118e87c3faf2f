"""FeatInv training through Ray Train on tiny models: the loss goes down, a re-run resumes, a NaN loss stops."""

import io

import lance
import mlflow
import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image

from featmap_ray.config import BackboneRequest
from featmap_ray.featinv import loading, metrics
from featmap_ray.io import tables, tracking
from featmap_ray.stages import extract, ingest
from featmap_ray.stages import featinv_train as train
from tests.conftest import TINY_BACKBONES, make_config, tiny_backbone, write_image

pytestmark = pytest.mark.usefixtures("ray_session")

# The reference's training text (spec §10.4: tutorial_train_featinv.py), without the ", " that its
# sampling code appends (spec §10.6).
TRAINING_PROMPT = "a high-quality, detailed, and professional image"


def _config(storage, root, **training):
    featinv = {"base_model": "tiny", "encoder_hidden_channels": 16, "sampling": {"steps": 2},
               "training": {"batch_size": 2, "log_every": 1, "sample_every": 3, "checkpoint_every": 3,
                            "sample_steps": 2, **training}}
    return make_config(storage, root, featinv=featinv)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i in range(6):
        write_image(root / "images" / "train" / f"c{i % 2}" / f"{i}.png", size=(64, 64), seed=10 + i)
    cfg = _config(tmp_path_factory.mktemp("store"), root)
    ingest.run(cfg)
    extract.run(cfg)  # for features_source: table
    return cfg


def _reference_backbone():
    torch.manual_seed(0)  # = BackboneRequest.init_seed
    return timm.create_model("convnext_base", pretrained=False, **TINY_BACKBONES["convnext_base"]).eval()


VIEW = T.Compose([T.Resize(288), T.CenterCrop(288)])
NORMALISE = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def _eval_batch(cfg):
    """Every stored image as (pixels in [-1, 1] at the model's 16×16, ConvNeXt final map of the 288 view)."""
    pngs = lance.dataset(tables.Store(cfg.storage).layout.images).to_table(columns=["image"])["image"].to_pylist()
    views = [VIEW(Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs]
    with torch.no_grad():
        features = _reference_backbone().forward_features(torch.stack([NORMALISE(v) for v in views]))
    pixels = torch.stack([T.ToTensor()(v.resize((16, 16), Image.BILINEAR)) for v in views]) * 2 - 1
    return pixels, features


def _denoising_loss(components, pixels, features) -> float:
    """Independent definition: ε-prediction MSE at fixed noise and timesteps, conditioned on the training prompt."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    with torch.no_grad():
        latents = components.vae.encode(pixels).latent_dist.mean * components.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
        t = torch.linspace(50, 999, len(pixels)).long()
        noisy = scheduler.add_noise(latents, noise, t)
        text = components.encode_prompt([TRAINING_PROMPT]).expand(len(pixels), -1, -1)
        down, mid = components.controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=features,
                                          return_dict=False)
        pred = components.unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample
    return float(((pred - noise) ** 2).mean())


def test_conditioning_flips_the_view_and_its_feature_map_together():
    probe = metrics.BackboneProbe(BackboneRequest(**tiny_backbone("convnext_base")), "stage3")
    views = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 288, 288, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(1)
    flipped = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < flipped.sum() < 6
    pixels, features = train.conditioning({"pixels": views}, probe, True, generator)
    reference = _reference_backbone()
    for i in range(6):
        expected = views[i].flip(1) if flipped[i] else views[i]
        assert torch.equal(pixels[i], expected)
        with torch.no_grad():
            ref = reference.forward_features(NORMALISE(Image.fromarray(expected.numpy()))[None])[0]
        torch.testing.assert_close(features[i], ref, atol=1e-4, rtol=1e-4)


def test_table_mode_pairs_each_stored_map_with_the_view_of_its_image(ingested):
    cfg = _config(ingested.storage, ingested.dataset.root, features_source="table")
    rows = train.training_dataset(cfg).take_all()
    st = tables.Store(cfg.storage)
    features = lance.dataset(st.layout.features("convnext_base", "stage3")).to_table()
    stored = dict(zip(features["source_id"].to_pylist(), tables.tensor_numpy(features["feature"]), strict=True))
    images = {r["source_id"]: r["image"] for r in lance.dataset(st.layout.images).to_table().to_pylist()}
    assert len(rows) == len(stored) == 6
    for row in rows:
        [sid] = [s for s, f in stored.items() if np.array_equal(f, row["feature"])]
        expected = np.asarray(VIEW(Image.open(io.BytesIO(images[sid])).convert("RGB")))
        np.testing.assert_array_equal(row["pixels"], expected)


def test_training_lowers_the_loss_and_a_rerun_resumes_from_the_saved_step(ingested, tmp_path):
    cfg = _config(ingested.storage, ingested.dataset.root, lr=1e-2, max_steps=6, run_name="fit")
    pixels, features = _eval_batch(cfg)
    fresh = loading.build_featinv(loading.tiny_base_components(), feature_channels=64, encoder_hidden_channels=16)
    before = _denoising_loss(fresh, pixels, features)

    first = train.run(cfg)
    assert (first.start_step, first.step) == (0, 6)
    assert first.controlnet == f"{cfg.storage}/featinv/fit/controlnet"
    trained = loading.featinv_pipeline(cfg, first.controlnet)  # as `featinv.controlnet`: its published version
    after = _denoising_loss(trained, pixels, features)
    assert after < 0.95 * before, (before, after)

    cfg.featinv.training.max_steps = 8
    second = train.run(cfg)
    assert (second.start_step, second.step) == (6, 8)
    assert second.mlflow_run_id == first.mlflow_run_id
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    # Each run's final ControlNet: artefacts of the training's MLflow run, and a registered model version.
    run_id = first.mlflow_run_id
    for summary, version, step in ((first, "1", 6), (second, "2", 8)):
        assert summary.registered.registered == f"models:/featinv-convnext_base-stage3/{version}"
        assert summary.registered.uri == f"runs:/{run_id}/controlnet/step_{step:07d}"
        registered = client.get_model_version("featinv-convnext_base-stage3", version)
        assert (registered.run_id, registered.source) == (run_id, summary.registered.uri)
        assert registered.tags == {"run_name": "fit", "step": str(step)}
    logged = client.download_artifacts(run_id, "controlnet/step_0000006", str(tmp_path))
    weights = loading.load_featinv(logged, loading.tiny_base_components()).controlnet.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in trained.controlnet.state_dict().items())
    history = client.get_metric_history(first.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))  # every step logged once: no restart from 0
    samples = {a.path for a in client.list_artifacts(first.mlflow_run_id, "samples")}
    assert samples == {"samples/step_0000003.png", "samples/step_0000006.png"}
    grid = np.asarray(Image.open(client.download_artifacts(first.mlflow_run_id, "samples/step_0000006.png",
                                                           str(tmp_path))))
    assert grid.shape[:2] == (2 * 16, train.SAMPLES * 16)  # views over reconstructions


def _fit_in_this_process(cfg, storage_path):
    """Ray Train local mode (the loop in this process): the same loop as `train.run`, minus worker startup."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(train.train_loop, train_loop_config={"cfg": cfg.model_dump(mode="json")},
                           datasets={"train": train.training_dataset(cfg)}, dataset_config=train.ingest_config(),
                           scaling_config=ray.train.ScalingConfig(num_workers=0),
                           run_config=ray.train.RunConfig(name=cfg.featinv.training.run_name,
                                                          storage_path=str(storage_path)))
    return trainer.fit()


def test_training_encodes_the_training_prompt_and_the_sample_grid_the_sampling_prompt(ingested, tmp_path,
                                                                                       monkeypatch):
    from featmap_ray.featinv.pipeline import FeatInvPipeline

    cfg = _config(ingested.storage, ingested.dataset.root, max_steps=1, sample_every=1, run_name="prompt",
                  features_source="table")
    assert cfg.featinv.training.prompt == TRAINING_PROMPT
    assert cfg.featinv.sampling.prompt == TRAINING_PROMPT + ", "  # the reference's sampling text (spec §10.6)
    encoded = []
    encode = FeatInvPipeline.encode_prompt

    def recording(pipe, prompts):
        encoded.append(list(prompts))
        return encode(pipe, prompts)

    monkeypatch.setattr(FeatInvPipeline, "encode_prompt", recording)
    _fit_in_this_process(cfg, tmp_path)
    # The training text and the dropped-out text "", then the grid's conditional and unconditional texts.
    assert encoded == [[TRAINING_PROMPT, ""], [cfg.featinv.sampling.prompt], [cfg.featinv.sampling.negative_prompt]]


def test_a_resumed_run_trains_on_the_batches_an_uninterrupted_run_trains_on(ingested, tmp_path, monkeypatch):
    """6 rows in batches of 2: 3 steps an epoch. Resumed from the checkpoint of step 2, steps 3-5 (the
    rest of epoch 0, then epoch 1) see what the uninterrupted run saw at steps 3-5."""
    import ray.train

    seen, checkpoints = [], {}
    loss, report = train.diffusion_loss, ray.train.report

    def recording(pipe, controlnet, pixels, *args):
        seen.append(pixels.cpu().clone())
        return loss(pipe, controlnet, pixels, *args)

    def keeping(metrics, checkpoint=None, **kwargs):  # every checkpoint, not only the last
        if checkpoint is not None:
            kept = checkpoint.to_directory(str(tmp_path / f"step_{metrics['step']}"))
            checkpoints[metrics["step"]] = ray.train.Checkpoint.from_directory(kept)
        return report(metrics, checkpoint=checkpoint, **kwargs)

    monkeypatch.setattr(train, "diffusion_loss", recording)
    monkeypatch.setattr(ray.train, "report", keeping)
    cfg = _config(ingested.storage, ingested.dataset.root, max_steps=5, checkpoint_every=2, sample_every=100,
                  run_name="order", features_source="table")
    _fit_in_this_process(cfg, tmp_path / "straight")
    uninterrupted = list(seen)
    assert len(uninterrupted) == 5 and not torch.equal(uninterrupted[0], uninterrupted[2])
    seen.clear()
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoints[2])  # what Ray Train hands a restarted run
    _fit_in_this_process(cfg, tmp_path / "resumed")
    assert len(seen) == 3
    for step, (resumed, expected) in enumerate(zip(seen, uninterrupted[2:], strict=True), 3):
        assert torch.equal(resumed, expected), f"step {step}: another batch than the uninterrupted run's"


def test_a_non_finite_loss_stops_training_and_names_the_step(ingested, tmp_path):
    cfg = _config(ingested.storage, ingested.dataset.root, lr=1e30, max_steps=5, run_name="nan",
                  features_source="table")
    with pytest.raises(Exception) as failure:
        _fit_in_this_process(cfg, tmp_path)
    error = failure.value
    while not isinstance(error, train.NonFiniteLoss) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, train.NonFiniteLoss), repr(failure.value)
    assert "at step 2 " in str(error) and "featinv.training.lr" in str(error)


def test_run_reraises_the_workers_own_error():
    from ray.train import WorkerGroupError

    nan = train.NonFiniteLoss("the loss is nan at step 2")
    assert train.first_worker_error(WorkerGroupError("worker 1 failed", {1: nan})) is nan
    other = RuntimeError("controller")
    assert train.first_worker_error(other) is other
