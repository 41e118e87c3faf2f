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

Object stores have no atomic rename of a folder, so a multi-file artefact is published by writing its
files first and its marker file (e.g. a mapping run's run.json) last: a reader that finds the marker
finds the rest. Single files are written atomically everywhere (a local temporary file and a rename;
an object-store PUT is atomic by itself).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs


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

    @contextlib.contextmanager
    def staged(self, marker: str | None = None) -> Iterator[Path]:
        """A local folder to write this folder's new contents into; on success they replace what was
        here, on an error nothing changes. Locally the swap is one rename. In an object store the old
        `marker` file goes first, then the old objects, then the new files are uploaded with `marker`
        last, so a reader that finds the marker finds a complete folder."""
        if self.is_local:
            path = self.local_path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
            try:
                yield tmp
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
            return
        with tempfile.TemporaryDirectory(prefix="featmap-") as tmp:
            yield Path(tmp)
            if marker:
                (self / marker).delete()
            self.delete()
            last = Path(tmp, marker) if marker else None
            for file in sorted(p for p in Path(tmp).rglob("*") if p.is_file() and p != last):
                (self / file.relative_to(tmp).as_posix()).write_bytes(file.read_bytes())
            if last is not None and last.exists():
                (self / marker).write_bytes(last.read_bytes())
