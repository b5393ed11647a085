"""Train stage: fit the 7,776-parameter CNN, testing after every epoch.

Reads:  DATA_DIR/{train,test}.pt and DATA_DIR/stats.json (from preprocess).
Writes: MODELS_DIR/model.pt (final) and best.pt (best test epoch), checkpoints that
        rebuild the model; MODELS_DIR/state.pt (resumable state, each epoch);
        MODELS_DIR/summary.txt (torchinfo); LIVE_DIR, DVCLive's per-epoch metrics.
Params: train.*, runtime.* (applied before torch starts; see stages/runtime.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from stages.common import StageError, load_torch, run_cli, save_torch, write_text
from stages.data import DeviceData, augment, load_split, load_stats, to_device
from stages.device import CompiledModel, compile_model, mark_step, resolve_device, switch
from stages.model import Net, checkpoint, count_params, predict
from stages.params import TrainParams, load_params

# DVC's tools are imported in main() only: the training functions also run where they
# are not installed (benchmarks/gpu_check.py on a bare GPU machine)
if TYPE_CHECKING:
    from dvclive import Live

POSTFIX_EVERY = 50  # steps between progress-bar updates (each one syncs the device)
# the per-epoch test pass's batch: a speed setting only (1000 gave bit-identical results)
TEST_BATCH_SIZE = 250
METRICS = ("train/loss", "train/acc", "test/loss", "test/acc", "lr")
# the code whose changes make a saved state stale (with the params and the data)
CODE = [Path(__file__).with_name(name) for name in
        ("train.py", "data.py", "model.py", "device.py", "params.py", "common.py")]


@dataclass
class TrainState:
    """Everything that changes while training, so that it can be saved and resumed."""

    model: Net
    net: torch.nn.Module | CompiledModel  # runs the training batches: MODEL, or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # batch order, rotation angles and shifts
    ema: AveragedModel | None = None  # moving average of the weights, if train.ema > 0
    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # checkpoint of the best test epoch so far

    @property
    def scored(self) -> torch.nn.Module | CompiledModel:
        """What is tested each epoch and saved: the moving average if there is one."""
        return self.ema.module if self.ema is not None else self.net

    def state_dict(self, fingerprint: str) -> dict:
        return {
            "fingerprint": fingerprint,
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": (torch.cuda.get_rng_state(self.generator.device)
                         if self.generator.device.type == "cuda" else None),
        }

    def load_state_dict(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        if (saved["ema"] is None) != (self.ema is None):
            raise ValueError("the saved state and this run disagree on train.ema")
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.generator.device)
        self.epoch, self.history, self.best = saved["epoch"], list(saved["history"]), saved["best"]


def make_scheduler(p: TrainParams, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped after every batch.

    onecycle: up from lr/start_div to lr over the first `warmup` share of the steps, then
    down (cosine) to lr/start_div/final_div; momentum stays at train.momentum.
    step: lr times gamma after every step_size epochs.
    """
    if p.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=p.lr, epochs=p.epochs, steps_per_epoch=steps_per_epoch,
            pct_start=p.warmup, div_factor=p.start_div, final_div_factor=p.final_div,
            cycle_momentum=False)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=p.step_size * steps_per_epoch,
                                           gamma=p.gamma)


def new_state(p: TrainParams, device: torch.device, n_train: int) -> TrainState:
    """A freshly initialised model, optimiser and scheduler, seeded from P, for a
    training set of N_TRAIN images."""
    torch.manual_seed(p.seed)
    # torch's own dropout is fast on CUDA (and safe inside CUDA graphs); Dropout16 is for CPUs
    model = Net(dropout=p.dropout, fast_dropout=switch(p.fast_dropout, device, "cpu")).to(device)
    if switch(p.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    net = compile_model(model, device) if switch(p.compile, device) else model
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum,
                                nesterov=p.nesterov, weight_decay=p.weight_decay)
    scheduler = make_scheduler(p, optimizer, math.ceil(n_train / p.batch_size))
    generator = torch.Generator(device=device).manual_seed(p.seed)
    # the average covers BatchNorm's running statistics too (use_buffers)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(p.ema), use_buffers=True)
           if p.ema > 0 else None)
    return TrainState(model, net, optimizer, scheduler, generator, ema)


