"""`featmap featinv-viz`: FeatInv-Viz concept steering, interpolation and spatial composition (spec §10.9,
§10.10) on the stored feature maps of `featinv.backbone` / `featinv.layer`, with the FeatInv model of the
config. The maths is in `viz.py`; this module reads the maps, samples, scores and writes.

It runs in the calling process (a handful of maps: no Ray Data), on CUDA when featinv.sampling.num_gpus
> 0 (under `ray job submit`, give the driver the GPU: `--entrypoint-num-gpus 1`). Everything goes to
`<storage>/results/<mapping.study>/featinv_viz/` (a new version published as a whole, local or object store:
featmap_ray.io.files; `featmap report` copies it into the report) and to the MLflow stage run `<study>:featinv-viz`:

    concepts/<source>/            source.png, recon_seed<s>.png, concept<k>_seed<s>.png,
                                  concept<k>_heat.png, concept<k>_unaffected.png
    concepts/<source>.png         grid: per concept, source | φ | φ' | heat map | affected pixels
    interpolation/alpha<α>_seed<s>.png, strip.png, alpha_curve.png
    composition/a_seed<s>.png, b_seed<s>.png, composed_seed<s>.png, grid.png
    concepts.csv, interpolation.csv, results.json, concepts.safetensors (the bases used, one tensor per concept)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.patches import Rectangle
from PIL import Image
from tqdm import tqdm

from featmap_ray import backbones
from featmap_ray.config import BackboneRequest, Config
from featmap_ray.cosine import median_cosine
from featmap_ray.evaluation.report import new_figure, safe_name, save_figure
from featmap_ray.featinv import data, identity, metrics, viz
from featmap_ray.io import imageio, tables, tracking
from featmap_ray.io.files import Location
from featmap_ray.layout import Layout
from featmap_ray.stages import base, runtime
from featmap_ray.stages.featinv_train import FEATINV_KEYS

NAME = "featinv-viz"
KEY = "featinv.viz"


@dataclass(frozen=True)
class Plan:
    """What the command will do, checked before any model is loaded or anything is written."""

    request: BackboneRequest
    layer: str
    grid: tuple[int, int]  # (H, W) of the layer's maps
    fit_ids: list[str]  # the images whose vectors the decomposition uses
    shown: list[str]  # the images steered and shown (the first featinv.viz.limit of fit_ids)
    label: str  # what was selected, for the summary
    concepts: viz.Concepts | None  # user bases (featinv.viz.concepts), None: decompose
    pair: tuple[str, str]
    region: tuple[int, int, int, int]
    seeds: list[int]


def plan(cfg: Config) -> Plan:
    """Resolve and check featinv.viz against the config and the tables; a ValueError or
    FileNotFoundError names the key that is wrong."""
    v = cfg.featinv.viz
    request, layer = data.featinv_backbone(cfg)
    channels, height, width = backbones.feature_shapes(backbones.get_spec(request.name), request, [layer])[layer]
    st = tables.Store(cfg.storage)
    uri = st.layout.features(request.name, layer)
    if st.open(uri) is None:
        raise FileNotFoundError(f"no feature maps at {uri}: run `featmap extract` first")
    stored = sorted(sid for sid, _ in st.keys(uri, filter=f"variant = {tables.sql_list([v.variant])}"))
    if not stored:
        raise ValueError(f"{KEY}.variant: no feature maps of variant {v.variant!r} in {uri}")
    if v.source_ids and v.class_name is not None:
        raise ValueError(f"{KEY}.class_name and {KEY}.source_ids are both set: select the images by one of them")
    if v.source_ids:
        missing = sorted(set(v.source_ids) - set(stored))
        if missing:
            raise ValueError(f"{KEY}.source_ids: no feature maps of variant {v.variant!r} for {missing} in {uri}")
        fit_ids, label = sorted(set(v.source_ids)), f"{len(set(v.source_ids))} source ids"
    else:
        images = st.open(st.layout.images)
        table = images.to_table(columns=["source_id", "class_name"], filter=f"source_id IN ({tables.sql_list(stored)})")
        by_class: dict[str, list[str]] = {}
        for sid, name in zip(table["source_id"].to_pylist(), table["class_name"].to_pylist(), strict=True):
            by_class.setdefault(name, []).append(sid)
        name = v.class_name if v.class_name is not None else min(by_class)  # unset: the first class by name
        if name not in by_class:
            raise ValueError(f"{KEY}.class_name: no feature maps of class {name!r} (variant {v.variant!r}) in {uri}; "
                             f"classes there: {sorted(by_class)[:20]}")
        fit_ids, label = sorted(set(by_class[name])), f"class {name!r}"
    shown = fit_ids[: v.limit]
    if v.pair is not None:
        missing = sorted(set(v.pair) - set(stored))
        if missing:
            raise ValueError(f"{KEY}.pair: no feature maps of variant {v.variant!r} for {missing} in {uri}")
        pair = (v.pair[0], v.pair[1])
    elif len(shown) >= 2:
        pair = (shown[0], shown[1])
    else:
        raise ValueError(f"{KEY}.pair: interpolation and composition need two images; {label} has {len(shown)}: "
                         "set featinv.viz.pair to two source ids")
    region = viz.check_region(v.region if v.region is not None else viz.central_region((height, width)),
                              (height, width), f"{KEY}.region")
    if v.concepts:
        try:
            concepts = viz.load_concepts(Location(v.concepts).read_bytes(), v.concepts, channels)
        except ValueError as e:
            raise ValueError(f"{KEY}.concepts: {e}") from None
    else:
        concepts = None
        if v.n_concepts * v.rank > channels:
            raise ValueError(f"{KEY}.n_concepts × {KEY}.rank = {v.n_concepts} × {v.rank} exceeds the {channels} "
                             f"channels of {request.name}/{layer}")
    seeds = [cfg.featinv.sampling.seed + i for i in range(v.num_seeds)]
    return Plan(request, layer, (height, width), fit_ids, shown, label, concepts, pair, region, seeds)


def read_maps(cfg: Config, p: Plan, ids: list[str]) -> dict[str, np.ndarray]:
    """float32 (C, H, W) maps of `ids` (variant featinv.viz.variant); a map with NaN or Inf is an error."""
    st = tables.Store(cfg.storage)
    variant = cfg.featinv.viz.variant
    table = st.rows(st.layout.features(p.request.name, p.layer), [(sid, variant) for sid in ids], ["feature"])
    maps = dict(zip(table["source_id"].to_pylist(), tables.tensor_numpy(table["feature"]).astype(np.float32),
                    strict=True))
    bad = sorted(sid for sid, m in maps.items() if not np.isfinite(m).all())
    if bad:
        raise ValueError(f"feature maps with NaN or Inf ({variant}): {bad}; leave them out of featinv.viz")
    return maps


def read_sources(cfg: Config, ids: list[str]) -> dict[str, np.ndarray]:
    """The stored images (uint8 RGB) of `ids`, variant featinv.viz.variant."""
    st = tables.Store(cfg.storage)
    table = st.rows(st.layout.images, [(sid, cfg.featinv.viz.variant) for sid in ids], ["image"])
    return {r["source_id"]: imageio.decode_png_rgb(r["image"]) for r in table.to_pylist()}


class Sampler:
    """FeatInv + the backbone probe: maps and seeds -> uint8 images, and the cosine of a map with its image's.
    `controlnet`: the ControlNet (None: featinv.controlnet)."""

    def __init__(self, cfg: Config, p: Plan, controlnet: str | None = None):
        from featmap_ray.featinv import loading

        self.sampling = cfg.featinv.sampling
        device = runtime.actor_device(self.sampling.num_gpus > 0)
        self.pipe = loading.featinv_pipeline(cfg, controlnet).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.probe = metrics.BackboneProbe(p.request, p.layer, device)

    def images(self, maps: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        """One image per (map, seed), sampled in batches of featinv.sampling.batch_size; each image depends
        only on its map and seed (per-item generators)."""
        from featmap_ray.featinv.pipeline import seeded_generators

        s, out = self.sampling, []
        for start in range(0, len(maps), s.batch_size):
            batch = torch.from_numpy(np.stack(maps[start:start + s.batch_size]).astype(np.float32))
            out += [np.asarray(image) for image in self.pipe(
                batch, seeded_generators(seeds[start:start + s.batch_size]), num_inference_steps=s.steps,
                guidance_scale=s.guidance, prompt=s.prompt, negative_prompt=s.negative_prompt,
                controlnet_conditioning_scale=s.control_scale).images]
        return out

    def per_seed(self, phi: np.ndarray, seeds: list[int]) -> list[np.ndarray]:
        return self.images([phi] * len(seeds), seeds)

    def cosine(self, phi: np.ndarray, images: list[np.ndarray]) -> list[float]:
        """Median over positions (rule lower, as FeatInv's metric) of the cosine between φ and each image's map."""
        seen = self.probe.features(torch.from_numpy(np.stack(images))).cpu()
        return median_cosine(torch.from_numpy(phi).float()[None].expand_as(seen), seen, "lower").tolist()


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _heat_rgb(heat: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["inferno"](heat)[..., :3] * 255).round().astype(np.uint8)


def _dimmed(image: np.ndarray, unaffected: np.ndarray) -> np.ndarray:
    """The image with its unaffected pixels greyed out: the mask made visible."""
    grey = np.asarray(Image.fromarray(image).convert("L").convert("RGB"), np.float64)
    return np.where(unaffected[..., None], (grey * 0.35 + 160).round(), image).astype(np.uint8)


def steer_concepts(sampler: Sampler, p: Plan, maps: dict[str, np.ndarray], sources: dict[str, np.ndarray],
                   concepts: viz.Concepts, factor: float, out: Path) -> list[dict]:
    """Per shown image and concept: φ and φ' reconstructed with the same seeds, heat map and mask."""
    rows = []
    for sid in tqdm(p.shown, desc="featinv-viz: concept steering", unit="image"):  # in-process: Ray shows nothing
        phi, name = maps[sid], safe_name(sid)
        folder = out / "concepts" / name
        variants = [phi] + [viz.attenuate(phi, concepts, k, factor).astype(np.float32) for k in range(len(concepts))]
        flat = sampler.images([m for m in variants for _ in p.seeds], p.seeds * len(variants))
        recon = [flat[i * len(p.seeds):(i + 1) * len(p.seeds)] for i in range(len(variants))]
        energy = (viz.parts(phi, concepts) ** 2).sum(axis=(1, 2, 3)) / max(float((phi.astype(np.float64) ** 2).sum()), 1e-30)
        if sid in sources:
            _png(folder / "source.png", sources[sid])
        for seed, image in zip(p.seeds, recon[0], strict=True):
            _png(folder / f"recon_seed{seed}.png", image)
        fig = new_figure(10, 2.1 * len(concepts))
        axes = fig.subplots(len(concepts), 5, squeeze=False)
        for k in range(len(concepts)):
            heat, unaffected = viz.heat_map(recon[0], recon[k + 1])
            for seed, image in zip(p.seeds, recon[k + 1], strict=True):
                _png(folder / f"concept{k}_seed{seed}.png", image)
            _png(folder / f"concept{k}_heat.png", _heat_rgb(heat))
            _png(folder / f"concept{k}_unaffected.png", (unaffected * 255).astype(np.uint8))
            change = np.mean([viz.pixel_distance(a, b).mean() for a, b in zip(recon[0], recon[k + 1], strict=True)])
            rows.append({"source_id": sid, "concept": k, "rank": concepts.bases[k].shape[0],
                         "energy_share": float(energy[k]), "mean_pixel_change": float(change),
                         "unaffected_fraction": float(unaffected.mean())})
            panels = [(sources.get(sid), "source"), (recon[0][0], f"φ, seed {p.seeds[0]}"),
                      (recon[k + 1][0], f"φ' (concept {k} × {factor})"), (_heat_rgb(heat), "heat map"),
                      (_dimmed(recon[0][0], unaffected), "affected (≥ 0.33)")]
            for ax, (image, title) in zip(axes[k], panels, strict=True):
                ax.set_axis_off()
                if image is not None:
                    ax.imshow(image)
                ax.set_title(title, fontsize=8)
        fig.suptitle(f"{sid}: concepts of {p.request.name}/{p.layer}", fontsize=9)
        save_figure(fig, out / "concepts", name)
    return rows


def interpolation(sampler: Sampler, p: Plan, maps: dict[str, np.ndarray], sources: dict[str, np.ndarray],
                  alphas: list[float], out: Path) -> list[dict]:
    """φ_α for every α, reconstructed with the same seeds; the cosine between φ_α and each reconstruction's map."""
    a, b = (maps[sid] for sid in p.pair)
    rows, first = [], []
    for alpha in tqdm(alphas, desc="featinv-viz: interpolation", unit="alpha"):
        phi = viz.interpolate(a, b, alpha).astype(np.float32)
        images = sampler.per_seed(phi, p.seeds)
        first.append(images[0])
        for seed, image, cos in zip(p.seeds, images, sampler.cosine(phi, images), strict=True):
            _png(out / "interpolation" / f"alpha{alpha:g}_seed{seed}.png", image)
            rows.append({"alpha": alpha, "seed": seed, "cos_median_lower": cos})
    strip = [(sources.get(p.pair[0]), f"A {p.pair[0]}")] + [(im, f"α={al:g}") for al, im in zip(alphas, first, strict=True)]
    strip.append((sources.get(p.pair[1]), f"B {p.pair[1]}"))
    fig = new_figure(1.6 * len(strip), 2.0)
    for ax, (image, title) in zip(fig.subplots(1, len(strip), squeeze=False)[0], strip, strict=True):
        ax.set_axis_off()
        if image is not None:
            ax.imshow(image)
        ax.set_title(title, fontsize=7)
    save_figure(fig, out / "interpolation", "strip")
    frame = pd.DataFrame(rows)
    fig = new_figure(4.5, 3.2)
    ax = fig.subplots()
    ax.scatter(frame["alpha"], frame["cos_median_lower"], s=10, alpha=0.5, label="per seed")
    mean = frame.groupby("alpha")["cos_median_lower"].mean()
    ax.plot(mean.index, mean.values, marker="o", label="mean over seeds")
    ax.set_xlabel("α   (φ_α = (1 − α)·φ_A + α·φ_B)")
    ax.set_ylabel("median cosine (lower)")
    ax.set_title("φ_α vs the map of its reconstruction", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, out / "interpolation", "alpha_curve")
    return rows


def composition(sampler: Sampler, p: Plan, maps: dict[str, np.ndarray], out: Path) -> dict:
    """A with the region taken from B, reconstructed; its change against A's reconstruction inside and
    outside the region's pixels (same seeds)."""
    a, b = (maps[sid] for sid in p.pair)
    composed = viz.compose(a, b, p.region).astype(np.float32)
    n = len(p.seeds)
    flat = sampler.images([a] * n + [b] * n + [composed] * n, p.seeds * 3)
    recon_a, recon_b, recon_c = flat[:n], flat[n:2 * n], flat[2 * n:]
    for name, images in (("a", recon_a), ("b", recon_b), ("composed", recon_c)):
        for seed, image in zip(p.seeds, images, strict=True):
            _png(out / "composition" / f"{name}_seed{seed}.png", image)
    inside = viz.region_pixels(p.region, p.grid, recon_a[0].shape[0])
    influence = viz.region_influence(recon_c, recon_a, inside)
    fig = new_figure(7.5, 2.6)
    r0, r1, c0, c1 = p.region
    size = recon_a[0].shape[0]
    for ax, image, title in zip(fig.subplots(1, 3), (recon_a[0], recon_b[0], recon_c[0]),
                                (f"A {p.pair[0]}", f"B {p.pair[1]}", "A with B's region"), strict=True):
        ax.imshow(image)
        ax.set_axis_off()
        ax.set_title(title, fontsize=8)
        sy, sx = size / p.grid[0], size / p.grid[1]  # the region's outline in pixels
        ax.add_patch(Rectangle((c0 * sx - 0.5, r0 * sy - 0.5), (c1 - c0) * sx, (r1 - r0) * sy, fill=False,
                               edgecolor="yellow", lw=1.5))
    save_figure(fig, out / "composition", "grid")
    return {"a": p.pair[0], "b": p.pair[1], "region": list(p.region), "grid": list(p.grid), **influence}


def output_dir(cfg: Config) -> Location:
    """Where the experiments' files go: beside the study's results (a report is rebuilt from them)."""
    return Layout(cfg.storage).featinv_viz(cfg.mapping.study)


def provenance(cfg: Config, p: Plan, controlnet: str | None) -> base.Provenance:
    """What made the experiments' outputs: the FeatInv model (`controlnet`: as `Sampler` loads it) and
    sampler, the seeds, the backbone (its maps, the cosine probe), featinv.viz (and the content of its
    concept bases' file), and the features and images groups read."""
    v, st = cfg.featinv.viz, tables.Store(cfg.storage)
    settings = {**identity.model_identity(cfg, controlnet), **identity.sampler_settings(cfg),
                "featinv.sampling.seed": cfg.featinv.sampling.seed,
                "featinv.backbone": p.request.model_dump(mode="json", exclude={"layers"}), "featinv.layer": p.layer,
                **{f"{KEY}.{k}": value for k, value in v.model_dump(mode="json").items()}}
    if v.concepts:
        settings[f"{KEY}.concepts"] = f"{v.concepts} (content {identity.content_digest(v.concepts)})"
    inputs = {**base.input_fingerprints(cfg.storage, st.layout.features(p.request.name, p.layer), [v.variant]),
              **base.input_fingerprints(cfg.storage, st.layout.images, [v.variant])}
    return base.Provenance(settings, inputs)


def run(cfg: Config) -> str:
    """The three experiments on the selected maps; returns what it made, in words. results.json records
    their provenance (`provenance`)."""
    from safetensors.numpy import save_file

    v = cfg.featinv.viz
    p = plan(cfg)
    maps = read_maps(cfg, p, sorted({*p.fit_ids, *p.pair}))
    sources = read_sources(cfg, sorted({*p.shown, *p.pair}))
    concepts = p.concepts or viz.decompose(viz.feature_vectors(np.stack([maps[s] for s in p.fit_ids])),
                                           v.n_concepts, v.rank, v.seed)
    how = f"file {v.concepts}" if v.concepts else (f"k-means + SVD of {len(p.fit_ids)} maps' vectors "
                                                   f"(n_concepts {v.n_concepts}, rank {v.rank}, seed {v.seed})")
    controlnet = identity.pinned_controlnet(cfg)
    made = provenance(cfg, p, controlnet)
    sampler = Sampler(cfg, p, controlnet)
    st = tables.Store(cfg.storage)
    target = output_dir(cfg)
    with target.publish() as out:
        concept_rows = steer_concepts(sampler, p, maps, sources, concepts, v.factor, out)
        interp_rows = interpolation(sampler, p, maps, sources, v.alphas, out)
        composed = composition(sampler, p, maps, out)
        pd.DataFrame(concept_rows).to_csv(out / "concepts.csv", index=False)
        pd.DataFrame(interp_rows).to_csv(out / "interpolation.csv", index=False)
        save_file({f"concept_{k:02d}": np.ascontiguousarray(b, np.float32) for k, b in enumerate(concepts.bases)},
             str(out / "concepts.safetensors"))
        source = sampler.pipe.source
        results = {"backbone": p.request.name, "layer": p.layer, "images": p.label, "shown": p.shown,
                   "controlnet": str(source) if source else "fresh from the base UNet",
                   "concepts": {"how": how, "ranks": [b.shape[0] for b in concepts.bases]},
                   "factor": v.factor, "seeds": p.seeds, "concept_steering": concept_rows,
                   "interpolation": interp_rows, "composition": composed, "provenance": made.to_json()}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        curve = pd.DataFrame(interp_rows).groupby("alpha")["cos_median_lower"].mean()
        logged = {f"interp_cos_alpha_{alpha:g}": float(cos) for alpha, cos in curve.items()}
        logged.update({f"composition_{k}": val for k in ("change_inside", "change_outside")
                       if (val := composed[k]) is not None})
        logged["unaffected_fraction_mean"] = float(np.mean([r["unaffected_fraction"] for r in concept_rows]))
        inputs = tracking.table_inputs(cfg, [st.layout.features(p.request.name, p.layer), st.layout.images])
        with tracking.study_stage(cfg, NAME, inputs, context="evaluation") as run_id:
            tracking.end_stage_run(cfg, run_id, logged, artefacts=out)
    curve_text = ", ".join(f"α={alpha:g}: {cos:.3f}" for alpha, cos in curve.items())
    inside, outside = composed["change_inside"], composed["change_outside"]
    return (f"[{NAME}] {len(p.shown)} images of {p.label} × {len(concepts)} concepts ({how}), "
            f"{len(p.seeds)} seeds each, in {target}\n"
            f"[{NAME}] interpolation {p.pair[0]} -> {p.pair[1]}, median cosine (lower) of φ_α and its "
            f"reconstruction: {curve_text}\n"
            f"[{NAME}] composition, region {list(p.region)} of the {p.grid[0]}×{p.grid[1]} grid: mean RGB change vs A "
            f"inside {_fmt(inside)}, outside {_fmt(outside)}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def check_plan(cfg: Config) -> None:
    """featinv.viz against the features table: the images, the pair, the region on the layer's grid, the
    concept bases' dimension, the alphas (the config checks their range)."""
    plan(cfg)


STAGE = base.Stage(
    NAME, "FeatInv-Viz: concept steering, interpolation, composition (PNGs)", run,
    details="Attenuates concepts of the selected images' feature maps (a k-means + SVD decomposition, or "
            "featinv.viz.concepts) and maps where the reconstructions change; reconstructs interpolations and a "
            "spatial composition of two maps. PNGs, CSVs and results.json in <storage>/results/<study>/"
            "featinv_viz/ (copied into the report by `featmap report`) and MLflow.",
    keys=(*base.RAY_KEYS, "featinv.viz", "mapping.study", *FEATINV_KEYS),
    checks=(data.check_featinv, check_plan), reads=("features", "images", "featinv"), writes=("featinv_viz",),
    shows_runs_page=True)
