"""MkDocs hook (`hooks: [docs/hooks.py]` in mkdocs.yml): the reference pages' generated parts, from the code.

A page holds a marker comment where generated Markdown goes; `on_page_markdown` replaces it:

    <!-- featmap:commands -->   the command table, from the stage registry (featmap_ray.stages.base.registry)
    <!-- featmap:cli -->        `featmap --help` and every command's `--help`, from the argparse parser (cli.build_parser)
    <!-- featmap:config -->     every config key with its type, default and description (featmap_ray.config.Config)
    <!-- featmap:layout -->     the storage root's layout (featmap_ray/layout.py: its docstring and Layout)
    <!-- featmap:tables -->     every table's Arrow schema (pa.schema in featmap_ray/io/tables.py and the stages)

Each generator is a plain function returning Markdown (`commands_table()`, `cli_reference()`,
`config_reference()`, `layout_reference()`, `tables_reference()`), so tests/test_docs.py calls them
without MkDocs. They import this checkout's `featmap_ray` (the repository root goes first on sys.path)
and start nothing: no Ray, no MLflow.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# -- the CLI ----------------------------------------------------------------------------------------

@functools.cache
def _parsers():
    from featmap_ray import cli
    from featmap_ray.stages import base

    stages = base.registry()
    parser, subparsers = cli.build_parser(stages)
    return stages, parser, subparsers


def commands_table() -> str:
    """The table of commands (what each does, the artefacts it reads and writes), from the stage registry."""
    from featmap_ray import cli

    stages, _, _ = _parsers()
    return cli.command_table(stages)


def _fence(text: str) -> str:
    return "```text\n" + text.rstrip() + "\n```"


def cli_reference() -> str:
    """`featmap --help`, then one section per command: its summary, options table and whole `--help`."""
    stages, parser, subparsers = _parsers()
    out = ["## Commands", "", commands_table(), "", "## `featmap`", "", _fence(parser.format_help()), ""]
    for name, sub in subparsers.items():
        out += [f"## `featmap {name}`", "", stages[name].summary, "", "| option | argument | help |", "|---|---|---|"]
        for action in sub._actions:
            names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
            arg = "" if not action.option_strings or action.nargs == 0 else f"`{action.metavar or action.dest.upper()}`"
            out.append(f"| {names} | {arg} | {_cell(action.help or '')} |")
        out += ["", _fence(sub.format_help()), ""]
    return "\n".join(out)


# -- the configuration ------------------------------------------------------------------------------

def _model_in(annotation: Any) -> tuple[type | None, str]:
    """The pydantic model a field holds, and the key suffix its entries take: "" (the model itself or
    optional), "[]" (list items), ".<name>" (dict values), nested as the types nest; (None, "") for a plain key."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _model_in(args[0])
    if origin in (typing.Union, types.UnionType):
        found = [m for m in (_model_in(a) for a in args if a is not type(None)) if m[0] is not None]
        return found[0] if len(found) == 1 else (None, "")
    if origin is list and args:
        model, suffix = _model_in(args[0])
        return (model, "[]" + suffix) if model else (None, "")
    if origin is dict and len(args) == 2:
        model, suffix = _model_in(args[1])
        return (model, ".<name>" + suffix) if model else (None, "")
    return None, ""


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: `int`, `str | None`, `list[str]`, `"auto" | "featmap"`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("multiple_of", "multiple of"),
           ("min_length", "min length"), ("max_length", "max length"), ("pattern", "pattern"))


def _constraints(field: Any) -> str:
    parts = []
    for item in field.metadata:
        for attr, label in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{label} {value}")
    return ", ".join(parts)


def _json(value: Any) -> str:
    from pydantic_core import to_jsonable_python

    return json.dumps(to_jsonable_python(value), ensure_ascii=False)


def default_text(field: Any) -> str:
    """A field's default as JSON (what `Config.dump()` writes, flow style), or "required"."""
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "required"
    return _json(field.default_factory() if field.default is PydanticUndefined else field.default)


def _doc(model: type) -> str:
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def _cell(text: str) -> str:
    """Text for one table cell: one line; outside code spans pipes escaped and `<` `>` as entities (Markdown
    would take `<storage>` for an HTML tag); inside backticks shown as written (the table parser skips them)."""
    parts = " ".join(text.split()).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans
        parts = ["\\`".join(parts)]
    return "`".join(p if i % 2 else p.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
                    for i, p in enumerate(parts))


def _code(text: str) -> str:
    return "`` " + text + " ``" if "`" in text else f"`{text}`"


