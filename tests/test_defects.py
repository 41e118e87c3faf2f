"""Defects of issue 19 (item 6), each pinned by a test that failed before its fix: a group whose members
all fail, normalisation statistics that follow the table, study stage runs that end FAILED, a backbone
build that leaves the caller's RNG alone, tracking that leaves os.environ alone, float rotation params,
`featinv-viz --help`, and VAE memory savers only where the VAE has them. (FeatInv's resume order is
tested in test_featinv_train.py, next to the training it runs.)"""

from __future__ import annotations

import os
import shutil
import time
from types import SimpleNamespace

import lance
import numpy as np
import pytest
import torch
from PIL import Image

from featmap_ray import backbones, cli
from featmap_ray.config import BackboneRequest, Config, EditConfig, MappingTraining
from featmap_ray.io import tables, tracking
from featmap_ray.layout import Layout
from featmap_ray.manipulations import direct, semantic
from featmap_ray.mapping import loop, models
from featmap_ray.mapping.grid import RunSpec
from featmap_ray.stages import pairs as data
from featmap_ray.stages import synthetic as mt
from tests import ray_cluster
from tests.conftest import TINY_BACKBONES

SHAPE = (4, 3, 3)
CPU = torch.device("cpu")


def _cfg(tmp_path, **mlflow) -> Config:
    return Config.model_validate({"storage": str(tmp_path / "store"), "dataset": {"name": "t", "root": str(tmp_path)},
                                  "mapping": {"study": "s"}, "mlflow": mlflow})


# -- 1. a mapping group whose members all fail ------------------------------------------------------

def test_a_group_whose_members_all_fail_records_each_failure(tmp_path, single_torch_thread):
    mt.write_tables(str(tmp_path), shape=SHAPE, n_train=12, n_test=2)
    pairs = data.load_pairs(tables.Store(str(tmp_path)), dataset="t", backbone=mt.BACKBONE, layer=mt.LAYER,
                            manipulation="hue_shift_60", split="train")
    train, val = data.train_val_split(pairs, 0.25, seed=0)
    training = MappingTraining(max_epochs=2, patience=2, lr=1e-2, batch_size=4, accumulate=1)
    specs = [RunSpec("t", "g", mt.BACKBONE, mt.LAYER, "hue_shift_60", model, "mse", {"mse": 1.0}, False, False, hp)
             for model, hp in (("linear", {}), ("mlp", {"hidden": 8}))]
    group = [loop.Member(s, s.key, training, shape=SHAPE, norm=None, loss_options={}, device=CPU) for s in specs]
    for m in group:
        m.optimiser.param_groups[0]["lr"] = 1e30  # after the first step, every prediction overflows
    loop.fit_group(group, data.PairLoader(train, batch_size=4, shuffle_seed=1), data.PairLoader(val, batch_size=4), CPU)
    assert [m.status for m in group] == ["failed", "failed"]
    for m in group:  # each failure names its own run and where it happened
        assert f"run {m.key}, epoch 0, step 2" in m.error and "not finite" in m.error


# -- 2. normalisation statistics follow the table, not its row count --------------------------------

def _expected_stats(originals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std + 1e-6 over (maps, H, W): ChannelStats' definition."""
    values = originals.astype(np.float64).transpose(1, 0, 2, 3).reshape(originals.shape[1], -1)
    return values.mean(1), values.std(1) + 1e-6


def _cached_stats(root: str) -> data.ChannelStats:
    return data.cached_channel_stats(tables.Store(root), dataset="t", backbone=mt.BACKBONE, layer=mt.LAYER)


def _assert_stats(stats: data.ChannelStats, originals: np.ndarray) -> None:
    mean, std = _expected_stats(originals)
    # float32 maps summed in float64 by blocks vs numpy at once: equal to ~1e-12; 1e-9 leaves room.
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.std, std, rtol=1e-9, atol=1e-9)
    assert stats.count == len(originals)


