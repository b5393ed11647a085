"""Train stage: fit the 7,776-parameter CNN, testing after every epoch.

Reads:  DATA_DIR/{train,test}.pt and DATA_DIR/stats.json (from preprocess).
Writes: MODELS_DIR/model.pt (final) and best.pt (best test epoch), checkpoints that
        rebuild the model; MODELS_DIR/state.pt (resumable state, each epoch);
        MODELS_DIR/summary.txt (torchinfo); LIVE_DIR, DVCLive's per-epoch metrics.
Params: train.*, evaluate.batch_size (the per-epoch test pass).
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

import torch
import torch.nn.functional as F
from dvclive import Live
from torchinfo import summary
from tqdm import tqdm

from stages.common import StageError, load_torch, run, save_torch, write_text
from stages.data import (DeviceData, is_compiled, load_split, load_stats, predict,
                         resolve_device, rotate, to_device)
from stages.model import Net, checkpoint, count_params
from stages.params import TrainParams, load_params

POSTFIX_EVERY = 50  # steps between progress-bar updates (each one syncs the device)
METRICS = ("train/loss", "train/acc", "test/loss", "test/acc", "lr")


@dataclass
class Run:
    """Everything that changes while training, so that it can be saved and resumed."""

    model: Net
    net: torch.nn.Module  # what runs the batches: MODEL itself or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # batch order and rotation angles
    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # checkpoint of the best test epoch so far

    def state_dict(self, fingerprint: str) -> dict:
        return {
            "fingerprint": fingerprint,
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": (torch.cuda.get_rng_state(self.generator.device)
                         if self.generator.device.type == "cuda" else None),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.generator.device)
        self.epoch, self.history, self.best = state["epoch"], list(state["history"]), state["best"]


def switch(value: str, device: torch.device, auto_on: str = "cuda") -> bool:
    """A speed option's on/off/auto; `auto` is on for the device type where it pays."""
    return device.type == auto_on if value == "auto" else value == "on"


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


def new_run(p: TrainParams, device: torch.device, n_train: int) -> Run:
    """A freshly initialised model, optimiser and scheduler, seeded from P, for a
    training set of N_TRAIN images."""
    torch.manual_seed(p.seed)
    # torch's own dropout is fast on CUDA (and safe inside CUDA graphs); Dropout16 is for CPUs
    model = Net(dropout=p.dropout, fast_dropout=switch(p.fast_dropout, device, "cpu")).to(device)
    if switch(p.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    # CUDA graphs ("reduce-overhead") remove the launch cost of this tiny model's kernels
    net = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None,
                        dynamic=False) if switch(p.compile, device) else model
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum,
                                nesterov=p.nesterov, weight_decay=p.weight_decay)
    scheduler = make_scheduler(p, optimizer, math.ceil(n_train / p.batch_size))
    generator = torch.Generator(device=device).manual_seed(p.seed)
    return Run(model, net, optimizer, scheduler, generator)


def train_epoch(run: Run, data: DeviceData, p: TrainParams, desc: str = "") -> tuple[float, float]:
    """One pass over DATA in seeded random order; returns (mean loss, accuracy %)."""
    net, optimizer = run.net, run.optimizer
    net.train()
    n = len(data)
    order = torch.randperm(n, device=data.x.device, generator=run.generator)
    loss_sum = torch.zeros((), device=data.x.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.x.device)
    seen = 0
    bar = tqdm(order.split(p.batch_size), desc=desc, leave=False, unit="batch")
    compiled = is_compiled(net)
    for step, idx in enumerate(bar, 1):
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()  # a new step for the CUDA graphs
        x, y = data.x[idx], data.y[idx]
        if p.rotation > 0:
            x = rotate(x, p.rotation, data.background, run.generator)
        out = net(x)
        loss = F.nll_loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (out.detach().argmax(dim=1) == y).sum()
        seen += len(y)
        if step % POSTFIX_EVERY == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                            acc=f"{100 * correct.item() / seen:.2f}%")
    return loss_sum.item() / n, 100 * correct.item() / n


