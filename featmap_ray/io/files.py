"""One filesystem layer for every file under the storage root that is not a Lance table.

A `Location` is a path that is either local (`/data/featmap/mapping`) or in an object store
(`s3://bucket/featmap/mapping`, `gs://bucket/...`); the same calls read, write, list, copy and delete
both, through pyarrow.fs. Mapping runs, normalisation statistics, sweeps, reports, Ray Train and Tune
storage, FeatInv checkpoints and the demo's source photos all go through it, so `storage=s3://...`
works for every stage.

Credentials and endpoints come from the environment, never from code: the standard AWS variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for an S3-compatible
server, `AWS_ALLOW_HTTP=true` for a plain-http one) or an instance profile, and for GCS
`GOOGLE_APPLICATION_CREDENTIALS`. pyarrow, Lance, Ray and boto3 (MLflow) all read the same variables.

Single files are written atomically everywhere (a local temporary file and a rename; an object-store
PUT is atomic by itself). Object stores have no atomic rename of a folder, so a multi-file artefact (a
mapping run, a FeatInv model, a report) is versioned the same way on every backend:

    <artefact>/CURRENT           the name of the published version: one small file, written last
    <artefact>/v-<time>-<random>/ one version's files

`Location.publish` writes a new version folder, then points CURRENT at it (os.replace locally, one PUT
in an object store: both atomic; pyarrow.fs offers no conditional PUT), and only then deletes older
versions, keeping the one it replaced for readers still reading it. Readers resolve the pointer with
`Location.current` and never look at a version it does not name, so a writer killed at any point
leaves the previous version readable; its unfinished folder is deleted by the next publish.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import functools
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

POINTER = "CURRENT"  # in a versioned artefact folder: the name of its published version
VERSION_PREFIX = "v-"


def is_remote(uri: str) -> bool:
    """An object-store URI (s3://, gs://, ...) rather than a local path."""
    return "://" in str(uri) and not str(uri).startswith("file://")


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    # One filesystem per bucket: resolving an S3 bucket's region costs a request.
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}/")[0]


