"""Where every artefact lives under the storage root: the only module that spells the layout out.

    images.lance                                  originals and variants, key (source_id, variant)
    features/<backbone>/<layer>.lance             one (C, H, W) map per image variant, same key
    errors.lance                                  failures, key (stage, target, key)
    reconstructions/<backbone>/<layer>.lance      FeatInv images of stored maps
    mapping/runs/<study>/<run key>/               published mapping runs (run.json + model), versioned
    mapping/train/ mapping/tune/                  Ray Train and Tune state (checkpoints)
    mapping/norm/<dataset>/<backbone>/<layer>.json normalisation statistics
    mapping/sweeps/<study>/                       sweep results and the best trial's model
    results/<study>/<name>.lance                  evaluate / analyze / recon-eval tables
    results/<study>/featinv_viz/                  FeatInv-Viz outputs, versioned
    reports/<study>/                              report.md and its figures, versioned
    featinv/<run name>/                           FeatInv training checkpoints, the final ControlNet
                                                  (controlnet/, versioned) and a trained tiny base (base/)
    sources/<name>/                               the embedded demo's photographs, unpacked
    logs/                                         the library logs of each command (Ray, MLflow, ...)
    mlflow.db                                     the default MLflow store of a local root

A versioned folder holds CURRENT, the name of its published version, and the version folders
(featmap_ray.io.files: `Location.publish`, `Location.current`).

Every stage, the service, `featmap info` and `featmap status` go through `Layout`; nothing else
joins paths under the root. A name that becomes a path part (a study, a run) is checked by
`safe_part`, so it can never reach outside its folder.
"""

from __future__ import annotations

import re

from featmap_ray.io.files import Location

_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:=+-]*$")


def safe_part(name: str, what: str) -> str:
    """`name` as one path part: no separators, no `.`/`..`, nothing hidden; else a ValueError naming `what`."""
    if not isinstance(name, str) or not _SAFE.match(name) or name in (".", "..") or ".." in name:
        raise ValueError(f"{what} {name!r} cannot name a folder: use letters, digits and _ . : = + - "
                         "(not starting with '.' and without '/' or '..')")
    return name


class Layout:
    """The artefacts under one storage root (a local folder or an object-store URI)."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    def _table(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) + ".lance"

    def table(self, name: str) -> str:
        """The URI of the table `name` names (the inverse of `name`, e.g. "features/resnet50/layer1")."""
        return self._table(name)

    @property
    def location(self) -> Location:
        return Location(self.root)

    def name(self, artefact: str | Location) -> str:
        """An artefact's path under the root, without ".lance" (e.g. "features/resnet50/layer1"): how
        the errors table names the table or artefact a failed row was meant for."""
        uri = str(artefact)
        for root in (self.root, self.location.uri):  # as given, and normalised (a local root made absolute)
            if uri.startswith(root + "/"):
                return uri[len(root) + 1:].removesuffix(".lance")
        raise ValueError(f"{uri} is not under the storage root {self.root}")

    # -- Lance tables --------------------------------------------------------------------------------
    @property
    def images(self) -> str:
        return self._table("images")

    @property
    def errors(self) -> str:
        return self._table("errors")

    def features(self, backbone: str, layer: str) -> str:
        return self._table("features", backbone, layer)

    def reconstructions(self, backbone: str, layer: str) -> str:
        return self._table("reconstructions", backbone, layer)

    def results(self, study: str, name: str) -> str:
        return self._table("results", safe_part(study, "mapping.study"), name)

    # -- folders ------------------------------------------------------------------------------------
    def runs(self, study: str) -> Location:
        return self.location / "mapping" / "runs" / safe_part(study, "mapping.study")

    def run(self, study: str, key: str) -> Location:
        return self.runs(study) / safe_part(key, "run key")

    @property
    def mapping_train(self) -> Location:
        return self.location / "mapping" / "train"

    @property
    def mapping_tune(self) -> Location:
        return self.location / "mapping" / "tune"

    def norm_stats(self, dataset: str, backbone: str, layer: str) -> Location:
        return self.location / "mapping" / "norm" / dataset / backbone / f"{layer}.json"

    def sweeps(self, study: str) -> Location:
        return self.location / "mapping" / "sweeps" / safe_part(study, "mapping.study")

    def reports(self, study: str) -> Location:
        return self.location / "reports" / safe_part(study, "mapping.study")

    def featinv_viz(self, study: str) -> Location:
        return self.location / "results" / safe_part(study, "mapping.study") / "featinv_viz"

    @property
    def featinv_runs(self) -> Location:
        """Ray Train's storage for FeatInv training (one folder per run name)."""
        return self.location / "featinv"

    def featinv_run(self, run_name: str) -> Location:
        return self.featinv_runs / safe_part(run_name, "featinv.training.run_name")

    def featinv_controlnet(self, run_name: str) -> Location:
        """The final ControlNet of a FeatInv training run (a versioned folder: featmap_ray.io.files)."""
        return self.featinv_run(run_name) / "controlnet"

    def featinv_base(self, run_name: str) -> Location:
        """The tiny Stable Diffusion base a FeatInv training run trained first (`featinv.base_model: trained`;
        a versioned folder in diffusers layout)."""
        return self.featinv_run(run_name) / "base"

    def sources(self, name: str) -> Location:
        return self.location / "sources" / name

    @property
    def logs(self) -> Location:
        return self.location / "logs"

    @property
    def mlflow_db(self) -> str:
        return f"{self.root}/mlflow.db"
