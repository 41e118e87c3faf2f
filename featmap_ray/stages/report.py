"""`featmap report`: tables and PNG plots of what evaluate, analyze, recon-eval and featinv-viz wrote,
in <storage>/reports/<study>/ (a new version of the folder, published as a whole: featmap_ray.io.files)
and in MLflow. It refuses, before writing anything, when a results table it shows was computed from
mapping runs that changed since (retrained, or stale: fitted on features that changed).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from featmap_ray.config import Config
from featmap_ray.io import imageio, tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.layout import Layout
from featmap_ray.stages import analyze, base, edit
from featmap_ray.stages.evaluate import read_results, results_staleness, results_uri

if TYPE_CHECKING:
    import pandas as pd

    from featmap_ray.evaluation.model_weights import ModelWeights

# The results tables of mapping runs the report shows (each records the runs it was computed from).
REPORTED = ("evaluations", *analyze.TABLES)


def run_report(cfg: Config) -> Location:
    """report.md and its figures as a new version of <storage>/reports/<study>/ and in MLflow; returns the
    published report.md."""
    check_evaluations(cfg)
    target = Layout(cfg.storage).reports(cfg.mapping.study)
    with target.publish() as out:
        n_figures = write_report(cfg, out)
        results = [results_uri(cfg, name) for name in REPORTED]
        with tracking.study_stage(cfg, "report", tracking.table_inputs(cfg, results), context="evaluation") as run_id:
            tracking.end_stage_run(cfg, run_id, {"figures": n_figures}, artefacts=out)
    return target.current() / "report.md"


def write_report(cfg: Config, out: Path) -> int:
    """report.md and its PNG figures in the local folder `out`; returns the number of figures."""
    from featmap_ray.evaluation import model_weights, report

    evals = read_results(cfg, "evaluations")
    # heading -> keys (model_weights) of the models its numbers come from: the Models table and the caveats
    uses: dict[str, list[str]] = {}
    sections: dict[str, pd.DataFrame] = {}
    figures: dict[str, list[Path]] = {}
    cosine = "cos_median_upper"  # the evaluation's median rule, that of the loss (feature_metrics)
    heading = "Median cosine (upper) to the true edited features"
    figures[heading], uses[heading] = report.family_heatmaps(evals, cosine, out), _feature_models(evals)
    for (b, l), table in report.family_tables(evals, cosine).items():
        sections[f"{cosine} {b}/{l}"] = table
        uses[f"{cosine} {b}/{l}"] = _feature_models(_of(evals, b, l))
    if "agree_top1_orig_mapped" in evals and evals["agree_top1_orig_mapped"].notna().any():
        heading = "Top-1 agreement with the original's prediction"
        figures[heading] = report.family_heatmaps(evals, "agree_top1_orig_mapped", out)
        uses[heading] = _feature_models(evals, classifiers=True)
        for (b, l), table in report.family_tables(evals, "agree_top1_orig_mapped").items():
            sections[f"top-1 agreement {b}/{l}"] = table
            uses[f"top-1 agreement {b}/{l}"] = _feature_models(_of(evals, b, l), classifiers=True)
    if tables.open_table(results_uri(cfg, "svd")) is not None:
        svd, wxb = read_results(cfg, "svd"), read_results(cfg, "weight_bias")
        figures["Singular-value spectra of the linear maps"] = report.spectra_plot(read_results(cfg, "singular_values"), out)
        figures["Weight vs bias by manipulation family"] = report.weight_bias_plot(wxb.assign(group=wxb["family"]), out)
        figures["Rank-k truncations of W"] = report.truncation_plot(read_results(cfg, "truncation"), out)
        sections["SVD measures"] = svd.drop(columns=["run", "dataset"])
        uses.update(dict.fromkeys(["Singular-value spectra of the linear maps", "Weight vs bias by manipulation family",
                                   "Rank-k truncations of W", "SVD measures"], _feature_models(svd)))
    if tables.open_table(results_uri(cfg, "reconstructions")) is not None:  # featmap recon-eval
        recon = read_results(cfg, "reconstructions")
        featinv = [*_feature_models(recon), model_weights.FEATINV_BASE, model_weights.CONTROLNET]
        for metric, table in report.recon_tables(recon).items():
            heading = f"Reconstructions: {metric} against the manipulated image (mean over sources)"
            sections[heading] = table
            # SSIM, PSNR and MSE compare pixels; the cosines compare the judge's features of the images
            uses[heading] = featinv + ([model_weights.JUDGE] if metric.startswith("cos_") else [])
        st = tables.Store(cfg.storage)
        keys = set(zip(recon["source_id"], recon["variant"], strict=True))
        stored = st.rows(st.layout.images, keys, ["image"]).to_pylist()
        manipulated = {(r["source_id"], r["variant"]): imageio.decode_png_rgb(r["image"]) for r in stored}
        heading = "Reconstructions: manipulated image, FeatInv of the true target, mapped, noise control, baseline"
        figures[heading], uses[heading] = report.recon_grids(recon, manipulated, out), featinv
    for heading, paths in _featinv_viz_figures(cfg, out).items():
        figures[heading], uses[heading] = paths, _featinv_viz_models(cfg)
    models = _models(cfg, uses)
    notes = {heading: note for heading, keys in uses.items() if (note := model_weights.caveat(models[k] for k in keys))}
    report.write_summary(sections, out / "report.md", figures=figures, title=f"FeatMap study {cfg.mapping.study}",
                         intro=_models_box(models.values()), notes=notes)
    return sum(len(paths) for paths in figures.values())


def _of(rows: pd.DataFrame, backbone: str, layer: str) -> pd.DataFrame:
    return rows[(rows["backbone"] == backbone) & (rows["layer"] == layer)]


def _feature_models(rows: pd.DataFrame, classifiers: bool = False) -> list[str]:
    """The models behind numbers computed from the feature maps of `rows` (a results table): their backbones,
    with `classifiers` the classifiers of those features, and the editor when a semantic edit is among their
    manipulations."""
    from featmap_ray.evaluation import model_weights

    names = sorted(set(rows["backbone"]))
    keys = [model_weights.backbone_key(b) for b in names]
    keys += [model_weights.classifier_key(b) for b in names] if classifiers else []
    edited = "family" in rows and (rows["family"] == edit.FAMILY).any()
    return keys + ([model_weights.EDITOR] if edited else [])


def _featinv_viz_models(cfg: Config) -> list[str]:
    """The models behind featinv-viz's images: FeatInv, the backbone whose maps it steers, and the editor when
    those maps are of a semantic edit."""
    from featmap_ray.evaluation import model_weights
    from featmap_ray.featinv.data import featinv_backbone

    keys = [model_weights.backbone_key(featinv_backbone(cfg)[0].name), model_weights.FEATINV_BASE,
            model_weights.CONTROLNET]
    return keys + ([model_weights.EDITOR] if cfg.featinv.viz.variant.startswith(f"{cfg.edit.prefix}:") else [])


def _models(cfg: Config, uses: dict[str, list[str]]) -> dict[str, ModelWeights]:
    """{key: model} of the models the report's sections use, in model_weights' order (backbones first)."""
    from featmap_ray.evaluation import model_weights

    used = {key for keys in uses.values() for key in keys}
    manifest = None
    if model_weights.CONTROLNET in used and cfg.featinv.controlnet:  # the run and step of a featinv-train output
        from featmap_ray.featinv import identity
        from featmap_ray.io.tracking import model_source

        manifest = identity.read_manifest(cfg, model_source(cfg, cfg.featinv.controlnet))
    models = model_weights.model_weights(cfg, manifest, backbones_seen=model_weights.backbones_in(used))
    return {key: m for key, m in models.items() if key in used}


def _models_box(models: Iterable[ModelWeights]) -> str:
    """The report's opening section: the models its numbers depend on and where their weights come from."""
    from featmap_ray.evaluation import model_weights, report

    return ("## Models\n\nThe models the numbers below depend on. A section that depends on one with random "
            "weights says so at its top.\n\n" + report.markdown_table(model_weights.models_table(models)))


