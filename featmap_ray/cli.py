"""`featmap` command line: `featmap <stage> --config conf/x.yaml [key=value ...]`.

Entry points only parse configuration and call the Ray stages; `jobs/*.py` do the same for
`ray job submit`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from featmap_ray import store
from featmap_ray.config import Config, ConfigError, load_config

log = logging.getLogger("featmap")


def _ingest(cfg: Config) -> list[store.StageSummary]:
    from featmap_ray import ingest

    return [ingest.run(cfg)]


def _manipulate(cfg: Config) -> list[store.StageSummary]:
    from featmap_ray.manipulations import stage

    return [stage.run(cfg)]


def _extract(cfg: Config) -> list[store.StageSummary]:
    from featmap_ray import extract

    return extract.run(cfg)


STAGES: dict[str, Callable[[Config], list[store.StageSummary]]] = {
    "ingest": _ingest,
    "manipulate": _manipulate,
    "extract": _extract,
}
PIPELINE = ["ingest", "manipulate", "extract"]


def _fit(cfg: Config) -> object:
    from featmap_ray.mapping import fit

    summary = fit.run_study(cfg)
    if summary.failed and not summary.fitted and not summary.skipped:
        raise RuntimeError(f"every run of study {cfg.mapping.study} failed")
    return summary


def _sweep(cfg: Config) -> object:
    import json

    from featmap_ray.mapping import sweep

    return json.dumps(sweep.run_sweep(cfg), indent=1, default=str)


def _evaluate(cfg: Config) -> object:
    from featmap_ray.evaluation import stages

    frame = stages.run_evaluate(cfg)
    cols = [c for c in ("backbone", "layer", "manipulation", "model", "cos_median", "mse", "agree_top1_orig_mapped")
            if c in frame]
    return f"[evaluate] {len(frame)} rows in {stages.results_uri(cfg, 'evaluations')}\n" + frame[cols].to_string(index=False)


def _analyze(cfg: Config) -> object:
    from featmap_ray.evaluation import stages

    frames = stages.run_analyze(cfg)
    return "[analyze] " + ", ".join(f"{name}: {len(f)} rows in {stages.results_uri(cfg, name)}" for name, f in frames.items())


def _report(cfg: Config) -> object:
    from featmap_ray.evaluation import stages

    return f"[report] {stages.run_report(cfg)}"


def _featinv_train(cfg: Config) -> object:
    from featmap_ray.featinv import train

    return train.run(cfg)


def _reconstruct(cfg: Config) -> object:
    from featmap_ray.featinv import reconstruct

    s = cfg.featinv.sampling
    if s.mapping_run is None:
        return reconstruct.run(cfg)
    from featmap_ray.mapping.apply import mapped_features

    ds, keys = mapped_features(cfg, s.mapping_run, split=s.split or "test")
    return reconstruct.reconstruct_dataset(cfg, ds, f"mapped:{s.mapping_run}", keys=keys[: s.limit])


# Study commands: each prints what it made; failures inside a study are listed, not raised.
STUDY: dict[str, Callable[[Config], object]] = {
    "fit": _fit, "sweep": _sweep, "evaluate": _evaluate, "analyze": _analyze, "report": _report,
    "featinv-train": _featinv_train, "reconstruct": _reconstruct,
}


def featinv_import(argv: list[str]) -> int:
    """`featmap featinv-import CKPT OUT_DIR [--backbone B --layer L --tokenizer DIR]`: convert a
    FeatInv ControlNet-research-code checkpoint into our diffusers folders."""
    parser = argparse.ArgumentParser(prog="featmap featinv-import", description=featinv_import.__doc__.split(":")[0])
    parser.add_argument("checkpoint", help="the reference's .ckpt (or .safetensors)")
    parser.add_argument("out_dir", help="written: controlnet/ unet/ vae/ text_encoder/ scheduler/ [tokenizer/]")
    parser.add_argument("--backbone", help="backbone the features come from (recorded, checked when sampling)")
    parser.add_argument("--layer", help="its layer")
    parser.add_argument("--tokenizer", help="a CLIP tokenizer folder to copy (e.g. the base model's tokenizer/)")
    parser.add_argument("--pooled", action="store_true", help="the checkpoint is of the pooled variant")
    args = parser.parse_args(argv)
    from featmap_ray.featinv.convert import CheckpointMismatch, import_ldm_checkpoint

    try:
        out = import_ldm_checkpoint(args.checkpoint, args.out_dir, backbone=args.backbone, layer=args.layer,
                                    tokenizer_dir=args.tokenizer, pooled=args.pooled)
    except (CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"featmap featinv-import: error: {e}", file=sys.stderr)
        return 1
    print(f"[featinv-import] diffusers folders in {out}")
    return 0


def run_stage(cfg: Config, name: str) -> list[store.StageSummary]:
    """One stage inside its own MLflow run, with the summary as metrics."""
    import mlflow

    from featmap_ray import tracking

    with tracking.stage_run(cfg, name):
        summaries = STAGES[name](cfg)
        for s in summaries:
            mlflow.log_metrics({f"{s.stage}.written": sum(s.written.values()), f"{s.stage}.skipped": s.skipped,
                                f"{s.stage}.failed": s.failed})
    for s in summaries:
        print(s, flush=True)
    return summaries


def describe(cfg: Config) -> str:
    """Where the tables are, how many rows they hold, and how to look at them."""
    from featmap_ray import backbones, tracking

    st = store.Store(cfg.storage)
    uris = [st.images_uri]
    for request in cfg.extract.backbones:
        spec = backbones.get_spec(request.name)
        uris += [st.features_uri(spec.name, layer) for layer in backbones.resolve_layers(spec, request.layers)]
    uris.append(st.errors_uri)
    lines = [f"storage root: {cfg.storage}"]
    lines += [f"  {st.count(uri):>7} rows  {uri}" for uri in uris if st.open(uri) is not None]
    lines += [
        "look at them:",
        f"  python -c \"import lance; print(lance.dataset('{st.images_uri}').to_table(columns=['source_id','variant','class_name']).to_pandas())\"",
        f"  mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["featinv-import"]:  # paths, not a config: its own arguments
        return featinv_import(argv[1:])
    parser = argparse.ArgumentParser(prog="featmap", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*STAGES, "pipeline", *STUDY, "study", "featinv-import", "info"],
                        help="a data stage, `pipeline` (ingest -> manipulate -> extract), a study command "
                             "(fit, sweep, evaluate, analyze, report), `study` (fit -> evaluate -> analyze -> "
                             "report), FeatInv (featinv-train, reconstruct, featinv-import CKPT OUT_DIR), "
                             "or `info` (tables and row counts)")
    parser.add_argument("--config", "-c", help="YAML config file (conf/demo.yaml is the embedded default)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. extract.batch_size=8")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "info":
            print(describe(cfg))
            return 0
        from featmap_ray import runtime

        runtime.init_ray(cfg)
        if args.command in STUDY or args.command == "study":
            for name in ["fit", "evaluate", "analyze", "report"] if args.command == "study" else [args.command]:
                print(STUDY[name](cfg), flush=True)
            return 0
        summaries = []
        for name in PIPELINE if args.command == "pipeline" else [args.command]:
            summaries += run_stage(cfg, name)
    except ConfigError as e:
        print(f"featmap: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # named in the message: no traceback needed
        print(f"featmap {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(describe(cfg))
    # Non-zero only when nothing usable came out: every row of every stage failed or was absent.
    st = store.Store(cfg.storage)
    if st.count(st.images_uri, filter=f"variant = '{store.ORIGINAL}'") == 0:
        print("featmap: no usable images were found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
