"""Resumable training: a run killed with SIGKILL continues to the same result, and a
saved state that does not belong to this run is ignored with a line saying why."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from helpers import REPO, tiny_split, write_prepared
from stages.common import load_torch, save_torch
from stages.data import to_device
from stages.params import load_params
from stages.train import fingerprint, fit, new_state, restore
import stages.train

EPOCHS = 4
TRAIN_ARGS = ["-m", "stages.train", "--data", "data/prepared", "--models", "models",
              "--live", "metrics/train"]
CPU = torch.device("cpu")


def make_workdir(path, **train):
    write_prepared(path / "data" / "prepared", n_train=192)
    set_params(path, **train)
    return path


def set_params(path, **train):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update({"epochs": EPOCHS, "batch_size": 32, "resume": True, **train})
    (path / "params.yaml").write_text(yaml.safe_dump(raw))


def env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def train(cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *TRAIN_ARGS], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def train_and_kill(cwd, after_epoch: int) -> None:
    """Start training and SIGKILL it as soon as it reports AFTER_EPOCH finished; the
    line comes after that epoch's state is saved, so the kill point is exact."""
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
        "model": (cwd / "models" / "model.pt").read_bytes(),
        "best_epoch": best["epoch"],
        "best": (cwd / "models" / "best.pt").read_bytes(),
        "epoch": model["epoch"],
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = make_workdir(tmp_path_factory.mktemp("resume") / "whole")
    train(cwd)
    return outputs(cwd)


@pytest.mark.slow
@pytest.mark.parametrize("after_epoch", [1, 3])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, after_epoch):
    cwd = make_workdir(tmp_path / "killed")
    train_and_kill(cwd, after_epoch)
    assert load_torch(cwd / "models" / "state.pt", "state")["epoch"] == after_epoch
    proc = train(cwd)
    assert f"resuming after epoch {after_epoch} of {EPOCHS}" in proc.stdout
    assert f"epoch {after_epoch:2d}/{EPOCHS}" not in proc.stdout  # not trained again
    assert outputs(cwd) == uninterrupted  # the same bytes, checkpoints included


# --- restore() in-process: which saved states are used --------------------------

@pytest.fixture
def saved(tmp_path):
    """A state saved after epoch 1 of 2, its params, key and data, as main() makes them."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(epochs=2, batch_size=32, resume=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(tmp_path / "params.yaml").train
    split = tiny_split(64, 0)
    data = to_device(split["images"], split["labels"], 0.2, 0.35, CPU)
    key = fingerprint(p, CPU, 64, 64, 0.2, 0.35)
    state = new_state(dataclasses.replace(p, epochs=1), CPU, 64)
    fit(state, data, data, dataclasses.replace(p, epochs=1))
    path = tmp_path / "state.pt"
    save_torch(path, state.state_dict(key))
    return p, key, path


def test_a_matching_state_is_resumed(saved, capsys):
    p, key, path = saved
    assert restore(p, CPU, 64, path, key).epoch == 1
    assert "resuming after epoch 1 of 2" in capsys.readouterr().out


def test_without_resume_a_state_is_not_used(saved, capsys):
    p, key, path = saved
    assert restore(dataclasses.replace(p, resume=False), CPU, 64, path, key).epoch == 0
    assert "resuming" not in capsys.readouterr().out


@pytest.mark.parametrize("change", ["params", "code"])
def test_a_state_from_other_params_or_code_is_ignored(saved, capsys, monkeypatch, tmp_path, change):
    p, key, path = saved
    if change == "params":
        p = dataclasses.replace(p, lr=p.lr * 2)
    else:  # the same params, but the training code has changed since the state was saved
        edited = tmp_path / "train.py"
        edited.write_text(stages.train.CODE[0].read_text() + "\n# a change\n")
        monkeypatch.setattr(stages.train, "CODE", [edited, *stages.train.CODE[1:]])
    new_key = fingerprint(p, CPU, 64, 64, 0.2, 0.35)
    assert new_key != key
    assert restore(p, CPU, 64, path, new_key).epoch == 0
    assert "made with other params, code or data, ignored" in capsys.readouterr().out


def test_an_unreadable_state_is_ignored(saved, capsys):
    p, key, path = saved
    path.write_bytes(b"\x00garbage")
    assert restore(p, CPU, 64, path, key).epoch == 0
    assert "unreadable resumable state, ignored; starting from epoch 1" in capsys.readouterr().out


def test_a_state_that_does_not_fit_is_ignored(saved, capsys):
    p, key, path = saved
    state = load_torch(path, "state")
    state["model"]["features.0.0.weight"] = torch.zeros(3, 1, 3, 3)  # a wrong shape
    save_torch(path, state)
    restored = restore(p, CPU, 64, path, key)
    assert restored.epoch == 0 and restored.history == []
    assert "resumable state does not fit this run, ignored" in capsys.readouterr().out
