"""Semantic edits: the tiny offline Qwen image-editing pipelines, the `edit` Ray Data stage (keys, prompts,
seeds, settings, resume after a kill, failures as rows, checks before any work) and a semantic group of
the study run end to end on the edited variants."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import lance
import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from PIL import Image

from featmap_ray import cli
from featmap_ray.config import Config, ConfigError, EditConfig, load_config
from featmap_ray.io import imageio, tables
from featmap_ray.manipulations import semantic
from featmap_ray.seeding import derive_seed
from featmap_ray.stages import base, ingest, runtime
from featmap_ray.stages import edit as edit_stage
from tests.conftest import make_config, tiny_backbone, write_image

PROMPTS = {"Make_blue": "Make the object bright blue, keep everything else the same.",
           "Add_hat": "Add a small red hat on top, nothing else changes."}
# 64x64 working size and 2 steps: ~0.15 s per edit on one CPU thread (the pipeline's own ~1 MP takes ~45 s).
EDIT = {"model": "tiny", "dtype": "float32", "steps": 2, "working_pixels": 4096, "rows_per_commit": 2,
        "images_per_class": {"train": 4, "test": 1}, "num_actors": 2,
        "prompts": {"t": [{"name": n, "prompt": p} for n, p in PROMPTS.items()]}}
CLASSES, PER_SPLIT = ("a_cls", "b_cls"), {"train": 5, "test": 2}
N_EDITS = len(CLASSES) * (4 + 1) * len(PROMPTS)  # images_per_class originals of each class, every prompt
# Edits of one key made in two processes (other thread counts, batch neighbours) agree to ~1e-6 in
# float, which can move a pixel across a rounding boundary: one 8-bit level at most.
LEVELS = 1


def write_dataset(root, classes=CLASSES, per_split=PER_SPLIT):
    seed = 0
    for cls in classes:
        for split, n in per_split.items():
            for i in range(n):
                write_image(root / "images" / split / cls / f"{i:03d}.png", size=(72, 72), seed=seed)
                seed += 1
    return root


def table_rows(cfg, **filters) -> list[dict]:
    st = tables.Store(cfg.storage)
    rows = lance.dataset(st.layout.images).to_table().to_pylist()
    return [r for r in rows if all(r[k] == v for k, v in filters.items())]


def config_file(cfg, path) -> str:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


@dataclass
class Edited:
    cfg: Config
    committed_at_kill: int  # edits the killed `featmap edit` had committed
    resumed: base.StageSummary  # the re-run's summary


@pytest.fixture(scope="module")
def edited(tmp_path_factory, ray_session) -> Edited:
    """`featmap edit` in a process of its own, SIGKILLed once it has committed a few edits, then run again
    here: the table every test of the module reads."""
    tmp = tmp_path_factory.mktemp("edit")
    cfg = make_config(tmp / "store", write_dataset(tmp / "data"), edit=EDIT)
    ingest.run(cfg)
    uri = tables.Store(cfg.storage).layout.images
    with open(tmp / "edit.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "featmap_ray.cli", "edit", "--config", config_file(cfg, tmp / "c.yaml")],
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and lance.dataset(uri).count_rows("family = 'semantic'") < 2:
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    committed = lance.dataset(uri).count_rows("family = 'semantic'")
    assert 2 <= committed < N_EDITS, f"not interrupted half way; its output ends:\n{(tmp / 'edit.log').read_text()[-3000:]}"
    return Edited(cfg, committed, edit_stage.run(cfg))


def test_a_killed_job_resumes_to_exactly_one_row_per_key(edited):
    cfg, summary = edited.cfg, edited.resumed
    # A write task of the killed job that was already running may still commit before Ray's workers
    # notice the dead driver (even while the re-run edits: its commit then drops those keys as stored).
    assert summary.failed == 0 and summary.skipped >= edited.committed_at_kill
    assert summary.skipped + summary.written[tables.Store(cfg.storage).layout.images] <= N_EDITS
    keys = [(r["source_id"], r["variant"]) for r in table_rows(cfg, family="semantic")]
    assert len(keys) == len(set(keys)) == N_EDITS
    assert edit_stage.run(cfg).skipped == N_EDITS  # and a third run has nothing left to do


def test_edit_writes_every_chosen_original_with_each_prompt_its_seed_and_settings(edited):
    cfg = edited.cfg
    originals = {r["source_id"]: r for r in table_rows(cfg, variant=tables.ORIGINAL)}
    edits = table_rows(cfg, family="semantic")

    keys = [(r["source_id"], r["variant"]) for r in edits]
    assert len(keys) == len(set(keys))
    chosen = sorted({sid for sid, _ in keys})
    for sid in chosen:  # every chosen original has every prompt's variant
        assert {v for s, v in keys if s == sid} == {f"qwen:{name}:0" for name in PROMPTS}
    per_class = {}
    for sid in chosen:
        per_class.setdefault((originals[sid]["split"], originals[sid]["class_name"]), []).append(sid)
    assert {k: len(v) for k, v in per_class.items()} == {
        (split, cls): min(EDIT["images_per_class"][split], n) for cls in CLASSES for split, n in PER_SPLIT.items()}

    for row in edits:
        original = originals[row["source_id"]]
        assert {k: row[k] for k in edit_stage.CARRIED} == {k: original[k] for k in edit_stage.CARRIED}
        assert row["seed"] == derive_seed(EDIT.get("seed", 42), row["source_id"], row["variant"])
        params = json.loads(row["params"])
        name = row["variant"].split(":")[1]
        assert params == {"prompt": PROMPTS[name], "name": name, "repeat": 0, "model": "tiny",
                          "pipeline": "QwenImageEditPlusPipeline", "dtype": "float32", "working_pixels": 4096,
                          "negative_prompt": " ", "true_cfg_scale": 4.5, "guidance_scale": 1.0,
                          "num_inference_steps": 2, "vae_tiling": True}
        pixels = imageio.decode_png_rgb(row["image"])  # lossless, at the pipeline's size for the working area
        assert pixels.shape == (row["height"], row["width"], 3) == (64, 64, 3)
    # Edits of different prompts on one image, or one prompt on different images, differ.
    first = [r for r in edits if r["source_id"] == chosen[0]]
    assert not np.array_equal(*(imageio.decode_png_rgb(r["image"]) for r in first))


def test_the_choice_of_originals_is_seeded_and_independent_of_table_order(edited):
    cfg = edited.cfg
    st = tables.Store(cfg.storage)
    originals = lance.dataset(st.layout.images).to_table(filter=f"variant = '{tables.ORIGINAL}'")
    chosen = edit_stage.choose_sources(originals, cfg.edit)
    assert sorted(edit_stage.choose_sources(originals.take(np.arange(originals.num_rows)[::-1]), cfg.edit)) == sorted(chosen)
    assert sorted(chosen) == sorted({r["source_id"] for r in table_rows(cfg, family="semantic")})
    other = cfg.edit.model_copy(update={"seed": 7})
    assert sorted(edit_stage.choose_sources(originals, other)) != sorted(chosen)
    everything = cfg.edit.model_copy(update={"images_per_class": {"train": 99, "test": 99}})
    assert len(edit_stage.choose_sources(originals, everything)) == originals.num_rows


def test_the_same_key_gives_the_same_pixels_in_another_process(edited, single_torch_thread):
    """An edit depends on its key only: recomputed here (another process, another thread count, no
    Ray batch around it) it matches what an actor of the job stored."""
    cfg = edited.cfg
    originals = {r["source_id"]: r for r in table_rows(cfg, variant=tables.ORIGINAL)}
    pipe = semantic.load_pipeline(cfg.edit)
    for row in table_rows(cfg, family="semantic")[:3]:
        image = Image.fromarray(imageio.decode_png_rgb(originals[row["source_id"]]["image"]))
        prompt = json.loads(row["params"])["prompt"]
        [again] = semantic.edit_images(pipe, [semantic.EditRequest(image, prompt, row["seed"])], cfg.edit)
        diff = np.abs(np.asarray(again, np.int16) - imageio.decode_png_rgb(row["image"]).astype(np.int16))
        assert diff.max() <= LEVELS, (row["variant"], diff.max())


def test_a_pipeline_folder_that_takes_batches_edits_each_item_as_alone(tmp_path, single_torch_thread):
    """A saved QwenImageEditPipeline (class from model_index.json): its weights load exactly, and a batch
    of two edits gives each item what a call of its own gives."""
    folder = tmp_path / "qwen-edit"
    semantic.tiny_pipeline("QwenImageEditPipeline", seed=3).save_pretrained(folder)
    edit = EditConfig(model=str(folder), dtype="float32", steps=2, working_pixels=4096, batch_size=2)
    assert semantic.check(edit) == "QwenImageEditPipeline"
    pipe = semantic.load_pipeline(edit)
    built = semantic.tiny_pipeline("QwenImageEditPipeline", seed=3)
    for part in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(built, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8))
    requests = [semantic.EditRequest(square, "Make it blue.", 11), semantic.EditRequest(wide, "Add a hat.", 12),
                semantic.EditRequest(square.rotate(90), "Add a hat.", 13)]
    together = semantic.edit_images(pipe, requests, edit)  # the two squares in one call, the wide one alone
    for request, batched in zip(requests, together, strict=True):
        [alone] = semantic.edit_images(pipe, [request], edit)
        assert batched.size == alone.size
        assert np.abs(np.asarray(batched, np.int16) - np.asarray(alone, np.int16)).max() <= LEVELS
    # The working area keeps the input's aspect ratio (2:1 here) at about working_pixels.
    assert together[1].width > together[1].height and abs(together[1].width * together[1].height - 4096) < 2048


def test_failures_become_rows_and_the_rest_of_the_batch_goes_on(edited, single_torch_thread):
    cfg = edited.cfg
    st = tables.Store(cfg.storage)
    [plan] = semantic.planned_edits(cfg.edit, "t")[:1]
    sources = sorted(sid for sid, _ in st.keys(st.layout.images, filter=f"variant = '{tables.ORIGINAL}'"))[:2]
    tasks = edit_stage.with_originals(pa.Table.from_pylist(
        [{"source_id": sid, "variant": plan.variant, "prompt": plan.prompt, "name": plan.name, "repeat": 0,
          "seed": i} for i, sid in enumerate(sources)]), st)
    assert tasks["class_name"].to_pylist() == [r["class_name"] for sid in sources
                                               for r in table_rows(cfg, source_id=sid, variant=tables.ORIGINAL)]
    tasks = tasks.set_column(tasks.schema.get_field_index("image"), "image",
                             pa.array([b"not a png", tasks["image"][1].as_py()], pa.binary()))
    editor = edit_stage.SemanticEditor(cfg.edit, "QwenImageEditPlusPipeline", use_gpu=False)
    out = {r["source_id"]: r for r in editor(tasks).to_pylist()}
    assert out[sources[1]]["error_reason"] is None and out[sources[1]]["family"] == "semantic"
    assert out[sources[0]]["error_reason"] is not None and out[sources[0]]["image"] is None
    assert f"{plan.variant} of {sources[0]}" in out[sources[0]]["error_message"]

    with torch.no_grad():  # a pipeline that produces NaN: each of its edits is a failure row, not an image
        next(editor.pipe.transformer.parameters()).fill_(float("nan"))
    [row] = editor(tasks.slice(1, 1)).to_pylist()
    assert row["error_reason"] == "NonFiniteEdit" and "NaN" in row["error_message"]


def test_a_missing_model_stops_before_anything_is_written(edited, tmp_path, monkeypatch, capsys):
    cfg = edited.cfg

    def no_ray(cfg):
        raise AssertionError("Ray was started before the checks failed")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    version = lance.dataset(tables.Store(cfg.storage).layout.images).version
    path = config_file(cfg, tmp_path / "c.yaml")
    assert cli.main(["edit", "--config", path, "edit.model=Qwen/Qwen-Image-Edit-2511"]) == 1
    err = capsys.readouterr().err
    assert "Qwen/Qwen-Image-Edit-2511" in err and "hf download Qwen/Qwen-Image-Edit-2511" in err
    (tmp_path / "partial").mkdir()
    assert cli.main(["edit", "--config", path, f"edit.model={tmp_path / 'partial'}"]) == 1
    assert "lacks ['model_index.json']" in capsys.readouterr().err
    # The pipeline checks the edit model with the others, before ingest writes a row.
    assert cli.main(["pipeline", "--config", path, "edit.model=Qwen/Qwen-Image-Edit-2511"]) == 1
    assert "hf download Qwen/Qwen-Image-Edit-2511" in capsys.readouterr().err
    assert lance.dataset(tables.Store(cfg.storage).layout.images).version == version


def test_bad_edit_settings_fail_before_work_naming_the_key(edited, tmp_path):
    cfg = edited.cfg
    path = config_file(cfg, tmp_path / "c.yaml")
    for override, message in [
        ('edit.prompts={t: [{name: a, prompt: " "}]}', "edit.prompts.t.0.prompt: the prompt is empty"),
        ("edit.prompts={t: [{name: a, text: x}]}", "edit.prompts.t.0.text"),
        ("edit.prompts={t: [{name: a b, prompt: x}]}", "edit.prompts.t.0.name"),
        ("edit.prompts={t: [{name: a, prompt: x}, {name: a, prompt: y}]}", "prompt name(s) ['a'] used twice"),
        ("edit.images_per_class={train: -1}", "negative counts"),
        ("edit.num_gpus=1.5", "whole GPUs"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            load_config(path, [override])
    with pytest.raises(ValueError, match="one prompt per call"):
        semantic.check(cfg.edit.model_copy(update={"batch_size": 4}))
    version = lance.dataset(tables.Store(cfg.storage).layout.images).version
    # Edits stored under these variant ids were made with 2 steps: each variant is refused, naming the change.
    with pytest.raises(base.ProvenanceMismatch, match=r"qwen:Add_hat:0.*\n\s+num_inference_steps: 2 -> 3") as refused:
        edit_stage.run(cfg.model_copy(update={"edit": cfg.edit.model_copy(update={"steps": 3})}))
    assert "qwen:Make_blue:0" in str(refused.value) and "--overwrite" in str(refused.value)
    with pytest.raises(ValueError, match="edit.prompts names datasets \\['other'\\]"):
        edit_stage.run(cfg.model_copy(update={"edit": cfg.edit.model_copy(update={"prompts": {"other": []}})}))
    assert lance.dataset(tables.Store(cfg.storage).layout.images).version == version


def test_the_default_groups_include_the_semantic_edits_of_the_dataset(tmp_path):
    from featmap_ray.mapping import grid

    cfg = make_config(tmp_path, tmp_path, edit={**EDIT, "repeats": 2})
    semantic_group = grid.default_groups(cfg)["semantic"]
    assert semantic_group.manipulations == [f"qwen:{n}:{k}" for n in PROMPTS for k in (0, 1)]
    assert semantic_group.models == grid.PAPER_FAMILIES and not semantic_group.apply_transform
    other = make_config(tmp_path, tmp_path, dataset={"name": "other"}, edit=EDIT)
    assert "semantic" not in grid.default_groups(other)


SEMANTIC_RUN = "t--semantic--convnext_base--stage3--qwen:Make_blue:0--linear--mse"
GEOMETRIC_RUN = "t--geometric--convnext_base--stage3--rotation_90--linear--mse"


@pytest.fixture(scope="module")
def studied(edited, tmp_path_factory):
    """The edited table through the study: manipulate (rotation_90) -> extract -> fit a semantic and a
    geometric linear run -> evaluate -> analyze -> recon-eval (a tiny FeatInv whose ControlNet is moved off
    its zero initialisation, so the maps steer the samples) -> report."""
    from featmap_ray.featinv import loading
    from featmap_ray.stages import analyze, extract, fit, recon_eval, report
    from featmap_ray.stages import evaluate as stages
    from featmap_ray.stages import manipulate as stage

    cfg = edited.cfg
    cfg = cfg.model_copy(update={
        "manipulate": cfg.manipulate.model_validate({"ops": {"rotation": [90]}}),
        "mapping": cfg.mapping.model_validate({
            "study": "semantic",
            "targets": [{"backbone": "convnext_base", "layers": ["stage3"], "normalise": True}],
            "datasets": {"t": {"semantic": {"manipulations": ["qwen:Make_blue:0"], "models": ["linear"]},
                               "geometric": {"manipulations": ["rotation_90"], "models": ["linear"]}}},
            "losses": {"mse": "mse"},
            "training": {"max_epochs": 2, "batch_size": 4, "accumulate": 1}}),
        "evaluate": cfg.evaluate.model_validate({
            "truncation_ranks": [1, 4], "analysis_samples": 4,
            "reconstruction": {"subset_size": 2, "batch_size": 2, "judge": tiny_backbone("convnext_base")}}),
        "featinv": cfg.featinv.model_validate({"base_model": "tiny", "sampling": {"steps": 2}})})
    stage.run(cfg)
    extract.run(cfg)
    summary = fit.run_study(cfg)
    evals, frames = stages.run_evaluate(cfg), analyze.run_analyze(cfg)

    folder = tmp_path_factory.mktemp("controlnet") / "controlnet"
    controlnet = loading.featinv_pipeline(cfg).controlnet
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    controlnet.save_pretrained(folder)
    cfg = cfg.model_copy(update={"featinv": cfg.featinv.model_copy(update={"controlnet": str(folder)})})
    partial = recon_eval.run(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={
        "reconstruction": cfg.evaluate.reconstruction.model_copy(update={"subset_size": 1})})}))
    recon = recon_eval.run(cfg)
    return cfg, summary, evals, frames, (partial, recon), report.run_report(cfg)


@pytest.mark.slow
def test_a_semantic_group_runs_through_the_study(studied):
    """extract -> fit -> evaluate -> analyze -> report on the edited variants, like a direct group."""
    cfg, summary, evals, frames, _, report = studied
    assert sorted(summary.fitted) == sorted([SEMANTIC_RUN, GEOMETRIC_RUN]), summary
    mine = evals[(evals["model"] == "linear") & (evals["manipulation"] == "qwen:Make_blue:0")]
    assert list(mine["family"]) == ["semantic"]
    assert mine["n_samples"].iloc[0] == EDIT["images_per_class"]["test"] * len(CLASSES)
    weight_bias = frames["weight_bias"]
    assert set(weight_bias.loc[weight_bias["manipulation"] == "qwen:Make_blue:0", "family"]) == {"semantic"}
    assert "qwen:Make_blue:0" in report.read_text()


@pytest.mark.slow
def test_recon_eval_scores_every_reconstruction_by_the_definitions(studied):
    """Each row's scores recomputed here from its stored reconstructions and the stored images, with
    scikit-image and the change norm from the run's own model."""
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

    from featmap_ray.mapping.artefacts import load_run, runs_root
    from featmap_ray.stages import pairs as data
    from featmap_ray.stages.evaluate import read_results

    cfg, *_, (partial, recon), report = studied
    st = tables.Store(cfg.storage)
    assert partial.written and recon.skipped == 2 and recon.failed == 0  # the second run added only the rest
    rows = read_results(cfg, "reconstructions")
    assert sorted(zip(rows["run"], rows["source_id"])) == sorted(set(zip(rows["run"], rows["source_id"])))
    assert sorted(rows["run"].value_counts().items()) == [(GEOMETRIC_RUN, 2), (SEMANTIC_RUN, 2)]
    for _, row in rows.iterrows():
        model, spec, _ = load_run(runs_root(cfg) / row["run"])
        pairs = data.load_pairs(st, dataset="t", backbone="convnext_base", layer="stage3",
                                manipulation=spec.manipulation, split="test")
        x, _ = pairs.read(np.array([pairs.source_ids.index(row["source_id"])]))
        with torch.no_grad():
            mapped = model(torch.from_numpy(np.asarray(x, np.float32))).numpy()
        assert row["change_norm"] == pytest.approx(float(np.linalg.norm(mapped - x, axis=1).mean()), rel=1e-5)
        assert (row["recon_baseline"] is not None) == (spec.manipulation == "rotation_90")
        [manip] = [imageio.decode_png_rgb(r["image"]) for r in
                   st.rows(st.layout.images, [(row["source_id"], spec.manipulation)], ["image"]).to_pylist()]
        mapped_img = np.asarray(Image.fromarray(imageio.decode_png_rgb(row["recon_mapped"])).resize(
            (manip.shape[1], manip.shape[0]), Image.BICUBIC))
        assert row["manip_vs_mapped_mse"] == pytest.approx(mean_squared_error(manip, mapped_img))
        assert row["manip_vs_mapped_psnr"] == pytest.approx(peak_signal_noise_ratio(manip, mapped_img, data_range=255))
        assert row["manip_vs_mapped_ssim"] == pytest.approx(
            structural_similarity(manip, mapped_img, channel_axis=-1, data_range=255))
        # FeatInv steers by the map: the mapped and the true target's reconstructions differ.
        assert row["recon_mapped"] != row["recon_target"] and row["target_vs_mapped_mse"] > 0
    text = report.read_text()
    assert "Reconstructions: ssim against the manipulated image" in text
    assert "reconstructions_convnext_base_stage3_rotation_90.png" in text


