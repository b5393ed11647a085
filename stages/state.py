"""The training state: what changes while training, and how a run's first one is made.

TrainState is what both runners (stages/runners.py) step and what the train stage
(stages/train.py) scores, saves and resumes; new_state builds it from the train params.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stages.device import CompiledModel, compile_model, switch
from stages.model import Net
from stages.params import TrainParams

# the optimizer's settings that a runner chooses (GraphRunner: fused SGD, a tensor lr)
RUNNER_SETTINGS = ("lr", "fused", "foreach")


@dataclass
class TrainState:
    """Everything that changes while training, so that it can be saved and resumed."""

    model: Net
    net: torch.nn.Module | CompiledModel  # runs the training batches: MODEL, or compiled
    optimizer: torch.optim.Optimizer
    lrs: list[float]  # the learning rate of each training step of the run, in order
    generator: torch.Generator  # batch order, rotation angles and shifts
    ema: AveragedModel | None = None  # moving average of the weights, if train.ema > 0
    epoch: int = 0  # epochs finished
    step: int = 0  # training steps taken
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # checkpoint of the best epoch so far (is_better)
    runner: str | None = None  # the name of the runner that trained the epochs so far

    @property
    def scored(self) -> torch.nn.Module | CompiledModel:
        """What is tested each epoch and saved: the moving average if there is one."""
        return self.ema.module if self.ema is not None else self.net

    def state_dict(self, fingerprint: str) -> dict:
        return {
            "fingerprint": fingerprint,
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best": self.best,
            "runner": self.runner,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
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
        # how SGD runs (fused, with a tensor lr) belongs to this run's runner, not the state
        runner_settings = [{key: group[key] for key in RUNNER_SETTINGS}
                           for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, runner_settings):
            group.update(settings)
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.generator.device)
        self.epoch, self.step = saved["epoch"], saved["step"]
        self.history, self.best = list(saved["history"]), saved["best"]
        self.runner = saved["runner"]


def use_compile(p: TrainParams, device: torch.device) -> bool:
    """train.compile resolved: auto is off on every device (on the H200, compiling cost
    more than it saved in 15 epochs; docs/performance.md)."""
    return switch(p.compile, device, auto_on=None)


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


def lr_schedule(p: TrainParams, steps_per_epoch: int) -> list[float]:
    """The learning rate of each of the run's training steps, in order: the floats that
    torch's scheduler (make_scheduler) sets, stepped after every batch. Held as a list,
    the schedule can be indexed by step on the host or, as a tensor, on the GPU."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=p.lr)
    scheduler = make_scheduler(p, optimizer, steps_per_epoch)
    lrs = []
    for _ in range(p.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients, so it changes nothing; the scheduler wants it first
        scheduler.step()
    return lrs


def new_state(p: TrainParams, device: torch.device, n_train: int) -> TrainState:
    """A freshly initialised model, optimiser and schedule, seeded from P, for a
    training set of N_TRAIN images."""
    torch.manual_seed(p.seed)
    # torch's own dropout is fast on CUDA (and safe inside CUDA graphs); Dropout16 is for CPUs
    model = Net(dropout=p.dropout, fast_dropout=switch(p.fast_dropout, device, "cpu")).to(device)
    if switch(p.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    net = compile_model(model, device) if use_compile(p, device) else model
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum,
                                nesterov=p.nesterov, weight_decay=p.weight_decay)
    lrs = lr_schedule(p, math.ceil(n_train / p.batch_size))
    generator = torch.Generator(device=device).manual_seed(p.seed)
    # the average covers BatchNorm's running statistics too (use_buffers)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(p.ema), use_buffers=True)
           if p.ema > 0 else None)
    return TrainState(model, net, optimizer, lrs, generator, ema)