def section_id(path: str) -> str:
    """The HTML id of a config section's heading: "config-serve-limits", "config-top-level"."""
    return "config-" + (re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "top-level")


def config_sections() -> list[tuple[str, type, str, Any]]:
    """(dotted path, model, description, default instance or None) of Config and every nested section,
    depth first. A section held directly by a field (`serve.ingress`) has that field's default instance,
    whose values are the keys' defaults (they may differ from the model's own: `serve.ingress` has
    max_ongoing_requests 64); list items and dict values (`extract.backbones[]`) have none: their
    keys' defaults are the model's."""
    from pydantic_core import PydanticUndefined

    from featmap_ray.config import Config

    sections: list[tuple[str, type, str, Any]] = []

    def walk(path: str, model: type, description: str, instance: Any) -> None:
        sections.append((path, model, description, instance))
        for name, field in model.model_fields.items():
            sub, suffix = _model_in(field.annotation)
            if sub is None:
                continue
            held = None
            if suffix == "":
                if instance is not None:
                    held = getattr(instance, name)
                elif not field.is_required():
                    held = field.default_factory() if field.default is PydanticUndefined else field.default
            walk(f"{path}.{name}{suffix}".lstrip("."), sub, field.description or _doc(sub), held)

    walk("", Config, _doc(Config), None)
    return sections


