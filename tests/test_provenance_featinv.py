"""Provenance of the FeatInv stages (issue 19): reconstruct and recon-eval resume only rows the same FeatInv
model and settings made, refuse others before writing (naming the change), and with overwrite recompute
exactly the affected group; featinv-train resumes only its own checkpoints. Tiny models, 2-3 DDIM steps."""

from __future__ import annotations

import io
import shutil

import lance
import numpy as np
import pytest
import torch
from PIL import Image

from featmap_ray import cli
from featmap_ray.featinv import identity, loading
from featmap_ray.io import tables, tracking
from featmap_ray.mapping import artefacts
from featmap_ray.mapping.grid import RunSpec
from featmap_ray.stages import (
    base,
    extract,
    featinv_train,
    ingest,
    manipulate,
    recon_eval,
    reconstruct,
)
from tests.conftest import make_config, tiny_backbone, write_image

pytestmark = pytest.mark.usefixtures("ray_session")

FEATINV = {"base_model": "tiny", "encoder_hidden_channels": 16,
           "sampling": {"steps": 2, "batch_size": 4, "rows_per_commit": 4, "variants": ["original", "rotation_90"]},
           "training": {"batch_size": 2, "max_steps": 1, "log_every": 1, "sample_every": 100, "checkpoint_every": 1,
                        "features_source": "table", "split": None, "run_name": "prov"}}
RECON_EVAL = {"reconstruction": {"subset_size": 2, "batch_size": 2, "rows_per_commit": 2,
                                 "judge": tiny_backbone("convnext_base")}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """3 test images and their rotation_90, extracted by the tiny ConvNeXt; reconstructed once (both variants)."""
    root = tmp_path_factory.mktemp("data")
    for i in range(3):
        write_image(root / "images" / "test" / f"c{i % 2}" / f"{i}.png", size=(64, 64), seed=30 + i)
    cfg = make_config(tmp_path_factory.mktemp("store"), root, manipulate={"ops": {"rotation": [90]}},
                      featinv=FEATINV, evaluate=RECON_EVAL)
    ingest.run(cfg)
    manipulate.run(cfg)
    extract.run(cfg)
    reconstruct.run(cfg)
    return cfg


def _uri(cfg) -> str:
    return tables.Store(cfg.storage).layout.reconstructions("convnext_base", "stage3")


def _rows(cfg, variant: str) -> dict[tuple, dict]:
    table = lance.dataset(_uri(cfg)).to_table(filter=f"variant = '{variant}'").to_pylist()
    return {(r["source_id"], r["generator"], r["seed"]): r for r in table}


def _perturbed_controlnet(cfg, folder, seed: int) -> str:
    """A ControlNet moved off its zero initialisation (so the maps steer the samples), saved to `folder`."""
    controlnet = loading.featinv_pipeline(cfg).controlnet
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    controlnet.save_pretrained(folder)
    return str(folder)


def _config_file(cfg, path) -> str:
    path.write_text(cfg.dump())
    return str(path)


def test_reconstruct_resumes_same_settings_and_refuses_others_before_writing(store, tmp_path, capsys):
    uri = _uri(store)
    version = lance.dataset(uri).version
    again = reconstruct.run(store)
    assert again.written == {uri: 0} and again.skipped == 6 and again.overwritten == 0
    assert lance.dataset(uri).version == version  # nothing written, not even the provenance
    [state] = reconstruct.status(store)
    assert state.state == "up to date", state
    # The features group each group's maps came from, as extract recorded it.
    features = tables.read_provenance(tables.Store(store.storage).layout.features("convnext_base", "stage3"))
    assert tables.read_provenance(uri)["extracted/rotation_90"]["inputs"] == {
        "features/convnext_base/stage3#rotation_90": features["rotation_90"]["fingerprint"]}

    config = _config_file(store, tmp_path / "c.yaml")
    assert cli.main(["reconstruct", "--config", config, "featinv.sampling.steps=3"]) == 1
    err = capsys.readouterr().err
    assert "featinv.sampling.steps: 2 -> 3" in err and "extracted/original" in err and "overwrite" in err, err
    folder = _perturbed_controlnet(store, tmp_path / "controlnet", seed=1)
    assert cli.main(["reconstruct", "--config", config, f"featinv.controlnet={folder}"]) == 1
    err = capsys.readouterr().err
    assert "featinv.controlnet: fresh from the base UNet" in err and "-> weights " in err, err
    assert lance.dataset(uri).version == version

    stale = store.model_copy(deep=True)
    stale.featinv.sampling.steps = 3
    [state] = reconstruct.status(stale)
    assert state.state == "stale" and "featinv.sampling.steps: 2 -> 3" in state.detail, state


def test_overwrite_recomputes_exactly_the_changed_group(store, tmp_path):
    """steps 3 for the originals only: their rows are made again (as a fresh root makes them), the
    rotation_90 rows, another group, stay as they were."""
    before = _rows(store, "rotation_90")
    changed = store.model_copy(deep=True)
    changed.featinv.sampling.steps, changed.featinv.sampling.variants, changed.overwrite = 3, ["original"], True
    report = reconstruct.run(changed)
    assert report.overwritten == 3 and report.written == {_uri(store): 3} and report.skipped == 0
    assert _rows(store, "rotation_90") == before
    recorded = tables.read_provenance(_uri(store))
    assert recorded["extracted/original"]["settings"]["featinv.sampling.steps"] == 3
    assert recorded["extracted/rotation_90"]["settings"]["featinv.sampling.steps"] == 2

    fresh = changed.model_copy(deep=True)
    fresh.storage, fresh.overwrite = str(tmp_path / "fresh"), False
    fresh.mlflow.tracking_uri = tracking.tracking_uri(store)
    shutil.copytree(store.storage, fresh.storage, ignore=shutil.ignore_patterns("reconstructions", "mlflow.db*",
                                                                                "mlartifacts"))
    reconstruct.run(fresh)
    got, want = _rows(store, "original"), _rows(fresh, "original")
    assert got.keys() == want.keys() and len(got) == 3
    for key, row in got.items():
        # Other actors and batches: equal up to float32 rounding, so a pixel may round the other way.
        a, b = (np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), int) for r in (row, want[key]))
        assert np.abs(a - b).max() <= 1, key
        assert row["cos_median_lower"] == pytest.approx(want[key]["cos_median_lower"], abs=1e-4)


