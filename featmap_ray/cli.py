"""`featmap` command line: `featmap COMMAND [--config FILE] [key=value ...]`.

Entry points only parse configuration, check it, and call the Ray stages; `jobs/*.py` do the same
for `ray job submit`. Each command first runs its cheap checks (registry names, weights, tables),
and only then starts Ray and writes anything under the storage root.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from featmap_ray.config import Config, ConfigError, load_config
from featmap_ray.io import tables
from featmap_ray.stages import base

log = logging.getLogger("featmap")


def _ingest(cfg: Config) -> list[base.StageSummary]:
    from featmap_ray.stages import ingest

    return [ingest.run(cfg)]


def _manipulate(cfg: Config) -> list[base.StageSummary]:
    from featmap_ray.stages import manipulate as stage

    return [stage.run(cfg)]


def _edit(cfg: Config) -> list[base.StageSummary]:
    from featmap_ray.stages import edit as edit_stage

    return [edit_stage.run(cfg)]


def _extract(cfg: Config) -> list[base.StageSummary]:
    from featmap_ray.stages import extract

    return extract.run(cfg)


STAGES: dict[str, Callable[[Config], list[base.StageSummary]]] = {
    "ingest": _ingest,
    "manipulate": _manipulate,
    "edit": _edit,
    "extract": _extract,
}
PIPELINE = ["ingest", "manipulate", "edit", "extract"]


def pipeline_stages(cfg: Config) -> list[str]:
    """The pipeline's stages for this config: `edit` only when edit.prompts has prompts for the dataset."""
    return [s for s in PIPELINE if s != "edit" or cfg.edit.prompts.get(cfg.dataset.name)]


def _fit(cfg: Config) -> object:
    from featmap_ray.stages import fit

    summary = fit.run_study(cfg)
    if summary.failed and not summary.fitted and not summary.skipped:
        raise RuntimeError(f"every run of study {cfg.mapping.study} failed")
    return summary


def _sweep(cfg: Config) -> object:
    import json

    from featmap_ray.stages import sweep

    return json.dumps(sweep.run_sweep(cfg), indent=1, default=str)


def _evaluate(cfg: Config) -> object:
    from featmap_ray.stages import evaluate as stages

    frame = stages.run_evaluate(cfg)
    cols = [c for c in ("backbone", "layer", "manipulation", "model", "cos_median_upper", "mse", "agree_top1_orig_mapped")
            if c in frame]
    return f"[evaluate] {len(frame)} rows in {stages.results_uri(cfg, 'evaluations')}\n" + frame[cols].to_string(index=False)


def _analyze(cfg: Config) -> object:
    from featmap_ray.stages import analyze
    from featmap_ray.stages import evaluate as stages

    frames = analyze.run_analyze(cfg)
    return "[analyze] " + ", ".join(f"{name}: {len(f)} rows in {stages.results_uri(cfg, name)}" for name, f in frames.items())


def _report(cfg: Config) -> object:
    from featmap_ray.stages import report

    return f"[report] {report.run_report(cfg)}"


def _featinv_train(cfg: Config) -> object:
    from featmap_ray.stages import featinv_train as train

    return train.run(cfg)


def _reconstruct(cfg: Config) -> object:
    from featmap_ray.stages import reconstruct

    s = cfg.featinv.sampling
    if s.mapping_run is None:
        return reconstruct.run(cfg)
    from featmap_ray.stages.mapped import mapped_features

    ds, keys = mapped_features(cfg, s.mapping_run, split=s.split or "test")
    return reconstruct.reconstruct_dataset(cfg, ds, f"mapped:{s.mapping_run}", keys=keys[: s.limit])


def _recon_eval(cfg: Config) -> object:
    from featmap_ray.stages import recon_eval

    return recon_eval.run(cfg)


def _featinv_viz(cfg: Config) -> object:
    from featmap_ray.stages import featinv_viz as viz_stage

    return viz_stage.run(cfg)


# Study commands: each prints what it made; failures inside a study are listed, not raised.
STUDY: dict[str, Callable[[Config], object]] = {
    "fit": _fit, "sweep": _sweep, "evaluate": _evaluate, "analyze": _analyze, "report": _report,
    "featinv-train": _featinv_train, "reconstruct": _reconstruct, "recon-eval": _recon_eval,
    "featinv-viz": _featinv_viz,
}


