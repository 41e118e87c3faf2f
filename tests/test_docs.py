"""The documentation's generated reference (docs/hooks.py) covers the code, and the README stays a front door.

Fast and without Ray (the registry's modules are imported, nothing is started). The site's strict build
itself (`make docs`: broken links, missing pages and anchors fail it) runs in `make test`, not here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import typing
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the CLI ------------------------------------------------------------------------------------------

def test_every_command_and_option_is_in_the_cli_reference(hooks):
    from featmap_ray import cli
    from featmap_ray.stages import base

    text = hooks.cli_reference()
    stages = base.registry()
    _, subparsers = cli.build_parser(stages)
    assert set(subparsers) == set(stages)
    for name, sub in subparsers.items():
        section = text.split(f"## `featmap {name}`\n", 1)[1].split("\n## `featmap ", 1)[0]
        assert stages[name].summary in section
        for action in sub._actions:
            for option in action.option_strings:
                assert f"`{option}`" in section, f"featmap {name}: {option} is missing from the CLI reference"
            if not action.option_strings:  # a positional argument, by its metavar
                assert f"`{action.metavar or action.dest}`" in section
        assert sub.format_help().strip() in section  # the command's own --help, whole
    assert "| command | what it does | reads | writes |" in hooks.commands_table()
    assert all(f"| `featmap {name}` |" in hooks.commands_table() for name in stages)


# -- the configuration --------------------------------------------------------------------------------

def _nested_model(annotation):
    """(model, key suffix) held by a field: the model itself or optional (""), list items ("[]"), dict values
    (".<name>"), as nested as the types are; (None, "") for a plain key."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is list:
        model, suffix = _nested_model(args[0])
        return (model, "[]" + suffix) if model else (None, "")
    if origin is dict:
        model, suffix = _nested_model(args[1])
        return (model, ".<name>" + suffix) if model else (None, "")
    if len(args) == 1:  # X | None, Annotated[X, ...]
        return _nested_model(args[0])
    return None, ""


def _keys(model: type, prefix: str, values: typing.Any) -> list[tuple[str, str | None]]:
    """(dotted key, expected default as JSON or "required", None for a section) of every key below `model`.
    `values` is the section's value in a minimal valid config (so a section's own defaults win, as in
    serve.ingress), or None inside list items, dict values and required sections (the model's defaults)."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub, suffix = _nested_model(field.annotation)
        if sub is not None and suffix == "":
            out.append((key, None))
            held = getattr(values, name) if values is not None and not field.is_required() else None
            out += _keys(sub, key + ".", held)
            continue
        if values is not None and key != "storage":  # storage: resolved to an absolute path when validated
            default = json.dumps(to_jsonable_python(getattr(values, name)), ensure_ascii=False)
        elif field.is_required():
            default = "required"
        else:
            value = field.default_factory() if field.default is PydanticUndefined else field.default
            default = json.dumps(to_jsonable_python(value), ensure_ascii=False)
        out.append((key, default))
        if sub is not None:
            out += _keys(sub, key + suffix + ".", None)
    return out


def test_every_config_key_is_in_the_config_reference_with_its_default(hooks):
    from featmap_ray.config import Config

    minimal = Config.model_validate({"dataset": {"name": "x", "root": "builtin:skimage"}})
    text = hooks.config_reference()
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"(?<!\\)\|", line)  # cell separators: pipes not escaped as \|
        if line.startswith("| `") and len(cells) > 4:
            rows[cells[1].strip().strip("`")] = line
    keys = _keys(Config, "", minimal)
    assert len(keys) > 200
    for key, default in keys:
        assert key in rows, f"{key} is missing from the configuration reference"
        if default is not None:
            assert f"`{default}`" in rows[key] or f"`` {default} ``" in rows[key], \
                f"{key}: default {default} not in its row {rows[key]!r}"
    assert "max_ongoing_requests` | `int` (≥ 1) | `64`" in rows["serve.ingress.max_ongoing_requests"]
    assert "serve.limits.max_body_mb" in rows and "`16.0`" in rows["serve.limits.max_body_mb"]


# -- storage ------------------------------------------------------------------------------------------

def test_every_table_schema_and_its_fields_are_in_the_tables_reference(hooks):
    from featmap_ray.io import tables
    from featmap_ray.stages import edit, recon_eval

    text = hooks.tables_reference()
    expected = {
        "images.lance": tables.IMAGES_SCHEMA,
        "errors.lance": tables.ERRORS_SCHEMA,
        "features/<backbone>/<layer>.lance": tables.feature_schema((8, 2, 2), "float32", {}),
        "reconstructions/<backbone>/<layer>.lance": tables.reconstructions_schema(),
        "results/<study>/reconstructions.lance": recon_eval.results_schema(lpips=True),
        "edit's task batches (not stored)": edit.TASK_SCHEMA,
    }
    for title, schema in expected.items():
        assert f"### `{title}`" in text
        section = text.split(f"### `{title}`", 1)[1].split("\n### ", 1)[0]
        for field in schema:
            assert f"`{field.name}`" in section, f"{title}: column {field.name} is missing from the tables reference"
            if title != "results/<study>/reconstructions.lance" or "lpips" not in field.name:  # listed, not rows
                assert f"| `{field.name}` | `{field.type}` | {'yes' if field.nullable else 'no'} |" in section \
                    or title.startswith("features/")  # the tensor column's shape is the example's
    # Every module that declares a schema is covered by the reference.
    declaring = {p.relative_to(REPO).as_posix() for p in (REPO / "featmap_ray").rglob("*.py") if "pa.schema(" in p.read_text()}
    assert declaring <= set(re.findall(r"in `(featmap_ray/[\w/]+\.py)`", text)), declaring


def test_the_layout_reference_gives_every_layout_path(hooks):
    from featmap_ray.layout import Layout

    text = hooks.layout_reference()
    for name in ("images", "errors", "logs", "mlflow_db", "mapping_train", "mapping_tune", "featinv_runs"):
        assert f"`{name}`" in text
        assert str(getattr(Layout("/root"), name)).replace("/root", "<storage>") in text
    assert "`<storage>/features/<backbone>/<layer>.lance`" in text
    assert "`<storage>/mapping/runs/<study>/<key>`" in text


def test_every_marker_of_the_pages_has_a_generator(hooks):
    markers = {m for page in (REPO / "docs").rglob("*.md") for m in re.findall(r"<!-- featmap:[\w-]+ -->", page.read_text())}
    assert markers and markers <= set(hooks.GENERATED)


# -- the README ---------------------------------------------------------------------------------------

def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make demo" in readme and "make test" in readme and ".ci/run" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"