def smoothed_nll(log_probs: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """NLL against targets that put 1 - SMOOTHING on the label and SMOOTHING spread over
    all ten classes; exactly F.nll_loss when SMOOTHING is 0."""
    nll = F.nll_loss(log_probs, y)
    if smoothing == 0:
        return nll
    return (1 - smoothing) * nll - smoothing * log_probs.mean(dim=1).mean()


def train_epoch(state: TrainState, data: DeviceData, p: TrainParams,
                desc: str = "") -> tuple[float, float]:
    """One pass over DATA in seeded random order; returns (mean loss, accuracy %).

    The loss reported is the training objective (with label smoothing, if any)."""
    net, optimizer = state.net, state.optimizer
    net.train()
    n = len(data)
    order = torch.randperm(n, device=data.x.device, generator=state.generator)
    loss_sum = torch.zeros((), device=data.x.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.x.device)
    seen = 0
    bar = tqdm(order.split(p.batch_size), desc=desc, leave=False, unit="batch")
    for step, idx in enumerate(bar, 1):
        mark_step(net)  # a new step for the CUDA graphs
        x, y = data.x[idx], data.y[idx]
        x = augment(x, p.rotation, p.translate, data.background, state.generator)
        out = net(x)
        loss = smoothed_nll(out, y, p.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        loss_sum += loss.detach() * len(y)
        correct += (out.detach().argmax(dim=1) == y).sum()
        seen += len(y)
        if step % POSTFIX_EVERY == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                            acc=f"{100 * correct.item() / seen:.2f}%")
    return loss_sum.item() / n, 100 * correct.item() / n


def score(model, data: DeviceData, batch_size: int = TEST_BATCH_SIZE) -> tuple[float, float]:
    """(mean loss, accuracy %) of MODEL on DATA, in eval mode."""
    out = predict(model, data.x, batch_size)
    loss = F.nll_loss(out, data.y, reduction="sum").item() / len(data)
    return loss, 100 * (out.argmax(dim=1) == data.y).sum().item() / len(data)


def fit(state: TrainState, train_data: DeviceData, test_data: DeviceData, p: TrainParams,
        on_epoch=None) -> list[dict]:
    """Train from STATE.epoch to P.epochs, calling ON_EPOCH(state) after each epoch."""
    while state.epoch < p.epochs:
        epoch = state.epoch + 1
        lr = state.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(state, train_data, p, desc=f"epoch {epoch}/{p.epochs}")
        test_loss, test_acc = score(state.scored, test_data)
        seconds = time.perf_counter() - start
        state.epoch = epoch
        state.history.append({"epoch": epoch, "train/loss": train_loss, "train/acc": train_acc,
                              "test/loss": test_loss, "test/acc": test_acc, "lr": lr})
        if on_epoch is not None:
            on_epoch(state)
        # after ON_EPOCH: once this line is out, the epoch's state is saved
        tqdm.write(f"epoch {epoch:2d}/{p.epochs}  train loss {train_loss:.4f} "
                   f"acc {train_acc:6.2f}%  test loss {test_loss:.4f} acc {test_acc:6.2f}%  "
                   f"lr {lr:.0e}  {seconds:5.1f}s")
    return state.history


def log_epoch(live: Live, row: dict) -> None:
    live.step = row["epoch"]
    for name in METRICS:
        live.log_metric(name, row[name])
    live.next_step()


def fingerprint(p: TrainParams, device: torch.device, *facts) -> str:
    """What a resumable state must match: the train params, the device type, the code
    that trains, and FACTS about the data (sizes, normalisation)."""
    code = hashlib.sha256(b"".join(path.read_bytes() for path in CODE)).hexdigest()
    key = json.dumps([p.fingerprint(), device.type, code, *facts])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def restore(p: TrainParams, device: torch.device, n_train: int, state_path: Path,
            key: str) -> TrainState:
    """A new state, or with `train.resume` the one saved in STATE_PATH if it matches KEY."""
    state = new_state(p, device, n_train)
    if not p.resume or not state_path.exists():
        return state
    try:
        saved = load_torch(state_path, "resumable training state")
    except StageError:
        print(f"{state_path}: unreadable resumable state, ignored; starting from epoch 1")
        return state
    if not isinstance(saved, dict) or saved.get("fingerprint") != key:
        print(f"{state_path}: made with other params, code or data, ignored; "
              "starting from epoch 1")
        return state
    try:
        state.load_state_dict(saved)
    except (KeyError, RuntimeError, TypeError, ValueError):
        print(f"{state_path}: resumable state does not fit this run, ignored; "
              "starting from epoch 1")
        return new_state(p, device, n_train)
    print(f"{state_path}: resuming after epoch {state.epoch} of {p.epochs}")
    return state


def main() -> None:
    from dvclive import Live
    from torchinfo import summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    args = parser.parse_args()
    p = load_params().train
    device = resolve_device(p.device)
    mean, std = load_stats(args.data / "stats.json")
    train_data = to_device(*load_split(args.data / "train.pt"), mean, std, device)
    test_data = to_device(*load_split(args.data / "test.pt"), mean, std, device)
    state_path = args.models / "state.pt"
    key = fingerprint(p, device, len(train_data), len(test_data), mean, std)
    state = restore(p, device, len(train_data), state_path, key)
    # zeros in eval mode: the summary must not touch the RNG or BatchNorm statistics
    info = summary(state.model, input_data=torch.zeros(1, 1, 28, 28, device=device),
                   mode="eval", verbose=0, col_names=("output_size", "num_params"))
    print(info)
    write_text(args.models / "summary.txt", f"{info}\n")
    n_params = count_params(state.model)
    print(f"device {device}, {n_params} parameters, {len(train_data)} train / "
          f"{len(test_data)} test images, channels_last {switch(p.channels_last, device)}, "
          f"compile {switch(p.compile, device)}, "
          f"fast_dropout {switch(p.fast_dropout, device, 'cpu')}, "
          f"ema {p.ema or 'off'}, {torch.get_num_threads()} CPU threads")

    best_path = args.models / "best.pt"
    if state.best is not None:
        save_torch(best_path, state.best)

    def make_checkpoint(s: TrainState) -> dict:
        weights = s.ema.module if s.ema is not None else s.model
        return checkpoint(weights, {"dropout": p.dropout}, epoch=s.epoch,
                          test_accuracy=s.history[-1]["test/acc"],
                          params=dataclasses.asdict(p), normalisation={"mean": mean, "std": std})

    with Live(dir=str(args.live), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        for row in state.history:  # a resumed run replays its history into a clean folder
            log_epoch(live, row)

        def on_epoch(s: TrainState) -> None:
            log_epoch(live, s.history[-1])
            if s.best is None or s.history[-1]["test/acc"] > s.best["test_accuracy"]:
                s.best = make_checkpoint(s)
                save_torch(best_path, s.best)
            save_torch(state_path, s.state_dict(key))

        fit(state, train_data, test_data, p, on_epoch)
        live.summary["params"] = n_params
        # as the notebook reports them: the best of each over all epochs
        live.summary["best"] = {"test_acc": state.best["test_accuracy"],
                                "test_epoch": state.best["epoch"],
                                "train_acc": max(row["train/acc"] for row in state.history)}

    save_torch(args.models / "model.pt", make_checkpoint(state))
    print(f"final test accuracy {state.history[-1]['test/acc']:.2f}%, "
          f"best {state.best['test_accuracy']:.2f}% (epoch {state.best['epoch']})")


if __name__ == "__main__":
    run_cli(main)
