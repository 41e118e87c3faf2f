"""Shared body of the `jobs/<stage>.py` scripts run by `ray job submit --working-dir . -- python jobs/<stage>.py`.

The scripts are written from the stage registry (`python jobs/_entry.py` rewrites them; the documentation's
command table is generated from the same registry when the site is built, docs/hooks.py): one per command
that runs on Ray, except `serve` (a service: `serve run conf/serve.yaml` / `serve deploy` on a cluster).

The working dir is unpacked into a temporary folder on the cluster, which becomes the job's CWD,
and `featmap_ray` may not be installed there: the repository root goes first on sys.path. A
relative `storage` would resolve inside that temporary folder (and disappear with it), so a
submitted job refuses one before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Set by Ray's JobSupervisor for the entrypoint of a submitted job, and only there (it also sets
# RAY_ADDRESS to the GCS address; RAY_JOB_ID is stripped from a job's environment).
JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _storage_inside_working_dir(argv: list[str]) -> str | None:
    """The storage root relative to the CWD (the job's temporary working dir) when it lies inside
    it, where it would be lost with the job; None otherwise, or when the config cannot be loaded
    (then `featmap` itself reports the problem)."""
    from featmap_ray.cli import config_path
    from featmap_ray.config import ConfigError, load_config

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", "-c")
    parser.add_argument("overrides", nargs="*")
    try:
        args, _ = parser.parse_known_intermixed_args(argv)
        storage = load_config(config_path(args.config), args.overrides).storage  # relative: against the CWD
    except (ConfigError, SystemExit):
        return None
    if "://" in storage or not Path(storage).is_relative_to(Path.cwd()):
        return None
    return str(Path(storage).relative_to(Path.cwd()))


def run(stage: str) -> None:
    """`featmap <stage> <command-line arguments>`, then exit with its code."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from featmap_ray.cli import main

    argv = sys.argv[1:]
    if os.environ.get(JOB_ENV_VAR) and (raw := _storage_inside_working_dir(argv)) is not None:
        print(f"featmap {stage}: storage={raw!r} is a relative path; inside a Ray job it would resolve to "
              f"{Path(raw).resolve()}, the job's temporary working dir, and be lost with it. "
              "Pass storage=/absolute/path (or an object-store URI such as s3://bucket/featmap).",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(main([stage, *argv]))


SCRIPT = '''"""`featmap {name}` as a Ray job: {summary}.

    ray job submit --working-dir . -- python jobs/{file} --config conf/demo.yaml storage=/abs/path [key=value ...]

RAY_ADDRESS (or --address) names the cluster's dashboard, e.g. http://127.0.0.1:8265. storage must be
absolute (the job runs in a temporary copy of the working dir), as must dataset.root unless builtin:.
Written from the stage registry by `python jobs/_entry.py`.
"""
from _entry import run  # jobs/ is sys.path[0] when run as a script

run("{name}")
'''


def scripts() -> dict[str, str]:
    """{file name: content} of every job script, from the stage registry."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from featmap_ray.stages import base

    return {f"{name.replace('-', '_')}.py": SCRIPT.format(name=name, summary=stage.summary,
                                                          file=f"{name.replace('-', '_')}.py")
            for name, stage in base.registry().items() if stage.starts_ray and name != "serve"}


if __name__ == "__main__":  # rewrite the scripts
    here = Path(__file__).parent
    for stale in set(p.name for p in here.glob("[!_]*.py")) - set(scripts()):
        (here / stale).unlink()
    for file, text in scripts().items():
        (here / file).write_text(text)
