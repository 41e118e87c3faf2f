"""A study: the grid of mapping runs one config asks for, each named by what it maps.

A run maps, for one dataset, one manipulation, one backbone and one layer, the original image's
feature map to the manipulated image's, with one model family and one loss. The grid is
datasets x groups x (backbone, layer) x manipulations x model families x losses (spec §6.1: 615
runs for the paper's two datasets and five (backbone, layer) targets). Everything in a run spec is
checked here, before any work: unknown families, losses, hyper-parameters, layers or tables fail
with the offending name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from featmap_ray.config import Config, MappingGroup

# The paper's groups (spec §2, §6.5) over the manipulations this config's `manipulate` stage makes.
PAPER_FAMILIES = ["linear", "mlp", "cnn", "transformer"]


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    group: str
    backbone: str
    layer: str
    manipulation: str
    model: str
    loss_name: str
    loss: dict[str, float]
    apply_transform: bool
    normalise: bool
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Readable and unique: the folder, MLflow run name and Ray Train run name of the run."""
        parts = [self.dataset, self.group, self.backbone, self.layer, self.manipulation, self.model, self.loss_name]
        return "--".join(parts)

    @property
    def tags(self) -> dict[str, str]:
        return {"dataset": self.dataset, "group": self.group, "backbone": self.backbone, "layer": self.layer,
                "manipulation": self.manipulation, "model": self.model, "loss": self.loss_name,
                "normalised": str(self.normalise), "apply_transform": str(self.apply_transform)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**data)

    @property
    def data_key(self) -> tuple[str, str, str, str]:
        """(dataset, backbone, layer, manipulation): runs with the same key read the same pairs."""
        return self.dataset, self.backbone, self.layer, self.manipulation


# Bumped when the training procedure changes in a way that changes models, so old runs re-train.
TRAINING_REVISION = 2


def run_settings(spec: RunSpec, *, training: dict[str, Any], loss_options: dict[str, dict[str, Any]],
                 num_workers: int) -> dict[str, Any]:
    """A run's own settings, each named by where it is set: the spec (family, hyper-parameters, loss
    weights, apply_transform, normalise, ...), every training setting, the options of the loss terms it
    uses and the number of DDP workers (the effective batch). What a published run records, and what
    `fit` compares to refuse a run whose settings changed under the same key."""
    return {**{f"spec.{k}": v for k, v in spec.to_dict().items()},
            **{f"mapping.training.{k}": v for k, v in training.items()},
            **{f"mapping.loss_options.{term}": loss_options[term] for term in sorted(spec.loss) if term in loss_options},
            "mapping.resources.num_workers": num_workers}


def run_digest(settings: dict[str, Any], *, data: str, norm: dict | None) -> str:
    """The identity of a trained model: changes when anything that shapes it changes — its settings
    (`run_settings`), the data (`data.fingerprint`: the features table, the provenance of the features
    groups it reads and the train/validation images) and the normalisation statistics. A published
    run with the same digest is finished; a Ray Train checkpoint of a model is resumed only under the
    same digest."""
    payload = {"revision": TRAINING_REVISION, "settings": settings, "data": data,
               "norm": norm and {"mean": norm["mean"], "std": norm["std"]}}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=float).encode()).hexdigest()[:16]


def fused_groups(runs: list[RunSpec], max_size: int | None = None) -> list[list[RunSpec]]:
    """Runs that read the same pairs, together (in grid order), in groups of at most `max_size`."""
    by_data: dict[tuple[str, str, str, str], list[RunSpec]] = {}
    for run in runs:
        by_data.setdefault(run.data_key, []).append(run)
    return [group[i:i + (max_size or len(group))] for group in by_data.values()
            for i in range(0, len(group), max_size or len(group))]


