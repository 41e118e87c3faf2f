"""Provenance of the mapping study (issue 19): a run records its own settings and the features groups it
read; `fit` resumes only what the same settings made, refuses a run whose settings changed (unless
--overwrite), retrains a run whose input features changed, and evaluate / analyze / report refuse runs
and results that are stale.

One small study (two linear runs, two epochs) is fitted once for the module and changed by the tests in
order: the same settings again, another learning rate, then features made by other settings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from featmap_ray import cli
from featmap_ray.io import tables, tracking
from featmap_ray.mapping import artefacts
from featmap_ray.stages import analyze, base, evaluate, fit, report, runtime
from featmap_ray.stages import synthetic as mt
from tests.test_mapping_study import SHAPE, study_config

LR = 0.02
EXTRACTED = {"backbone": mt.BACKBONE, "init_seed": 0}  # the settings the features groups are recorded with


def config(storage, *, lr: float = LR, overwrite: bool = False):
    """Two runs, one per manipulation (so one per fused group), without normalisation (no Ray Data pass)."""
    cfg = study_config(storage, targets=[{"backbone": mt.BACKBONE, "layers": [mt.LAYER], "normalise": False}],
                       datasets={"t": {"hue": {"manipulations": ["hue_shift_60"], "models": ["linear"]},
                                       "rot": {"manipulations": ["rotation_90"], "models": ["linear"]}}},
                       training={"max_epochs": 2, "patience": 2, "lr": lr, "batch_size": 8, "accumulate": 1})
    return cfg.model_copy(update={"overwrite": overwrite})


def features_uri(cfg) -> str:
    return tables.Store(cfg.storage).layout.features(mt.BACKBONE, mt.LAYER)


def published(cfg) -> dict[str, tuple[str, int, bytes]]:
    """run key -> (its published version, run.json's mtime and bytes): what a retrain would change."""
    out = {}
    for directory in artefacts.finished_runs(cfg):
        run_json = artefacts.published_version(directory) / artefacts.RUN_FILE
        out[directory.name] = (str(run_json.parent), run_json.local_path.stat().st_mtime_ns, run_json.read_bytes())
    return out


def mlflow_runs(cfg) -> int:
    from mlflow import MlflowClient

    return len(MlflowClient(tracking.tracking_uri(cfg)).search_runs([tracking.experiment_id(cfg)]))


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_session):
    storage = tmp_path_factory.mktemp("provenance")
    mt.write_tables(str(storage), shape=SHAPE, n_train=12, n_test=4)
    cfg = config(storage)
    # What `extract` records for each group of the features table it writes.
    tables.write_provenance(features_uri(cfg), {variant: base.Provenance(EXTRACTED).to_json()
                                                for variant in (tables.ORIGINAL, "hue_shift_60", "rotation_90")})
    summary = fit.run_study(cfg)
    assert summary.failed == {} and len(summary.fitted) == 2 and summary.retrained == {}
    return {"storage": storage, "cfg": cfg}  # "cfg": the settings the published runs were last fitted with


def test_a_published_run_records_its_settings_and_the_features_groups_it_read(study):
    cfg = study["cfg"]
    uri = features_uri(cfg)
    fingerprint = base.Provenance(EXTRACTED).fingerprint
    for directory in artefacts.finished_runs(cfg):
        info = artefacts.read_info(directory)
        manipulation = info["spec"]["manipulation"]
        assert info["provenance"]["inputs"] == {base.input_key(cfg.storage, uri, tables.ORIGINAL): fingerprint,
                                                base.input_key(cfg.storage, uri, manipulation): fingerprint}
        settings = info["provenance"]["settings"]
        assert settings["mapping.training.lr"] == LR and settings["spec.model"] == "linear"
        assert settings["mapping.resources.num_workers"] == 1
        assert base.run_staleness(cfg.storage, info) == []
    [state] = fit.status(cfg)
    assert (state.state, state.detail) == ("up to date", "2 of 2 runs finished")


def test_the_same_settings_skip_every_run_without_training(study, monkeypatch):
    import ray.tune

    def no_tune(*args, **kwargs):
        raise AssertionError("Ray Tune started although every run is finished")

    cfg = study["cfg"]
    before = published(cfg)
    monkeypatch.setattr(ray.tune, "Tuner", no_tune)
    summary = fit.run_study(cfg)
    assert summary.fitted == [] and summary.groups == 0 and summary.retrained == {}
    assert sorted(summary.skipped) == sorted(before)
    assert published(cfg) == before


