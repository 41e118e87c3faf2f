"""The stage contract: what every `featmap` command declares, and the provenance rule they all follow.

A `Stage` names its command, help and the config keys it reads, the checks that run before Ray
starts, its body, and (for `featmap status`) how to tell whether what it wrote is up to date. The
CLI, `jobs/`, `featmap info`/`status` and the documentation's command table are built from `registry()`.

Provenance. Every resumable output records the settings that made it. A table's rows come in
groups (`Group`: the rows one set of settings made, e.g. one variant of the images table, or one
variant of a features table), and the table's schema metadata holds each group's `Provenance`:
its own settings and the fingerprints of the input groups it read. Before writing, `reconcile`
compares what is stored with what this run would make:
  same fingerprint      -> resume: only missing keys are computed;
  other fingerprint     -> refuse before writing anything (`ProvenanceMismatch`, naming each
                           setting that changed, old -> new), unless `overwrite` is set: then
                           exactly that group's rows are deleted and recomputed;
  group not stored yet  -> recorded, then written (a setting that is part of the key, such as a
                           manipulation's parameter, makes another group: written alongside).
The provenance is recorded before the rows, so a killed run leaves rows that match the recorded
settings, and re-running it resumes.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import BlockAccessor

from featmap_ray import seeding
from featmap_ray.config import Config
from featmap_ray.io import tables
from featmap_ray.io.files import Location
from featmap_ray.layout import Layout

# The commands, in the order `featmap --help` lists them; each is the module `stages/<name>.py`
# (dashes as underscores) holding a `STAGE`.
COMMANDS = ("demo", "ingest", "manipulate", "edit", "extract", "pipeline", "fit", "sweep", "evaluate", "analyze", "report",
            "study", "featinv-train", "reconstruct", "recon-eval", "featinv-viz", "serve", "featinv-import", "info",
            "status")


# -- provenance ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provenance:
    """What made a group of outputs: the stage's own settings, and the fingerprints of what it read
    (`inputs`: "<table or artefact>#<group>" -> that group's fingerprint)."""

    settings: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return seeding.fingerprint({"settings": self.settings, "inputs": self.inputs})

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "inputs": self.inputs, "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Provenance:
        return cls(data.get("settings", {}), data.get("inputs", {}))

    def changes(self, old: Provenance | None) -> list[str]:
        """Each difference from `old`, as "setting: old -> new" (inputs: "input X changed")."""
        if old is None:
            return ["no provenance recorded (made by an older featmap-ray, or by hand)"]
        out = []
        for key in sorted(old.settings.keys() | self.settings.keys()):
            before, after = old.settings.get(key, "(unset)"), self.settings.get(key, "(unset)")
            if _canonical(before) != _canonical(after):
                out.append(f"{key}: {_short(before)} -> {_short(after)}")
        for key in sorted(old.inputs.keys() | self.inputs.keys()):
            before, after = old.inputs.get(key), self.inputs.get(key)
            if before != after and before is not None and after is not None:
                out.append(f"input {key} changed (made by other settings: {before} -> {after})")
            elif before is None and after is not None:
                out.append(f"input {key}: not read before")
            elif after is None:
                out.append(f"input {key}: no longer read")
        return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else _canonical(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Group:
    """Rows of one table made by one set of settings: `filter` (Lance SQL) selects them, None: all rows."""

    name: str
    provenance: Provenance
    filter: str | None = None


class ProvenanceMismatch(ValueError):
    """Stored outputs were made by other settings: nothing was written."""


@dataclass
class Mismatch:
    uri: str
    group: Group
    stored: Provenance | None
    rows: int


def input_key(root: str, uri: str, group: str) -> str:
    """How a Provenance names an input group: "<table path under the root>#<group>" (e.g.
    "images#rotation_90", "features/convnext_tiny/stages.2#original"), the same wherever the root is."""
    return f"{Layout(root).name(uri)}#{group}"


def current_fingerprints(root: str, uri: str) -> dict[str, str]:
    """{input key: fingerprint} of every group the table at `uri` records now ({} when none)."""
    return {input_key(root, uri, name): entry.get("fingerprint", "")
            for name, entry in tables.read_provenance(uri).items()}


def input_fingerprints(root: str, uri: str, groups: list[str]) -> dict[str, str]:
    """The `inputs` of a Provenance that reads these groups of the table at `uri`: {input key: fingerprint}
    of those that record one."""
    now = current_fingerprints(root, uri)
    return {key: now[key] for key in (input_key(root, uri, g) for g in groups) if key in now}


def changed_inputs(root: str, inputs: dict[str, str], by_table: dict[str, dict[str, str]] | None = None) -> list[str]:
    """The recorded `inputs` (input key -> fingerprint) that no longer match what their tables record:
    each as "<input key>: made by other settings" (or "... no longer recorded"). `by_table` (table URI ->
    its `current_fingerprints`) is filled as tables are read: pass one dict to read each table once
    across many calls."""
    by_table = {} if by_table is None else by_table
    out = []
    for key, fingerprint in sorted(inputs.items()):
        path, _, _group = key.rpartition("#")
        uri = Layout(root).table(path)
        if uri not in by_table:
            by_table[uri] = current_fingerprints(root, uri)
        now = by_table[uri].get(key)
        if now is None:
            out.append(f"{key}: no longer recorded")
        elif now != fingerprint:
            out.append(f"{key}: made by other settings since")
    return out


# A published mapping run (run.json) records its provenance too: its own settings and the fingerprints of
# the features groups it read. Every consumer of runs (fit, evaluate, analyze, report, recon-eval, serve)
# judges them by this one rule.

def run_staleness(root: str, info: dict[str, Any], by_table: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Why the published mapping run whose run.json is `info` must not be used now: each features group
    it read that was made by other settings since, or no provenance at all (fitted by an older
    featmap-ray); [] when it is up to date. `by_table`: see `changed_inputs`."""
    recorded = info.get("provenance")
    if recorded is None:
        return ["no provenance recorded (fitted by an older featmap-ray)"]
    return changed_inputs(root, Provenance.from_json(recorded).inputs, by_table)


def stale_runs(root: str, run_dirs: Iterable[str | Location]) -> dict[str, list[str]]:
    """{run key (its folder's name): why} of the published runs among `run_dirs` that are stale now
    (`run_staleness`); folders without a published run are not judged."""
    from featmap_ray.mapping.artefacts import read_info

    by_table: dict[str, dict[str, str]] = {}
    out = {}
    for directory in map(Location, run_dirs):
        info = read_info(directory)
        reasons = [] if info is None else run_staleness(root, info, by_table)
        if reasons:
            out[directory.name] = reasons
    return out


def refuse_stale_runs(root: str, run_dirs: Iterable[str | Location]) -> None:
    """Before any work: a ValueError naming each stale run among `run_dirs` and why, if there is one."""
    stale = stale_runs(root, run_dirs)
    if not stale:
        return
    lines = [(f"{len(stale)} mapping run(s) were fitted on features that changed since (or record no provenance); "
              "nothing was done:")]
    lines += [f"  {key}: {'; '.join(reasons)}" for key, reasons in sorted(stale.items())[:20]]
    if len(stale) > 20:
        lines.append(f"  ... and {len(stale) - 20} more")
    lines.append("Run `featmap fit` first: it retrains the runs whose input features changed.")
    raise ValueError("\n".join(lines))


def group_filter(column: str, value: str) -> str:
    return f"{column} = {tables.sql_list([value])}"


def stale_groups(uri: str, groups: list[Group]) -> list[Mismatch]:
    """The groups of `uri` whose stored rows were made by other settings (or by unrecorded ones)."""
    ds = tables.open_table(uri)
    if ds is None:
        return []
    stored = tables.read_provenance(ds)
    out = []
    for g in groups:
        old = stored.get(g.name)
        if old is not None and old.get("fingerprint") == g.provenance.fingerprint:
            continue
        rows = ds.count_rows(filter=g.filter)
        if old is None and rows == 0:
            continue  # a new group: written alongside
        if old is not None and rows == 0:
            continue  # recorded, but none of its rows stored yet: nothing to mix with
        out.append(Mismatch(uri, g, None if old is None else Provenance.from_json(old), rows))
    return out


def mismatch_message(stage: str, mismatches: list[Mismatch]) -> str:
    """Every group that changed, with its changes, and the two ways out."""
    lines = [f"{stage}: stored outputs were made by other settings; nothing was written."]
    by_change: dict[tuple[str, tuple[str, ...]], list[Mismatch]] = {}
    for m in mismatches:
        by_change.setdefault((m.uri, tuple(m.group.provenance.changes(m.stored))), []).append(m)
    for (uri, changes), ms in by_change.items():
        names = ", ".join(m.group.name for m in ms[:4]) + (f" and {len(ms) - 4} more" if len(ms) > 4 else "")
        lines.append(f"  {uri} [{names}] ({sum(m.rows for m in ms)} rows):")
        lines += [f"    {c}" for c in changes]
    lines.append("Either use another storage root (storage=...), or pass --overwrite (overwrite=true) to recompute "
                 "exactly these rows and what depends on them.")
    return "\n".join(lines)


def reconcile(stage: str, plans: list[tuple[tables.Target, list[Group]]], *, overwrite: bool) -> list[Mismatch]:
    """Prepare every target table of a stage for this run's groups; refuse before writing anything.

    Checks all targets first: any group stored with other settings raises ProvenanceMismatch unless
    `overwrite`. Then each table is created if missing, the stale groups' rows are deleted (overwrite),
    and every group's provenance is recorded. Returns the overwritten groups."""
    for target, _ in plans:  # every table's schema before any table is touched
        tables.check_schema(target.uri, target.schema)
    mismatches = [m for target, groups in plans for m in stale_groups(target.uri, groups)]
    if mismatches and not overwrite:
        raise ProvenanceMismatch(mismatch_message(stage, mismatches))
    for target, groups in plans:
        tables.ensure_table(target.uri, target.schema)
        for m in mismatches:
            if m.uri == target.uri:
                tables.delete_rows(target.uri, m.group.filter)
        tables.write_provenance(target.uri, {g.name: g.provenance.to_json() for g in groups})
    return mismatches


# -- status ---------------------------------------------------------------------------------------

@dataclass
class OutputStatus:
    """One output of a stage, as `featmap status` shows it."""

    stage: str
    output: str  # a table URI or a folder
    state: str  # "up to date" | "stale" | "missing" | "partial"
    detail: str = ""

    def __str__(self) -> str:
        return f"  {self.state:<10} {self.stage:<14} {self.output}" + (f"\n{'':<28}{self.detail}" if self.detail else "")


def table_status(stage: str, uri: str, groups: list[Group], expected: dict[str, int] | None = None) -> OutputStatus:
    """A table's state against this config's groups: stale when a stored group has another fingerprint
    (naming the first change), partial when a group holds fewer rows than `expected[group]`."""
    ds = tables.open_table(uri)
    if ds is None:
        return OutputStatus(stage, uri, "missing")
    stale = stale_groups(uri, groups)
    if stale:
        first = stale[0]
        changes = first.group.provenance.changes(first.stored)
        return OutputStatus(stage, uri, "stale", f"{len(stale)} group(s), e.g. {first.group.name}: {'; '.join(changes[:3])}")
    if expected:
        have = sum(min(ds.count_rows(filter=g.filter), expected.get(g.name, 0)) for g in groups)
        want = sum(expected.get(g.name, 0) for g in groups)
        if have < want:
            return OutputStatus(stage, uri, "partial", f"{have} of {want} rows")
    return OutputStatus(stage, uri, "up to date", f"{ds.count_rows()} rows")


# -- the contract ---------------------------------------------------------------------------------

RAY_KEYS = ("storage", "overwrite", "ray", "mlflow")  # read by every command that starts Ray


@dataclass(frozen=True)
class Stage:
    """One `featmap` command."""

    name: str
    summary: str  # one line in `featmap --help`
    run: Callable[[Config], object] | None = None  # the body: what it returns (not None) is printed
    details: str = ""  # more in `featmap NAME --help`
    keys: tuple[str, ...] = ()  # config sections / keys it reads (dotted paths into Config)
    checks: tuple[Callable[[Config], None], ...] = ()  # before Ray starts and before anything is written
    reads: tuple[str, ...] = ()  # the artefacts it reads (as `featmap status` and the docs name them)
    writes: tuple[str, ...] = ()  # the artefacts it writes
    status: Callable[[Config], list[OutputStatus]] | None = None  # its outputs' state, for `featmap status`
    steps: tuple[str, ...] = ()  # a composite command (pipeline, study): the commands it runs, in order
    starts_ray: bool = True
    epilogue: Callable[[Config], str] | None = None  # printed after the body (e.g. where the tables are)
    shows_runs_page: bool = False  # it logs to MLflow: print where its runs are at the end
    # A command that takes its own arguments instead of --config (featinv-import): adds them, and
    # its `main` gets the parsed namespace and returns the exit code.
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    main: Callable[[argparse.Namespace], int] | None = None


def read_ray(uri: str, columns: list[str] | None = None, filter: str | None = None):
    """A Ray Dataset of a Lance table; the filter (Lance SQL, like every filter here) is pushed down to the scanner."""
    import ray.data

    return ray.data.read_lance(uri, columns=columns, scanner_options={"filter": filter} if filter else None)


def check_images(cfg: Config) -> None:
    """The images table exists (a stage that reads it runs after `featmap ingest`)."""
    st = tables.Store(cfg.storage)
    if st.open(st.layout.images) is None:
        raise FileNotFoundError(f"no images table at {st.layout.images}: run `featmap ingest` first")


def images_input(cfg: Config) -> list:
    """The images table at its current version, as an MLflow dataset input."""
    from featmap_ray.io import tracking

    return tracking.table_inputs(cfg, [tables.Store(cfg.storage).layout.images])


def describe_tables(cfg: Config) -> str:
    """After a stage that writes rows: where the tables are (`featmap info`); raises when no usable
    image came out at all (every row failed or was absent), so the command exits non-zero."""
    from featmap_ray.stages import info

    st = tables.Store(cfg.storage)
    if st.count(st.layout.images, filter=f"variant = '{tables.ORIGINAL}'") == 0:
        raise RuntimeError("no usable images were found")
    return info.describe(cfg)


def run_pipeline_stage(cfg: Config, name: str, inputs: list, body: Callable[[], list[StageSummary]]) -> str:
    """A stage that writes rows (ingest, manipulate, edit, extract) inside its own MLflow run, with its
    summaries as metrics and the tables it read as inputs; returns the summaries to print."""
    import mlflow

    from featmap_ray.io import tracking

    with tracking.stage_run(cfg, name, inputs):
        summaries = body()
        for s in summaries:
            mlflow.log_metrics({f"{s.stage}.written": sum(s.written.values()), f"{s.stage}.skipped": s.skipped,
                                f"{s.stage}.failed": s.failed, f"{s.stage}.overwritten": s.overwritten})
    return "\n".join(map(str, summaries))


def module_name(command: str) -> str:
    return "featmap_ray.stages." + command.replace("-", "_")


def registry() -> dict[str, Stage]:
    """Every command's Stage, in `COMMANDS` order (imports the stage modules)."""
    out = {}
    for command in COMMANDS:
        stage = importlib.import_module(module_name(command)).STAGE
        if stage.name != command:
            raise RuntimeError(f"{module_name(command)}.STAGE is named {stage.name!r}, not {command!r}")
        out[command] = stage
    return out


# -- writing rows through Ray Data ------------------------------------------------------------------

@dataclass
class StageSummary:
    stage: str
    written: dict[str, int]
    skipped: int
    failed: int
    errors_uri: str
    overwritten: int = 0  # rows of stale groups deleted and recomputed (--overwrite)

    def __str__(self) -> str:
        lines = [f"[{self.stage}] rows written:"]
        lines += [f"    {n:>7}  {uri}" for uri, n in self.written.items()] or ["    0"]
        lines.append(f"  skipped as already stored: {self.skipped}")
        if self.overwritten:
            lines.append(f"  recomputed (--overwrite): {self.overwritten} rows made by other settings")
        lines.append(f"  failed: {self.failed}" + (f"  (reasons in {self.errors_uri}, stage '{self.stage}')" if self.failed else ""))
        return "\n".join(lines)


class KeyedLanceSink(Datasink):
    """Ray Data sink: each write task commits its successful rows to every target, atomically,
    and returns its failed rows (small) to the driver, which records them in the errors table:
    a failed row once per target, under its key in that target (and a success clears only that)."""

    def __init__(self, targets: list[tables.Target], rows_per_commit: int):
        self.targets = targets
        self.rows_per_commit = rows_per_commit
        self.written: dict[str, int] = {t.uri: 0 for t in targets}
        self.failures = 0  # failed batch rows
        self.failed: dict[str, list[dict[str, Any]]] = {t.uri: [] for t in targets}  # target -> errors rows
        self.succeeded: dict[str, list[str]] = {t.uri: [] for t in targets}  # target -> keys written or stored

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_commit

    def get_name(self) -> str:
        return "LanceCommit"

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        for target in self.targets:
            tables.ensure_table(target.uri, target.schema)

    def write(self, blocks, ctx) -> dict[str, Any]:
        blocks = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        blocks = [t for t in blocks if t.num_rows]
        if not blocks:
            return {"written": {}, "failures": 0, "failed": {}, "succeeded": {}}
        batch = pa.concat_tables(blocks, promote_options="permissive")
        failed = pc.is_valid(batch["error_reason"])
        ok = batch.filter(pc.invert(failed))
        written = {}
        for target in self.targets:
            rows = target.rows(ok)
            written[target.uri] = tables.commit_new_rows(target.uri, rows, target.key) if rows.num_rows else 0
        bad = batch.filter(failed)
        columns = {*tables.KEY, "source_path", *tables.ERROR_COLUMNS, *(c for t in self.targets for c in t.batch_key)}
        bad = bad.select([c for c in bad.column_names if c in columns]).to_pylist()
        failed_rows = {t.uri: [{"key": tables.key_string(*(r[c] for c in t.batch_key)), "source_id": r.get("source_id"),
                                "variant": r.get("variant"), "path": r.get("source_path"), "reason": r["error_reason"],
                                "message": r["error_message"]} for r in bad]
                       for t in self.targets}
        succeeded = {t.uri: [tables.key_string(*k) for k in tables.row_keys(ok, t.batch_key)] for t in self.targets}
        return {"written": written, "failures": len(bad), "failed": failed_rows, "succeeded": succeeded}

    def on_write_complete(self, write_result) -> None:
        for result in write_result.write_returns:
            for uri, n in result["written"].items():
                self.written[uri] += n
            self.failures += result["failures"]
            for uri, rows in result["failed"].items():
                self.failed[uri].extend(rows)
            for uri, keys in result["succeeded"].items():
                self.succeeded[uri].extend(keys)


def write_stage(store: tables.Store, stage: str, dataset, targets: list[tables.Target], *, rows_per_commit: int,
                skipped: int, overwritten: int = 0) -> StageSummary:
    """Run a Ray Data pipeline into `targets` (None: nothing pending), record its failures and
    summarise. Each commit is one fragment: no compaction, since Ray reads in parallel per fragment."""
    store.check_errors_table()  # its failures have somewhere to go, before any row is written
    sink = KeyedLanceSink(targets, rows_per_commit)
    if dataset is None:
        sink.on_write_start()
    else:
        dataset.write_datasink(sink)
    for target in targets:
        store.record_errors(stage, target.uri, sink.failed[target.uri])
        store.clear_errors(stage, target.uri, sink.succeeded[target.uri])
    return StageSummary(stage, sink.written, skipped, sink.failures, store.layout.errors, overwritten)