class Location:
    """A file or folder under the storage root, local or in an object store."""

    def __init__(self, uri: str | os.PathLike | Location):
        uri = str(uri)
        if uri.startswith("file://"):
            uri = urlsplit(uri).path
        if is_remote(uri):
            self.uri = uri.rstrip("/")
        else:
            self.uri = str(Path(uri).expanduser().absolute())

    # -- naming ------------------------------------------------------------------------------------
    def __truediv__(self, part: str) -> Location:
        return Location(f"{self.uri}/{part}")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def name(self) -> str:
        return PurePosixPath(self.uri).name

    @property
    def parent(self) -> Location:
        return Location(self.uri.rsplit("/", 1)[0])

    @property
    def is_local(self) -> bool:
        return not is_remote(self.uri)

    @property
    def local_path(self) -> Path:
        """The local path (only for a local Location)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is in an object store, not a local path")
        return Path(self.uri)

    @property
    def fs(self) -> pafs.FileSystem:
        if self.is_local:
            return pafs.LocalFileSystem()
        parts = urlsplit(self.uri)
        return _filesystem(parts.scheme, parts.netloc)

    @property
    def path(self) -> str:
        """The path inside `fs` (bucket/key for an object store)."""
        if self.is_local:
            return self.uri
        parts = urlsplit(self.uri)
        return f"{parts.netloc}{parts.path}"

    # -- inspecting --------------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def iterdir(self) -> list[Location]:
        """The entries directly inside this folder (none when it does not exist), sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((self / PurePosixPath(i.path).name for i in infos), key=str)

    def glob(self, pattern: str) -> list[Location]:
        """Files whose path relative to this folder matches `pattern` (fnmatch per path part,
        e.g. "*/run.json"), sorted."""
        depth = len(PurePosixPath(pattern).parts)
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        found = []
        for info in infos:
            rel = PurePosixPath(info.path).relative_to(PurePosixPath(self.path))
            if info.type == pafs.FileType.File and len(rel.parts) == depth and fnmatch.fnmatch(str(rel), pattern):
                found.append(self / str(rel))
        return sorted(found, key=str)

    # -- reading and writing files -----------------------------------------------------------------
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no file at {self.uri}") from e

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file atomically: a reader sees the old content or the new, never half."""
        if self.is_local:
            path = self.local_path
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:  # a PUT replaces the object at once
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, data: Any) -> None:
        self.write_text(json.dumps(data, indent=1, default=float))

    # -- folders -------------------------------------------------------------------------------------
    def delete(self) -> None:
        """Remove this file or folder with everything in it; nothing when it does not exist."""
        kind = self._info().type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def upload(self, local: str | os.PathLike) -> None:
        """Copy a local file or folder (its contents) to this Location."""
        local = Path(local)
        if self.is_local:
            if local.is_dir():
                shutil.copytree(local, self.local_path, dirs_exist_ok=True)
            else:
                self.write_bytes(local.read_bytes())
            return
        if local.is_dir():
            pafs.copy_files(str(local), self.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        else:
            self.write_bytes(local.read_bytes())

    def copy_to(self, dest: Location) -> None:
        """Copy this folder's contents to `dest` (either may be local or remote)."""
        pafs.copy_files(self.path, dest.path, source_filesystem=self.fs, destination_filesystem=dest.fs)

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        """A local folder holding this folder's contents: the folder itself when it is local, else
        a temporary download, removed afterwards (for readers that need paths: diffusers, MLflow)."""
        if not self.exists():
            raise FileNotFoundError(f"nothing at {self.uri}")
        if self.is_local:
            yield self.local_path
            return
        with tempfile.TemporaryDirectory(prefix="featmap-") as tmp:
            pafs.copy_files(self.path, tmp, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            yield Path(tmp)

    # -- versioned folders (module doc) ----------------------------------------------------------------
    def current(self) -> Location | None:
        """The published version of this versioned folder (the folder CURRENT names), or None when
        nothing was published here."""
        try:
            name = (self / POINTER).read_text().strip()
        except FileNotFoundError:
            return None
        return self / name

    def resolved(self) -> Location:
        """What a reader of this folder reads: its published version when it is a versioned artefact,
        else the folder itself (a checkpoint, a `save_pretrained` output, a download)."""
        return self.current() or self

    @contextlib.contextmanager
    def publish(self) -> Iterator[Path]:
        """A local folder to write a new version of this artefact into; when the block ends without an
        error, the version is complete here and becomes the published one (on an error nothing is
        published). Locally it is the version folder itself; for an object store, a temporary folder
        uploaded as the version afterwards."""
        # Names sort by creation time: a version never replaces a newer one (`_point_to`).
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        version = self / f"{VERSION_PREFIX}{stamp}-{secrets.token_hex(4)}"
        if self.is_local:
            folder = version.local_path
            folder.mkdir(parents=True)
            try:
                yield folder
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        else:
            with tempfile.TemporaryDirectory(prefix="featmap-") as tmp:
                yield Path(tmp)
                for file in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                    (version / file.relative_to(tmp).as_posix()).upload(file)
        self._point_to(version)

    def _point_to(self, version: Location) -> None:
        """Publish `version` (complete) by one write of the pointer, then delete what is neither it, the
        version it replaces, nor newer (a concurrent writer's, still being written)."""
        previous = self.current()
        if previous is not None and previous.name > version.name:
            version.delete()  # a newer version was published while this one was written: it stays
            return
        (self / POINTER).write_text(version.name)
        keep = {POINTER, version.name, previous.name if previous else None}
        for entry in self.iterdir():
            # Hidden entries are a concurrent writer's temporary files (see write_bytes).
            if entry.name not in keep and not entry.name.startswith(".") and not (
                    entry.name.startswith(VERSION_PREFIX) and entry.name > version.name):
                entry.delete()
