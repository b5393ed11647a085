"""The training state: what changes while training, and how a run's first one is made.

TrainState is what both runners (stages/runners.py) step and what the train stage
(stages/train.py) scores, saves and resumes; new_state builds it from the train params.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stages.device import CompiledModel, compile_model, switch
from stages.model import Net
from stages.params import TrainParams

# the optimizer's settings that a runner chooses (GraphRunner: fused SGD, a tensor lr)
RUNNER_SETTINGS = ("lr", "fused", "foreach")
# the batch of BatchNorm's recomputed statistics (train.bn_recompute, train.swa_epochs)
BN_BATCH_SIZE = 500


@dataclass
class TrainState:
    """Everything that changes while training, so that it can be saved and resumed."""

    model: Net
    net: torch.nn.Module | CompiledModel  # runs the training batches: MODEL, or compiled
    optimizer: torch.optim.Optimizer
    lrs: list[float]  # the learning rate of each training step of the run, in order
    generator: torch.Generator  # batch order and the augmentation's draws
    ema: AveragedModel | None = None  # moving average of the weights, if train.ema > 0
    swa: AveragedModel | None = None  # mean of the last epochs' weights (train.swa_epochs)
    epoch: int = 0  # epochs finished
    step: int = 0  # training steps taken
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # checkpoint of the best epoch so far (is_better)
    runner: str | None = None  # the name of the runner that trained the epochs so far

    @property
    def scored(self) -> torch.nn.Module | CompiledModel:
        """What is tested each epoch and saved: the moving average if there is one."""
        return self.ema.module if self.ema is not None else self.net

    def end_of_epoch(self, p: TrainParams, data: torch.Tensor) -> None:
        """What follows the training of epoch SELF.epoch + 1: its weights join the
        average of train.swa_epochs' last epochs, and after the last epoch the average
        becomes the model, whose BatchNorm statistics are then recomputed on the
        un-augmented training images DATA (as they are with train.bn_recompute)."""
        epoch = self.epoch + 1
        if self.swa is not None and epoch > p.epochs - p.swa_epochs:
            self.swa.update_parameters(self.model)
        if epoch < p.epochs:
            return
        if self.swa is not None:
            with torch.no_grad():  # in place: a CUDA graph's tensors keep their addresses
                for weight, averaged in zip(self.model.parameters(),
                                            self.swa.module.parameters()):
                    weight.copy_(averaged)
        if self.swa is not None or p.bn_recompute:
            recompute_bn(self.ema.module if self.ema is not None else self.model, data,
                         BN_BATCH_SIZE)

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
            "swa": self.swa.state_dict() if self.swa is not None else None,
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
        if (saved["swa"] is None) != (self.swa is None):
            raise ValueError("the saved state and this run disagree on train.swa_epochs")
        if self.swa is not None:
            self.swa.load_state_dict(saved["swa"])
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


@torch.no_grad()
def recompute_bn(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Set MODEL's BatchNorm running statistics to those of the images X: each layer's
    cumulative average (momentum None) over X in batches of BATCH_SIZE, BatchNorm in
    training mode and everything else, dropout included, in eval mode, as at
    inference. No gradients and no random draws."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    model.eval()
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    for batch in x.split(batch_size):
        model(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)


def param_groups(model: Net, p: TrainParams) -> list[dict]:
    """SGD's parameter groups: one, or with train.norm_decay false a second, without
    weight decay, for BatchNorm's weights and biases and the last 1x1 convolution."""
    if p.norm_decay:
        return [{"params": list(model.parameters())}]
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    exempt = {id(w) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) or m is last_conv
              for w in m.parameters(recurse=False)}
    return [{"params": [w for w in model.parameters() if id(w) not in exempt]},
            {"params": [w for w in model.parameters() if id(w) in exempt], "weight_decay": 0.0}]


def make_scheduler(p: TrainParams, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped after every batch.

    onecycle: up from lr/start_div to lr over the first `warmup` share of the steps, then
    down (train.anneal: cosine or linear) to lr/start_div/final_div; momentum stays at
    train.momentum.
    step: lr times gamma after every step_size epochs.
    """
    if p.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=p.lr, epochs=p.epochs, steps_per_epoch=steps_per_epoch,
            pct_start=p.warmup, div_factor=p.start_div, final_div_factor=p.final_div,
            anneal_strategy=p.anneal, cycle_momentum=False)
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
    optimizer = torch.optim.SGD(param_groups(model, p), lr=p.lr, momentum=p.momentum,
                                nesterov=p.nesterov, weight_decay=p.weight_decay)
    lrs = lr_schedule(p, math.ceil(n_train / p.batch_size))
    generator = torch.Generator(device=device).manual_seed(p.seed)
    # the average covers BatchNorm's running statistics too (use_buffers)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(p.ema), use_buffers=True)
           if p.ema > 0 else None)
    swa = AveragedModel(model) if p.swa_epochs > 0 else None  # an equal-weight mean
    return TrainState(model, net, optimizer, lrs, generator, ema, swa)
