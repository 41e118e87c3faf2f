"""Every config key is described in its model (`Field(description=...)`), and every section has a docstring:
the generated configuration reference reads them, so a new key cannot land undocumented."""

from __future__ import annotations

import inspect
import typing

from pydantic import BaseModel

from featmap_ray import config
from featmap_ray.config import Config


def _models_in(annotation: object) -> list[tuple[str, type[BaseModel]]]:
    """The config models an annotation holds, each with the path suffix that reaches it: itself (""), optional
    (""), as list items ("[]") or as dict values (".<key>"), nested to any depth."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin in (list, tuple, set, frozenset):
        return [("[]" + suffix, model) for arg in args for suffix, model in _models_in(arg)]
    if origin is dict:
        return [(".<key>" + suffix, model) for suffix, model in _models_in(args[1])]
    return [found for arg in args for found in _models_in(arg)]  # Union / Optional


def _walk(model: type[BaseModel], prefix: str, seen: dict[type[BaseModel], str],
          parents: tuple[type[BaseModel], ...] = ()) -> list[str]:
    """Dotted paths of the fields of `model`, and of every model nested in them wherever it occurs, that have no
    description. `seen` collects each model reached, with the first path that reaches it."""
    seen.setdefault(model, prefix.rstrip(".") or "<root>")
    missing = []
    for name, field in model.model_fields.items():
        path = prefix + name
        if not (field.description or "").strip():
            missing.append(path)
        for suffix, sub in _models_in(field.annotation):
            if sub not in parents and sub is not model:  # a model holding itself would never end
                missing += _walk(sub, f"{path}{suffix}.", seen, (*parents, model))
    return missing


def test_every_config_key_has_a_description():
    missing = _walk(Config, "", {})
    assert not missing, ("config keys without a description (give each a Field(..., description=...) in "
                         f"featmap_ray/config.py): {missing}")


def test_every_config_model_is_reached_and_has_a_docstring():
    seen: dict[type[BaseModel], str] = {}
    _walk(Config, "", seen)
    defined = {obj for _, obj in inspect.getmembers(config, inspect.isclass)
               if issubclass(obj, BaseModel) and obj.__module__ == config.__name__ and obj is not config._Strict}
    assert defined - set(seen) == set(), "config models the walk from Config does not reach"
    undocumented = sorted(f"{model.__name__} ({path})" for model, path in seen.items()
                          if not (model.__dict__.get("__doc__") or "").strip())
    assert not undocumented, f"config sections without a docstring: {undocumented}"


def test_the_walk_names_undocumented_keys_at_any_depth():
    from pydantic import Field

    class Leaf(BaseModel):
        """A leaf."""

        documented: int = Field(0, description="described")
        bare: int = 0

    class Root(BaseModel):
        """The root."""

        one: Leaf | None = Field(None, description="optional")
        many: list[Leaf] = Field([], description="a list")
        named: dict[str, list[Leaf]] = {}

    seen: dict[type[BaseModel], str] = {}
    assert _walk(Root, "", seen) == ["one.bare", "many[].bare", "named", "named.<key>[].bare"]
    assert seen == {Root: "<root>", Leaf: "one"}
