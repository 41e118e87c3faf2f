"""Result tables -> PNG plots and a markdown summary, readable without a notebook.

Figures are drawn on matplotlib's Agg canvas through `matplotlib.figure.Figure` (no pyplot, no
global backend state), one figure per (backbone, layer). Several rows for the same plotted point
(e.g. per-sample rows, or repeated runs) are averaged: for per-sample rows of a feature metric
this is exactly the run-level value (the mean over samples).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _check(df: pd.DataFrame, name: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; expected {list(columns)}, got {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{name}: the table is empty")


def safe_name(*parts: object) -> str:
    """A file-name stem from parts: characters other than letters, digits, '.', '-' become '_'."""
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "_", str(p)).strip("_") for p in parts)


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_dir: Path | str, *name: object) -> Path:
    path = Path(out_dir) / f"{safe_name(*name)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _by_backbone_layer(df: pd.DataFrame) -> Iterable[tuple[str, str, pd.DataFrame]]:
    for (backbone, layer), group in df.groupby(["backbone", "layer"], sort=True):
        yield str(backbone), str(layer), group


def heatmap_figure(table: pd.DataFrame, title: str, fmt: str = ".3f") -> Figure:
    """A heatmap of table (rows x columns) with each non-missing cell annotated with its value."""
    values = table.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    fig = new_figure(1.6 + 1.0 * n_cols, 1.4 + 0.45 * n_rows)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n_cols), [str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(range(n_rows), [str(i) for i in table.index])
    ax.set_xlabel(str(table.columns.name or ""))
    ax.set_ylabel(str(table.index.name or ""))
    ax.set_title(title)
    middle = np.nanmean(values) if np.isfinite(values).any() else 0.0
    for i in range(n_rows):
        for j in range(n_cols):
            if np.isfinite(values[i, j]):
                # dark text on the bright (high) end of viridis, light text on the dark end
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="black" if values[i, j] > middle else "white")
    return fig


def family_tables(evals: pd.DataFrame, metric: str) -> dict[tuple[str, str], pd.DataFrame]:
    """{(backbone, layer): table} with rows = model family, columns = manipulation, cell = the
    mean of `metric` (missing combinations are NaN). Also usable as report.md tables."""
    _check(evals, "evals", ["backbone", "layer", "model", "manipulation", metric])
    evals = evals.dropna(subset=[metric])  # e.g. classifier metrics of a backbone without a head
    if evals.empty:
        raise ValueError(f"evals: column {metric!r} has no values, nothing to plot")
    return {(backbone, layer): group.pivot_table(index="model", columns="manipulation", values=metric, aggfunc="mean")
            for backbone, layer, group in _by_backbone_layer(evals)}


def family_heatmaps(evals: pd.DataFrame, metric: str, out_dir: Path | str) -> list[Path]:
    """One annotated heatmap of `family_tables` per (backbone, layer), written as
    heatmap_<metric>_<backbone>_<layer>.png."""
    return [save_figure(heatmap_figure(table, f"{metric} — {backbone} {layer}"), out_dir, "heatmap", metric, backbone, layer)
            for (backbone, layer), table in family_tables(evals, metric).items()]


def spectra_plot(singular_values: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """Normalised singular values s_i / s_1 against i, one line per manipulation, one figure per
    (backbone, layer). s_1 is the value at the smallest index. Writes spectra_<backbone>_<layer>.png."""
    _check(singular_values, "singular_values", ["backbone", "layer", "manipulation", "index", "value"])
    paths = []
    for backbone, layer, group in _by_backbone_layer(singular_values):
        fig = new_figure(6, 4)
        ax = fig.add_subplot()
        for manipulation, rows in group.groupby("manipulation", sort=True):
            spectrum = rows.groupby("index")["value"].mean().sort_index()
            if spectrum.iloc[0] <= 0:
                raise ValueError(f"singular_values: {backbone} {layer} {manipulation}: the largest singular value "
                                 f"is {spectrum.iloc[0]}, cannot normalise")
            ax.plot(spectrum.index, spectrum / spectrum.iloc[0], label=str(manipulation))
        ax.set(xlabel="index i", ylabel="s_i / s_1", title=f"singular values — {backbone} {layer}")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out_dir, "spectra", backbone, layer))
    return paths


def weight_bias_plot(wxb: pd.DataFrame, out_dir: Path | str, metrics: Sequence[str] = ("wx_share", "bias_share")) -> list[Path]:
    """Box plots with the individual values (jittered points) of each metric per manipulation
    group, one panel per metric, one figure per (backbone, layer). wxb is long format (one row
    per sample and metric). Writes weight_bias_<backbone>_<layer>.png."""
    _check(wxb, "wxb", ["backbone", "layer", "group", "manipulation", "metric", "value"])
    wxb = wxb[wxb["metric"].isin(metrics)].dropna(subset=["value"])
    if wxb.empty:
        raise ValueError(f"wxb: no rows with metric in {list(metrics)}")
    rng = np.random.default_rng(0)  # jitter only: fixed so that re-runs draw identical files
    paths = []
    for backbone, layer, group in _by_backbone_layer(wxb):
        present = [m for m in metrics if m in set(group["metric"])]
        fig = new_figure(1.5 + 3.5 * len(present), 4)
        for n, metric in enumerate(present):
            ax = fig.add_subplot(1, len(present), n + 1)
            rows = group[group["metric"] == metric]
            names = list(pd.unique(rows["group"]))
            data = [rows.loc[rows["group"] == g, "value"].to_numpy(float) for g in names]
            ax.boxplot(data, showfliers=False)
            for x, values in enumerate(data, start=1):
                ax.scatter(x + rng.uniform(-0.15, 0.15, len(values)), values, s=6, alpha=0.5)
            ax.set_xticks(range(1, len(names) + 1), [str(g) for g in names], rotation=30, ha="right")
            ax.set(title=metric, ylabel="value")
        fig.suptitle(f"weight vs bias — {backbone} {layer}")
        paths.append(save_figure(fig, out_dir, "weight_bias", backbone, layer))
    return paths


def truncation_plot(trunc: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """Each metric against the rank k of the truncated map, one line per manipulation, one panel
    per metric, one figure per (backbone, layer). Writes truncation_<backbone>_<layer>.png."""
    _check(trunc, "trunc", ["backbone", "layer", "manipulation", "k", "metric", "value"])
    paths = []
    for backbone, layer, group in _by_backbone_layer(trunc):
        metrics = sorted(group["metric"].unique())
        fig = new_figure(1.5 + 4.5 * len(metrics), 4)
        for n, metric in enumerate(metrics):
            ax = fig.add_subplot(1, len(metrics), n + 1)
            rows = group[group["metric"] == metric]
            for manipulation, line in rows.groupby("manipulation", sort=True):
                curve = line.groupby("k")["value"].mean().sort_index()
                ax.plot(curve.index, curve.to_numpy(), marker="o", markersize=3, label=str(manipulation))
            if group["k"].min() > 0:
                ax.set_xscale("log", base=2)  # k usually doubles from one truncation to the next
            ax.set(xlabel="rank k", ylabel=metric, title=metric)
            ax.legend(fontsize=7)
        fig.suptitle(f"rank truncation — {backbone} {layer}")
        paths.append(save_figure(fig, out_dir, "truncation", backbone, layer))
    return paths


RECON_METRICS = ("ssim", "psnr", "cos_median", "cos_median_masked", "mse")


def recon_tables(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{metric: table}: per (backbone, layer, manipulation, family, model) the mean over sources of each
    reconstruction's score against the manipulated image — FeatInv's own (target), the mapping's (mapped),
    the spatial-only baseline and the noise control side by side — and the pairs it averages."""
    keys = ["backbone", "layer", "manipulation", "family", "model"]
    _check(rows, "recon_tables", ["backbone", "layer", "variant", "family", "model"])
    rows = rows.rename(columns={"variant": "manipulation"})
    out = {}
    for metric in RECON_METRICS:
        columns = {kind: f"manip_vs_{kind}_{metric}" for kind in ("target", "mapped", "baseline", "noise")
                   if f"manip_vs_{kind}_{metric}" in rows}
        # PSNR of two identical images is +inf: averaged over the finite values.
        finite = rows[keys + list(columns.values())].replace([np.inf, -np.inf], np.nan)
        table = finite.groupby(keys, sort=True)[list(columns.values())].mean().rename(
            columns={c: k for k, c in columns.items()})
        table["pairs"] = rows.groupby(keys, sort=True).size()
        out[metric] = table.reset_index()
    return out


