"""Helpers the tests share: tiny IDX files, tiny prepared digits, stage subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from scripts.page_screenshot import CHROMIUM

REPO = Path(__file__).resolve().parents[1]

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
SIDE = 28
N_TRAIN, N_TEST = 64, 32


def idx_bytes(data: np.ndarray, magic: int | None = None, dims: list[int] | None = None) -> bytes:
    """An IDX file: big-endian magic, one uint32 per dimension, then the uint8 data.

    `magic` defaults to 2051 for 3-D data and 2049 for 1-D data; `dims` overrides the
    header's dimensions (to write a header that disagrees with the data).
    """
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if magic is None:
        magic = 0x800 + data.ndim
    if dims is None:
        dims = list(data.shape)
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + data.tobytes()


def random_images(n: int, seed: int = 0, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side), dtype=np.uint8)


def random_labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(0, 10, size=n, dtype=np.uint8)


def write_idx(path: Path, data: np.ndarray, magic: int | None = None,
              dims: list[int] | None = None) -> Path:
    path.write_bytes(idx_bytes(data, magic, dims))
    return path


def raw_arrays(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST files' contents, by file name (without .gz)."""
    arrays = {}
    for i, (prefix, n) in enumerate({"train": n_train, "t10k": n_test}.items()):
        arrays[f"{prefix}-images-idx3-ubyte"] = random_images(n, seed + i)
        arrays[f"{prefix}-labels-idx1-ubyte"] = random_labels(n, seed + i)
    return arrays


def write_raw_dir(folder: Path, arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write the four decompressed IDX files into FOLDER; return their arrays."""
    arrays = raw_arrays() if arrays is None else arrays
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in arrays.items():
        write_idx(folder / name, data)
    return arrays


def tiny_split(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Digits that are easy to tell apart: the label sets the brightness of a block."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 30, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 4 + 2 * label: 8 + 2 * label, 6:22] = 255
    return {"images": images, "labels": labels}


def write_prepared(folder: Path, n_train: int, n_test: int = 64) -> Path:
    """A preprocess output folder of tiny_split digits, as train and evaluate read it."""
    folder.mkdir(parents=True)
    torch.save(tiny_split(n_train, 0), folder / "train.pt")
    torch.save(tiny_split(n_test, 1), folder / "test.pt")
    (folder / "stats.json").write_text(json.dumps({"mean": 0.2, "std": 0.35}))
    return folder


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Mirror:
    path: Path                 # folder holding NAME.gz for the four files
    content: dict[str, bytes]  # the decompressed bytes of each file, by NAME

    def gz(self, name: str) -> Path:
        return self.path / f"{name}.gz"

    def replace(self, name: str, gz_bytes: bytes) -> None:
        """Overwrite NAME.gz with GZ_BYTES (already compressed, or deliberately not)."""
        self.gz(name).write_bytes(gz_bytes)


def stage_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a stage subprocess runs in: the repo importable, one thread, no
    MNIST mirror, then ENV."""
    full_env = {k: v for k, v in os.environ.items() if k != "MNIST_MIRROR"}
    full_env["PYTHONPATH"] = str(REPO)
    full_env["OMP_NUM_THREADS"] = "1"
    full_env.update(env or {})
    return full_env


def run_stage(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGS` in CWD with the repo importable; capture its output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=stage_env(env),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, starts_with: str = "error: ") -> str:
    """The stage failed with exit 1 and exactly one 'error: ...' line on stderr."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(starts_with), proc.stderr
    return lines[0]


def mnist_mirror() -> Path | None:
    """The folder of the four original MNIST .gz files: $MNIST_MIRROR if it is a folder,
    else ../shared/data/mnist beside the checkout (as CI lays it out); None if neither."""
    for folder in (os.environ.get("MNIST_MIRROR"), REPO.parent / "shared/data/mnist"):
        if folder and Path(folder).is_dir() and any(Path(folder).glob("*-idx3-ubyte.gz")):
            return Path(folder)
    return None


class Killed(Exception):
    """Stops fit() after an epoch, as a kill right after its state was saved would."""


def train_first_epoch_and_save(state, train, test, p, path: Path, key: str,
                               runner=None) -> None:
    """fit() STATE for its first epoch only, saving its resumable state to PATH under
    KEY as the train stage does after each epoch; then stop, as a killed run would."""
    from stages.common import save_torch
    from stages.train import fit

    def save_and_stop(s) -> None:
        save_torch(path, s.state_dict(key))
        raise Killed

    try:
        fit(state, train, test, p, save_and_stop, runner)
    except Killed:
        return
    raise AssertionError("fit ended without finishing an epoch")


def needs_chromium(test):
    """A test that drives a real browser: marked `browser`, and skipped without Chromium
    (failed instead in CI: tests/ci_suites.py)."""
    skip = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium for a real browser "
                              "(apt-get install chromium); make test installs it")
    return pytest.mark.browser(skip(test))


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder NAME, filled by MAKE once per test run. Each xdist worker runs the
    session fixtures itself; the first to get here makes the folder while the others wait
    on its lock, then they read it. The workers' temp folders share a parent, which a
    run without xdist does not have: there the folder is in the run's own. A pytest run
    in a subprocess of a worker inherits PYTEST_XDIST_WORKER, so the worker is also
    recognised by the folder xdist gives it (popen-gwN in the run's folder)."""
    base = tmp_path_factory.getbasetemp()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and base.name.endswith(f"-{worker}"):
        base = base.parent
    folder = base / name
    with FileLock(f"{folder}.lock"):
        if not folder.is_dir():
            scratch = base / f"{name}.partial"  # a worker that failed half-way leaves it
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            make(scratch)
            scratch.rename(folder)
    return folder
