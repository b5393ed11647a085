"""Resumable training: a run killed with SIGKILL continues to the same result, and a
saved state that does not belong to this run is ignored with a line saying why."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, tiny_split, train_first_epoch_and_save, write_prepared
from stages.common import load_torch, save_torch
from stages.data import to_device
from stages.params import load_params
from stages.state import new_state
from stages.train import fingerprint, fit, restore, resume_runner
import stages.train

EPOCHS = 5  # a kill that lands an epoch late still finds epochs left
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


def train_and_kill(cwd, after_epoch: int) -> int:
    """Start training and SIGKILL it as soon as it reports AFTER_EPOCH finished (the
    line comes after that epoch's state is saved); the last epoch whose state was saved.
    On a busy machine the kill can land an epoch or so later: the run resumes from
    whichever epoch was saved."""
    proc = subprocess.Popen([sys.executable, *TRAIN_ARGS], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith(f"epoch {after_epoch:2d}/{EPOCHS}"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    saved = load_torch(cwd / "models" / "state.pt", "state")["epoch"]
    assert after_epoch <= saved < EPOCHS
    return saved


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
    saved = train_and_kill(cwd, after_epoch)
    proc = train(cwd)
    assert f"resuming after epoch {saved} of {EPOCHS}" in proc.stdout
    assert f"epoch {saved:2d}/{EPOCHS}" not in proc.stdout  # not trained again
    assert outputs(cwd) == uninterrupted  # the same bytes, checkpoints included


# --- what a saved state must match --------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("change", ["runtime.threads", "runtime.cpu_isa", "data"])
def test_a_state_from_another_runtime_or_other_data_is_not_resumed(tmp_path, change):
    """The runtime section and the data's content change the bytes a run writes, so a
    killed run's state saved under other ones starts the run over (the same sizes and
    statistics are not enough: the images themselves count). Unchanged, the same state
    is resumed (test_killed_run_resumes_to_the_uninterrupted_result)."""
    cwd = make_workdir(tmp_path)
    train_and_kill(cwd, after_epoch=1)
    if change == "data":
        split = torch.load(cwd / "data/prepared/train.pt")
        split["images"] = split["images"].flip(0)  # the same images, in another order
        torch.save(split, cwd / "data/prepared/train.pt")
    else:
        raw = yaml.safe_load((cwd / "params.yaml").read_text())
        key = change.split(".")[1]
        raw["runtime"][key] = {"threads": 2, "cpu_isa": "native"}[key]
        (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = train(cwd)
    assert "made with other params, code or data, ignored; starting from epoch 1" in proc.stdout
    assert f"epoch  1/{EPOCHS}" in proc.stdout


# --- restore() in-process: which saved states are used --------------------------

def tiny_run(folder: Path, **train) -> tuple:
    """params.yaml's recipe with TRAIN's changes, written to FOLDER and read back as
    main() reads it: the train and runtime params, 64 tiny images on the CPU, their
    fingerprint, and where the state is saved."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(batch_size=32, resume=True, **train)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(folder / "params.yaml")
    split = tiny_split(64, 0)
    data = to_device(split["images"], split["labels"], 0.2, 0.35, CPU)
    key = fingerprint(params.train, params.runtime, CPU, "data", 0.2, 0.35)
    return params.train, params.runtime, data, key, folder / "state.pt"


@pytest.fixture
def saved(tmp_path):
    """A 2-epoch run's state saved after epoch 1, its params, key and data, as main()
    makes them; and the uninterrupted run's history and weights."""
    p, runtime, data, key, path = tiny_run(tmp_path, epochs=2)
    train_first_epoch_and_save(new_state(p, CPU, 64), data, data, p, path, key)
    whole = new_state(p, CPU, 64)
    fit(whole, data, data, p)
    return Saved(p, runtime, key, path, data, whole)


@dataclasses.dataclass
class Saved:
    p: object
    runtime: object
    key: str
    path: object
    data: object
    whole: object  # the uninterrupted run's final state

    def train_on(self, state):
        """Train STATE to the end; it must end exactly as the uninterrupted run."""
        fit(state, self.data, self.data, self.p)
        assert state.history == self.whole.history
        for name, tensor in self.whole.model.state_dict().items():
            assert torch.equal(state.model.state_dict()[name], tensor), name


def test_a_matching_state_is_resumed_and_trains_on_to_the_uninterrupted_result(saved, capsys):
    state = restore(saved.p, CPU, 64, saved.path, saved.key)
    assert state.epoch == 1 and state.step == 2
    assert "resuming after epoch 1 of 2" in capsys.readouterr().out
    saved.train_on(state)


def test_without_resume_a_state_is_not_used(saved, capsys):
    state = restore(dataclasses.replace(saved.p, resume=False), CPU, 64, saved.path, saved.key)
    assert state.epoch == 0
    assert "resuming" not in capsys.readouterr().out
    saved.train_on(state)


@pytest.mark.parametrize("change", ["params", "code", "runtime", "runtime code", "torch",
                                    "GPU model", "data"])
