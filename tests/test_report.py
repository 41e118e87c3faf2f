"""Report plots are real PNGs, heatmap annotations show the table values, markdown is exact."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featmap_ray.config import BackboneRequest, Config
from featmap_ray.evaluation import model_weights, report


def assert_png(path, min_side=200):
    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_side
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5  # something was drawn


@pytest.fixture
def evals() -> pd.DataFrame:
    """Per-sample rows: 2 samples per (backbone, layer, model, manipulation); one combination missing."""
    rows = []
    rng = np.random.default_rng(0)
    for backbone, layer, model, manipulation, sample in itertools.product(
            ["convnext_base"], ["stage2", "stage3"], ["linear", "mlp", "cnn"], ["rotation_90", "mask tl/sq"], [0, 1]):
        if (layer, model, manipulation) != ("stage3", "cnn", "rotation_90"):
            rows.append({"backbone": backbone, "layer": layer, "model": model, "manipulation": manipulation,
                         "sample": sample, "cos_median_upper": rng.uniform(0.2, 1.0)})
    return pd.DataFrame(rows)


def test_family_tables_average_the_rows_of_each_cell(evals):
    no_values = {"backbone": "dinov3_vitb16", "layer": "final", "model": "linear", "manipulation": "rotation_90",
                 "sample": 0, "cos_median_upper": np.nan}  # e.g. a metric this backbone cannot have
    tables = report.family_tables(pd.concat([evals, pd.DataFrame([no_values])]), "cos_median_upper")
    assert set(tables) == {("convnext_base", "stage2"), ("convnext_base", "stage3")}
    table = tables[("convnext_base", "stage3")]
    for model, manipulation in itertools.product(["linear", "mlp", "cnn"], ["rotation_90", "mask tl/sq"]):
        cell = evals[(evals.layer == "stage3") & (evals.model == model) & (evals.manipulation == manipulation)]
        want = cell["cos_median_upper"].mean() if len(cell) else np.nan
        np.testing.assert_allclose(table.loc[model, manipulation], want, err_msg=f"{model} {manipulation}")


def test_heatmap_annotations_are_the_cell_values():
    table = pd.DataFrame([[0.91234, np.nan], [0.5, 0.123]], index=pd.Index(["linear", "mlp"], name="model"),
                         columns=pd.Index(["rot", "mask"], name="manipulation"))
    fig = report.heatmap_figure(table, "t")
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in fig.axes[0].texts}
    assert texts == {(0, 0): "0.912", (0, 1): "0.500", (1, 1): "0.123"}  # (column, row); NaN left blank
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["rot", "mask"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["linear", "mlp"]


def test_family_heatmaps_write_one_png_per_backbone_layer(evals, tmp_path):
    paths = report.family_heatmaps(evals, "cos_median_upper", tmp_path)
    assert [p.name for p in paths] == ["heatmap_cos_median_upper_convnext_base_stage2.png",
                                       "heatmap_cos_median_upper_convnext_base_stage3.png"]
    for path in paths:
        assert_png(path)


def test_spectra_weight_bias_and_truncation_plots(tmp_path):
    manipulations = ["rotation_90", "grayscale"]
    spectra = pd.DataFrame([{"backbone": "swinv2_base", "layer": "stage3", "manipulation": m, "index": i,
                             "value": 4.0 / (i + 1) ** (1 + j)}
                            for j, m in enumerate(manipulations) for i in range(16)])
    wxb = pd.DataFrame([{"backbone": "swinv2_base", "layer": layer, "group": g, "manipulation": m, "metric": metric,
                         "value": v}
                        for layer in ("stage2", "stage3") for g, m in (("Geometry", "rotation_90"), ("Photometric", "grayscale"))
                        for metric in ("wx_share", "bias_share", "cosine_similarity")
                        for v in np.random.default_rng(0).uniform(0, 1, 20)])
    trunc = pd.DataFrame([{"backbone": "swinv2_base", "layer": "stage3", "manipulation": m, "k": k, "metric": metric,
                           "value": 1 - 1 / k}
                          for m in manipulations for k in (1, 2, 4, 8) for metric in ("cos_median_upper", "mse")])
    paths = (report.spectra_plot(spectra, tmp_path) + report.weight_bias_plot(wxb, tmp_path)
             + report.truncation_plot(trunc, tmp_path))
    assert [p.name for p in paths] == ["spectra_swinv2_base_stage3.png", "weight_bias_swinv2_base_stage2.png",
                                       "weight_bias_swinv2_base_stage3.png", "truncation_swinv2_base_stage3.png"]
    for path in paths:
        assert_png(path)


def test_empty_or_incomplete_tables_are_rejected(tmp_path):
    columns = ["backbone", "layer", "model", "manipulation", "cos_median_upper"]
    with pytest.raises(ValueError, match="evals: the table is empty"):
        report.family_heatmaps(pd.DataFrame(columns=columns), "cos_median_upper", tmp_path)
    with pytest.raises(ValueError, match=r"evals: missing column\(s\) \['agree_top1_orig_mapped'\]"):
        report.family_heatmaps(pd.DataFrame([[1, 2, 3, 4, 5]], columns=columns), "agree_top1_orig_mapped", tmp_path)
    with pytest.raises(ValueError, match="singular_values: the table is empty"):
        report.spectra_plot(pd.DataFrame(columns=["backbone", "layer", "manipulation", "index", "value"]), tmp_path)
    with pytest.raises(ValueError, match="wxb: missing column"):
        report.weight_bias_plot(pd.DataFrame({"value": [1.0]}), tmp_path)
    with pytest.raises(ValueError, match="trunc: the table is empty"):
        report.truncation_plot(pd.DataFrame(columns=["backbone", "layer", "manipulation", "k", "metric", "value"]), tmp_path)
    with pytest.raises(ValueError, match="expected at least one table"):
        report.write_summary({}, tmp_path / "report.md")
    assert not list(tmp_path.iterdir())


def test_markdown_table_and_summary(tmp_path, evals):
    df = pd.DataFrame({"model": ["linear", "mlp|x"], "layer": ["stage3", "stage3"], "cos": [0.912345, np.nan], "n": [3, 4]})
    assert report.markdown_table(df, columns=["cos", "n"], index="model") == (
        "| model | cos | n |\n|---|---|---|\n| linear | 0.9123 | 3 |\n| mlp\\|x |  | 4 |\n")
    pivot = report.family_tables(evals, "cos_median_upper")[("convnext_base", "stage3")]
    lines = report.markdown_table(pivot).splitlines()
    assert lines[0] == "| model | mask tl/sq | rotation_90 |"
    assert lines[2].startswith("| cnn | ") and lines[2].endswith(" |  |")  # missing combination: empty cell

    figure = report.family_heatmaps(evals, "cos_median_upper", tmp_path / "plots")[0]
    out = report.write_summary({"cos median / stage3": pivot}, tmp_path / "report.md", figures={"heatmaps": [figure]})
    text = out.read_text()
    assert "## cos median / stage3" in text and lines[2] in text
    name = "heatmap_cos_median_upper_convnext_base_stage2"
    assert f"![{name}](plots/{name}.png)" in text
    csv = pd.read_csv(tmp_path / "cos_median_stage3.csv", index_col="model")
    np.testing.assert_allclose(csv.to_numpy(), pivot.to_numpy())


# ---------------------------------------------------------------------------------------------
# The Models box and the random-weights caveats: derived from the config, shown where they apply.

def demo_like(storage, pretrained: bool = False, **featinv) -> Config:
    """The demo's models: random backbone, judge and editor, tiny FeatInv base, fresh ControlNet;
    `pretrained` marks the backbone and judge pretrained instead (nothing is loaded here)."""
    backbone = {"name": "convnext_base", "layers": ["stage2", "stage3"], "pretrained": pretrained, "init_seed": 3}
    return Config.model_validate({
        "storage": str(storage), "dataset": {"name": "t", "root": str(storage)}, "mapping": {"study": "s"},
        "extract": {"backbones": [backbone]}, "edit": {"model": "tiny"},
        "evaluate": {"reconstruction": {"judge": {"name": "convnext_base", "pretrained": pretrained}}},
        "featinv": {"base_model": "tiny", **featinv}})


def test_model_weights_name_where_each_model_comes_from(tmp_path):
    demo = model_weights.model_weights(demo_like(tmp_path))
    words = {key: m.weights for key, m in demo.items()}
    assert words == {
        "backbone:convnext_base": "random weights (initialised with seed 3)",
        "classifier:convnext_base": "random weights (initialised with seed 3)",  # the backbone's own head
        "editor": "random weights (initialised with seed 0: a tiny QwenImageEditPlusPipeline)",
        "featinv.base_model": "random weights (initialised with seed 0: tiny Stable Diffusion parts)",
        "featinv.controlnet": "random weights (initialised with seed 0: a fresh ControlNet from the base UNet)",
        "judge": "random weights (initialised with seed 0)"}
    assert all(m.random for m in demo.values())
    assert demo["classifier:convnext_base"].setting == "extract.backbones[0] (its head)"

    trained = demo_like(tmp_path, pretrained=True, base_model="trained", controlnet=str(tmp_path / "controlnet"))
    trained.edit.model = "Qwen/Qwen-Image-Edit-2511"
    trained.evaluate.classifier = BackboneRequest(name="convnext_base", checkpoint="/w/fine_tuned.safetensors")
    models = model_weights.model_weights(trained, {"weights": "ab12", "run_name": "featinv", "step": 400})
    assert {key: m.weights for key, m in models.items()} == {
        "backbone:convnext_base": "pretrained (convnext_base.fb_in22k_ft_in1k)",
        "classifier:convnext_base": "pretrained (/w/fine_tuned.safetensors)",
        "editor": "pretrained (Qwen/Qwen-Image-Edit-2511)",
        "featinv.base_model": "trained by this study: featinv-train run featinv trained a tiny Stable Diffusion base "
                              "on the stored images (VAE, then UNet)",
        "featinv.controlnet": "trained by this study: featinv-train run featinv, step 400",
        "judge": "pretrained (convnext_base.fb_in22k_ft_in1k)"}
    assert not any(m.random for m in models.values()) and models["classifier:convnext_base"].setting == "evaluate.classifier"
    imported = model_weights.model_weights(trained, {"weights": "ab12"})["featinv.controlnet"]  # no featinv-train run
    assert imported.weights == f"pretrained ({tmp_path / 'controlnet'}, weights ab12)" and not imported.random


def test_caveat_names_only_the_random_models(tmp_path):
    demo = model_weights.model_weights(demo_like(tmp_path))
    line = model_weights.caveat([demo["featinv.base_model"], demo["judge"]])
    assert line == ("**Random weights** (Models, above): FeatInv base model: FeatInv's images come from an untrained "
                    "diffusion model; recon-eval judge (convnext_base stage3): its feature cosines compare an untrained "
                    "network's features.")
    pretrained = model_weights.model_weights(demo_like(tmp_path, pretrained=True))
    assert model_weights.caveat([pretrained["backbone:convnext_base"], pretrained["judge"]]) is None


def write_evaluations(cfg: Config) -> None:
    """An evaluations table like `featmap evaluate`'s: stage2 with a direct manipulation only, stage3 also
    with a semantic edit."""
    from featmap_ray.stages.evaluate import write_results

    rows = [{"run": f"{layer}-{m}-{model}", "dataset": "t", "backbone": "convnext_base", "layer": layer, "model": model,
             "manipulation": m, "family": family, "cos_median_upper": 0.5, "agree_top1_orig_mapped": 1.0}
            for layer, m, family in (("stage2", "rotation_90", "geometric"), ("stage3", "rotation_90", "geometric"),
                                     ("stage3", "qwen:Add_snow:0", "semantic"))
            for model in ("linear", "mlp")]
    write_results(cfg, "evaluations", pd.DataFrame(rows), {})


def sections(text: str) -> dict[str, str]:
    """report.md's sections: heading -> body."""
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in text.split("\n## ")[1:]}