def test_normalisation_statistics_follow_the_table_not_its_row_count(tmp_path, monkeypatch, ray_session):
    root = str(tmp_path)
    n_train = 8
    first = mt.write_tables(root, n_train=n_train, n_test=2, shape=SHAPE, seed=0)[tables.ORIGINAL][:n_train]
    _assert_stats(_cached_stats(root), first)
    assert Layout(root).norm_stats("t", mt.BACKBONE, mt.LAYER).exists()
    with monkeypatch.context() as patched:  # nothing changed: read from the cache, not computed again
        patched.setattr(data, "channel_stats", lambda *args, **kwargs: pytest.fail("statistics computed again"))
        _assert_stats(_cached_stats(root), first)

    # The features table made again with other maps of the same images: same row count, other statistics.
    shutil.rmtree(tables.Store(root).layout.features(mt.BACKBONE, mt.LAYER))
    second = mt.write_tables(root, n_train=n_train, n_test=2, shape=SHAPE, seed=1)[tables.ORIGINAL][:n_train]
    _assert_stats(_cached_stats(root), second)

    # Another selection of the dataset's images, of the same size: t0000 leaves it, u0000 joins it.
    others = mt.write_tables(root, dataset="u", n_train=n_train, n_test=0, shape=SHAPE, seed=2)[tables.ORIGINAL]
    images = lance.dataset(tables.Store(root).layout.images)
    images.update({"dataset": "'u'"}, where="source_id = 't0000'")
    images.update({"dataset": "'t'"}, where="source_id = 'u0000'")
    _assert_stats(_cached_stats(root), np.concatenate([others[:1], second[1:]]))


# -- 4. an exception inside a stage ends its MLflow run FAILED --------------------------------------

def _status(cfg: Config, run_name: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking.tracking_uri(cfg))
    [run] = client.search_runs([tracking.experiment_id(cfg)], filter_string=f"attributes.run_name = '{run_name}'")
    return run.info.status


@pytest.mark.slow  # starts its own Ray
def test_an_exception_inside_a_stage_ends_its_mlflow_runs_failed(tmp_path, monkeypatch):
    import ray

    from featmap_ray.stages import analyze

    def lost(refs):
        raise RuntimeError("a worker died")

    cfg = _cfg(tmp_path)
    monkeypatch.setattr(ray, "get", lost)  # the stage's Ray tasks fail after its run was opened
    with pytest.raises(RuntimeError, match="a worker died"):
        analyze.run_analyze(cfg)
    assert _status(cfg, "s:analyze") == "FAILED"
    assert _status(cfg, "s") == "FAILED"  # the study's run, which the stage set running

    with pytest.raises(RuntimeError, match="stage body"), tracking.stage_run(cfg, "ingest"):
        raise RuntimeError("stage body")
    assert _status(cfg, "ingest") == "FAILED"


# -- 5. building a model leaves the caller's random state alone --------------------------------------

def test_building_a_backbone_leaves_the_global_rng_alone_and_depends_only_on_init_seed():
    spec = backbones.get_spec("convnext_base")

    def build(init_seed: int) -> dict[str, torch.Tensor]:
        request = BackboneRequest(name="convnext_base", pretrained=False, init_seed=init_seed,
                                  model_kwargs=TINY_BACKBONES["convnext_base"])
        return backbones.build_model(spec, request).state_dict()

    torch.manual_seed(123)
    before = torch.get_rng_state()
    weights = build(7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)  # another global state: the same weights
    again = build(7)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    other = build(8)
    assert any(not torch.equal(weights[k], other[k]) for k in weights if weights[k].is_floating_point())


# -- 6. tracking setup leaves os.environ alone --------------------------------------------------------

