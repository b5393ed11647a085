"""Training, evaluation and plotting on tiny generated data."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import REPO, assert_one_line_error, run_stage, tiny_split, write_prepared
from stages.common import StageError, load_torch
from stages.data import DeviceData, load_split, to_device
from stages.model import count_params, from_checkpoint
from stages.params import load_params
from stages.plot import read_history
from stages.train import fit, make_scheduler, new_state, smoothed_nll, score, train_epoch

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
    state = new_state(p, CPU, 64)
    batch = device_data(tiny_split(64, 0))
    losses = [train_epoch(state, batch, p)[0] for _ in range(20)]  # one step each
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
    history = fit(new_state(p, CPU, 256), train, test, p)
    again = fit(new_state(p, CPU, 256), train, test, p)
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


def test_compiled_steps_match_eager_steps(params):
    """train.compile: on (the CUDA default) runs the same training as eager on the CPU:
    the same losses within 0.1 % over a few steps (Inductor fuses and reorders ops, so
    the last bits differ, and the steps carry the difference on), and checkpoints from the plain module, not torch.compile's wrapper.
    Without dropout: compiled code draws its masks from its own random generator."""
    from stages.device import is_compiled
    from stages.model import checkpoint

    p = dataclasses.replace(params.train, epochs=3, batch_size=32, dropout=0.0, lr=0.01,
                            schedule="step", gamma=1.0)  # a constant, gentle lr
    train = device_data(tiny_split(96, 0))
    eager = new_state(dataclasses.replace(p, compile="off"), CPU, 96)
    compiled = new_state(dataclasses.replace(p, compile="on"), CPU, 96)
    assert not is_compiled(eager.net) and is_compiled(compiled.net)
    for _ in range(3):  # three steps an epoch
        a, b = train_epoch(eager, train, p), train_epoch(compiled, train, p)
        assert a[0] == pytest.approx(b[0], rel=1e-3) and a[1] == pytest.approx(b[1], abs=1.1)
    assert is_compiled(compiled.net)  # it did not fall back
    test = device_data(tiny_split(64, 1))
    assert score(eager.net, test)[0] == pytest.approx(score(compiled.net, test)[0], rel=1e-3)
    keys = checkpoint(compiled.model, {"dropout": p.dropout})["model"].keys()
    assert keys == checkpoint(eager.model, {"dropout": p.dropout})["model"].keys()


def test_a_failing_compiler_falls_back_to_eager_with_one_line(params, monkeypatch, capsys):
    """What a missing C compiler or an unsupported GPU does to torch.compile, simulated:
    the first call raises; training goes on eagerly, as a compile=off run would."""
    import stages.device

    def broken_compile(model, **kwargs):
        def call(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore text")
        return call

    monkeypatch.setattr(stages.device.torch, "compile", broken_compile)
    p = dataclasses.replace(params.train, epochs=1)
    train, test = device_data(tiny_split(96, 0)), device_data(tiny_split(64, 1))
    history = fit(new_state(dataclasses.replace(p, compile="on"), CPU, 96), train, test, p)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "torch.compile failed" in line]
    assert lines == ["warning: torch.compile failed (RuntimeError: InvalidCxxCompiler: No "
                     "working C++ compiler found); continuing without compiling. To skip "
                     "compiling, set train.compile=off (dvc exp run -S train.compile=off)"]
    assert history == fit(new_state(dataclasses.replace(p, compile="off"), CPU, 96),
                          train, test, p)


def test_an_error_of_the_model_itself_is_not_hidden_by_the_fallback(monkeypatch):
    from stages.device import CompiledModel
    import stages.device

    monkeypatch.setattr(stages.device.torch, "compile", lambda model, **kw: model)
    net = CompiledModel(torch.nn.Linear(3, 2), mode=None)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        net(torch.zeros(1, 5))  # fails compiled and eagerly: a real error


def test_label_smoothing_is_nll_at_zero_and_spreads_the_target():
    log_probs = torch.randn(8, 10).log_softmax(dim=1)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(smoothed_nll(log_probs, y, 0.0), F.nll_loss(log_probs, y))
    expected = F.cross_entropy(log_probs, y, label_smoothing=0.1)  # log_softmax is idempotent
    torch.testing.assert_close(smoothed_nll(log_probs, y, 0.1), expected)


def test_ema_is_what_is_tested_and_lags_the_weights(params):
    p = dataclasses.replace(params.train, ema=0.9, epochs=1)
    train, test = device_data(tiny_split(96, 0)), device_data(tiny_split(64, 1))
    state = new_state(p, CPU, 96)
    fit(state, train, test, p)
    averaged = state.ema.module.state_dict()
    live = state.model.state_dict()
    assert averaged.keys() == live.keys()
    assert not torch.equal(averaged["features.0.0.weight"], live["features.0.0.weight"])
    assert state.history[-1]["test/loss"] == score(state.ema.module, test)[0]
