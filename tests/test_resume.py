"""Resumable training: a run killed with SIGKILL continues to the same result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, write_prepared
from stages.common import load_torch

EPOCHS = 4
TRAIN_ARGS = ["-m", "stages.train", "--data", "data/prepared", "--models", "models",
              "--live", "metrics/train"]


def make_workdir(path, **train):
    write_prepared(path / "data" / "prepared", n_train=192)
    set_params(path, **train)
    return path


def set_params(path, **train):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update({"epochs": EPOCHS, "batch_size": 32, "resume": True, **train})
    raw["evaluate"].update(batch_size=64)
    (path / "params.yaml").write_text(yaml.safe_dump(raw))


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def train(cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *TRAIN_ARGS], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def train_and_kill(cwd, after_epoch: int) -> None:
    """Start training and SIGKILL it as soon as it reports AFTER_EPOCH finished."""
    proc = subprocess.Popen([sys.executable, *TRAIN_ARGS], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith(f"epoch {after_epoch:2d}/{EPOCHS}"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"


def outputs(cwd) -> dict:
    model = load_torch(cwd / "models" / "model.pt", "checkpoint")
    best = load_torch(cwd / "models" / "best.pt", "checkpoint")
    return {
        "summary": (cwd / "metrics" / "train" / "metrics.json").read_text(),
        "history": {name: (cwd / "metrics" / "train" / "plots" / "metrics" / name).read_text()
                    for name in ("train/acc.tsv", "test/acc.tsv", "train/loss.tsv", "test/loss.tsv")},
        "model": model["model"],
        "best_epoch": best["epoch"],
        "best": best["model"],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["summary"] == b["summary"]
    assert a["history"] == b["history"]
    assert a["best_epoch"] == b["best_epoch"]
    for key in ("model", "best"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = make_workdir(tmp_path_factory.mktemp("resume") / "whole")
    train(cwd)
    return outputs(cwd)


@pytest.mark.parametrize("after_epoch", [1, 2, 3])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, after_epoch):
    cwd = make_workdir(tmp_path / "killed")
    train_and_kill(cwd, after_epoch)
    state_path = cwd / "models" / "state.pt"
    # the kill may come before the epoch's state is saved; then the last one counts
    saved = load_torch(state_path, "state")["epoch"] if state_path.exists() else 0
    assert after_epoch - 1 <= saved <= after_epoch
    proc = train(cwd)
    if saved:
        assert f"resuming after epoch {saved} of {EPOCHS}" in proc.stdout
    assert_same(outputs(cwd), uninterrupted)


def test_state_from_other_params_is_ignored(tmp_path):
    cwd = make_workdir(tmp_path / "w")
    train_and_kill(cwd, 2)
    set_params(cwd, lr=0.02)
    proc = train(cwd)
    assert "made with other params or data, ignored; starting from epoch 1" in proc.stdout
    assert "resuming" not in proc.stdout
    history = (cwd / "metrics" / "train" / "plots" / "metrics" / "test" / "acc.tsv").read_text()
    assert len(history.splitlines()) == 1 + EPOCHS


def test_without_resume_a_state_is_not_used(tmp_path):
    cwd = make_workdir(tmp_path / "w")
    train_and_kill(cwd, 2)
    set_params(cwd, resume=False)
    proc = train(cwd)
    assert "resuming" not in proc.stdout


def test_corrupt_state_is_ignored(tmp_path):
    cwd = make_workdir(tmp_path / "w")
    (cwd / "models").mkdir()
    (cwd / "models" / "state.pt").write_bytes(b"\x00garbage")
    proc = train(cwd)
    assert "unreadable resumable state, ignored" in proc.stdout
    shutil.rmtree(cwd)