def _featinv_viz_figures(cfg: Config, out: Path) -> dict[str, list[Path]]:
    """`featmap featinv-viz`'s files copied into the report (it rebuilds the report folder as a whole), and
    its grids as figures; nothing when the command has not run."""
    from featmap_ray.stages.featinv_viz import output_dir

    viz = output_dir(cfg).current()
    if viz is None:
        return {}
    with viz.local_copy() as local:
        shutil.copytree(local, out / "featinv_viz")
    base = out / "featinv_viz"
    return {
        "FeatInv-Viz: concept steering (source | reconstruction | attenuated | heat map | affected pixels)":
            sorted((base / "concepts").glob("*.png")),
        "FeatInv-Viz: interpolation of two feature maps, and the cosine of each map to its reconstruction":
            [base / "interpolation" / "strip.png", base / "interpolation" / "alpha_curve.png"],
        "FeatInv-Viz: spatial composition (B's region in A's map)": [base / "composition" / "grid.png"],
    }


def stale_results(cfg: Config) -> dict[str, list[str]]:
    """{results table: why} of the tables the report shows that were computed from mapping runs that
    changed since (`evaluate.results_staleness`)."""
    return {name: reasons for name in REPORTED if (reasons := results_staleness(cfg, name))}


def check_evaluations(cfg: Config) -> None:
    """`featmap evaluate` has written this study's evaluations, and no results table the report shows was
    computed from runs that changed since: else an error naming them, before anything is written."""
    read_results(cfg, "evaluations")
    stale = stale_results(cfg)
    if stale:
        lines = ["the results were computed from mapping runs that changed since; no report was written:"]
        lines += [f"  {results_uri(cfg, name)}: {'; '.join(reasons[:3])}"
                  + (f" and {len(reasons) - 3} more" if len(reasons) > 3 else "") for name, reasons in stale.items()]
        lines.append("Run `featmap fit` (it retrains the runs whose input features changed), then `featmap evaluate` "
                     "and `featmap analyze` again.")
        raise ValueError("\n".join(lines))


def status(cfg: Config) -> list[base.OutputStatus]:
    """The report folder, for `featmap status`: missing, stale (a results table it shows was computed from
    runs that changed since) or up to date (as far as the results it shows go)."""
    target = Layout(cfg.storage).reports(cfg.mapping.study)
    if target.current() is None:
        return [base.OutputStatus("report", str(target), "missing")]
    stale = stale_results(cfg)
    if stale:
        name, reasons = next(iter(stale.items()))
        return [base.OutputStatus("report", str(target), "stale", f"{name} computed from runs that changed: {reasons[0]}")]
    return [base.OutputStatus("report", str(target), "up to date")]


def command(cfg: Config) -> str:
    return f"[report] {run_report(cfg)}"


STAGE = base.Stage(
    "report", "tables and PNG plots in <storage>/reports/<study>/ and MLflow", command,
    details="Reads what evaluate (and analyze, recon-eval, featinv-viz) wrote: run `featmap evaluate` first.",
    keys=(*base.RAY_KEYS, "mapping.study"), checks=(check_evaluations,), reads=("results",), writes=("reports",),
    shows_runs_page=True, status=status)