def test_epoch(model: torch.nn.Module, data: DeviceData, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy %) of MODEL on DATA, in eval mode."""
    out = predict(model, data.x, batch_size)
    loss = F.nll_loss(out, data.y, reduction="sum").item() / len(data)
    return loss, 100 * (out.argmax(dim=1) == data.y).sum().item() / len(data)


def fit(run: Run, train_data: DeviceData, test_data: DeviceData, p: TrainParams,
        eval_batch_size: int, on_epoch=None) -> list[dict]:
    """Train from RUN.epoch to P.epochs, calling ON_EPOCH(run) after each epoch."""
    while run.epoch < p.epochs:
        epoch = run.epoch + 1
        lr = run.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(run, train_data, p, desc=f"epoch {epoch}/{p.epochs}")
        test_loss, test_acc = test_epoch(run.net, test_data, eval_batch_size)
        seconds = time.perf_counter() - start
        run.epoch = epoch
        run.history.append({"epoch": epoch, "train/loss": train_loss, "train/acc": train_acc,
                            "test/loss": test_loss, "test/acc": test_acc, "lr": lr})
        tqdm.write(f"epoch {epoch:2d}/{p.epochs}  train loss {train_loss:.4f} "
                   f"acc {train_acc:6.2f}%  test loss {test_loss:.4f} acc {test_acc:6.2f}%  "
                   f"lr {lr:.0e}  {seconds:5.1f}s")
        if on_epoch is not None:
            on_epoch(run)
    return run.history


def log_epoch(live: Live, row: dict) -> None:
    live.step = row["epoch"]
    for name in METRICS:
        live.log_metric(name, row[name])
    live.next_step()


def fingerprint(p: TrainParams, device: torch.device, *facts) -> str:
    """What a resumable state must match: the train params, the device type, and FACTS
    about the data (sizes, normalisation)."""
    key = json.dumps([p.fingerprint(), device.type, *facts])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def restore(p: TrainParams, device: torch.device, n_train: int, state_path: Path,
            key: str) -> Run:
    """A new run, or with `train.resume` the one saved in STATE_PATH if it matches KEY."""
    run = new_run(p, device, n_train)
    if not p.resume or not state_path.exists():
        return run
    try:
        state = load_torch(state_path, "resumable training state")
    except StageError:
        print(f"{state_path}: unreadable resumable state, ignored; starting from epoch 1")
        return run
    if not isinstance(state, dict) or state.get("fingerprint") != key:
        print(f"{state_path}: made with other params or data, ignored; starting from epoch 1")
        return run
    try:
        run.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, ValueError):
        print(f"{state_path}: resumable state does not fit this run, ignored; "
              "starting from epoch 1")
        return new_run(p, device, n_train)
    print(f"{state_path}: resuming after epoch {run.epoch} of {p.epochs}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    p = params.train
    device = resolve_device(p.device)
    if p.threads:
        torch.set_num_threads(p.threads)
    mean, std = load_stats(args.data / "stats.json")
    train_data = to_device(*load_split(args.data / "train.pt"), mean, std, device)
    test_data = to_device(*load_split(args.data / "test.pt"), mean, std, device)
    state_path = args.models / "state.pt"
    key = fingerprint(p, device, len(train_data), len(test_data), mean, std)
    run_ = restore(p, device, len(train_data), state_path, key)
    # zeros in eval mode: the summary must not touch the RNG or BatchNorm statistics
    info = summary(run_.model, input_data=torch.zeros(1, 1, 28, 28, device=device),
                   mode="eval", verbose=0, col_names=("output_size", "num_params"))
    print(info)
    write_text(args.models / "summary.txt", f"{info}\n")
    n_params = count_params(run_.model)
    print(f"device {device}, {n_params} parameters, {len(train_data)} train / "
          f"{len(test_data)} test images, channels_last {switch(p.channels_last, device)}, "
          f"compile {switch(p.compile, device)}, "
          f"fast_dropout {switch(p.fast_dropout, device, 'cpu')}, "
          f"{torch.get_num_threads()} CPU threads")

    best_path = args.models / "best.pt"
    if run_.best is not None:
        save_torch(best_path, run_.best)

    def make_checkpoint(r: Run) -> dict:
        return checkpoint(r.model, {"dropout": p.dropout}, epoch=r.epoch,
                          test_accuracy=r.history[-1]["test/acc"],
                          params=dataclasses.asdict(p), normalisation={"mean": mean, "std": std})

    with Live(dir=str(args.live), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        for row in run_.history:  # a resumed run replays its history into a clean folder
            log_epoch(live, row)

        def on_epoch(r: Run) -> None:
            log_epoch(live, r.history[-1])
            if r.best is None or r.history[-1]["test/acc"] > r.best["test_accuracy"]:
                r.best = make_checkpoint(r)
                save_torch(best_path, r.best)
            save_torch(state_path, r.state_dict(key))

        fit(run_, train_data, test_data, p, params.evaluate.batch_size, on_epoch)
        live.summary["params"] = n_params
        # as the notebook reports them: the best of each over all epochs
        live.summary["best"] = {"test_acc": run_.best["test_accuracy"],
                                "test_epoch": run_.best["epoch"],
                                "train_acc": max(row["train/acc"] for row in run_.history)}

    save_torch(args.models / "model.pt", make_checkpoint(run_))
    print(f"final test accuracy {run_.history[-1]['test/acc']:.2f}%, "
          f"best {run_.best['test_accuracy']:.2f}% (epoch {run_.best['epoch']})")


if __name__ == "__main__":
    run(main)
