"""Fixtures: a folder of small IDX files, a local MNIST mirror, and an SSH server.

Nothing here touches the network: the mirror is a temp folder of small, random
IDX files, and stages.download.FILES is patched to expect their md5s; the SSH server
listens on 127.0.0.1 (tests/ssh_server.py).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import ssh_server
from helpers import Mirror, idx_bytes, md5, raw_arrays, write_raw_dir

# The tests' tensors are tiny: one thread is faster, and does not fight a training
# run in the background for the cores.
torch.set_num_threads(1)


@pytest.fixture
def raw_dir(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder with four small valid IDX files, and the arrays they hold."""
    folder = tmp_path / "raw"
    return folder, write_raw_dir(folder)


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Mirror:
    """A local mirror of four small gzipped IDX files; FILES expects their md5s."""
    import stages.download

    folder = tmp_path / "mirror"
    folder.mkdir()
    content = {name: idx_bytes(data) for name, data in raw_arrays().items()}
    for name, data in content.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    assert set(content) == set(stages.download.FILES)
    monkeypatch.setattr(stages.download, "FILES", {name: md5(content[name])
                                                   for name in stages.download.FILES})
    return Mirror(folder, content)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> ssh_server.SshServer:
    """One real sshd for the whole session; skips with the reason where none can run."""
    reason = ssh_server.unavailable()
    if reason:
        pytest.skip(reason)
    server = ssh_server.start(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where torch sees a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