def test_a_state_from_other_params_code_runtime_or_data_is_ignored(saved, capsys, monkeypatch,
                                                                    tmp_path, change):
    p, runtime, digest = saved.p, saved.runtime, "data"
    if change == "params":
        p = dataclasses.replace(p, lr=p.lr * 2)
    elif change == "code":  # the same params, but the training code has changed since
        edited = tmp_path / "train.py"
        edited.write_text(stages.train.CODE[0].read_text() + "\n# a change\n")
        monkeypatch.setattr(stages.train, "CODE", [edited, *stages.train.CODE[1:]])
    elif change == "runtime":
        runtime = dataclasses.replace(runtime, threads=runtime.threads + 1)
    elif change == "runtime code":  # stages/runtime.py sets how torch computes
        path = next(path for path in stages.train.CODE if path.name == "runtime.py")
        edited = tmp_path / "runtime.py"
        edited.write_text(path.read_text() + "\n# a change\n")
        monkeypatch.setattr(stages.train, "CODE", [edited if c == path else c
                                                   for c in stages.train.CODE])
    elif change == "torch":  # an upgraded torch computes other last bits
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "GPU model":  # as another GPU would name itself
        monkeypatch.setattr(stages.train, "device_model", lambda device: "Another GPU")
    else:
        digest = "other data"
    new_key = fingerprint(p, runtime, CPU, digest, 0.2, 0.35)
    assert new_key != saved.key
    state = restore(p, CPU, 64, saved.path, new_key)
    assert state.epoch == 0
    assert "made with other params, code or data, ignored" in capsys.readouterr().out
    if change in ("code", "data"):  # the same params: trained from scratch, the same result
        saved.train_on(state)


def test_a_state_that_another_runner_trained_is_ignored(saved, capsys):
    """A state whose epochs ran from CUDA graphs (or eagerly, after a capture that failed
    where this run's works) holds other last bits: it is not continued."""
    state = load_torch(saved.path, "state")
    assert state["runner"] == "eager"
    state["runner"] = "CUDA graphs"
    save_torch(saved.path, state)
    restored = restore(saved.p, CPU, 64, saved.path, saved.key)
    assert restored.epoch == 1
    capsys.readouterr()
    state, runner = resume_runner(restored, saved.p, saved.data, saved.path)
    assert state.epoch == 0 and runner.name == "eager"
    assert ("its epochs ran on the CUDA graphs runner and this run's is eager, ignored; "
            "starting from epoch 1") in capsys.readouterr().out
    saved.train_on(state)


def test_an_unreadable_state_is_ignored(saved, capsys):
    saved.path.write_bytes(b"\x00garbage")
    state = restore(saved.p, CPU, 64, saved.path, saved.key)
    assert state.epoch == 0
    assert "unreadable resumable state, ignored; starting from epoch 1" in capsys.readouterr().out
    saved.train_on(state)


def test_a_state_that_does_not_fit_is_ignored(saved, capsys):
    state = load_torch(saved.path, "state")
    state["model"]["features.0.0.weight"] = torch.zeros(3, 1, 3, 3)  # a wrong shape
    save_torch(saved.path, state)
    restored = restore(saved.p, CPU, 64, saved.path, saved.key)
    assert restored.epoch == 0 and restored.history == []
    assert "resumable state does not fit this run, ignored" in capsys.readouterr().out
    saved.train_on(restored)


def test_data_digest_tells_content_not_only_sizes():
    from stages.train import data_digest

    images = tiny_split(64, 0)["images"]
    assert data_digest(images) == data_digest(images.clone())
    assert data_digest(images) != data_digest(images.flip(0))
    assert data_digest(images) != data_digest(images.to(torch.int64))


@pytest.mark.parametrize("after_epoch", [1, 2])
def test_a_run_with_every_candidate_on_resumes_to_the_uninterrupted_result(tmp_path,
                                                                           after_epoch):
    """The weights' average (train.swa_epochs) and the second parameter group
    (train.norm_decay false) are saved and restored; clean epochs, the elastic fields
    and the statistics recomputed at the end follow from the epoch and the generator."""
    from helpers import Killed

    p, _, data, key, path = tiny_run(tmp_path, epochs=3, swa_epochs=2, norm_decay=False,
                                     clean_epochs=1, bn_recompute=True, elastic=1.0,
                                     interpolation="bilinear", anneal="linear")

    def save_and_stop(s) -> None:
        save_torch(path, s.state_dict(key))
        if s.epoch == after_epoch:
            raise Killed

    with pytest.raises(Killed):
        fit(new_state(p, CPU, 64), data, data, p, save_and_stop)
    whole = new_state(p, CPU, 64)
    fit(whole, data, data, p)
    state = restore(p, CPU, 64, path, key)
    assert state.epoch == after_epoch and (state.swa.n_averaged.item() == after_epoch - 1)
    fit(state, data, data, p)
    assert state.history == whole.history
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(state.model.state_dict()[name], tensor), name
