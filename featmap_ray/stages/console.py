"""What a `featmap` command prints, and where everything else goes.

The console shows what the user acts on: the progress bars (Ray Data's, one per dataset run, and
tqdm's for loops in this process), the summaries the stages print, featmap's own warnings and
errors, and first one line naming the command's log file. Everything else goes to that file,
`<storage>/logs/<command>-<timestamp>.log` (`Layout.logs`): the Python logging of Ray (Core, Data,
Train, Tune, Serve), MLflow, Lance, diffusers, transformers and the other libraries, Python
warnings, what Ray's workers print (forwarded to this driver), and what native code (Ray's core
worker, Lance) writes to this process's stderr. With `-v` all of it is shown on the console too,
as it happens (and still written to the file, but for native code's output).

How, for a command that starts Ray (`Console(..., logs=True)`):
  - the root logger gets two handlers: the file (everything from INFO) and the console (featmap's
    warnings and errors; everything with -v); Python warnings go through logging;
  - `sys.stdout` and `sys.stderr` become `_Router`s: a write made by a library (through its own
    logging handler, or a print, as Ray prints its workers' lines and Ray Tune its tables) goes to
    the file, any other write (a stage's summary, a progress bar, an error message) to the console;
  - once the file is open (after the command's checks passed, so a command that fails them writes
    nothing under the storage root), file descriptor 2 points at it, for native code; what was
    written before is written first.
All of it is undone when the command ends. A command that starts no Ray (info, status) only gets
the logging part, without a file.

An object-store root (s3://...) cannot be appended to: the log is written to
`<temp dir>/featmap-logs/<command>-<timestamp>.log` and copied to `<storage>/logs/` when the command
ends (the local file stays, so a killed command's log survives).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Self, TextIO

from featmap_ray.io.files import Location, is_remote
from featmap_ray.layout import Layout

# Top-level packages whose writes to stdout/stderr are library output, not the command's.
LIBRARIES = frozenset({
    "ray", "mlflow", "lance", "lance_ray", "lance_namespace", "pylance", "pyarrow", "diffusers", "transformers",
    "huggingface_hub", "tokenizers", "accelerate", "safetensors", "timm", "torch", "torchvision", "torchmetrics",
    "alembic", "sqlalchemy", "urllib3", "requests", "httpx", "aiohttp", "botocore", "boto3", "s3transfer",
    "fsspec", "grpc", "uvicorn", "starlette", "fastapi", "PIL", "skimage", "filelock", "tensorboardX", "opentelemetry",
})
# Frames skipped when finding who wrote: the machinery between the writer and the stream, and
# Ray's replacement of print (installed with its tqdm bars, in every process that imports Ray Data).
_MACHINERY = frozenset({"logging", "warnings", "traceback", __name__})
_PRINT_WRAPPERS = frozenset({("ray.experimental.tqdm_ray", "safe_print")})
_DEPTH = 16
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PENDING_LIMIT = 8 * 2**20  # bytes kept before the file opens
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _from_library(frame) -> bool:
    """Whether the code that made a write (the first frame outside logging/warnings) is a library's."""
    for _ in range(_DEPTH):
        if frame is None:
            return False
        module = frame.f_globals.get("__name__") or ""
        if module not in _MACHINERY and (module, frame.f_code.co_name) not in _PRINT_WRAPPERS:
            return module.partition(".")[0] in LIBRARIES
        frame = frame.f_back
    return False


def _is_featmap(record: logging.LogRecord) -> bool:
    return record.name == "featmap" or record.name.startswith("featmap_ray")