def recon_grids(rows: pd.DataFrame, manipulated: Mapping[tuple[str, str], np.ndarray], out_dir: Path | str,
                per_grid: int = 3) -> list[Path]:
    """One image grid per (backbone, layer, manipulation): for the first `per_grid` sources, the manipulated
    image, FeatInv's reconstruction of the true target, then per model the reconstruction of its mapped map
    and of its noise control, and the spatial-only baseline when there is one."""
    from featmap_ray.io import imageio

    paths = []
    for (backbone, layer, manipulation), group in rows.groupby(["backbone", "layer", "variant"], sort=True):
        sources = sorted(group["source_id"].unique())[:per_grid]
        models = sorted(group["model"].unique())
        first = group[group["model"] == models[0]].set_index("source_id")
        columns = [("manipulated", None, None), ("target", models[0], "recon_target")]
        for model in models:
            columns.append((f"mapped\n{model}", model, "recon_mapped"))
            if group.loc[group["model"] == model, "recon_noise"].notna().any():
                columns.append((f"noise\n{model}", model, "recon_noise"))
        if first["recon_baseline"].notna().any():
            columns.append(("spatial only", models[0], "recon_baseline"))
        fig = new_figure(1.6 * len(columns), 1.7 * len(sources) + 0.4)
        axes = fig.subplots(len(sources), len(columns), squeeze=False)
        for i, sid in enumerate(sources):
            for j, (title, model, column) in enumerate(columns):
                ax = axes[i][j]
                ax.set_axis_off()
                if column is None:
                    image = manipulated.get((sid, manipulation))
                else:
                    match = group[(group["model"] == model) & (group["source_id"] == sid)][column]
                    image = imageio.decode_png_rgb(match.iloc[0]) if len(match) and match.iloc[0] is not None else None
                if image is not None:
                    ax.imshow(image)
                if i == 0:
                    ax.set_title(title, fontsize=8)
        fig.suptitle(f"reconstructions — {backbone} {layer} {manipulation}", fontsize=9)
        paths.append(save_figure(fig, out_dir, "reconstructions", backbone, layer, manipulation))
    return paths