def config_keys() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every key of every section; a section's own row has
    the default "(section)"."""
    rows = []
    for path, model, _, instance in config_sections():
        for name, field in model.model_fields.items():
            key = f"{path}.{name}" if path else name
            sub, suffix = _model_in(field.annotation)
            bounds = _constraints(field)
            kind = _code(_type_name(field.annotation)) + (f" ({_cell(bounds)})" if bounds else "")
            if sub is not None and suffix == "":
                default = "(section)"
            elif instance is not None:
                default = _code(_json(getattr(instance, name)))
            else:
                default = _code(default_text(field))
            desc = field.description or ""
            if sub is not None:
                desc = (desc + " " if desc else "") + f"Section: [`{key + suffix}`](#{section_id(key + suffix)})."
            rows.append((key, kind, default, desc))
    return rows


def config_reference() -> str:
    """One section per config model, its keys as rows: dotted key, type (and bounds), default, description."""
    rows: dict[str, list[tuple[str, str, str, str]]] = {}
    for row in config_keys():
        rows.setdefault(row[0].rpartition(".")[0], []).append(row)
    out = []
    for path, _, description, _ in config_sections():
        title = f"`{path}`" if path else "Top level"
        out += [f"## {title} {{ #{section_id(path)} }}", ""]
        if description:
            out += [description, ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        out += [f"| `{key}` | {kind} | {default} | {_cell(desc)} |" for key, kind, default, desc in rows.get(path, [])]
        out.append("")
    return "\n".join(out)


# -- storage: the layout and the tables -------------------------------------------------------------

def _example_path(member: Any, layout: Any) -> str:
    """What a Layout member gives for the root `<storage>` and `<parameter>` placeholders ("" when it
    needs a real artefact)."""
    root = "/STORAGE"
    try:
        if isinstance(member, property):
            value = member.fget(layout)
        else:
            params = list(inspect.signature(member).parameters)[1:]
            value = member(layout, *(p.upper() for p in params))
            for param in params:
                value = str(value).replace(param.upper(), f"<{param}>")
    except ValueError:
        return ""
    return str(value).replace(root, "<storage>")


def layout_reference() -> str:
    """The storage root as `featmap_ray/layout.py` spells it: its docstring, then what each `Layout`
    member gives (called on the root `<storage>`)."""
    from featmap_ray import layout

    doc = inspect.cleandoc(layout.__doc__ or "")
    head, _, rest = doc.partition("\n\n")
    tree, _, prose = rest.partition("\n\n")
    example = layout.Layout("/STORAGE")
    out = [head, "", _fence(inspect.cleandoc(tree)), "", prose, "",
           "| `Layout` member | path | what it is |", "|---|---|---|"]
    for name, member in vars(layout.Layout).items():
        if name.startswith("_"):
            continue
        func = member.fget if isinstance(member, property) else member
        if not callable(func):
            continue
        signature = "" if isinstance(member, property) else str(inspect.signature(func)).replace("(self, ", "(").replace("(self)", "()")
        signature = signature.replace("'", "")
        path = _example_path(member, example)
        out.append(f"| `{name}{signature}` | {_code(path) if path else ''} | {_cell(inspect.getdoc(func) or '')} |")
    return "\n".join(out)


def _block(module: types.ModuleType, name: str) -> str:
    """The source that defines `name` in `module`: a function's, or a module-level assignment's lines."""
    value = getattr(module, name)
    if inspect.isfunction(value):
        return inspect.getsource(value)
    lines = inspect.getsource(module).splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{name}\s*=", line))
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1].strip() and lines[i][0] not in ")]}"),
               len(lines))
    return "\n".join(lines[start:end])


def _field_comments(source: str) -> dict[str, str]:
    """Column name -> the comment on the source line that declares it (pa.field / key_field)."""
    out = {}
    for line in source.splitlines():
        match = re.search(r"""(?:pa\.field|key_field)\(\s*["']([^"'{]+)["'].*?\s{2,}#\s?(.*)$""", line)
        if match:
            out.setdefault(match.group(1), match.group(2).strip())
    return out


def schemas() -> list[tuple[str, str, str, Any, str]]:
    """(title, defining module, defining name, schema, note) of every table schema, and of the in-flight
    batch schema `featmap edit` declares."""
    from featmap_ray.io import tables
    from featmap_ray.stages import recon_eval

    plain, with_lpips = recon_eval.results_schema(lpips=False), recon_eval.results_schema(lpips=True)
    lpips_columns = [n for n in with_lpips.names if n not in plain.names]
    return [
        ("images.lance", "featmap_ray.io.tables", "IMAGES_SCHEMA", tables.IMAGES_SCHEMA,
         "Originals and every variant (manipulations, semantic edits)."),
        ("errors.lance", "featmap_ray.io.tables", "ERRORS_SCHEMA", tables.ERRORS_SCHEMA,
         "What failed and why, keyed on what failed."),
        ("features/<backbone>/<layer>.lance", "featmap_ray.io.tables", "feature_schema",
         tables.feature_schema((1024, 9, 9), "float16", {}),
         "Shown for ConvNeXt-B `stage3` (1024×9×9) at the default `extract.dtype` float16: each table has its "
         "layer's (C, H, W) and dtype, and its settings in the schema metadata."),
        ("reconstructions/<backbone>/<layer>.lance", "featmap_ray.io.tables", "reconstructions_schema",
         tables.reconstructions_schema(), "FeatInv reconstructions of stored or mapped maps (`featmap reconstruct`)."),
        ("results/<study>/reconstructions.lance", "featmap_ray.stages.recon_eval", "results_schema", plain,
         "`featmap recon-eval`, shown without LPIPS. With `evaluate.reconstruction.lpips_weights` set it has "
         f"{len(lpips_columns)} more float64 columns: " + ", ".join(f"`{c}`" for c in lpips_columns) + "."),
        ("edit's task batches (not stored)", "featmap_ray.stages.edit", "TASK_SCHEMA", None,
         "One pending semantic edit, as `featmap edit` hands it to its actors."),
    ]


def tables_reference() -> str:
    """Every schema of `schemas()`: field name, Arrow type, nullable, part of the key, and the source comment."""
    import importlib

    out = []
    for title, module_name, name, schema, note in schemas():
        module = importlib.import_module(module_name)
        schema = getattr(module, name) if schema is None else schema
        comments = _field_comments(_block(module, name))
        path = module_name.replace(".", "/") + ".py"
        out += [f"### `{title}`", "", f"{note} Defined by `{name}` in `{path}`.", "",
                "| field | Arrow type | nullable | key | note |", "|---|---|---|---|---|"]
        for field in schema:
            key = "yes" if (field.metadata or {}).get(b"lance-schema:unenforced-primary-key") == b"true" else ""
            out.append(f"| `{field.name}` | `{field.type}` | {'yes' if field.nullable else 'no'} | {key} | "
                       f"{_cell(comments.get(field.name, ''))} |")
        out.append("")
    return "\n".join(out)


# -- the hook ---------------------------------------------------------------------------------------

GENERATED = {
    "<!-- featmap:commands -->": commands_table,
    "<!-- featmap:cli -->": cli_reference,
    "<!-- featmap:config -->": config_reference,
    "<!-- featmap:layout -->": layout_reference,
    "<!-- featmap:tables -->": tables_reference,
}


@functools.cache
def _generated(marker: str) -> str:
    return GENERATED[marker]()


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker in GENERATED:
        if marker in markdown:
            markdown = markdown.replace(marker, _generated(marker))
    unknown = re.findall(r"<!-- featmap:[\w-]+ -->", markdown)
    if unknown:
        raise ValueError(f"{page.file.src_uri}: unknown generated-content marker(s) {unknown}")
    return markdown
