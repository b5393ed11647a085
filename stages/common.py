"""Helpers every stage shares: one-line errors, atomic writes, safe tensor loading."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


class StageError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a command's main(), turning StageError into one line on stderr and exit 1. A
    reader of stdout that leaves early (`| head`) ends the command quietly, with exit 1."""
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs as they happen
    try:
        main()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        if not stdout_is_gone():
            raise  # another pipe or socket: not the reader of stdout leaving
        # what is still buffered for stdout would fail again at exit: send it nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def stdout_is_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has left."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # not a file: in memory
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only on success.

    A crash or exception leaves either the old file or none, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(_umask_mode(0o666))  # mkstemp makes 0600; give the file a normal mode
    try:
        yield tmp
        with tmp.open("rb") as f:  # on disk before it takes the real name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(_umask_mode(0o777))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    try:
        with path.open() as f:
            return json.load(f)
    except FileNotFoundError:
        raise StageError(f"{path}: {what} not found; run the stage that makes it (dvc repro)") from None
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: {what} is unreadable ({err}); rerun the stage that makes it") from None


def torch_bytes(obj) -> bytes:
    """torch.save's bytes for OBJ. They depend only on OBJ: saved to a file, torch names
    the archive inside after the file, so a temporary name would change the bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_torch(path: str | Path, obj) -> None:
    write_bytes(path, torch_bytes(obj))


def load_torch(path: str | Path, what: str, map_location="cpu"):
    """torch.load with weights_only=True and a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: {what} not found; run the stage that makes it (dvc repro)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise StageError(f"{path}: {what} is not a torch file (truncated or overwritten?); "
                         "rerun the stage that makes it")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise StageError(f"{path}: {what} is corrupt or holds objects other than tensors "
                         f"and plain data ({type(err).__name__}); rerun the stage that "
                         "makes it") from None
