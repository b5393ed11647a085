"""Training, evaluation and plotting on tiny generated data."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import REPO, assert_one_line_error, run_stage, tiny_split, write_prepared
from stages.common import StageError, load_torch
from stages.data import DeviceData, load_split, split_validation, to_device
from stages.model import count_params, from_checkpoint
from stages.params import load_params
from stages.plot import read_history
from stages.runners import EagerRunner, GraphRunner, make_runner, smoothed_nll
from stages.state import lr_schedule, new_state
from stages.train import fit, score
import stages.runners

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
    losses = [EagerRunner().train_epoch(state, batch, p)[0] for _ in range(20)]  # a step each
    assert losses[-1] < 0.5 * losses[0]


def test_step_schedule_drops_lr_every_step_size_epochs(params):
    p = dataclasses.replace(params.train, schedule="step", lr=0.01, epochs=7, step_size=3,
                            gamma=0.1)
    # exactly the floats an epoch-stepped StepLR gives, so step runs reproduce bit for bit
    assert lr_schedule(p, steps_per_epoch=5) == [0.01] * 15 + [0.01 * 0.1] * 15 + [0.01 * 0.1 * 0.1] * 5


def test_onecycle_rises_to_lr_then_anneals(params):
    p = dataclasses.replace(params.train, schedule="onecycle", lr=0.1, epochs=4, warmup=0.25,
                            start_div=10.0, final_div=100.0)
    seq = lr_schedule(p, steps_per_epoch=10)
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
    """train.compile: on runs the same training as eager on the CPU:
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
        a = EagerRunner().train_epoch(eager, train, p)
        b = EagerRunner().train_epoch(compiled, train, p)
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


# --- the step function and its two runners ------------------------------------------

def augment_before(x, rotation, translate, background, generator, scale):
    """stages.data.augment as it was before the recipe's candidates (interpolation,
    elastic), copied: the oracle that their defaults draw and compute the same."""
    from stages.data import pixel_centres

    if rotation == 0 and translate == 0 and scale == 0:
        return x
    n, _, h, w = x.shape
    xs = pixel_centres(w, x.device, x.dtype).view(1, 1, w)
    ys = pixel_centres(h, x.device, x.dtype).view(1, h, 1)
    if rotation > 0:
        angles = torch.rand(n, device=x.device, generator=generator, dtype=x.dtype)
        angles = (angles * 2 - 1) * math.radians(rotation)
        cos, sin = angles.cos().view(n, 1, 1), angles.sin().view(n, 1, 1)
        gx, gy = cos * xs + (-sin) * ys, sin * xs + cos * ys
    else:
        gx, gy = xs.expand(n, h, w), ys.expand(n, h, w)
    if translate > 0:
        shift = torch.rand(n, 2, device=x.device, generator=generator, dtype=x.dtype)
        shift = (shift * 2 - 1) * translate
    if scale > 0:
        zoom = torch.rand(n, device=x.device, generator=generator, dtype=x.dtype)
        zoom = (1 + (zoom * 2 - 1) * scale).view(n, 1, 1)
        gx, gy = gx / zoom, gy / zoom
    if translate > 0:
        gx = gx + (shift[:, 0] * (2 / w)).view(n, 1, 1)
        gy = gy + (shift[:, 1] * (2 / h)).view(n, 1, 1)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x - background, grid, mode="nearest", align_corners=False) + background