def test_report_opens_with_its_models_and_flags_sections_of_random_ones(tmp_path):
    from featmap_ray.stages.report import write_report

    cfg = demo_like(tmp_path)
    write_evaluations(cfg)
    write_report(cfg, tmp_path / "random")
    text = (tmp_path / "random" / "report.md").read_text()
    assert text.startswith("# FeatMap study s\n\n## Models\n")
    found = sections(text)
    assert found["Models"].splitlines()[3:] == [
        "| model | setting | weights |", "|---|---|---|",
        "| backbone convnext_base | extract.backbones[0] | random weights (initialised with seed 3) |",
        "| classifier of convnext_base features | extract.backbones[0] (its head) | random weights (initialised with seed 3) |",
        "| semantic editor | edit.model | random weights (initialised with seed 0: a tiny QwenImageEditPlusPipeline) |"]
    backbone, classifier, editor = (m.consequence for m in model_weights.model_weights(cfg).values()
                                    if m.role in ("backbone convnext_base", "classifier of convnext_base features",
                                                  "semantic editor"))
    caveat = {heading: body.split("\n")[1] for heading, body in found.items() if heading != "Models"}
    assert backbone in caveat["cos_median_upper convnext_base/stage2"]
    assert editor not in caveat["cos_median_upper convnext_base/stage2"]  # no semantic edit in that table
    assert backbone in caveat["cos_median_upper convnext_base/stage3"] and editor in caveat["cos_median_upper convnext_base/stage3"]
    assert classifier in caveat["top-1 agreement convnext_base/stage2"]
    assert classifier not in caveat["cos_median_upper convnext_base/stage3"]
    assert all(line.startswith("**Random weights** (Models, above): ") for line in caveat.values())

    # A pretrained backbone: the sections without a semantic edit carry no caveat; those with one name only the editor.
    cfg = demo_like(tmp_path, pretrained=True)
    write_report(cfg, tmp_path / "pretrained")
    found = sections((tmp_path / "pretrained" / "report.md").read_text())
    assert "| backbone convnext_base | extract.backbones[0] | pretrained (convnext_base.fb_in22k_ft_in1k) |" in found["Models"]
    assert found["cos_median_upper convnext_base/stage2"].startswith("\n| model |")
    assert found["top-1 agreement convnext_base/stage2"].startswith("\n| model |")
    stage3 = found["cos_median_upper convnext_base/stage3"].split("\n")[1]
    assert stage3 == f"**Random weights** (Models, above): semantic editor: {editor}."