def test_another_training_setting_refuses_before_anything_then_overwrite_retrains(study, tmp_path, monkeypatch,
                                                                                 capsys):
    def no_ray(cfg):
        raise AssertionError("Ray was started before fit refused")

    cfg = study["cfg"]
    before, runs_before = published(cfg), mlflow_runs(cfg)
    path = tmp_path / "study.yaml"
    path.write_text(cfg.dump())
    monkeypatch.setattr(runtime, "init_ray", no_ray)
    assert cli.main(["fit", "--config", str(path), "mapping.training.lr=0.05"]) == 1
    err = capsys.readouterr().err
    assert "mapping.training.lr: 0.02 -> 0.05" in err and "--overwrite" in err
    assert all(key in err for key in before)
    assert "max_epochs" not in err  # only what changed is named
    assert published(cfg) == before and mlflow_runs(cfg) == runs_before  # nothing trained, no MLflow run

    summary = fit.run_study(config(study["storage"], lr=0.05, overwrite=True))
    assert sorted(summary.fitted) == sorted(before) and summary.failed == {}
    assert summary.retrained == dict.fromkeys(before, fit.SETTINGS_CHANGED)
    assert "retrained 2 (settings changed, --overwrite)" in str(summary)
    after = published(cfg)
    for key, info in ((d.name, artefacts.read_info(d)) for d in artefacts.finished_runs(cfg)):
        assert after[key][0] != before[key][0]  # a new version of each run
        assert info["provenance"]["settings"]["mapping.training.lr"] == 0.05 and info["training"]["lr"] == 0.05
    study["cfg"] = config(study["storage"], lr=0.05)
    fit.validate_study(study["cfg"])  # the new settings are now the recorded ones: no refusal


def test_features_made_by_other_settings_make_their_runs_stale_until_fit_retrains_them(study):
    cfg = study["cfg"]
    # Results computed from the runs as they are now (evaluate's own recording is checked at the end).
    digests = {d.name: artefacts.read_info(d)["digest"] for d in artefacts.finished_runs(cfg)}
    evaluate.write_results(cfg, "evaluations", pd.DataFrame({"run": sorted(digests), "cos_median_upper": 1.0}), digests)
    assert report.stale_results(cfg) == {}
    before = published(cfg)
    [rotation] = [key for key in before if "rotation_90" in key]
    [hue] = [key for key in before if "hue_shift_60" in key]

    # rotation_90's features made again by other settings, as `extract --overwrite` does to a group:
    # its provenance recorded, its rows replaced.
    uri = features_uri(cfg)
    other = base.Provenance({**EXTRACTED, "init_seed": 1})
    old = tables.open_table(uri).to_table(filter="variant = 'rotation_90'")
    tables.write_provenance(uri, {"rotation_90": other.to_json()})
    tables.delete_rows(uri, "variant = 'rotation_90'")
    doubled = tables.tensor_array(2 * tables.tensor_numpy(old["feature"]))
    tables.commit_new_rows(uri, old.set_column(old.schema.get_field_index("feature"), "feature",
                                               pa.chunked_array([doubled])))

    for refuses in (evaluate.run_evaluate, analyze.run_analyze):
        with pytest.raises(ValueError, match="Run `featmap fit` first") as refused:
            refuses(cfg)
        assert rotation in str(refused.value) and "made by other settings since" in str(refused.value)
        assert hue not in str(refused.value)
    with pytest.raises(ValueError, match=f"run {rotation}: .*made by other settings since"):
        report.check_evaluations(cfg)
    [runs_state] = fit.status(cfg)
    assert runs_state.state == "stale" and rotation in runs_state.detail
    [results_state] = evaluate.status(cfg)
    assert results_state.state == "stale" and rotation in results_state.detail
    assert published(cfg) == before  # refusing wrote nothing

    summary = fit.run_study(cfg)
    assert summary.fitted == [rotation] and summary.skipped == [hue] and summary.failed == {}
    assert summary.retrained == {rotation: fit.INPUTS_CHANGED}
    assert "retrained 1 (input features changed)" in str(summary)
    after = published(cfg)
    assert after[hue] == before[hue] and after[rotation][0] != before[rotation][0]
    info = artefacts.read_info(artefacts.runs_root(cfg) / rotation)
    assert info["provenance"]["inputs"][base.input_key(cfg.storage, uri, "rotation_90")] == other.fingerprint
    assert fit.status(cfg)[0].state == "up to date"

    # The evaluations were computed from the run before it was retrained: stale until evaluate runs again.
    with pytest.raises(ValueError, match=f"run {rotation}: retrained since"):
        report.check_evaluations(cfg)
    frame = evaluate.run_evaluate(cfg)
    assert {hue, rotation} <= set(frame["run"]) and np.isfinite(frame["cos_median_upper"]).all()
    report.check_evaluations(cfg)
    assert [s.state for s in evaluate.status(cfg)] == ["up to date"]