# -- recon-eval ---------------------------------------------------------------------------------------

def _publish_run(cfg, loss: str, seed: int) -> str:
    """A finished linear mapping run of rotation_90 (random weights, seeded), published as `fit` would."""
    spec = RunSpec(dataset="t", group="g", backbone="convnext_base", layer="stage3", manipulation="rotation_90",
                   model="linear", loss_name=loss, loss={"mse": 1.0}, apply_transform=False, normalise=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = artefacts.build_mapping(spec, (64, 9, 9), None)
    st = tables.Store(cfg.storage)
    features = st.layout.features("convnext_base", "stage3")
    made = base.Provenance({"run": spec.key, "seed": seed},
                           base.input_fingerprints(cfg.storage, features, [tables.ORIGINAL, "rotation_90"]))
    artefacts.publish(st.layout.run(cfg.mapping.study, spec.key), model,
                      {"spec": spec.to_dict(), "digest": f"d{seed}", "shape": [64, 9, 9], "norm": None,
                       "provenance": made.to_json()})
    return spec.key


def _scores(cfg) -> dict[tuple, dict]:
    table = lance.dataset(recon_eval_uri(cfg)).to_table().to_pylist()
    return {(r["run"], r["source_id"]): r for r in table}


def recon_eval_uri(cfg) -> str:
    return tables.Store(cfg.storage).layout.results(cfg.mapping.study, recon_eval.RESULTS)


def test_recon_eval_groups_per_run_refuse_a_changed_model_and_a_refit_run(store, tmp_path):
    run_a, run_b = _publish_run(store, "mse", seed=1), _publish_run(store, "l1", seed=2)
    first = recon_eval.run(store)
    assert sum(first.written.values()) == 4 and first.failed == 0
    scored = _scores(store)
    version = lance.dataset(recon_eval_uri(store)).version
    [state] = recon_eval.status(store)
    assert state.state == "up to date", state

    other_model = store.model_copy(deep=True)
    other_model.featinv.controlnet = _perturbed_controlnet(store, tmp_path / "controlnet", seed=3)
    with pytest.raises(base.ProvenanceMismatch, match="featinv.controlnet: fresh from the base UNet") as refused:
        recon_eval.run(other_model)
    assert run_a in str(refused.value) and run_b in str(refused.value)
    assert lance.dataset(recon_eval_uri(store)).version == version

    _publish_run(store, "l1", seed=4)  # run b refit: another model under the same key
    with pytest.raises(base.ProvenanceMismatch, match="mapping run:") as refused:
        recon_eval.run(store)
    assert f"[{run_b}]" in str(refused.value) and run_a not in str(refused.value)
    assert lance.dataset(recon_eval_uri(store)).version == version

    overwrite = store.model_copy(update={"overwrite": True})
    again = recon_eval.run(overwrite)
    assert again.overwritten == 2 and sum(again.written.values()) == 2 and again.skipped == 2
    now = _scores(store)
    assert {k: v for k, v in now.items() if k[0] == run_a} == {k: v for k, v in scored.items() if k[0] == run_a}
    # Run b's rows were scored again, with its new model: the mapped maps moved by other amounts.
    assert all(now[k]["change_norm"] != pytest.approx(scored[k]["change_norm"], rel=1e-3) for k in now if k[0] == run_b)


# -- featinv-train ------------------------------------------------------------------------------------

def test_featinv_training_resumes_only_its_own_checkpoints(store):
    first = featinv_train.run(store)
    assert (first.start_step, first.step) == (0, 1)
    manifest = identity.read_manifest(store, tracking.model_source(store, first.controlnet))
    assert manifest["step"] == 1 and manifest["provenance"]["settings"]["featinv.training.lr"] == 1e-5
    [state] = featinv_train.status(store)
    assert state.state == "up to date", state

    changed = store.model_copy(deep=True)
    changed.featinv.training.lr, changed.featinv.training.max_steps = 1e-3, 2
    [state] = featinv_train.status(changed)
    assert state.state == "stale" and "featinv.training.lr: 1e-05 -> 0.001" in state.detail, state
    with pytest.raises(base.ProvenanceMismatch, match=r"featinv.training.lr: 1e-05 -> 0.001") as refused:
        featinv_train.run(changed)
    assert "checkpoint of run prov (step 1" in str(refused.value)
    # Nothing was trained: the published model is still the first one.
    assert identity.read_manifest(store, tracking.model_source(store, first.controlnet)) == manifest