def epochs_before_the_step_function(state, data, p, epochs: int) -> list[tuple[float, float]]:
    """The training loop as it was before train_step, the runners and the recipe's
    candidates: one SGD group, torch's own OneCycleLR or StepLR (default anneal) stepped
    after each optimizer step, the old augmentation. The oracle for the eager runner."""
    steps = math.ceil(len(data) / p.batch_size)
    optimizer = torch.optim.SGD(state.model.parameters(), lr=p.lr, momentum=p.momentum,
                                nesterov=p.nesterov, weight_decay=p.weight_decay)
    if p.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=p.lr, epochs=p.epochs, steps_per_epoch=steps,
            pct_start=p.warmup, div_factor=p.start_div, final_div_factor=p.final_div,
            cycle_momentum=False)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=p.step_size * steps,
                                                    gamma=p.gamma)
    state.optimizer = optimizer
    results = []
    for _ in range(epochs):
        state.net.train()
        order = torch.randperm(len(data), generator=state.generator)
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.int64)
        for idx in order.split(p.batch_size):
            x, y = data.x[idx], data.y[idx]
            x = augment_before(x, p.rotation, p.translate, data.background, state.generator,
                               p.scale)
            out = state.net(x)
            loss = smoothed_nll(out, y, p.label_smoothing)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            scheduler.step()
            if state.ema is not None:
                state.ema.update_parameters(state.model)
            loss_sum += loss.detach() * len(y)
            correct += (out.detach().argmax(dim=1) == y).sum()
        results.append((loss_sum.item() / len(data), 100 * correct.item() / len(data)))
    return results


@pytest.mark.parametrize("changes", [{}, {"schedule": "step", "lr": 0.01, "step_size": 1,
                                          "gamma": 0.5},
                                     {"ema": 0.9, "label_smoothing": 0.1}])
def test_the_eager_runner_trains_bit_for_bit_as_the_loop_before_it(params, changes):
    """The committed CPU runs must not change: the schedule as a table of per-step lrs,
    the step as a function, and the recipe's candidates at params.yaml's values give
    exactly the old loop's weights and numbers."""
    p = dataclasses.replace(params.train, epochs=2, **changes)
    assert (p.interpolation, p.elastic, p.clean_epochs, p.anneal, p.norm_decay, p.swa_epochs,
            p.bn_recompute) == ("nearest", 0.0, 0, "cos", True, 0, False)
    data = device_data(tiny_split(200, 0))  # 6 batches of 32 and one of 8
    before = new_state(p, CPU, 200)  # each right before its run: dropout draws from
    expected = epochs_before_the_step_function(before, data, p, 2)  # torch's global RNG
    after = new_state(p, CPU, 200)
    history = fit(after, data, data, p, runner=EagerRunner())  # scoring draws nothing
    assert [(row["train/loss"], row["train/acc"]) for row in history] == expected
    for name, tensor in before.model.state_dict().items():
        assert torch.equal(after.model.state_dict()[name], tensor), name
    if before.ema is not None:
        for name, tensor in before.ema.state_dict().items():
            assert torch.equal(after.ema.state_dict()[name], tensor), name


@pytest.mark.parametrize("changes", [{}, {"interpolation": "bilinear", "elastic": 1.5},
                                     {"norm_decay": False, "anneal": "linear"},
                                     {"swa_epochs": 2}, {"bn_recompute": True}])
def test_the_graph_runners_steps_match_the_eager_runners_on_the_cpu(params, changes):
    """GraphRunner without capture: its device-side gather, counters, lr table and fused
    SGD with a tensor lr, run eagerly. Against the eager runner over 3 epochs the
    weights differ by at most 1.8e-7 (measured: fused SGD rounds in another order), and
    every logged number agrees within 1e-6; the tolerances are a few times that. The
    recipe's candidates that the graphs hold (or that run between epochs) too."""
    p = dataclasses.replace(params.train, epochs=3, **changes)
    train, test = device_data(tiny_split(200, 0)), device_data(tiny_split(64, 1))
    eager = new_state(p, CPU, 200)
    expected = fit(eager, train, test, p, runner=EagerRunner())
    graphed = new_state(p, CPU, 200)
    history = fit(graphed, train, test, p, runner=GraphRunner(graphed, train, p, capture=False))
    for row, want in zip(history, expected, strict=True):
        assert row == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(graphed.model.state_dict(), eager.model.state_dict(),
                               rtol=1e-5, atol=1e-6)
    assert graphed.step == eager.step == 3 * 7
    assert graphed.optimizer.param_groups[0]["fused"] is True


