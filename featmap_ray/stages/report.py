"""`featmap report`: tables and PNG plots of what evaluate, analyze, recon-eval and featinv-viz wrote,
in <storage>/reports/<study>/ (replaced as a whole) and in MLflow.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from featmap_ray.config import Config
from featmap_ray.io import imageio, tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.layout import Layout
from featmap_ray.stages.evaluate import read_results, results_uri


def run_report(cfg: Config) -> Location:
    """report.md and its figures in <storage>/reports/<study>/ (replaced as a whole) and in MLflow."""
    target = Layout(cfg.storage).reports(cfg.mapping.study)
    with target.staged() as out:
        n_figures = write_report(cfg, out)
        results = [results_uri(cfg, name) for name in ("evaluations", "svd", "singular_values", "weight_bias",
                                                        "truncation")]
        run_id = tracking.study_stage_run(cfg, "report", tracking.table_inputs(cfg, results), context="evaluation")
        tracking.end_stage_run(cfg, run_id, {"figures": n_figures}, artefacts=out)
    return target / "report.md"


def write_report(cfg: Config, out: Path) -> int:
    """report.md and its PNG figures in the local folder `out`; returns the number of figures."""
    from featmap_ray.evaluation import report

    evals = read_results(cfg, "evaluations")
    cosine = "cos_median_upper"  # the evaluation's median rule, that of the loss (feature_metrics)
    figures = {"Median cosine (upper) to the true edited features": report.family_heatmaps(evals, cosine, out)}
    sections = {f"{cosine} {b}/{l}": t for (b, l), t in report.family_tables(evals, cosine).items()}
    if "agree_top1_orig_mapped" in evals and evals["agree_top1_orig_mapped"].notna().any():
        figures["Top-1 agreement with the original's prediction"] = report.family_heatmaps(
            evals, "agree_top1_orig_mapped", out)
        sections.update({f"top-1 agreement {b}/{l}": t
                       for (b, l), t in report.family_tables(evals, "agree_top1_orig_mapped").items()})
    if tables.open_table(results_uri(cfg, "svd")) is not None:
        wxb = read_results(cfg, "weight_bias")
        figures["Singular-value spectra of the linear maps"] = report.spectra_plot(read_results(cfg, "singular_values"), out)
        figures["Weight vs bias by manipulation family"] = report.weight_bias_plot(wxb.assign(group=wxb["family"]), out)
        figures["Rank-k truncations of W"] = report.truncation_plot(read_results(cfg, "truncation"), out)
        sections["SVD measures"] = read_results(cfg, "svd").drop(columns=["run", "dataset"])
    if tables.open_table(results_uri(cfg, "reconstructions")) is not None:  # featmap recon-eval
        recon = read_results(cfg, "reconstructions")
        sections.update({f"Reconstructions: {metric} against the manipulated image (mean over sources)": t
                       for metric, t in report.recon_tables(recon).items()})
        st = tables.Store(cfg.storage)
        keys = set(zip(recon["source_id"], recon["variant"], strict=True))
        stored = st.rows(st.layout.images, keys, ["image"]).to_pylist()
        manipulated = {(r["source_id"], r["variant"]): imageio.decode_png_rgb(r["image"]) for r in stored}
        figures["Reconstructions: manipulated image, FeatInv of the true target, mapped, noise control, baseline"] = (
            report.recon_grids(recon, manipulated, out))
    figures.update(_featinv_viz_figures(cfg, out))
    report.write_summary(sections, out / "report.md", figures=figures, title=f"FeatMap study {cfg.mapping.study}")
    return sum(len(paths) for paths in figures.values())


def _featinv_viz_figures(cfg: Config, out: Path) -> dict[str, list[Path]]:
    """`featmap featinv-viz`'s files copied into the report (it rebuilds the report folder as a whole), and
    its grids as figures; nothing when the command has not run."""
    from featmap_ray.stages.featinv_viz import output_dir

    viz = output_dir(cfg)
    if not (viz / "results.json").exists():
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