def _cell(value: object, float_format: str) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float | np.floating):
        return format(value, float_format)
    return str(value).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, columns: Sequence[str] | None = None, index: str | Sequence[str] | None = None,
                   float_format: str = ".4g") -> str:
    """A GitHub markdown table: the `index` columns first, then `columns` (default: all others).
    A pivot table's own (non-default) row index is shown as leading columns; multi-level column
    labels are joined with ' / '."""
    if not isinstance(df.index, pd.RangeIndex):
        df = df.reset_index()
    if isinstance(df.columns, pd.MultiIndex):
        df.columns = [" / ".join(str(level) for level in c if str(level)) for c in df.columns]
    df = df.rename(columns=str)
    index = [index] if isinstance(index, str) else list(index or [])
    columns = list(columns) if columns is not None else [c for c in df.columns if c not in index]
    _check(df, "markdown_table", [*index, *columns])
    header = [*index, *columns]
    lines = ["| " + " | ".join(_cell(h, float_format) for h in header) + " |", "|" + "---|" * len(header)]
    for row in df[header].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, float_format) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_summary(tables: Mapping[str, pd.DataFrame], out_path: Path | str,
                  figures: Mapping[str, Sequence[Path | str]] | None = None, title: str = "FeatMap report",
                  intro: str = "", notes: Mapping[str, str] | None = None) -> Path:
    """Write out_path (e.g. report.md): `intro` (markdown) under the title, then one section per table
    (heading = key), then one section per figure list with the images linked relative to the report; a
    section whose heading `notes` has opens with that line. Each table is also written next to it as
    <safe key>.csv."""
    if not tables:
        raise ValueError("write_summary: expected at least one table, got none")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    notes = notes or {}
    parts = [f"# {title}\n"] + ([intro] if intro else [])

    def heading(key: str) -> str:
        return f"## {key}\n\n" + (f"{notes[key]}\n\n" if key in notes else "")

    for key, table in tables.items():
        parts.append(heading(key) + markdown_table(table))
        table.to_csv(out_path.parent / f"{safe_name(key)}.csv", index=not isinstance(table.index, pd.RangeIndex))
    for key, paths in (figures or {}).items():
        links = [f"![{Path(p).stem}]({Path(os.path.relpath(p, out_path.parent)).as_posix()})" for p in paths]
        parts.append(heading(key) + "\n".join(links) + "\n")
    out_path.write_text("\n".join(parts))
    return out_path
