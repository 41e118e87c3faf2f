"""Pretrained model folders on this machine: a local folder, or a Hugging Face hub id in the local cache.

Nothing here downloads unless asked (`local_files_only=False`). A model that is not here is a
`WeightsNotFound` naming the model and the command that fetches it — never a silent random substitute.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from featmap_ray import seeding

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class WeightsNotFound(FileNotFoundError):
    """Pretrained weights that are not on this machine."""


def download_hint(hub_id: str) -> str:
    return (f"on a machine with internet run `hf download {hub_id} --local-dir DIR` (`huggingface-cli download "
            f"{hub_id} --local-dir DIR` with huggingface_hub < 1.0) and pass DIR, or copy its Hugging Face cache "
            f"(HF_HOME) here")


def local_model_dir(name: str | Path, *, what: str, default_id: str, required: Sequence[str],
                    local_files_only: bool = True) -> Path:
    """The folder of a diffusers-layout model: `name` as a local folder, else as a hub id resolved in the
    local Hugging Face cache. `required` names the files or subfolders it must hold; `default_id` is the
    hub id the error suggests when `name` is a path."""
    hub_id = str(name) if HUB_ID.fullmatch(str(name)) else default_id
    fetch = download_hint(hub_id)
    root = Path(name).expanduser()
    if not root.is_dir():
        if not HUB_ID.fullmatch(str(name)):
            raise WeightsNotFound(f"{what} {str(name)!r}: no such directory; {fetch}")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            root = Path(snapshot_download(str(name), local_files_only=local_files_only))
        except (LocalEntryNotFoundError, OSError) as e:
            where = "in the local Hugging Face cache" if local_files_only else "locally or on the hub"
            raise WeightsNotFound(f"{what} {str(name)!r}: not a directory and not found {where} "
                                  f"({type(e).__name__}); {fetch}") from e
    missing = [item for item in required if not (root / item).exists()]
    if missing:
        raise WeightsNotFound(f"{what} {str(name)!r} at {root} lacks {missing} (a diffusers folder needs "
                              f"{list(required)}); {fetch}")
    return root


def weights_identity(root: Path) -> str:
    """Which weights a model folder holds, told apart without reading them (a full content hash of tens of
    GB would cost minutes per run): a Hugging Face cache snapshot by its repository and revision (the commit
    its folder is named after); any other folder by its path and each file's size and modification time,
    so a replaced file changes it."""
    root = Path(root).resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return f"{root.parent.parent.name.removeprefix('models--').replace('--', '/')}@{root.name}"
    files = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    return f"{root} (files {seeding.fingerprint(files)})"