def test_tracking_setup_leaves_the_environment_alone(tmp_path):
    cfg = _cfg(tmp_path)
    def ours():
        # MLflow names each process's telemetry session in the environment on its first use there, whoever
        # calls it: not ours to leave alone (the test may be the first MLflow use of its process).
        return {k: v for k, v in os.environ.items() if not k.startswith("_MLFLOW_TELEMETRY")}

    before = ours()
    tracking.experiment_id(cfg)
    assert tracking.find_experiment_id(cfg) is not None
    with tracking.stage_run(cfg, "ingest"):
        pass
    assert ours() == before
    assert _status(cfg, "ingest") == "FINISHED"


def test_looking_up_an_unreachable_server_is_quick_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    from mlflow.utils import rest_utils

    down = _cfg(tmp_path, tracking_uri=f"http://127.0.0.1:{ray_cluster.free_ports(1)[0]}")  # nothing listens there
    before = dict(os.environ)
    seen = []
    request = rest_utils.http_request

    def recording(*args, **kwargs):
        seen.append(dict(os.environ))
        return request(*args, **kwargs)

    monkeypatch.setattr(rest_utils, "http_request", recording)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"cannot read {down.mlflow.tracking_uri}"):
        tracking.find_experiment_id(down)
    # No retries: MLflow's default (7, with backoff) takes minutes on a refused connection.
    assert time.monotonic() - started < 20
    assert seen and all(env == before for env in seen)
    assert dict(os.environ) == before


# -- 7. float-valued rotation params keep their geometric baseline -----------------------------------

@pytest.mark.parametrize("degrees, k", [(90.0, 1), (180.0, 2), (270.0, 3)])
def test_a_float_rotation_is_the_integer_rotation(degrees, k):
    [as_float] = direct.expand({"rotation": [degrees]})
    [as_int] = direct.expand({"rotation": [int(degrees)]})
    assert as_float.name == as_int.name == f"rotation_{int(degrees)}"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(as_float.apply(img)), np.asarray(as_int.apply(img)))
    # The mapping side: a geometric manipulation, whose spatial-only baseline is the exact rotation.
    assert models.is_geometric(as_float.name)
    x = torch.randn(2, 3, 5, 5)
    baseline = models.build_model("spatial_only", 3, 5, 5, manipulation=as_float.name)
    assert torch.equal(baseline(x), torch.rot90(x, k, dims=(-2, -1)))


def test_an_off_axis_float_rotation_stays_non_geometric():
    [m] = direct.expand({"rotation": [45.5]})
    assert m.name == "rotation_45.5" and not models.is_geometric(m.name)


# -- 8. `featinv-viz --help` names where its outputs go ----------------------------------------------

def test_featinv_viz_help_names_its_output_folder(capsys):
    root, study = "/storage", "the_study"
    folder = str(Layout(root).featinv_viz(study)).removeprefix(root + "/").replace(study, "<study>")
    with pytest.raises(SystemExit):
        cli.main(["featinv-viz", "--help"])
    text = "".join(capsys.readouterr().out.split())  # unwrapped, as a path is never cut
    assert f"<storage>/{folder}" in text
    assert "reports/<study>/featinv_viz" not in text


# -- 9. VAE slicing and tiling only where the VAE has them -------------------------------------------

class _TilingOnlyVae:
    def __init__(self):
        self.enabled = []

    def enable_tiling(self):
        self.enabled.append("tiling")


class _MixinVae(_TilingOnlyVae):
    """diffusers' AutoencoderMixin: enable_slicing exists but raises for a VAE without slicing."""

    def enable_slicing(self):
        raise NotImplementedError("Slicing doesn't seem to be implemented for _MixinVae.")


@pytest.mark.parametrize("vae_class", [_TilingOnlyVae, _MixinVae])
def test_the_semantic_editor_enables_only_what_the_vae_has(vae_class, monkeypatch):
    vae = vae_class()
    pipe = SimpleNamespace(vae=vae)
    pipe.to = lambda *args, **kwargs: pipe
    monkeypatch.setattr(semantic, "tiny_pipeline", lambda: pipe)
    assert semantic.load_pipeline(EditConfig(model=semantic.TINY, vae_tiling=True)) is pipe
    assert vae.enabled == ["tiling"]
