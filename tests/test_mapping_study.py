"""A study end to end on feature tables with a known ground truth: Ray Tune runs the grid, each run
is a Ray Train TorchTrainer, MLflow records it; then evaluate, analyze and report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pytest

from featmap_ray.config import Config
from featmap_ray.stages import synthetic as mt

TINY_CLASSIFIER = {"name": "convnext_base", "pretrained": False,
                   "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 8, 8, 16]}}
SHAPE = (16, 3, 3)  # = the tiny classifier's stage3, so its head can classify the maps


def study_config(storage: Path, **mapping) -> Config:
    data = {
        "storage": str(storage),
        "dataset": {"name": "t", "root": str(storage)},
        "extract": {"backbones": [{**TINY_CLASSIFIER, "layers": ["stage3"]}]},
        "mapping": {
            "study": "s",
            "targets": [{"backbone": "convnext_base", "layers": ["stage3"], "normalise": True}],
            "datasets": {"t": {"affine": {"manipulations": ["hue_shift_60"], "models": ["linear", "ridge"]},
                               "geometric_apply": {"manipulations": ["rotation_90"], "models": ["linear"],
                                                   "apply_transform": True}}},
            "losses": {"mse": "mse"},
            "model_hparams": {"ridge": {"gamma": 1e-6}},  # ~no shrinkage: the exact map must come back
            "training": {"max_epochs": 20, "patience": 20, "lr": 0.02, "batch_size": 16, "accumulate": 1},
            "resources": {"num_workers": 1},
            **mapping,
        },
        "evaluate": {"truncation_ranks": [1, 4]},
    }
    return Config.model_validate(data)


@pytest.fixture(scope="module")
def fitted_study(tmp_path_factory, ray_session):
    from featmap_ray.stages import fit

    storage = tmp_path_factory.mktemp("study")
    mt.write_tables(str(storage), shape=SHAPE)
    cfg = study_config(storage)
    summary = fit.run_study(cfg)
    return cfg, summary


def _mlflow_runs(cfg):
    import mlflow

    from featmap_ray.io import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    return mlflow.search_runs(experiment_names=[cfg.mlflow.experiment])


def test_grid_fits_every_run_and_ridge_recovers_the_affine_map(fitted_study):
    from featmap_ray.mapping.artefacts import finished_runs, load_run
    from featmap_ray.stages.analyze import raw_affine

    cfg, summary = fitted_study
    assert summary.failed == {} and len(summary.fitted) == 3
    assert summary.groups == 2  # hue_shift_60's two families train together, rotation_90 alone
    assert not list((Path(cfg.storage) / "mapping" / "train").glob("*"))  # finished groups leave no checkpoints
    runs = {load_run(d)[1].model + ("+apply" if load_run(d)[1].apply_transform else ""): load_run(d) for d in finished_runs(cfg)}
    assert set(runs) == {"linear", "ridge", "linear+apply"}
    a, b = mt.affine_truth(SHAPE[0])
    # Fitted in normalised space, read back in raw space: must be the generating A x + b.
    w, bias = raw_affine(runs["ridge"][0])
    np.testing.assert_allclose(w, a, atol=2e-3)
    np.testing.assert_allclose(bias, b, atol=5e-3)
    # The gradient-trained linear map approaches A; the apply-group map approaches the identity.
    w_lin, _ = raw_affine(runs["linear"][0])
    assert np.abs(w_lin - a).max() < 0.5 * np.abs(np.eye(SHAPE[0]) - a).max()
    history = runs["linear"][2]["history"]
    assert history[-1]["val_loss"] < 0.2 * history[0]["val_loss"]
    # The training means a rank-k truncation falls back to: the raw means of the training pairs.
    from featmap_ray.stages import mapping_train as train

    model, spec, info = runs["ridge"]
    plan = train.plan_group(cfg, [spec])
    assert plan.runs[0].digest == info["digest"]
    x, y = plan.train.read(np.arange(len(plan.train)))
    np.testing.assert_allclose(info["train_means"]["x"], x.astype(np.float64).mean((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(info["train_means"]["y"], y.astype(np.float64).mean((0, 2, 3)), rtol=1e-6)


def test_rerun_skips_finished_runs(fitted_study):
    from featmap_ray.stages import fit

    cfg, _ = fitted_study
    again = fit.run_study(cfg)
    assert again.fitted == [] and len(again.skipped) == 3


def test_mlflow_records_nested_runs_with_tags_metrics_and_artefacts(fitted_study):
    from mlflow import MlflowClient

    from featmap_ray.io import tracking

    cfg, _ = fitted_study
    runs = _mlflow_runs(cfg)
    parent = runs[runs["tags.mlflow.runName"] == "s:fit"]  # the fit stage run, under the study's run
    assert len(parent) == 1
    study = runs[runs["tags.mlflow.runName"] == "s"]
    assert len(study) == 1 and parent["tags.mlflow.parentRunId"].iloc[0] == study["run_id"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert len(children) == 3 and set(children["status"]) == {"FINISHED"}
    assert set(children["tags.model"]) == {"linear", "ridge"}
    assert set(children["tags.normalised"]) == {"True"} and set(children["tags.layer"]) == {"stage3"}
    client = MlflowClient(tracking.tracking_uri(cfg))
    linear = children[(children["tags.model"] == "linear") & (children["tags.group"] == "affine")].iloc[0]
    history = client.get_metric_history(linear["run_id"], "val_loss")
    assert len(history) == cfg.mapping.training.max_epochs  # one point per epoch
    names = {f.path for f in client.list_artifacts(linear["run_id"], "mapping")}
    assert {"mapping/model.safetensors", "mapping/run.json"} <= names
    # The features table the runs read, as a dataset input: its URI and the Lance version read.
    uri = f"{cfg.storage}/features/convnext_base/stage3.lance"
    for run_id in (parent["run_id"].iloc[0], linear["run_id"]):
        [read] = client.get_run(run_id).inputs.dataset_inputs
        assert read.dataset.name == "features/convnext_base/stage3" and uri in read.dataset.source
        assert read.dataset.digest == str(lance.dataset(uri).version)


def test_evaluate_scores_runs_and_baselines(fitted_study):
    from featmap_ray.stages import evaluate as stages

    cfg, _ = fitted_study
    frame = stages.run_evaluate(cfg).set_index(["manipulation", "model", "group"])
    assert len(frame) == 6  # 3 runs + identity (x2) + spatial_only
    assert frame.loc[("rotation_90", "spatial_only", "baseline"), "cos_median_upper"] == pytest.approx(1.0, abs=1e-6)
    assert frame.loc[("rotation_90", "identity", "baseline"), "cos_median_upper"] < 0.99
    assert frame.loc[("hue_shift_60", "ridge", "affine"), "cos_median_upper"] > 0.999
    assert frame.loc[("hue_shift_60", "linear", "affine"), "cos_median_upper"] > frame.loc[
        ("hue_shift_60", "identity", "baseline"), "cos_median_upper"]
    # Classifier agreement through the tiny ConvNeXt head; the exact map agrees with the edit.
    assert frame.loc[("rotation_90", "spatial_only", "baseline"), "agree_top1_edit_mapped"] == 1.0
    assert 0.0 <= frame["jsd_orig_mapped_mean"].min() and frame["jsd_orig_mapped_mean"].max() <= 1.0
    assert frame["n_samples"].eq(16).all()


def test_analyze_and_report(fitted_study):
    from featmap_ray.io import tables as store
    from featmap_ray.stages import analyze, report
    from featmap_ray.stages import evaluate as stages

    cfg, _ = fitted_study
    frames = analyze.run_analyze(cfg)
    svd = frames["svd"].set_index("model")
    assert len(frames["svd"]) == 3
    a, _ = mt.affine_truth(SHAPE[0])
    s = np.linalg.svd(a, compute_uv=False)
    assert svd.loc["ridge", "spectral_norm"] == pytest.approx(s[0], rel=1e-3)
    trunc = frames["truncation"]
    ridge = trunc[(trunc["model"] == "ridge") & (trunc["metric"] == "cos_median_upper")].set_index("k")["value"]
    assert list(ridge.index) == [1, 4, 16] and ridge[16] > 0.999 and ridge[1] < ridge[4] < ridge[16]
    wxb = frames["weight_bias"]
    assert set(wxb["family"]) == {"photometric", "geometric"}

    if store.open_table(stages.results_uri(cfg, "evaluations")) is None:
        stages.run_evaluate(cfg)
    summary = report.run_report(cfg)
    pngs = list(summary.parent.glob("*.png"))
    assert summary.exists() and len(pngs) >= 4
    assert "cos_median_upper" in summary.read_text()

    # Every stage has its run under the study's run, with the tables it read as inputs.
    from mlflow import MlflowClient

    from featmap_ray.io import tracking

    client = MlflowClient(tracking.tracking_uri(cfg))
    runs = _mlflow_runs(cfg).set_index("tags.mlflow.runName")
    for stage, tables in (("evaluate", {"features/convnext_base/stage3"}),
                          ("analyze", {"images", "features/convnext_base/stage3"}),
                          ("report", {"results/s/evaluations", "results/s/svd", "results/s/singular_values",
                                      "results/s/weight_bias", "results/s/truncation"})):
        run = runs.loc[f"s:{stage}"]
        assert run["tags.mlflow.parentRunId"] == runs.loc["s", "run_id"] and run["status"] == "FINISHED", stage
        inputs = client.get_run(run["run_id"]).inputs.dataset_inputs
        assert {i.dataset.name for i in inputs} == tables, stage


def test_bad_requests_fail_before_any_work(tmp_path, ray_session):
    from featmap_ray.stages import fit

    mt.write_tables(str(tmp_path), shape=SHAPE, n_train=4, n_test=2)
    bad = [
        ({"datasets": {"t": {"g": {"manipulations": ["hue_shift_60"], "models": ["lineer"]}}}}, "unknown model family 'lineer'"),
        ({"losses": {"x": "mse+cosine"}}, "cosine"),
        ({"datasets": {"t": {"g": {"manipulations": ["sepia"], "models": ["linear"]}}}}, "['sepia'] are not in the images table"),
        ({"targets": [{"backbone": "convnext_base", "layers": ["stage2"]}]}, "no features table"),
        ({"model_hparams": {"mlp": {"hiden": 3}}}, "hiden"),
    ]
    for mapping, message in bad:
        with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[").replace("]", r"\]")):
            fit.run_study(study_config(tmp_path, **mapping))
    assert not (tmp_path / "mapping" / "runs").exists()


@pytest.mark.slow
def test_sweep_keeps_the_best_trial(tmp_path, ray_session):
    from featmap_ray.mapping.artefacts import load_run
    from featmap_ray.stages import sweep

    mt.write_tables(str(tmp_path), shape=SHAPE, n_train=24, n_test=4)
    cfg = study_config(tmp_path, sweep={"model": "mlp", "manipulation": "hue_shift_60", "num_samples": 1,
                                        "grace_period": 1, "space": {"lr": {"type": "grid", "values": [1e-6, 3e-2]},
                                                                     "hidden": {"type": "choice", "values": [8]}}},
                       training={"max_epochs": 4, "batch_size": 8, "accumulate": 1})
    summary = sweep.run_sweep(cfg)
    assert summary["trials"] == 2 and summary["errors"] == 0
    assert summary["best_config"]["lr"] == pytest.approx(3e-2)  # 1e-6 cannot move in 4 epochs
    model, spec, info = load_run(summary["dir"])
    assert spec.hparams["hidden"] == 8 and info["best"]["val_loss"] == pytest.approx(summary["best_val_loss"])


@pytest.mark.slow
def test_killed_fit_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL the whole `featmap fit` (driver, Tune, Train), run the same command again: it goes on
    after the last checkpointed epoch."""
    from featmap_ray.mapping.artefacts import finished_runs, read_info

    mt.write_tables(str(tmp_path), shape=SHAPE, n_train=96, n_test=4)
    cfg = study_config(tmp_path, datasets={"t": {"g": {"manipulations": ["hue_shift_60"], "models": ["linear"]}}},
                       training={"max_epochs": 40, "patience": 40, "lr": 1e-4, "batch_size": 4, "accumulate": 1})
    path = tmp_path / "study.yaml"
    path.write_text(cfg.dump())
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    cmd = [sys.executable, "-m", "featmap_ray.cli", "fit", "--config", str(path), "ray.num_cpus=6"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    train_dir = tmp_path / "mapping" / "train"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(train_dir.glob("*/checkpoint_*"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(train_dir.glob("*/checkpoint_*"))) >= 1, "no checkpoint before the kill"
    assert not (tmp_path / "mapping" / "runs").exists(), "the run finished before the kill"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [run] = finished_runs(cfg)
    info = read_info(run)
    assert info["resumed_at"] and info["resumed_at"][0] >= 1  # continued after a finished epoch
    assert [h["epoch"] for h in info["history"]] == list(range(40))


def _train_worker_pids() -> list[int]:
    """PIDs of this Ray session's Ray Train worker processes (children of our raylet only: other
    Ray instances on the machine are not ours to touch)."""
    import ray

    parents, cmdlines = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdlines[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    ours = {ray._private.worker._global_node.all_processes["raylet"][0].process.pid}
    while True:
        more = {pid for pid, parent in parents.items() if parent in ours} - ours
        if not more:
            break
        ours |= more
    return [pid for pid in ours if b"RayTrainWorker" in cmdlines.get(pid, b"")]


@pytest.mark.slow
def test_a_killed_train_worker_restarts_within_the_command(tmp_path, ray_session, single_torch_thread):
    """SIGKILL the Train worker process (not the driver) mid-run: FailureConfig restarts it from the
    last checkpoint in the same `fit`, and the result is what an uninterrupted run gives."""
    import threading

    import torch

    from featmap_ray.mapping import loop
    from featmap_ray.mapping.artefacts import finished_runs, load_run
    from featmap_ray.stages import fit
    from featmap_ray.stages import mapping_train as train

    mt.write_tables(str(tmp_path), shape=SHAPE, n_train=96, n_test=4)
    cfg = study_config(tmp_path, datasets={"t": {"g": {"manipulations": ["hue_shift_60"], "models": ["mlp"]}}},
                       model_hparams={"mlp": {"hidden": 16}}, resources={"num_workers": 1, "max_failures": 2},
                       training={"max_epochs": 30, "patience": 30, "lr": 1e-3, "batch_size": 4, "accumulate": 2})
    killed: list[int] = []

    def kill_after_a_registered_checkpoint():
        deadline, seen = time.time() + 300, set()
        while time.time() < deadline and not killed:
            now = set((tmp_path / "mapping" / "train").glob("*/checkpoint_*"))
            # A checkpoint deleted (num_to_keep=2): the controller has registered three.
            if seen - now:
                for pid in _train_worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            seen |= now
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_a_registered_checkpoint)
    killer.start()
    summary = fit.run_study(cfg)
    killer.join()
    assert killed, "no Train worker was killed"
    assert summary.failed == {} and len(summary.fitted) == 1
    model, spec, info = load_run(finished_runs(cfg)[0])
    assert info["resumed_at"] and [h["epoch"] for h in info["history"]] == list(range(30))

    # The same run, uninterrupted, in this process: same data, seed and batch order. Another
    # process may take other float kernel paths, which 30 epochs of Adam amplify: 1e-3 relative.
    plan = train.plan_group(cfg, fit.validate_study(cfg))
    [run] = plan.runs
    assert run.digest == info["digest"]
    member = loop.Member(run.spec, run.digest, run.training, shape=plan.train.shape, norm=run.norm,
                         loss_options={}, device=torch.device("cpu"))
    stream = plan.stream
    loop.fit_group([member], data_loader(plan.train, stream, shuffle=True), data_loader(plan.val, stream),
                   torch.device("cpu"))
    assert member.best_epoch == info["best_epoch"]
    for k, v in member.best_model().state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-3, atol=1e-4, msg=k)


def data_loader(pairs, training, shuffle=False):
    from featmap_ray.stages import pairs as data

    return data.PairLoader(pairs, batch_size=training.batch_size, shuffle_seed=training.seed if shuffle else None)


@pytest.mark.slow
def test_a_changed_setting_trains_a_new_model_from_scratch(tmp_path, ray_session):
    """The digest covers every setting that shapes a model: a changed family hyper-parameter re-trains
    that run only, a changed training setting every run it applies to, `refit` every run."""
    from featmap_ray.mapping.artefacts import finished_runs, load_run
    from featmap_ray.stages import fit

    mt.write_tables(str(tmp_path), shape=SHAPE, n_train=24, n_test=4)
    base = {"datasets": {"t": {"g": {"manipulations": ["hue_shift_60"], "models": ["linear", "ridge"]}}},
            "training": {"max_epochs": 3, "patience": 3, "lr": 1e-2, "batch_size": 8, "accumulate": 1}}

    def run(**changes):
        # Settings changed under the same run keys: --overwrite retrains those runs (without it fit refuses,
        # see tests/test_provenance_study.py).
        summary = fit.run_study(study_config(tmp_path, **{**base, **changes}).model_copy(update={"overwrite": True}))
        runs = {load_run(d)[1].model: load_run(d)[2] for d in finished_runs(study_config(tmp_path, **base))}
        return sorted(k.split("--")[-2] for k in summary.fitted), sorted(k.split("--")[-2] for k in summary.skipped), runs

    assert run()[:2] == (["linear", "ridge"], [])
    fitted, skipped, runs = run(model_hparams={"ridge": {"gamma": 5.0}})
    assert (fitted, skipped) == (["ridge"], ["linear"]) and runs["ridge"]["spec"]["hparams"] == {"gamma": 5.0}
    changed = {**base["training"], "lr": 5e-3}
    fitted, skipped, runs = run(model_hparams={"ridge": {"gamma": 5.0}}, training=changed)
    assert (fitted, skipped) == (["linear", "ridge"], [])
    assert runs["linear"]["training"]["lr"] == 5e-3
    assert runs["linear"]["resumed_at"] == [] and [h["epoch"] for h in runs["linear"]["history"]] == [0, 1, 2]
    fitted, _, runs = run(model_hparams={"ridge": {"gamma": 5.0}}, training=changed, refit=True)
    assert fitted == ["linear", "ridge"] and runs["linear"]["resumed_at"] == []


def test_paper_study_config_expands_to_the_615_runs_of_the_paper():
    from featmap_ray.config import load_config
    from featmap_ray.mapping import grid

    cfg = load_config(Path(__file__).parents[1] / "conf" / "paper_study.yaml")
    runs = grid.expand(cfg)
    # spec §6.1: Cars 7x4 + 5x1 + 5x4 + 5x1 = 58 and CUB 7x4 + 3x4 + 5x4 + 5x1 = 65 per target, 5 targets
    assert len(runs) == 615 == len({r.key for r in runs})
    assert sum(r.apply_transform for r in runs) == 2 * 5 * 4 * 5
    assert {r.normalise for r in runs if r.layer == "stage3"} == {False}


def test_mapped_features_of_a_run_feed_reconstruction(fitted_study):
    """The reconstruct job's input for a mapping run: the run's model applied to each held-out original."""
    import pyarrow as pa
    import ray

    from featmap_ray.io import tables
    from featmap_ray.mapping.artefacts import finished_runs, load_run
    from featmap_ray.stages.mapped import mapped_features, mapped_pairs

    cfg, _ = fitted_study
    ridge = next(d for d in finished_runs(cfg) if load_run(d)[1].model == "ridge")
    run_dir, info, pairs = mapped_pairs(cfg, ridge.name, split="test")
    assert info["spec"]["manipulation"] == "hue_shift_60"
    table = pa.concat_tables(ray.get(mapped_features(run_dir, pairs, "test").to_arrow_refs())).sort_by("source_id")
    assert [tuple(k) for k in zip(table["source_id"].to_pylist(), table["variant"].to_pylist())] == sorted(
        (sid, "hue_shift_60") for sid in pairs.source_ids)
    x, y = mt.read_pairs(cfg.storage, "hue_shift_60", split="test")
    model = load_run(ridge)[0]
    expected = model(x.float()).detach().numpy()
    np.testing.assert_allclose(tables.tensor_numpy(table["feature"]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(expected, y.numpy(), atol=1e-2)  # and it is the true edit
    with pytest.raises(FileNotFoundError, match="no finished mapping run"):
        mapped_pairs(cfg, "nope")


@pytest.mark.slow
def test_two_workers_sum_their_shards(tmp_path, ray_session, single_torch_thread):
    """DDP over two Train workers: each reads half the pairs, closed-form statistics, training means
    and validation sums are reduced across them, so a ridge map equals the one-process fit on all pairs."""
    import torch

    from featmap_ray.mapping import loop
    from featmap_ray.mapping.artefacts import finished_runs, load_run
    from featmap_ray.stages import fit
    from featmap_ray.stages import mapping_train as train

    mt.write_tables(str(tmp_path), shape=SHAPE, n_train=40, n_test=4)
    cfg = study_config(tmp_path, datasets={"t": {"g": {"manipulations": ["hue_shift_60"], "models": ["ridge", "linear"]}}},
                       resources={"num_workers": 2}, training={"max_epochs": 2, "batch_size": 4, "accumulate": 1,
                                                               "val_fraction": 0.1})
    summary = fit.run_study(cfg)
    assert summary.failed == {} and len(summary.fitted) == 2
    runs = {load_run(d)[1].model: load_run(d) for d in finished_runs(cfg)}
    plan = train.plan_group(cfg, fit.validate_study(cfg))
    assert len(plan.train) % 2 == 0  # so the two shards cover every training pair
    member = loop.Member(plan.runs[0].spec, plan.runs[0].digest, plan.runs[0].training, shape=plan.train.shape,
                         norm=plan.runs[0].norm, loss_options={}, device=torch.device("cpu"))
    fitted = loop.fit_group([member], data_loader(plan.train, plan.stream, shuffle=True),
                            data_loader(plan.val, plan.stream), torch.device("cpu"))
    ridge, _, info = runs["ridge"]
    # Sums of float64 statistics over two shards vs one: equal to float64 rounding, then float32 weights.
    for k, v in member.best_model().state_dict().items():
        torch.testing.assert_close(ridge.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    np.testing.assert_allclose(info["train_means"]["x"], fitted.train_means["x"], rtol=1e-9)
    assert info["best"]["val_loss"] == pytest.approx(member.best["val_loss"], rel=1e-5)
    assert len(runs["linear"][2]["history"]) == 2


def test_group_drivers_ask_for_the_configured_resources(tmp_path):
    from featmap_ray.stages import fit

    cfg = study_config(tmp_path, resources={"driver_cpus": 0.25, "driver_resources": {"head": 0.01}})
    assert fit.trial_resources(cfg) == {"cpu": 0.25, "head": 0.01}


def test_runs_reading_the_same_pairs_form_groups_of_at_most_models_per_group():
    from featmap_ray.mapping import grid

    cfg = study_config(Path("/nonexistent"), datasets={"t": {
        "a": {"manipulations": ["hue_shift_60", "grayscale"], "models": ["linear", "ridge", "mlp"]},
        "b": {"manipulations": ["hue_shift_60"], "models": ["cnn"]}}})
    runs = grid.expand(cfg)
    groups = grid.fused_groups(runs)
    assert sorted(len(g) for g in groups) == [3, 4]  # hue_shift_60: 3 + cnn of group b; grayscale: 3
    assert all(len({r.data_key for r in g}) == 1 for g in groups)
    split = grid.fused_groups(runs, 2)
    assert sorted(len(g) for g in split) == [1, 2, 2, 2] and sum(map(len, split)) == len(runs)
    keys = [g[0].data_key for g in split]
    assert keys == sorted(keys, key=keys.index)  # a data key's groups are adjacent (plan_study numbers them)
    assert len(set(keys)) == 2
