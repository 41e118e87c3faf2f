"""`featmap` command line: `featmap COMMAND [--config FILE] [--overwrite] [-v] [key=value ...]`.

Built from the stage registry (`featmap_ray.stages.base.registry()`): every command is a `Stage` that
declares its help, the config keys it reads, the checks that run before Ray starts or anything is
written, and its body. This module only parses arguments, loads the config and runs a stage; `jobs/*.py`
do the same for `ray job submit`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import typing
from pathlib import Path

from pydantic import BaseModel

from featmap_ray.config import Config, ConfigError, load_config
from featmap_ray.stages import base, console

log = logging.getLogger("featmap")

DEFAULT_CONFIG = "conf/demo.yaml"
WIDTH = 88  # of every help text


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
    return "\n".join(["config keys it reads (--config file or key=value; docs/reference/configuration.md):",
                      *map(_key_line, keys),
                      f"* required. Every command needs {' and '.join(_required())}: the config is checked whole."])


CONFIG_HELP = (f"YAML config file (default: {DEFAULT_CONFIG} in the current directory, the embedded demo)")
VERBOSE_HELP = ("show the logs of Ray, MLflow and the other libraries here as they happen (they always go to "
                "<storage>/logs/<command>-<timestamp>.log)")
FOOTER = ("Every command but featinv-import takes --config FILE (default: {default}, relative to the current "
          "directory) and key=value overrides (values parsed as YAML, e.g. extract.batch_size=8), in any order. "
          "A command checks its config, names and tables before it starts Ray or writes anything. It shows "
          "progress and results; the logs of Ray and the other libraries go to <storage>/logs/ (-v: shown too). "
          "`featmap COMMAND --help` says what a command does and which config keys it reads.")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, width=WIDTH, max_help_position=28)


def build_parser(stages: dict[str, base.Stage]) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    listing = "\n".join(f"  {name:<16}{stage.summary}" for name, stage in stages.items())
    parser = argparse.ArgumentParser(
        prog="featmap", usage="featmap COMMAND [--config FILE] [--overwrite] [-v] [key=value ...]",
        formatter_class=_formatter,
        description=textwrap.fill("The FeatMap / FeatInv study on Ray: image folders -> images -> feature maps "
                                  "-> mapping models -> evaluation -> FeatInv reconstructions, in Lance tables "
                                  "under one storage root, recorded in MLflow.", WIDTH),
        epilog=f"commands:\n{listing}\n\n{textwrap.fill(FOOTER.format(default=DEFAULT_CONFIG), WIDTH)}")
    # The listing above is the commands' help; argparse's own would wrap each line.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help=argparse.SUPPRESS)
    subparsers = {}
    for name, stage in stages.items():
        sub = commands.add_parser(name, prog=f"featmap {name}", formatter_class=_formatter,
                                  description="\n\n".join(textwrap.fill(t, WIDTH) for t in (stage.summary, stage.details) if t),
                                  epilog=_keys_help(stage.keys) if stage.keys else None)
        if stage.arguments is not None:
            stage.arguments(sub)
        else:
            sub.add_argument("--config", "-c", metavar="FILE", help=CONFIG_HELP)
            if stage.starts_ray:
                sub.add_argument("--overwrite", action="store_true",
                                 help="recompute outputs made by other settings (same as overwrite=true)")
            sub.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
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


def command_table(stages: dict[str, base.Stage]) -> str:
    """The command table (Markdown), from the registry: the documentation's (docs/hooks.py)."""
    def cell(text: str) -> str:  # "<storage>" is text, not an HTML tag
        return text.replace("<", "&lt;").replace(">", "&gt;") or "-"

    rows = ["| command | what it does | reads | writes |", "|---|---|---|---|"]
    rows += [f"| `featmap {name}` | {cell(s.summary)} | {cell(', '.join(s.reads))} | {cell(', '.join(s.writes))} |"
             for name, s in stages.items()]
    return "\n".join(rows)


def run(stage: base.Stage, cfg: Config, out: console.Console | None = None) -> None:
    """A stage's checks, then (when it needs it) its log file and Ray, its body and what it prints at
    the end. A Ray this started is shut down here, while `out` still sends what Ray prints on its way
    out to the log."""
    for check in stage.checks:  # before Ray starts and before anything is written
        check(cfg)
    started = False
    if stage.starts_ray:
        from featmap_ray.stages import runtime

        if out is not None:
            out.open(cfg.storage)
        # Ray Train needs the State API of the dashboard; the other commands start Ray without it.
        trains = runtime.TRAINING & {stage.name, *stage.steps}
        started = runtime.init_ray(cfg, **({"state_api": True} if trains else {}))
        if out is not None:
            out.attach_ray()
    try:
        result = stage.run(cfg)
        if result is not None:
            print(result, flush=True)
        if stage.epilogue is not None:
            print(stage.epilogue(cfg), flush=True)
        if stage.shows_runs_page:
            from featmap_ray.io import tracking

            print(tracking.runs_page_line(cfg), flush=True)
    finally:
        if started:
            runtime.shutdown_ray()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = base.registry()
    parser, subparsers = build_parser(stages)
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    name = next((a for a in argv if a in stages), None)
    if name is None or argv[0] in ("-h", "--help"):
        parser.parse_args(argv)  # prints the help, or what is wrong, and exits
        return 2
    argv.remove(name)  # the command may follow its options: `featmap -c x.yaml fit`
    stage = stages[name]
    if stage.main is not None:  # its own arguments, no config
        return stage.main(subparsers[name].parse_args(argv))
    args = subparsers[name].parse_intermixed_args(argv)
    # The console shows progress, summaries, featmap's warnings and errors; the libraries' logs go to
    # the command's log file (-v: here as well). docs/concepts/pipeline.md: What a command prints.
    with console.Console(name, verbose=args.verbose, logs=stage.starts_ray) as out:
        try:
            overrides = [*args.overrides, *(["overwrite=true"] if getattr(args, "overwrite", False) else [])]
            run(stage, load_config(config_path(args.config), overrides), out)
        except ConfigError as e:
            print(f"featmap: {e}", file=sys.stderr)
            return 2
        except (FileNotFoundError, ValueError, RuntimeError) as e:  # named in the message: no traceback needed
            print(f"featmap {name}: error: {e}", file=sys.stderr)
            if out.path is not None:
                print(f"featmap {name}: the libraries' logs are in {out.path}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