def _featinv_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the reference's .ckpt (or .safetensors)")
    parser.add_argument("out_dir", help="written: controlnet/ unet/ vae/ text_encoder/ scheduler/ "
                                        "[tokenizer/ model_index.json]")
    parser.add_argument("--backbone", help="backbone the features come from (recorded, checked when sampling)")
    parser.add_argument("--layer", help="its layer")
    parser.add_argument("--tokenizer", help="a CLIP tokenizer folder to copy (e.g. the base model's tokenizer/)")
    parser.add_argument("--pooled", action="store_true", help="the checkpoint is of the pooled variant")


def featinv_import(args: argparse.Namespace) -> int:
    """`featmap featinv-import CKPT OUT_DIR [--backbone B --layer L --tokenizer DIR]`: convert a
    FeatInv ControlNet-research-code checkpoint into our diffusers folders."""
    from featmap_ray.featinv.convert import CheckpointMismatch, import_ldm_checkpoint

    try:
        out = import_ldm_checkpoint(args.checkpoint, args.out_dir, backbone=args.backbone, layer=args.layer,
                                    tokenizer_dir=args.tokenizer, pooled=args.pooled)
    except (CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"featmap featinv-import: error: {e}", file=sys.stderr)
        return 1
    print(f"[featinv-import] diffusers folders in {out}")
    return 0


def _stage_inputs(cfg: Config, name: str) -> list:
    """What a pipeline stage reads, for its MLflow run's inputs: the dataset folder (ingest), the
    images table at its current version (manipulate, edit, extract)."""
    from featmap_ray.io import tracking

    if name == "ingest":
        return [tracking.TableInput(cfg.dataset.name, cfg.dataset.root)]
    return tracking.table_inputs(cfg, [tables.Store(cfg.storage).layout.images])


