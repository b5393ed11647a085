"""Fixtures: a folder of small IDX files, a local MNIST mirror, an SSH server, and real
MNIST digits with a briefly trained model; and how `make test` spreads the tests over
pytest-xdist's workers.

Nothing here touches the network: the mirror is a temp folder of small, random
IDX files, and stages.download.FILES is patched to expect their md5s; the SSH server
listens on 127.0.0.1 (tests/ssh_server.py).

`make test` spreads the test files over two pytest-xdist workers (`pytest -n 2 --dist
loadfile`: a file's tests run in one worker, so that no module-scoped fixture is built
twice). Each worker runs the session fixtures itself; the costly ones (the trained model
and its digit check) are made once per run, by the first worker that needs them, and
read by the others (`helpers.made_once`).
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import dvc  # noqa: F401 - see below
import numpy as np
import pytest
import torch

import ssh_server
from ci_suites import pytest_runtest_makereport  # noqa: F401 - a hook: CI fails skipped suites
from helpers import Mirror, idx_bytes, made_once, md5, raw_arrays, write_raw_dir

# The tests' tensors are tiny: one thread is faster, and does not fight a training
# run in the background for the cores.
torch.set_num_threads(1)

# After each command DVC starts a process that sends a usage report over the network,
# unless told not to: the suite's own repositories (tests/test_steps.py polls `dvc queue
# status` every second) would start one per call. tests/clones.py's clones say so too.
os.environ["DVC_NO_ANALYTICS"] = "1"

# DVC sets up its console logging on its first import, writing to the sys.stdout and
# sys.stderr of that moment. Imported above, at the start of each worker, it writes to
# the run's own capture; first imported in a test that captures its output (capsys),
# it would keep that test's streams, which are closed when the test ends, and a later
# test that uses DVC in the same worker would fail as DVC logs to them.


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
    """One real sshd for the whole session; skips with the reason where none can run
    (and fails instead in CI: tests/ci_suites.py)."""
    reason = ssh_server.unavailable()
    if reason:
        pytest.skip(reason)
    server = ssh_server.start(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


# a test that needs the session's model may wait for it, trained by another worker
WAITS_FOR_MODEL = 900


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where torch sees a GPU; a test that uses the session's
    model has time to wait for it, while another worker trains it."""
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        if "mnist_model" in item.fixturenames and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(WAITS_FOR_MODEL))


# --- real MNIST digits and a briefly trained model, for predict, the digit check and
# the page. Only where the MNIST files are at hand; the tests that need them skip.

@pytest.fixture(scope="session")
def mnist(tmp_path_factory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The MNIST train and test splits (uint8 images, int64 labels), read by preprocess's
    own reader from the local mirror."""
    from helpers import mnist_mirror
    from stages.download import gunzip_md5
    from stages.preprocess import SPLITS, read_split

    mirror = mnist_mirror()
    if mirror is None:
        pytest.skip("needs the MNIST files: set MNIST_MIRROR to a folder of the four .gz "
                    "files (CI has them in ../shared/data/mnist)")

    def unzip(raw: Path) -> None:
        for gz in mirror.glob("*-ubyte.gz"):
            gunzip_md5(gz, raw / gz.name.removesuffix(".gz"))

    raw = made_once(tmp_path_factory, "mnist", unzip)
    return {split: read_split(raw, prefix) for split, prefix in SPLITS.items()}


@pytest.fixture(scope="session")
def mnist_model(mnist, tmp_path_factory) -> Path:
    """A checkpoint of the real Net, trained by train's own functions with params.yaml's
    recipe for 2 epochs on 12,000 training digits (about 98 % on the test split); the
    one model of the whole run."""
    import dataclasses

    from stages.common import save_torch
    from stages.data import to_device
    from stages.model import checkpoint
    from stages.params import load_params
    from stages.preprocess import normalisation_stats
    from stages.runners import EagerRunner
    from stages.train import new_state

    from helpers import REPO

    def train(folder: Path) -> None:
        images, labels = mnist["train"][0][:12000], mnist["train"][1][:12000]
        stats = normalisation_stats(images)
        p = dataclasses.replace(load_params(REPO / "params.yaml").train, epochs=2,
                                device="cpu", compile="off", channels_last="off")
        state = new_state(p, torch.device("cpu"), len(labels))
        data = to_device(images, labels, stats["mean"], stats["std"], torch.device("cpu"))
        for _ in range(p.epochs):
            EagerRunner().train_epoch(state, data, p)
        save_torch(folder / "model.pt",
                   checkpoint(state.model, {"dropout": p.dropout}, normalisation=stats))

    return made_once(tmp_path_factory, "mnist_model", train) / "model.pt"


# params for a quick digit check: small counts, few steps
QUICK_CHECK = dict(false_flags=0.005, fitted=4000, held_out=2000, typed=400, per_kind=80,
                   drawn=100, photos=200, photo_sets=30, photo_others=30, hidden=32, fits=2,
                   steps=400, lr=0.003, weight_decay=0.0001, seed=1, max_passed=64)


@pytest.fixture(scope="session")
def mnist_check(mnist, mnist_model, tmp_path_factory):
    """The digit check for mnist_model, fitted by calibrate's own functions with
    QUICK_CHECK, once per run; (its file, the Calibration)."""
    from stages.calibrate import Reader, calibrate
    from stages.common import write_json
    from stages.ood import file_md5
    from stages.params import CalibrateParams
    from stages.predict import load_model

    def fit(folder: Path) -> None:
        reader = Reader(*load_model(mnist_model))
        calibration = calibrate(reader, mnist["train"], CalibrateParams(**QUICK_CHECK),
                                file_md5(mnist_model))
        write_json(folder / "ood.json", calibration.check.to_json())
        (folder / "calibration.pickle").write_bytes(pickle.dumps(calibration))

    folder = made_once(tmp_path_factory, "mnist_check", fit)
    return folder / "ood.json", pickle.loads((folder / "calibration.pickle").read_bytes())