class _LogFile:
    """The command's log, shared by every writer: text written before `open` is kept (up to
    _PENDING_LIMIT) and written first; ANSI colours are dropped."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._size = 0
        self._file: TextIO | None = None

    def write(self, text: str) -> int:
        clean = _ANSI.sub("", text)
        with self._lock:
            if self._file is not None:
                self._file.write(clean)
            elif self._size < _PENDING_LIMIT:
                self._pending.append(clean)
                self._size += len(clean)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def open(self, path: Path) -> TextIO:
        with self._lock:
            self._file = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
            self._file.write("".join(self._pending))
            self._pending, self._size = [], 0
            return self._file

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._file = None


class _Router:
    """Stands in for sys.stdout / sys.stderr: a library's write goes to the log (and, with `tee`, to
    the console as well), any other write to the console."""

    def __init__(self, console: TextIO, log: _LogFile, tee: bool):
        self._console, self._log, self._tee = console, log, tee

    def write(self, text: str) -> int:
        if _from_library(sys._getframe(1)):
            self._log.write(text)
            if not self._tee:
                return len(text)
        return self._console.write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._console.flush()
        self._log.flush()

    def isatty(self) -> bool:  # Ray Data and tqdm ask: bars on a terminal, log lines elsewhere
        return self._console.isatty()

    def fileno(self) -> int:
        return self._console.fileno()

    def __getattr__(self, name: str):  # encoding, errors, buffer, ...
        return getattr(self._console, name)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _retarget_handlers(routes: dict, stderr: _Router) -> Callable[[], None]:
    """Point the stream handlers that libraries made before (at import) on the standard streams of
    that moment at the routers; returns what undoes it. Ray's PlainRayHandler means to write to
    "whatever sys.stderr points to at emit-time" but keeps the stream it was made with: it goes to
    `stderr` whatever that stream was."""
    routes = {id(stream): router for stream, router in routes.items() if stream is not None}
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    moved = []
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not isinstance(handler, logging.StreamHandler) or "stream" not in handler.__dict__:
            continue  # _StderrHandler (lastResort) looks sys.stderr up itself
        target = stderr if type(handler).__name__ == "PlainRayHandler" else routes.get(id(handler.stream))
        if target is not None:
            moved.append((handler, handler.stream))
            handler.stream = target

    def undo() -> None:
        for handler, stream in moved:
            handler.stream = stream

    return undo


def log_name(command: str, now: dt.datetime | None = None) -> str:
    return f"{command}-{(now or dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}.log"


class Console:
    """A command's console and log file (module docstring), as a context manager:

        with Console("pipeline", verbose=False, logs=True) as out:
            ...checks...
            out.open(cfg.storage)   # the log file, then Ray
            ...
    """

    def __init__(self, command: str, verbose: bool = False, logs: bool = True):
        self.command, self.verbose, self.logs = command, verbose, logs
        self.path: Path | None = None  # the log file this process writes
        self.destination: Location | None = None  # where it is copied at the end (object-store root)
        self._log = _LogFile()
        self._undo: list = []

    # -- set-up ------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        root = logging.getLogger()
        self._stdout, self._stderr = sys.stdout, sys.stderr
        self._console_handler = logging.StreamHandler(sys.stderr)
        self._console_handler.setFormatter(logging.Formatter(FORMAT if self.verbose else "%(levelname)s: %(message)s"))
        self._console_handler.addFilter(lambda r: self.verbose or (_is_featmap(r) and r.levelno >= logging.WARNING))
        handlers = [self._console_handler]
        if self.logs:
            file_handler = logging.StreamHandler(self._log)
            file_handler.setFormatter(logging.Formatter(FORMAT))
            handlers.append(file_handler)
        level = root.level
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)

        def restore_logging() -> None:
            logging.captureWarnings(False)
            for handler in handlers:
                root.removeHandler(handler)
            root.setLevel(level)

        self._undo.append(restore_logging)
        if self.logs:
            sys.stdout = out_router = _Router(self._stdout, self._log, tee=self.verbose)
            sys.stderr = self._err_router = _Router(self._stderr, self._log, tee=self.verbose)
            self._undo.append(self._restore_streams)
            self._undo.append(_retarget_handlers({self._stdout: out_router, sys.__stdout__: out_router,
                                                  self._stderr: self._err_router, sys.__stderr__: self._err_router},
                                                 self._err_router))
        return self

    def _restore_streams(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = self._stdout, self._stderr

    def open(self, storage: str) -> Path:
        """Create the log file (under the storage root, or locally for an object-store root), write
        what was logged so far, point file descriptor 2 at it (quietly) and say where it is."""
        if not self.logs:
            raise ValueError(f"featmap {self.command} keeps no log file")
        logs = Layout(storage).logs
        name = log_name(self.command)
        if is_remote(logs.uri):
            folder = Path(tempfile.gettempdir()) / "featmap-logs"
            self.destination = logs / name
        else:
            folder = logs.local_path
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        stamp = 1
        while self.path.exists():  # another command of the same name started this second
            stamp += 1
            self.path = folder / name.replace(".log", f"-{stamp}.log")
            if self.destination is not None:
                self.destination = logs / self.path.name
        log_file = self._log.open(self.path)
        self._undo.append(self._close_log)
        if not self.verbose:
            self._redirect_fd2(log_file)
        where = f"{self.path} (copied to {self.destination} at the end)" if self.destination else str(self.path)
        self._say(f"featmap {self.command}: logs of Ray, MLflow and the other libraries: {where}"
                  + ("" if self.verbose else " (-v shows them here)"))
        return self.path

    def _redirect_fd2(self, log_file: TextIO) -> None:
        """Native code writes to file descriptor 2: point it at the log. The console keeps a
        descriptor of its own (when it was fd 2 itself, as in a terminal)."""
        if _fileno(self._stderr) == 2:
            console = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(self._stderr, "encoding", None) or "utf-8",
                                errors="backslashreplace")
        else:  # a stream of its own (a test's capture): it stays the console
            console = None
        self._stderr.flush()
        saved = os.dup(2)
        os.dup2(log_file.fileno(), 2)
        if console is not None:
            self._err_router._console = console
            self._console_handler.setStream(console)

        def restore() -> None:
            self._log.flush()
            if console is not None:
                console.flush()
                self._err_router._console = self._stderr
                self._console_handler.setStream(self._stderr)
            os.dup2(saved, 2)
            os.close(saved)
            if console is not None:
                console.close()

        self._undo.append(restore)

    def attach_ray(self) -> None:
        """After Ray started: its workers' output to this driver (hence to the log), and, quietly, one
        Ray Data progress bar per dataset run instead of one per operator."""
        from featmap_ray.stages import runtime

        self._undo.append(runtime.forward_worker_output())
        if not self.verbose:
            self._undo.append(runtime.operator_progress_bars(False))

    # -- output ------------------------------------------------------------------------------------
    def _say(self, line: str) -> None:
        """A line on the console (and in the log)."""
        self._console_handler.stream.write(line + "\n")
        self._console_handler.stream.flush()
        self._log.write(line + "\n")

    def _close_log(self) -> None:
        self._log.close()
        if self.destination is not None and self.path is not None:
            try:
                self.destination.upload(self.path)
            except Exception as e:  # the local file stays
                self._say(f"featmap {self.command}: could not copy the log to {self.destination}: {e}; "
                          f"it stays in {self.path}")

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()