def test_both_runners_train_every_image_once_an_epoch_the_last_batch_included(
        params, monkeypatch):
    """200 images in batches of 64: three full batches and a last one of 8, in the
    seeded order, the same batches from both runners."""
    p = dataclasses.replace(params.train, batch_size=64, epochs=1)
    data = device_data(tiny_split(200, 0))
    seen = []

    def recording_step(state, data, idx, p, totals, *args):
        seen.append(idx.clone())
        real_step(state, data, idx, p, totals, *args)

    real_step = stages.runners.train_step
    monkeypatch.setattr(stages.runners, "train_step", recording_step)
    batches = {}
    for name in ("eager", "graph"):
        seen.clear()
        state = new_state(p, CPU, 200)
        runner = EagerRunner() if name == "eager" else GraphRunner(state, data, p, capture=False)
        runner.train_epoch(state, data, p)
        batches[name] = [idx.tolist() for idx in seen]
        assert [len(b) for b in batches[name]] == [64, 64, 64, 8]
        assert sorted(sum(batches[name], [])) == list(range(200))
        assert state.step == 4
        assert state.model.features[0][2].num_batches_tracked.item() == 4
    assert batches["graph"] == batches["eager"]


def test_a_failed_capture_falls_back_to_eager_with_one_line_and_state_untouched(
        params, monkeypatch, capsys):
    """Capture fails after the warm-up has trained: the runner rewinds the weights, the
    momentum, the generator and the optimizer's settings, says so in one line, and the
    run is exactly an eager run."""
    p = dataclasses.replace(params.train, epochs=2)
    train, test = device_data(tiny_split(200, 0)), device_data(tiny_split(64, 1))

    def failing_capture(self, saved):
        for _ in range(3):
            self._step("full")  # as a warm-up does: weights, momentum, generator all move
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(GraphRunner, "_capture", failing_capture)
    state = new_state(p, CPU, 200)
    runner = make_runner(state, train, p, graphed=True)
    assert isinstance(runner, EagerRunner)
    assert capsys.readouterr().out.splitlines() == [
        "warning: capturing the training step in a CUDA graph failed (RuntimeError: "
        "operation not permitted when stream is capturing); training eagerly instead. To "
        "skip the attempt, set train.cuda_graph=off (dvc exp run -S train.cuda_graph=off)"]
    group = state.optimizer.param_groups[0]
    assert group["fused"] is None and group["foreach"] is None and group["lr"] == p.lr
    assert state.optimizer.state[state.model.features[0][0].weight]["momentum_buffer"].eq(0).all()
    history = fit(state, train, test, p, runner=runner)
    eager = new_state(p, CPU, 200)
    assert history == fit(eager, train, test, p)
    for name, tensor in eager.model.state_dict().items():
        assert torch.equal(state.model.state_dict()[name], tensor), name


def test_cuda_graph_auto_is_off_without_cuda_and_on_is_refused_there(params):
    from stages.runners import use_cuda_graph

    p = params.train
    assert use_cuda_graph(p, CPU) is False
    with pytest.raises(StageError, match="train.cuda_graph is on but training runs on the cpu"):
        use_cuda_graph(dataclasses.replace(p, cuda_graph="on"), CPU)
    cuda = torch.device("cuda")
    assert use_cuda_graph(p, cuda) is True
    assert use_cuda_graph(dataclasses.replace(p, ema=0.99), cuda) is False
    assert use_cuda_graph(dataclasses.replace(p, compile="on"), cuda) is False
    assert use_cuda_graph(dataclasses.replace(p, cuda_graph="off"), cuda) is False


def test_fast_dropout_draws_other_masks_so_it_changes_the_result(params):
    """Not a speed-only switch: from the same seed, Dropout16 and nn.Dropout drop other
    units, and the runs part (docs/performance.md has the numbers on real data)."""
    data = device_data(tiny_split(96, 0))
    weights = {}
    for value in ("on", "off"):
        p = dataclasses.replace(params.train, epochs=1, fast_dropout=value)
        state = new_state(p, CPU, 96)
        EagerRunner().train_epoch(state, data, p)
        weights[value] = state.model.features[0][0].weight.detach().clone()
    assert not torch.equal(weights["on"], weights["off"])