def default_groups(cfg: Config) -> dict[str, MappingGroup]:
    """The paper's groups over this config's manipulations: photometric/mask ("direct"), the geometric
    ones twice, with the exact spatial transform applied and fully learned, and the semantic edits
    of the dataset (edit.prompts)."""
    from featmap_ray.manipulations.semantic import planned_edits
    from featmap_ray.mapping.models import is_geometric

    names = [m.name for m in cfg.manipulate.manipulations()]
    geometric = [n for n in names if is_geometric(n)]
    direct = [n for n in names if not is_geometric(n)]
    groups = {}
    if direct:
        groups["direct"] = MappingGroup(manipulations=direct, models=PAPER_FAMILIES)
    if geometric:
        groups["geometric_apply"] = MappingGroup(manipulations=geometric, models=PAPER_FAMILIES, apply_transform=True)
        groups["geometric_learned"] = MappingGroup(manipulations=geometric, models=["transformer"])
    if edits := [plan.variant for plan in planned_edits(cfg.edit, cfg.dataset.name)]:
        groups["semantic"] = MappingGroup(manipulations=edits, models=PAPER_FAMILIES)
    return groups


def targets(cfg: Config) -> list[tuple[str, str, bool]]:
    """(backbone, layer, normalise) triples, validated against the backbone registry."""
    from featmap_ray import backbones

    if cfg.mapping.targets:
        out = []
        for t in cfg.mapping.targets:
            spec = backbones.get_spec(t.backbone)
            out += [(spec.name, layer, t.normalise) for layer in backbones.resolve_layers(spec, t.layers)]
        return out
    out = []
    for request in cfg.extract.backbones:
        spec = backbones.get_spec(request.name)
        out += [(spec.name, layer, True) for layer in backbones.resolve_layers(spec, request.layers)]
    return out


def _check_families(models: list[str], hparams: dict[str, dict[str, Any]], where: str) -> None:
    from featmap_ray.mapping.models import MODELS, model_hparams

    for name in models:
        if name not in MODELS:
            raise ValueError(f"{where}: unknown model family {name!r}; available: {sorted(MODELS)}")
    for name, given in hparams.items():
        if name not in MODELS:
            raise ValueError(f"mapping.model_hparams: unknown model family {name!r}; available: {sorted(MODELS)}")
        bad = sorted(set(given) - set(model_hparams(name)))
        if bad:
            raise ValueError(f"mapping.model_hparams.{name}: unknown hyper-parameter(s) {bad}; "
                             f"{name} accepts {sorted(model_hparams(name))}")


def expand_losses(cfg: Config) -> dict[str, dict[str, float]]:
    from featmap_ray.mapping.losses import build_loss

    out = {}
    for name, spec in cfg.mapping.losses.items():
        try:
            build_loss(spec, cfg.mapping.loss_options)  # validates names and options
        except ValueError as e:
            raise ValueError(f"mapping.losses.{name}: {e}") from None
        out[name] = {term: 1.0 for term in spec.split("+")} if isinstance(spec, str) else dict(spec)
    return out


def expand(cfg: Config, known_manipulations: set[str] | None = None) -> list[RunSpec]:
    """Every run of the study, in a stable order. `known_manipulations` (the variants present in
    the images table) turns a manipulation that was never made into an error naming it."""
    losses = expand_losses(cfg)
    datasets = cfg.mapping.datasets or {cfg.dataset.name: default_groups(cfg)}
    runs = []
    for dataset, groups in datasets.items():
        for group_name, group in groups.items():
            where = f"mapping.datasets.{dataset}.{group_name}"
            _check_families(group.models, cfg.mapping.model_hparams, where)
            if known_manipulations is not None:
                missing = sorted(set(group.manipulations) - known_manipulations)
                if missing:
                    raise ValueError(f"{where}: manipulation(s) {missing} are not in the images table; "
                                     f"available: {sorted(known_manipulations)}")
            for backbone, layer, normalise in targets(cfg):
                for manipulation in group.manipulations:
                    for model in group.models:
                        for loss_name, loss in losses.items():
                            runs.append(RunSpec(dataset, group_name, backbone, layer, manipulation, model, loss_name,
                                                loss, group.apply_transform, normalise,
                                                dict(cfg.mapping.model_hparams.get(model, {}))))
    keys = [r.key for r in runs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"the study names the same run twice: {dupes[:3]}")
    return runs
