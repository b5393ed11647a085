"""Training, evaluation and plotting on tiny generated data."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, assert_one_line_error, run_stage, tiny_split, write_prepared
from stages.common import StageError, load_torch
from stages.data import DeviceData, load_split, to_device
from stages.model import count_params, from_checkpoint
from stages.params import load_params
from stages.plot import read_history
from stages.train import fit, make_scheduler, new_run, train_epoch

CPU = torch.device("cpu")


@pytest.fixture
def prepared(tmp_path):
    return write_prepared(tmp_path / "data" / "prepared", n_train=256)


@pytest.fixture
def params(tmp_path):
    """The repo's params.yaml with a short, small-batch run; written to TMP_PATH."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(epochs=2, batch_size=32)
    raw["evaluate"].update(batch_size=50, max_errors=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(tmp_path / "params.yaml")


def device_data(split: dict) -> DeviceData:
    return to_device(split["images"], split["labels"], 0.2, 0.35, CPU)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(params):
    p = dataclasses.replace(params.train, rotation=0.0, batch_size=64, lr=0.05, epochs=20,
                            schedule="step", gamma=1.0)  # a constant lr
    run = new_run(p, CPU, 64)
    batch = device_data(tiny_split(64, 0))
    losses = [train_epoch(run, batch, p)[0] for _ in range(20)]  # one step each
    assert losses[-1] < 0.5 * losses[0]


def lrs(p, steps_per_epoch: int) -> list[float]:
    """The lr each training step of P's schedule uses."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=p.lr,
                                momentum=p.momentum)
    scheduler = make_scheduler(p, optimizer, steps_per_epoch)
    out = []
    for _ in range(p.epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[0]["momentum"] == p.momentum
        optimizer.step()
        scheduler.step()
    return out


def test_step_schedule_drops_lr_every_step_size_epochs(params):
    p = dataclasses.replace(params.train, schedule="step", lr=0.01, epochs=7, step_size=3,
                            gamma=0.1)
    # exactly the floats an epoch-stepped StepLR gives, so step runs reproduce bit for bit
    assert lrs(p, steps_per_epoch=5) == [0.01] * 15 + [0.01 * 0.1] * 15 + [0.01 * 0.1 * 0.1] * 5


def test_onecycle_rises_to_lr_then_anneals(params):
    p = dataclasses.replace(params.train, schedule="onecycle", lr=0.1, epochs=4, warmup=0.25,
                            start_div=10.0, final_div=100.0)
    seq = lrs(p, steps_per_epoch=10)
    peak = seq.index(max(seq))
    assert seq[0] == pytest.approx(0.01) and max(seq) == pytest.approx(0.1)
    assert peak == 9  # warmup ends a quarter of the way through the 40 steps
    assert all(a < b for a, b in zip(seq[:peak], seq[1:peak + 1]))
    assert all(a > b for a, b in zip(seq[peak:], seq[peak + 1:]))
    assert seq[-1] == pytest.approx(0.01 / 100)


def test_fit_is_deterministic_and_records_history(params):
    p = params.train
    train, test = device_data(tiny_split(256, 0)), device_data(tiny_split(64, 1))
    history = fit(new_run(p, CPU, 256), train, test, p, eval_batch_size=50)
    again = fit(new_run(p, CPU, 256), train, test, p, eval_batch_size=50)
    assert [row["epoch"] for row in history] == [1, 2]
    assert history == again
    assert set(history[0]) == {"epoch", "train/loss", "train/acc", "test/loss", "test/acc", "lr"}


def test_train_evaluate_plot_stages_end_to_end(tmp_path, prepared, params):
    cwd = tmp_path
    proc = run_stage("stages.train", "--data", "data/prepared", "--models", "models",
                     "--live", "metrics/train", cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Total params: 7,776" in proc.stdout
    assert "Total params: 7,776" in (cwd / "models" / "summary.txt").read_text()
    final = load_torch(cwd / "models" / "model.pt", "checkpoint")
    best = load_torch(cwd / "models" / "best.pt", "checkpoint")
    assert final["epoch"] == 2 and final["params"]["epochs"] == 2
    assert best["test_accuracy"] >= final["test_accuracy"] - 1e-9
    assert count_params(from_checkpoint(final, "model.pt")) == 7776

    history = read_history(cwd / "metrics" / "train")
    assert list(history.index) == [1, 2]
    summary = json.loads((cwd / "metrics" / "train" / "metrics.json").read_text())
    assert summary["params"] == 7776
    assert summary["test"]["acc"] == pytest.approx(history["test/acc"].iloc[-1])
    assert summary["best"]["test_acc"] == pytest.approx(history["test/acc"].max())
    assert summary["best"]["train_acc"] == pytest.approx(history["train/acc"].max())
    assert summary["best"]["test_epoch"] == best["epoch"]

    proc = run_stage("stages.evaluate", "--model", "models/model.pt", "--data", "data/prepared",
                     "--metrics", "metrics/eval.json", "--confusion", "plots/confusion.csv",
                     "--errors-png", "plots/errors.png", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((cwd / "metrics" / "eval.json").read_text())
    assert metrics["params"] == 7776
    assert metrics["accuracy"] == pytest.approx(final["test_accuracy"])
    confusion = pd.read_csv(cwd / "plots" / "confusion.csv")
    labels = load_split(prepared / "test.pt")[1]
    assert list(confusion.columns) == ["actual", "predicted"]
    assert confusion["actual"].tolist() == labels.tolist()
    assert metrics["errors"] == int((confusion["actual"] != confusion["predicted"]).sum())
    assert (cwd / "plots" / "errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = run_stage("stages.plot", "metrics/train", "plots", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    for name in ("accuracy.png", "loss.png"):
        assert (cwd / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_a_missing_or_corrupt_checkpoint(tmp_path, prepared, params):
    args = ["--model", "models/model.pt", "--data", "data/prepared", "--metrics", "m.json",
            "--confusion", "c.csv", "--errors-png", "e.png"]
    line = assert_one_line_error(run_stage("stages.evaluate", *args, cwd=tmp_path))
    assert "models/model.pt: checkpoint not found" in line
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"not a checkpoint")
    line = assert_one_line_error(run_stage("stages.evaluate", *args, cwd=tmp_path))
    assert "models/model.pt: checkpoint is not a torch file" in line
    assert not (tmp_path / "m.json").exists()


class Opaque:
    """An arbitrary class: weights_only loading must refuse to rebuild it."""


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": {}, "model_args": {}, "extra": Opaque()}, path)
    with pytest.raises(StageError, match="model.pt: checkpoint is corrupt or holds objects "
                                         "other than tensors"):
        load_torch(path, "checkpoint")


def write_history(live, steps_by_file):
    for (split, metric), steps in steps_by_file.items():
        folder = live / "plots" / "metrics" / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"{step}\t{50 + step}\n" for step in steps)
        (folder / f"{metric}.tsv").write_text(f"step\t{metric}\n{rows}")


def test_plot_reads_history_and_refuses_a_broken_one(tmp_path):
    with pytest.raises(StageError, match="per-epoch history not found"):
        read_history(tmp_path / "nowhere")
    files = [(split, metric) for split in ("train", "test") for metric in ("acc", "loss")]
    write_history(tmp_path / "good", {f: [1, 2, 3] for f in files})
    history = read_history(tmp_path / "good")
    assert list(history.index) == [1, 2, 3]
    assert history["test/acc"].tolist() == [51, 52, 53]
    write_history(tmp_path / "bad", {f: [1, 2, 3] if f != ("test", "acc") else [1, 2]
                                     for f in files})
    with pytest.raises(StageError, match="disagree on the epochs"):
        read_history(tmp_path / "bad")


def test_compiled_run_matches_the_eager_code_paths(params):
    """train.compile: on (the CUDA default) also works on the CPU, and checkpoints
    come from the plain module, not from torch.compile's wrapper."""
    from stages.model import checkpoint

    p = dataclasses.replace(params.train, compile="on", channels_last="on", epochs=1)
    run = new_run(p, CPU, 96)
    assert run.net is not run.model
    history = fit(run, device_data(tiny_split(96, 0)), device_data(tiny_split(64, 1)), p,
                  eval_batch_size=50)
    assert len(history) == 1 and 0 <= history[0]["test/acc"] <= 100
    keys = checkpoint(run.model, {"dropout": p.dropout})["model"].keys()
    assert not any(key.startswith("_orig_mod") for key in keys)