def test_recon_eval_refuses_runs_it_cannot_reconstruct(studied):
    from featmap_ray.stages import recon_eval

    cfg = studied[0]

    def with_recon(**changes):
        return cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={
            "reconstruction": cfg.evaluate.reconstruction.model_copy(update=changes)})})

    with pytest.raises(ValueError, match=r"\['nope'\] are not finished runs"):
        recon_eval.plan(with_recon(runs=["nope"]))
    other_layer = with_recon(runs=[SEMANTIC_RUN]).model_copy(update={
        "featinv": cfg.featinv.model_copy(update={"layer": "stage2"}), "extract": cfg.extract.model_validate(
            {"backbones": [tiny_backbone("convnext_base", layers=["stage2", "stage3"])]})})
    with pytest.raises(ValueError, match=f"{SEMANTIC_RUN} maps convnext_base/stage3, but the FeatInv model inverts "
                                         "convnext_base/stage2"):
        recon_eval.plan(other_layer)


def test_recon_eval_turns_non_finite_maps_into_failure_rows(studied, single_torch_thread):
    from featmap_ray.stages import recon_eval

    cfg = studied[0]
    runs = recon_eval.plan(cfg)
    evaluator = recon_eval.ReconEvaluator(cfg, runs, recon_eval.results_schema(lpips=False))
    info = runs[GEOMETRIC_RUN]
    tasks = pa.Table.from_pylist([{"run": GEOMETRIC_RUN, "source_id": info["pairs"].source_ids[i], "row": int(i),
                                   "variant": "rotation_90", "split": "test", "seed": 100, **info["labels"]}
                                  for i in info["rows"]])
    good = evaluator(tasks).to_pylist()
    assert [r["error_reason"] for r in good] == [None, None] and all(r["recon_baseline"] for r in good)
    with torch.no_grad():  # a run whose model outputs NaN: its pairs are failure rows, nothing is sampled
        for p in evaluator._model(GEOMETRIC_RUN).parameters():
            p.fill_(float("nan"))
    bad = evaluator(tasks).to_pylist()
    assert [r["error_reason"] for r in bad] == ["non_finite"] * 2 and all(r["recon_mapped"] is None for r in bad)
    assert GEOMETRIC_RUN in bad[0]["error_message"] and "NaN" in bad[0]["error_message"]