def test_the_errors_figure_says_when_it_draws_none_of_the_errors(tmp_path):
    """evaluate.max_errors 0 once drew "no errors" over a model with errors."""
    from stages.evaluate import draw_errors

    images = tiny_split(8, 0)["images"]
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    wrong = torch.tensor([0, 1, 2, 3, 4, 5, 9, 9])  # two errors
    path = tmp_path / "errors.png"
    assert draw_errors(path, images, labels, wrong, 0) == \
        "2 misclassified test digits, none drawn (evaluate.max_errors is 0)"
    assert draw_errors(path, images, labels, wrong, 1) == \
        "misclassified test digits (true→predicted): 1 of 2 shown"
    assert draw_errors(path, images, labels, labels, 48) == "no misclassified test digits"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_validation_split_is_seeded_balanced_and_the_same_for_every_training_seed():
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(3))
    kept, held = split_validation(labels, 100, seed=0)
    again_kept, again_held = split_validation(labels, 100, seed=0)
    assert torch.equal(kept, again_kept) and torch.equal(held, again_held)
    assert len(held) == 100 and len(kept) == 900
    assert not set(kept.tolist()) & set(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == list(range(1000))
    # each class gives its share of the labels, give or take the one image of rounding
    share = torch.bincount(labels, minlength=10) * 100 / 1000
    assert (torch.bincount(labels[held], minlength=10) - share).abs().max() < 1
    assert not torch.equal(split_validation(labels, 100, seed=1)[1], held)
    with pytest.raises(StageError, match="train.val_size 1000 must be between 1 and 999"):
        split_validation(labels, 1000, seed=0)


def test_no_training_batch_holds_a_validation_image_whatever_the_training_seed(
        tmp_path, params, monkeypatch):
    """The train stage trains on the images that split_validation keeps, and on no other:
    recorded from the images each training step receives, for two training seeds."""
    folder = write_prepared(tmp_path / "prepared", n_train=200)
    images = load_split(folder / "train.pt")[0]
    _, held = split_validation(load_split(folder / "train.pt")[1], 40, seed=0)
    held_images = {images[i].numpy().tobytes() for i in held.tolist()}
    for seed in (1, 2):
        p = dataclasses.replace(params.train, epochs=1, val_size=40, seed=seed, rotation=0.0,
                                translate=0.0)
        seen = []

        def recording_step(state, data, idx, p, totals, *args):
            seen.extend(data.x[idx].mul(0.35).add(0.2).mul(255).round().to(torch.uint8)
                        .squeeze(1).numpy())
            real_step(state, data, idx, p, totals, *args)

        real_step = stages.runners.train_step
        monkeypatch.setattr(stages.runners, "train_step", recording_step)
        train_split = load_split(folder / "train.pt")
        kept, held_now = split_validation(train_split[1], p.val_size, p.val_seed)
        assert torch.equal(held_now, held)
        train = to_device(train_split[0][kept], train_split[1][kept], 0.2, 0.35, CPU)
        fit(new_state(p, CPU, len(train)), train, device_data(tiny_split(64, 1)), p)
        monkeypatch.setattr(stages.runners, "train_step", real_step)
        trained = {image.tobytes() for image in seen}
        assert len(seen) == 160 and not trained & held_images


def test_a_run_with_a_validation_split_reads_and_scores_no_test_set(tmp_path, params):
    """With a validation split, the stage scores each epoch on it and never opens
    test.pt (here a file that is no split at all, so reading it would fail); best.pt is
    the best validation epoch; no test metric is logged or written; the plot stage draws
    the validation curve."""
    cwd = tmp_path
    folder = write_prepared(cwd / "data" / "prepared", n_train=256)
    (folder / "test.pt").write_bytes(b"not a split: the stage must not read it")
    raw = yaml.safe_load((cwd / "params.yaml").read_text())
    raw["train"].update(epochs=4, val_size=64, lr=0.05)
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = run_stage("stages.train", "--data", "data/prepared", "--models", "models",
                     "--live", "metrics/train", cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "192 train / 64 validation images (the test set unused)" in proc.stdout
    assert "test loss" not in proc.stdout and "test accuracy" not in proc.stdout
    history = read_history(cwd / "metrics" / "train")
    assert list(history.columns) == ["train/acc", "train/loss", "val/acc", "val/loss"]
    assert not (cwd / "metrics" / "train" / "plots" / "metrics" / "test").exists()
    summary = json.loads((cwd / "metrics" / "train" / "metrics.json").read_text())
    assert "test" not in summary and "test" not in json.dumps(summary)
    assert summary["best"]["val_epoch"] == history["val/acc"].idxmax()
    best = load_torch(cwd / "models" / "best.pt", "checkpoint")
    final = load_torch(cwd / "models" / "model.pt", "checkpoint")
    assert best["epoch"] == history["val/acc"].idxmax()
    assert best["val_accuracy"] == pytest.approx(history["val/acc"].max())
    assert final["val_accuracy"] == pytest.approx(history["val/acc"].iloc[-1])
    assert "test_accuracy" not in best and "test_accuracy" not in final
    proc = run_stage("stages.plot", "metrics/train", "plots", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert (cwd / "plots" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_with_a_validation_split_passes_no_test_image_to_the_model(params):
    """A sentinel: test images of a value no normalised digit has; the model's inputs,
    training and scoring, are watched for it, and the score function for the test set."""
    p = dataclasses.replace(params.train, epochs=2)
    train, val = device_data(tiny_split(96, 0)), device_data(tiny_split(32, 2))
    test = DeviceData(x=torch.full((64, 1, 28, 28), 777.0), y=torch.zeros(64, dtype=torch.int64),
                      background=0.0)
    state = new_state(p, CPU, 96)
    inputs = []
    state.model.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    history = fit(state, train, test, p, val_data=val)
    assert len(inputs) > 2 and not any((x == 777.0).any() for x in inputs)
    assert [sorted(row) for row in history] == [["epoch", "lr", "train/acc", "train/loss",
                                                 "val/acc", "val/loss"]] * 2
    assert history[-1]["val/loss"] == score(state.scored, val)[0]
    # the watch can see it: without the split, the test set and its sentinel are scored
    plain, seen = new_state(p, CPU, 96), []
    plain.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    assert "test/acc" in fit(plain, train, test, p)[0]
    assert any((x == 777.0).any() for x in seen)


def test_a_validation_split_as_large_as_the_training_set_is_one_line(tmp_path, prepared):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(epochs=1, val_size=256)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = run_stage("stages.train", "--data", "data/prepared", "--models", "models",
                     "--live", "metrics/train", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert line == ("error: train.val_size 256 must be between 1 and 255, the 256 training "
                    "images less one; 0 holds out none")
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()


def test_the_training_state_has_one_home_that_the_runners_and_the_stage_import():
    """TrainState lives in stages/state.py; the runners use it at run time, with no
    import of the train stage (no circle through a TYPE_CHECKING import)."""
    import ast
    import stages.state
    import stages.train

    assert stages.runners.TrainState is stages.state.TrainState is stages.train.TrainState

    def imported(module) -> set[str]:
        tree = ast.parse(open(module.__file__).read())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}

    assert "stages.train" not in imported(stages.runners)
    assert not {"stages.train", "stages.runners"} & imported(stages.state)
    assert "stages/state.py" in yaml.safe_load((REPO / "dvc.yaml").read_text()
                                               )["stages"]["train"]["deps"]


# --- the recipe's candidates (train params whose defaults change nothing) ---------------

def total_variation(x: torch.Tensor) -> float:
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().sum()
            + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()).item()


def test_bilinear_resampling_differs_from_nearest_and_is_smoother():
    from stages.data import augment

    x = device_data(tiny_split(16, 0)).x
    background = x.min().item()
    out = {mode: augment(x, 15.0, 1.0, background, torch.Generator().manual_seed(3), 0.1,
                         mode=mode) for mode in ("nearest", "bilinear")}
    assert not torch.equal(out["nearest"], out["bilinear"])
    values = set(x.unique().tolist()) | {background}
    assert set(out["nearest"].unique().tolist()) <= values  # nearest only copies pixels
    assert not set(out["bilinear"].unique().tolist()) <= values  # bilinear blends them
    assert total_variation(out["bilinear"]) < 0.9 * total_variation(out["nearest"])


def test_the_training_step_resamples_as_train_interpolation_says(params, monkeypatch):
    from stages.data import augment

    modes = []

    def recording(*args, **kwargs):
        modes.append(args[7] if len(args) > 7 else kwargs.get("mode", "nearest"))
        return augment(*args, **kwargs)

    monkeypatch.setattr(stages.runners, "augment", recording)
    for mode in ("nearest", "bilinear"):
        p = dataclasses.replace(params.train, epochs=1, interpolation=mode)
        EagerRunner().train_epoch(new_state(p, CPU, 64), device_data(tiny_split(64, 0)), p)
    assert modes == ["nearest"] * 2 + ["bilinear"] * 2


def test_elastic_displaces_smoothly_by_at_most_its_pixels_after_the_other_draws():
    """On ramps that hold each pixel's own column (or row), bilinear resampling tells
    the displacement: at most ELASTIC pixels, somewhere near it, smooth between
    neighbours. A vanishing ELASTIC gives the output without it: the angles, shifts and
    zooms are drawn first, as before."""
    from stages.data import augment

    n, side, elastic = 8, 28, 2.0
    cols = torch.arange(side, dtype=torch.float32).expand(n, 1, side, side).contiguous()
    rows = cols.transpose(2, 3).contiguous()
    dx, dy = (augment(ramp, 0.0, 0.0, 0.0, torch.Generator().manual_seed(5), 0.0, elastic,
                      "bilinear") - ramp for ramp in (cols, rows))
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # no border clipping
    shift = torch.stack([dx[inner], dy[inner]])
    assert shift.abs().max() <= elastic + 1e-4 and shift.abs().max() > 0.5 * elastic
    inner_dx = dx[inner]
    assert (inner_dx[..., 1:] - inner_dx[..., :-1]).abs().max() < 0.5  # a field, not noise
    x = device_data(tiny_split(n, 0)).x
    plain, tiny = (augment(x, 7.0, 1.0, -0.4, torch.Generator().manual_seed(5), 0.1, e,
                           "bilinear") for e in (0.0, 1e-6))
    torch.testing.assert_close(tiny, plain, rtol=0, atol=1e-4)
    assert torch.equal(augment(x, 0.0, 0.0, -0.4, torch.Generator(), 0.0, 0.0), x)


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def bn_inputs(model, x) -> list[torch.Tensor]:
    """Each BatchNorm layer's input for images X in one batch, on a copy of MODEL with
    BatchNorm normalising by the batch's statistics and dropout off."""
    import copy

    model, seen = copy.deepcopy(model), []
    model.eval()
    for norm in batch_norms(model):
        norm.train()
        norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    return seen


@pytest.mark.parametrize("bn_recompute", [False, True])
def test_bn_recompute_sets_the_statistics_of_the_unaugmented_training_images(
        params, bn_recompute):
    """96 images, one batch of the recompute: each layer's running mean and variance
    are then exactly the batch statistics of the un-augmented images (dropout off);
    without bn_recompute they are not."""
    p = dataclasses.replace(params.train, epochs=2, bn_recompute=bn_recompute, dropout=0.1)
    train, test = device_data(tiny_split(96, 0)), device_data(tiny_split(64, 1))
    state = new_state(p, CPU, 96)
    fit(state, train, test, p)
    inputs = bn_inputs(state.model, train.x)
    matches = []
    for norm, x in zip(batch_norms(state.model), inputs, strict=True):
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)
        matches.append(torch.allclose(norm.running_mean, mean, rtol=1e-4, atol=1e-6)
                       and torch.allclose(norm.running_var, var, rtol=1e-4, atol=1e-6))
    assert all(matches) if bn_recompute else not any(matches)
    assert state.history[-1]["test/loss"] == score(state.scored, test)[0]  # scored after it


def test_clean_epochs_train_the_last_epochs_on_unaugmented_images(params, monkeypatch):
    from stages.data import augment

    p = dataclasses.replace(params.train, epochs=3, clean_epochs=1)
    train = device_data(tiny_split(96, 0))
    state = new_state(p, CPU, 96)
    augmented_in, fed = [], []
    monkeypatch.setattr(stages.runners, "augment",
                        lambda *a, **k: augmented_in.append(state.epoch) or augment(*a, **k))
    state.model.register_forward_pre_hook(lambda m, args: fed.append((state.epoch, args[0])))
    fit(state, train, device_data(tiny_split(64, 1)), p)
    assert augmented_in == [0] * 3 + [1] * 3  # epochs 1 and 2, 3 batches each
    last = [x for epoch, x in fed if epoch == 2 and x.shape[0] == 32]  # epoch 3's batches
    assert len(last) == 3
    images = {image.numpy().tobytes() for image in train.x}
    assert all(image.numpy().tobytes() in images for x in last for image in x)


def test_clean_epochs_run_eagerly_only(params):
    from stages.runners import use_cuda_graph

    p = dataclasses.replace(params.train, clean_epochs=2)
    assert use_cuda_graph(p, torch.device("cuda")) is False
    with pytest.raises(ValueError, match="eagerly only"):
        GraphRunner(new_state(p, CPU, 64), device_data(tiny_split(64, 0)), p, capture=False)


def test_linear_anneal_falls_in_equal_steps_to_the_same_end(params):
    p = dataclasses.replace(params.train, schedule="onecycle", lr=0.1, epochs=4, warmup=0.25,
                            start_div=10.0, final_div=1000.0)
    cos, linear = (lr_schedule(dataclasses.replace(p, anneal=a), steps_per_epoch=10)
                   for a in ("cos", "linear"))
    peak = linear.index(max(linear))  # torch shapes the warm-up the same way
    assert peak == 9 and linear[peak] == pytest.approx(0.1)
    falls = [a - b for a, b in zip(linear[peak:], linear[peak + 1:])]
    assert max(falls) - min(falls) < 1e-9 and min(falls) > 0
    assert linear[-1] == pytest.approx(cos[-1]) == pytest.approx(0.1 / 10 / 1000)
    assert linear != cos


def test_norm_decay_false_exempts_batchnorm_and_the_last_1x1_from_weight_decay(params):
    p = params.train
    groups = new_state(p, CPU, 64).optimizer.param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == p.weight_decay > 0
    state = new_state(dataclasses.replace(p, norm_decay=False), CPU, 64)
    decayed, exempt = state.optimizer.param_groups
    names = {id(w): name for name, w in state.model.named_parameters()}
    norms = {name for name, m in state.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert decayed["weight_decay"] == p.weight_decay and exempt["weight_decay"] == 0
    assert sorted(names[id(w)] for w in exempt["params"]) == sorted(
        [f"{n}.{k}" for n in norms for k in ("weight", "bias")] + ["features.9.weight"])
    assert len(decayed["params"]) == 7  # the six 3x3 convolutions and the first 1x1
    assert all(names[id(w)].endswith(".weight") and w.dim() == 4 for w in decayed["params"])


def test_swa_saves_the_mean_of_the_last_epochs_weights_with_recomputed_statistics(params):
    p = dataclasses.replace(params.train, epochs=3, swa_epochs=2)
    train, test = device_data(tiny_split(96, 0)), device_data(tiny_split(64, 1))
    state = new_state(p, CPU, 96)
    snapshots, runner = [], EagerRunner()
    train_epoch = runner.train_epoch

    def recording(*args, **kwargs):
        result = train_epoch(*args, **kwargs)
        snapshots.append({k: v.clone() for k, v in state.model.named_parameters()})
        return result

    runner.train_epoch = recording
    fit(state, train, test, p, runner=runner)
    weights = dict(state.model.named_parameters())
    for name, weight in weights.items():
        mean = (snapshots[1][name] + snapshots[2][name]) / 2
        torch.testing.assert_close(weight.detach(), mean, rtol=1e-6, atol=1e-7)
        assert not torch.equal(weight.detach(), snapshots[2][name])
    for norm, x in zip(batch_norms(state.model), bn_inputs(state.model, train.x), strict=True):
        torch.testing.assert_close(norm.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    assert state.history[-1]["test/loss"] == score(state.scored, test)[0]