def serve_until_interrupted(cfg: Config) -> int:
    """`featmap serve`: deploy the service, print where it is, keep it up until Ctrl-C / SIGTERM."""
    import signal
    import threading

    from ray import serve

    from featmap_ray.serve import deployments

    url = deployments.start(cfg)
    print(f"[serve] page: {url}/\n[serve] API docs: {url}/docs  (OpenAPI: {url}/openapi.json)\n"
          f"[serve] models: {url}/models   Ctrl-C stops the service", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0


def run_stage(cfg: Config, name: str) -> list[base.StageSummary]:
    """One stage inside its own MLflow run, with the summary as metrics and what it read as inputs."""
    import mlflow

    from featmap_ray.io import tracking

    with tracking.stage_run(cfg, name, _stage_inputs(cfg, name)):
        summaries = STAGES[name](cfg)
        for s in summaries:
            mlflow.log_metrics({f"{s.stage}.written": sum(s.written.values()), f"{s.stage}.skipped": s.skipped,
                                f"{s.stage}.failed": s.failed})
    for s in summaries:
        print(s, flush=True)
    return summaries


def describe(cfg: Config) -> str:
    """Where the tables are, how many rows they hold, and how to look at them."""
    from featmap_ray import backbones
    from featmap_ray.io import tracking

    st = tables.Store(cfg.storage)
    uris = [st.layout.images]
    for request in cfg.extract.backbones:
        spec = backbones.get_spec(request.name)
        uris += [st.layout.features(spec.name, layer) for layer in backbones.resolve_layers(spec, request.layers)]
    uris.append(st.layout.errors)
    lines = [f"storage root: {cfg.storage}"]
    lines += [f"  {st.count(uri):>7} rows  {uri}" for uri in uris if st.open(uri) is not None] or [
        "  no tables yet: run `featmap pipeline`"]
    lines += [
        "look at them:",
        f"  python -c \"import lance; print(lance.dataset('{st.layout.images}').to_table(columns=['source_id','variant','class_name']).to_pandas())\"",
    ]
    if (command := tracking.ui_command(cfg)) is not None:
        lines.append(f"  {command}")
    try:
        exp = tracking.find_experiment_id(cfg)  # creates nothing
        lines.append(f"  MLflow runs: {tracking.runs_page_url(cfg, exp)}" if exp is not None else
                     f"  MLflow runs: {tracking.ui_base(cfg)} (no experiment {cfg.mlflow.experiment!r} yet)")
    except RuntimeError as e:  # an unreachable server: the rest of the answer still stands
        lines.append(f"  MLflow runs: {tracking.ui_base(cfg)} ({e})")
    return "\n".join(lines)


# -- checks: run after the config loads, before Ray starts or anything is written ------------------
# Each raises (ValueError, FileNotFoundError: exit code 1) naming what is wrong; none needs Ray.

def _check_dataset(cfg: Config) -> None:
    """dataset.root is a folder holding image files of the configured classes (the builtin demo
    photographs are unpacked by ingest itself)."""
    from featmap_ray.stages import ingest

    root = cfg.dataset.root
    if not root.startswith("builtin:") and not ingest.discover(cfg.dataset, root):
        raise FileNotFoundError(f"no image files ({', '.join(cfg.dataset.extensions)}) under dataset.root {root}")


def _check_images(cfg: Config) -> None:
    st = tables.Store(cfg.storage)
    if st.open(st.layout.images) is None:
        raise FileNotFoundError(f"no images table at {st.layout.images}: run `featmap ingest` first")


def _check_edit(cfg: Config) -> None:
    """edit.prompts names something to do, and edit.model is here and suits the settings."""
    if not any(cfg.edit.prompts.values()):
        raise ValueError("edit.prompts is empty: nothing to edit (give prompts per dataset name; README: Semantic edits)")
    _check_edit_model(cfg)


def _check_edit_model(cfg: Config) -> None:
    """The pipeline's edit stage (when the dataset has prompts): the model is here and suits the settings."""
    if cfg.edit.prompts.get(cfg.dataset.name):
        from featmap_ray.manipulations import semantic

        semantic.check(cfg.edit)


def _check_backbones(cfg: Config) -> None:
    """Every extract.backbones entry: a registry (or timm) name, its layers, its weights."""
    from featmap_ray import backbones

    for request in cfg.extract.backbones:
        spec = backbones.get_spec(request.name)
        backbones.resolve_layers(spec, request.layers)
        backbones.check_weights(spec, request)


def _check_study(cfg: Config) -> None:
    from featmap_ray.stages import fit

    fit.validate_study(cfg)


def _check_grid(cfg: Config) -> None:
    """The mapping section expands to a grid (families, losses, targets), tables not consulted."""
    from featmap_ray.mapping import grid

    grid.expand(cfg)


def _check_sweep(cfg: Config) -> None:
    from featmap_ray.stages import sweep

    sweep.search_space(cfg, sweep.base_spec(cfg))


def _check_evaluations(cfg: Config) -> None:
    from featmap_ray.stages import evaluate as stages

    stages.read_results(cfg, "evaluations")


def _check_featinv(cfg: Config) -> None:
    """The backbone and layer FeatInv inverts, their weights, the ControlNet's MLflow run or model
    version (featinv.controlnet as runs:/ or models:/), and the Stable Diffusion base model."""
    from featmap_ray import backbones
    from featmap_ray.featinv import data
    from featmap_ray.io import tracking

    request, _ = data.featinv_backbone(cfg)
    backbones.check_weights(backbones.get_spec(request.name), request)
    if cfg.featinv.controlnet:
        tracking.model_source(cfg, cfg.featinv.controlnet)  # ModelNotFound (a FileNotFoundError) names what is missing
    if cfg.featinv.base_model != "tiny":
        from featmap_ray.featinv import loading  # imports diffusers: after the cheap checks

        loading.resolve_base_dir(cfg.featinv.base_model, local_files_only=True)


def _check_recon_eval(cfg: Config) -> None:
    """The judge backbone (name, layer, weights), LPIPS's local weights, and the runs to evaluate: finished,
    of the FeatInv model's (backbone, layer), with held-out pairs."""
    from featmap_ray import backbones
    from featmap_ray.evaluation import image_metrics
    from featmap_ray.stages import recon_eval

    rc = cfg.evaluate.reconstruction
    spec = backbones.get_spec(rc.judge.name)
    backbones.resolve_layers(spec, [rc.judge_layer])
    backbones.check_weights(spec, rc.judge)
    if rc.lpips_weights:
        image_metrics.lpips_metric(rc.lpips_weights)
    recon_eval.plan(cfg)


def _check_featinv_viz(cfg: Config) -> None:
    """featinv.viz against the features table: the images, the pair, the region on the layer's grid, the
    concept bases' dimension, the alphas (the config checks their range)."""
    from featmap_ray.stages import featinv_viz as viz_stage

    viz_stage.plan(cfg)


def _check_serve(cfg: Config) -> None:
    """The allow-lists: FeatInv models (MLflow URIs resolve) and finished mapping runs of the study."""
    from featmap_ray.serve import catalogue

    catalogue.check(cfg)


# -- commands and their help ---------------------------------------------------------------------

DEFAULT_CONFIG = "conf/demo.yaml"
WIDTH = 88  # of every help text
RAY_KEYS = ("storage", "ray", "mlflow")  # read by every command that starts Ray


@dataclass(frozen=True)
class Command:
    summary: str  # one line in `featmap --help`
    details: str = ""  # more in `featmap COMMAND --help`
    keys: tuple[str, ...] = ()  # config sections / keys it reads (dotted paths into Config)
    checks: tuple[Callable[[Config], None], ...] = ()


_FIT_KEYS = ("mapping", "mapping.targets", "mapping.training", "mapping.resources", "manipulate.ops",
             "extract.backbones")
_EVALUATE_KEYS = ("evaluate", "evaluate.classifier", "mapping.study", "mapping.resources.gpus_per_worker")
_FEATINV_KEYS = ("featinv", "featinv.training", "featinv.sampling", "featinv.eval", "extract.backbones")

COMMANDS: dict[str, Command] = {
    "ingest": Command("image folders -> images.lance (originals, resized and centre-cropped)",
                      "Lists the image files under dataset.root, decodes, resizes and centre-crops them; "
                      "unreadable files become rows of errors.lance. A re-run adds only what is missing.",
                      (*RAY_KEYS, "dataset"), (_check_dataset,)),
    "manipulate": Command("originals -> manipulated variants in images.lance",
                          "Applies every manipulate.ops entry to every original image.",
                          (*RAY_KEYS, "manipulate"), (_check_images,)),
    "edit": Command("originals -> semantic edits (Qwen-Image-Edit) in images.lance",
                    "Edits a seeded choice of originals per (split, class) with every prompt of edit.prompts for "
                    "their dataset, on an actor pool of diffusers image-editing pipelines (one per actor); the "
                    "edits are variants <prefix>:<name>:<repeat> of family semantic. A re-run adds only what is "
                    "missing.",
                    (*RAY_KEYS, "edit", "edit.prompts"), (_check_images, _check_edit)),
    "extract": Command("images -> feature maps in features/<backbone>/<layer>.lance",
                       "Runs every extract.backbones entry over every image (originals and variants) in a "
                       "Ray Data actor pool and stores the requested layers.",
                       (*RAY_KEYS, "extract", "extract.backbones"), (_check_backbones, _check_images)),
    "pipeline": Command("ingest -> manipulate -> edit -> extract",
                        "edit runs when edit.prompts has prompts for dataset.name.",
                        keys=(*RAY_KEYS, "dataset", "manipulate", "edit", "extract", "extract.backbones"),
                        checks=(_check_dataset, _check_edit_model, _check_backbones)),
    "fit": Command("train the study's pending mapping runs (Ray Tune schedules the grid)",
                   "Expands mapping.datasets x targets x losses into runs; finished runs are skipped, "
                   "interrupted ones resume. Runs land in <storage>/mapping/runs/<study>/.",
                   (*RAY_KEYS, *_FIT_KEYS), (_check_study,)),
    "sweep": Command("Ray Tune + ASHA over one model family's hyper-parameters",
                     "Tunes mapping.sweep.model on one (backbone, layer, manipulation); the best trial's "
                     "model goes to <storage>/mapping/sweeps/<study>/best.",
                     (*RAY_KEYS, *_FIT_KEYS, "mapping.sweep"), (_check_sweep,)),
    "evaluate": Command("held-out metrics of every finished mapping run, and the baselines",
                        "Feature metrics and classifier agreement of each run of the study, plus the "
                        "identity and spatial-only baselines, in <storage>/results/<study>/evaluations.",
                        (*RAY_KEYS, *_EVALUATE_KEYS), (_check_grid,)),
    "analyze": Command("linear maps of the study: weight vs bias, SVD, rank-k truncations",
                       keys=(*RAY_KEYS, "evaluate", "mapping.study"), checks=(_check_grid,)),
    "report": Command("tables and PNG plots in <storage>/reports/<study>/ and MLflow",
                      "Reads what evaluate (and analyze) wrote: run `featmap evaluate` first.",
                      (*RAY_KEYS, "mapping.study"), (_check_evaluations,)),
    "study": Command("fit -> evaluate -> analyze -> report",
                     keys=(*RAY_KEYS, *_FIT_KEYS, *_EVALUATE_KEYS), checks=(_check_study,)),
    "featinv-train": Command("train a FeatInv ControlNet on Ray Train",
                             "Checkpoints and the final ControlNet go to <storage>/featinv/<run_name>; a "
                             "re-run with a larger max_steps continues from the last checkpoint.",
                             (*RAY_KEYS, *_FEATINV_KEYS), (_check_featinv,)),
    "reconstruct": Command("feature maps -> FeatInv reconstructions, with metrics",
                           "Samples images from the stored feature maps (or from a mapping run's mapped maps: "
                           "featinv.sampling.mapping_run) into reconstructions/<backbone>/<layer>.lance.",
                           (*RAY_KEYS, *_FEATINV_KEYS), (_check_featinv,)),
    "recon-eval": Command("mapping runs judged as images, through FeatInv reconstructions",
                          "For each finished run of FeatInv's (backbone, layer), on a seeded subset of held-out "
                          "sources: MSE, SSIM, PSNR and the judge backbone's (masked) median cosine of each "
                          "reconstruction against the manipulated image and the true target's reconstruction, in "
                          "<storage>/results/<study>/reconstructions.lance; `featmap report` shows them.",
                          (*RAY_KEYS, "evaluate.reconstruction", "evaluate.reconstruction.judge", "mapping.study",
                           *_FEATINV_KEYS), (_check_featinv, _check_recon_eval)),
    "featinv-viz": Command("FeatInv-Viz: concept steering, interpolation, composition (PNGs)",
                           "Attenuates concepts of the selected images' feature maps (a k-means + SVD "
                           "decomposition, or featinv.viz.concepts) and maps where the reconstructions change; "
                           "reconstructs interpolations and a spatial composition of two maps. PNGs, CSVs and "
                           "results.json in <storage>/reports/<study>/featinv_viz/ and MLflow.",
                           (*RAY_KEYS, "featinv.viz", "mapping.study", *_FEATINV_KEYS),
                           (_check_featinv, _check_featinv_viz)),
    "serve": Command("FeatInv as a service: web page + HTTP API on Ray Serve (until Ctrl-C)",
                     "Starts the composed application (ingress, backbone, FeatInv and mapping deployments) on "
                     "serve.host:serve.port (127.0.0.1 by default) and prints the page's and the API docs' URLs. "
                     "On a cluster use conf/serve.yaml with `serve run` / `serve deploy` (README: Serving).",
                     (*RAY_KEYS, "serve", "serve.limits", "serve.featinv", "featinv", "extract.backbones"),
                     (_check_featinv, _check_serve)),
    "featinv-import": Command("convert a FeatInv research-code checkpoint into diffusers folders",
                              "Reads no config: its arguments are paths."),
    "info": Command("tables, row counts and how to look at them (starts no Ray)",
                    keys=("storage", "extract.backbones", "mlflow")),
}


def _section(annotation: object) -> type[BaseModel] | None:
    """The config model a field holds (itself, optional, or as list items), else None (a plain key)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list or len(args) == 1:
        annotation = args[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _key_line(path: str) -> str:
    """`section: field, field*, ...` for a section (its plain keys and lists; nested sections have
    their own lines), or the dotted key itself. A path that is not in Config raises."""
    annotation: object = Config
    for part in path.split("."):
        model = _section(annotation)
        if model is None or part not in model.model_fields:
            raise KeyError(f"{path!r} is not a config key")
        annotation = model.model_fields[part].annotation
    model = _section(annotation)
    if model is None:
        return "  " + path
    label = path + ("[]" if typing.get_origin(annotation) is list else "")
    names = [n + "*" * f.is_required() for n, f in model.model_fields.items()  # nested sections: own lines
             if _section(f.annotation) is None or typing.get_origin(f.annotation) is not None]
    return textwrap.fill(f"{label}: {', '.join(names)}", width=WIDTH, initial_indent="  ",
                         subsequent_indent=" " * (len(label) + 4))


def _required(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        if f.is_required():
            sub = _section(f.annotation)
            out += _required(sub, f"{prefix}{name}.") if sub else [prefix + name]
    return out


def _keys_help(keys: tuple[str, ...]) -> str:
    return "\n".join(["config keys it reads (in the --config file or as key=value; README: Configuration):",
                      *map(_key_line, keys),
                      f"* required. Every command needs {' and '.join(_required())}: the config is checked whole."])


CONFIG_HELP = (f"YAML config file (default: {DEFAULT_CONFIG} in the current directory, the embedded demo)")
FOOTER = ("Every command but featinv-import takes --config FILE (default: {default}, relative to the current "
          "directory) and key=value overrides (values parsed as YAML, e.g. extract.batch_size=8), in any order. "
          "A command checks its config, names and tables before it starts Ray or writes anything. "
          "`featmap COMMAND --help` says what a command does and which config keys it reads.")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, width=WIDTH, max_help_position=28)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    listing = "\n".join(f"  {name:<16}{cmd.summary}" for name, cmd in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="featmap", usage="featmap COMMAND [--config FILE] [key=value ...]",
        formatter_class=_formatter,
        description=textwrap.fill("The FeatMap / FeatInv study on Ray: image folders -> images -> feature maps "
                                  "-> mapping models -> evaluation -> FeatInv reconstructions, in Lance tables "
                                  "under one storage root, recorded in MLflow.", WIDTH),
        epilog=f"commands:\n{listing}\n\n{textwrap.fill(FOOTER.format(default=DEFAULT_CONFIG), WIDTH)}")
    # The listing above is the commands' help; argparse's own would wrap each line.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help=argparse.SUPPRESS)
    subparsers = {}
    for name, cmd in COMMANDS.items():
        sub = commands.add_parser(name, prog=f"featmap {name}", formatter_class=_formatter,
                                  description="\n\n".join(textwrap.fill(t, WIDTH) for t in (cmd.summary, cmd.details) if t),
                                  epilog=_keys_help(cmd.keys) if cmd.keys else None)
        if name == "featinv-import":
            _featinv_import_arguments(sub)
        else:
            sub.add_argument("--config", "-c", metavar="FILE", help=CONFIG_HELP)
            sub.add_argument("overrides", nargs="*", metavar="key=value",
                             help="config overrides, values parsed as YAML (e.g. extract.batch_size=8)")
        subparsers[name] = sub
    return parser, subparsers


def config_path(path: str | None) -> str:
    """`--config`, else conf/demo.yaml in the current directory."""
    if path is not None:
        return path
    if not Path(DEFAULT_CONFIG).is_file():
        raise ConfigError(f"no --config given, and the default {DEFAULT_CONFIG} does not exist in {Path.cwd()}: "
                          f"pass --config FILE (or run from the repository root for the demo)")
    log.info("config: %s (the default)", DEFAULT_CONFIG)
    return DEFAULT_CONFIG


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    name = next((a for a in argv if a in COMMANDS), None)
    if name is None or argv[0] in ("-h", "--help"):
        parser.parse_args(argv)  # prints the help, or what is wrong, and exits
        return 2
    argv.remove(name)  # the command may follow its options: `featmap -c x.yaml fit`
    if name == "featinv-import":  # paths, not a config: its own arguments
        return featinv_import(subparsers[name].parse_args(argv))
    args = subparsers[name].parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        cfg = load_config(config_path(args.config), args.overrides)
        for check in COMMANDS[name].checks:  # before Ray starts and before anything is written
            check(cfg)
        if name == "info":
            print(describe(cfg))
            return 0
        from featmap_ray import runtime

        runtime.init_ray(cfg)
        if name == "serve":
            return serve_until_interrupted(cfg)
        if name in STUDY or name == "study":
            for step in ["fit", "evaluate", "analyze", "report"] if name == "study" else [name]:
                print(STUDY[step](cfg), flush=True)
            from featmap_ray.io import tracking

            print(tracking.runs_page_line(cfg), flush=True)
            return 0
        summaries = []
        for stage in pipeline_stages(cfg) if name == "pipeline" else [name]:
            summaries += run_stage(cfg, stage)
    except ConfigError as e:
        print(f"featmap: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # named in the message: no traceback needed
        print(f"featmap {name}: error: {e}", file=sys.stderr)
        return 1
    print(describe(cfg))
    # Non-zero only when nothing usable came out: every row of every stage failed or was absent.
    st = tables.Store(cfg.storage)
    if st.count(st.layout.images, filter=f"variant = '{tables.ORIGINAL}'") == 0:
        print("featmap: no usable images were found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
