"""Train stage: fit the 7,776-parameter CNN, testing after every epoch.

Reads:  DATA_DIR/{train,test}.pt and DATA_DIR/stats.json (from preprocess).
Writes: MODELS_DIR/model.pt (final) and best.pt (best test epoch), checkpoints that
        rebuild the model; MODELS_DIR/state.pt (resumable state, each epoch);
        MODELS_DIR/summary.txt (torchinfo); LIVE_DIR, DVCLive's per-epoch metrics.
Params: train.*, runtime.* (applied first; see stages/runtime.py).

On CUDA the training steps replay from CUDA graphs (train.cuda_graph); elsewhere, or
if capturing fails, they run eagerly. Both runners call the same train_step.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from stages.common import StageError, load_torch, run_cli, save_torch, write_text
from stages.data import DeviceData, augment, load_split, load_stats, to_device
from stages.device import (CompiledModel, compile_model, first_line, mark_step,
                           resolve_device, switch)
from stages.model import Net, checkpoint, count_params, predict
from stages.params import RuntimeParams, TrainParams, load_params
from stages.runtime import apply as apply_runtime

# DVC's tools are imported in main() only: the training functions also run where they
# are not installed (benchmarks/gpu_check.py on a bare GPU machine)
if TYPE_CHECKING:
    from dvclive import Live

POSTFIX_EVERY = 50  # steps between progress-bar updates (each one syncs the device)
# the per-epoch test pass's batch: a speed setting only (1000 gave bit-identical results)
TEST_BATCH_SIZE = 250
METRICS = ("train/loss", "train/acc", "test/loss", "test/acc", "lr")
# the optimizer's settings that a runner chooses (GraphRunner: fused SGD, a tensor lr)
RUNNER_SETTINGS = ("lr", "fused", "foreach")
# the code whose changes make a saved state stale (with the params and the data)
CODE = [Path(__file__).with_name(name) for name in
        ("train.py", "data.py", "model.py", "device.py", "params.py", "common.py")]


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
    best: dict | None = None  # checkpoint of the best test epoch so far

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
    net = compile_model(model, device) if switch(p.compile, device, auto_on=None) else model
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum,
                                nesterov=p.nesterov, weight_decay=p.weight_decay)
    lrs = lr_schedule(p, math.ceil(n_train / p.batch_size))
    generator = torch.Generator(device=device).manual_seed(p.seed)
    # the average covers BatchNorm's running statistics too (use_buffers)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(p.ema), use_buffers=True)
           if p.ema > 0 else None)
    return TrainState(model, net, optimizer, lrs, generator, ema)


def smoothed_nll(log_probs: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """NLL against targets that put 1 - SMOOTHING on the label and SMOOTHING spread over
    all ten classes; exactly F.nll_loss when SMOOTHING is 0."""
    nll = F.nll_loss(log_probs, y)
    if smoothing == 0:
        return nll
    return (1 - smoothing) * nll - smoothing * log_probs.mean(dim=1).mean()


@dataclass
class Totals:
    """An epoch's running sums, kept on the training device and read at its end."""

    loss: torch.Tensor     # the training objective, summed over images
    correct: torch.Tensor  # training images classified correctly

    @classmethod
    def zeros(cls, device: torch.device) -> "Totals":
        return cls(torch.zeros((), device=device), torch.zeros((), dtype=torch.int64,
                                                               device=device))

    def reset(self) -> None:
        self.loss.zero_()
        self.correct.zero_()

    def read(self, n: int) -> tuple[float, float]:
        """(mean loss, accuracy %) over N images; waits for the device."""
        return self.loss.item() / n, 100 * self.correct.item() / n


def train_step(state: TrainState, data: DeviceData, idx: torch.Tensor, p: TrainParams,
               totals: Totals) -> None:
    """One training step on the images DATA[IDX], at the optimizer's current lr: augment,
    forward, loss, backward, SGD, the moving average; the batch's loss and correct count
    are added to TOTALS.

    Device work only, with no host synchronisation: EagerRunner calls it for each
    batch, GraphRunner captures it once in a CUDA graph and replays it."""
    x, y = data.x[idx], data.y[idx]
    x = augment(x, p.rotation, p.translate, data.background, state.generator)
    out = state.net(x)
    loss = smoothed_nll(out, y, p.label_smoothing)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    if state.ema is not None:
        state.ema.update_parameters(state.model)
    totals.loss += loss.detach() * len(y)
    totals.correct += (out.detach().argmax(dim=1) == y).sum()


class EagerRunner:
    """Runs the training steps as they come: on the CPU, and on CUDA without graphs."""

    name = "eager"
    test_batch_size = TEST_BATCH_SIZE

    def train_epoch(self, state: TrainState, data: DeviceData, p: TrainParams,
                    desc: str = "") -> tuple[float, float]:
        """One pass over DATA in seeded random order, the last batch smaller if need be;
        returns (mean loss, accuracy %). The loss is the training objective (with label
        smoothing, if any)."""
        state.net.train()
        order = torch.randperm(len(data), device=data.x.device, generator=state.generator)
        totals, seen = Totals.zeros(data.x.device), 0
        bar = tqdm(order.split(p.batch_size), desc=desc, leave=False, unit="batch")
        for i, idx in enumerate(bar, 1):
            mark_step(state.net)  # a new step for torch.compile's CUDA graphs
            for group in state.optimizer.param_groups:
                group["lr"] = state.lrs[state.step]
            train_step(state, data, idx, p, totals)
            state.step += 1
            seen += len(idx)
            if i % POSTFIX_EVERY == 0:  # each read waits for the device
                loss, acc = totals.read(seen)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2f}%")
        return totals.read(len(data))


class GraphRunner:
    """Replays each training step from a CUDA graph: the batch's gather, augmentation,
    forward, backward, SGD step and learning rate all happen on the GPU, so an epoch's
    468 steps cost 468 graph launches and no host synchronisation.

    Two graphs: one for the full batches, one for the last, smaller batch (60,000 =
    468 × 128 + 96), so each epoch sees every image once in the seeded order, as the
    eager runner does. The graphs read static tensors that each epoch refills: the
    order, the batch counter and the step counter that index the order and the
    learning-rate schedule. SGD runs fused, with its lr a tensor on the GPU.

    With CAPTURE false, each step is called instead of replayed: the same arithmetic and
    bookkeeping on any device, which is how the CPU tests check it.
    """

    name = "CUDA graphs"
    test_batch_size = None  # the whole test set at once
    WARMUP = 3  # eager steps before capture, on a side stream, as torch's notes advise

    def __init__(self, state: TrainState, data: DeviceData, p: TrainParams, capture: bool = True):
        device = data.x.device
        self.state, self.data, self.p = state, data, p
        self.full, self.last = divmod(len(data), p.batch_size)  # full batches, last batch's size
        self.order = torch.arange(len(data), device=device)
        self.batches = self.order[:self.full * p.batch_size].view(self.full, p.batch_size)
        self.batch_index = torch.zeros(1, dtype=torch.int64, device=device)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.lrs = torch.tensor(state.lrs, dtype=torch.float32, device=device)
        self.totals = Totals.zeros(device)
        self.kinds = ["full"] * self.full + ["last"] * bool(self.last)  # an epoch's steps
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        groups = [{key: group[key] for key in RUNNER_SETTINGS}
                  for group in state.optimizer.param_groups]
        for group in state.optimizer.param_groups:  # fused SGD takes a tensor lr
            group.update(lr=self.lr, fused=True, foreach=False)
        if not capture:
            return
        saved = snapshot(state)
        entry_stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        try:
            self._capture(saved)
        except BaseException:  # leave STATE as it was, for the eager runner
            recover_from_capture(state, saved, entry_stream)
            rewind(state, saved)
            for group, before in zip(state.optimizer.param_groups, groups):
                group.update(before)
            raise

    def _step(self, kind: str) -> None:
        """The work one graph holds: the next batch of KIND, trained at the step's lr."""
        if kind == "full":
            idx = self.batches.index_select(0, self.batch_index).view(-1)
        else:
            idx = self.order[self.full * self.p.batch_size:]
        self.lr.copy_(self.lrs.index_select(0, self.step).view(()))
        train_step(self.state, self.data, idx, self.p, self.totals)
        self.batch_index += 1
        self.step += 1

    def _capture(self, saved: dict) -> None:
        """Warm up, rewind to SAVED, then capture one graph per kind of batch."""
        self.state.net.train()  # the graphs keep the mode they were captured in
        kinds = sorted(set(self.kinds))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN's choices, SGD's momentum buffers
            for _ in range(self.WARMUP):
                for kind in kinds:
                    self.batch_index.zero_()
                    self.step.zero_()
                    self._step(kind)
        torch.cuda.current_stream().wait_stream(side)
        rewind(self.state, saved)  # as if the warm-up had not happened
        for kind in kinds:
            graph = torch.cuda.CUDAGraph()
            register_generator(graph, self.state.generator)
            with torch.cuda.graph(graph):
                self._step(kind)
            self.graphs[kind] = graph

    def train_epoch(self, state: TrainState, data: DeviceData, p: TrainParams,
                    desc: str = "") -> tuple[float, float]:
        """What EagerRunner.train_epoch does, from the graphs (or, without capture, from
        _step): the same order, steps and schedule; the sums are read once, at the end."""
        assert state is self.state and data is self.data, "the graphs hold their own"
        state.net.train()
        self.order.copy_(torch.randperm(len(data), device=data.x.device,
                                        generator=state.generator))
        self.batch_index.zero_()
        self.step.fill_(state.step)
        self.totals.reset()
        for kind in tqdm(self.kinds, desc=desc, leave=False, unit="batch"):
            if self.graphs:
                self.graphs[kind].replay()
            else:
                self._step(kind)
        state.step += len(self.kinds)
        return self.totals.read(len(data))


def register_generator(graph: torch.cuda.CUDAGraph, generator: torch.Generator) -> None:
    """Let GRAPH's replays draw from GENERATOR (the augmentation's). torch registers its
    default generator (dropout's) itself; before 2.14 a graph needs every other one
    registered before capture, and from 2.14 registration is automatic and this call a
    deprecated no-op."""
    register = getattr(graph, "register_generator_state", None)
    if register is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            register(generator)


def recover_from_capture(state: TrainState, saved: dict, entry_stream) -> None:
    """After a failed capture, leave CUDA as eager training needs it. A capture that
    fails half-way can leave the current stream set to the capture stream, and, before
    torch 2.14, the generators it touched marked as capturing, so that their next eager
    draw raises. So: back to ENTRY_STREAM, and generators with fresh states (the state
    itself is put back by rewind)."""
    if state.generator.device.type != "cuda":
        return
    torch.cuda.set_stream(entry_stream)
    generator = torch.Generator(device=state.generator.device)
    generator.set_state(saved["generator"])
    state.generator = generator
    default = torch.cuda.default_generators[state.generator.device.index or 0]
    if hasattr(default, "graphsafe_set_state"):
        fresh = torch.Generator(device=state.generator.device)
        fresh.set_state(saved["cuda_rng"])
        default.graphsafe_set_state(fresh)


def snapshot(state: TrainState) -> dict:
    """Copies of what a training step changes: weights, BatchNorm statistics, momentum
    buffers and the random generators."""
    device = state.generator.device
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},
        "optimizer": {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                      for p, s in state.optimizer.state.items()},
        "generator": state.generator.get_state(),
        "torch_rng": torch.get_rng_state(),  # Dropout16's, on the CPU
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def rewind(state: TrainState, saved: dict) -> None:
    """Put back what SAVED (from snapshot) holds, in place, so that tensors keep their
    addresses. A momentum buffer that did not exist before becomes zeros: SGD's next
    step then gives exactly what its first step would have."""
    weights = state.model.state_dict()
    for name, tensor in saved["model"].items():
        weights[name].copy_(tensor)
    for param, param_state in state.optimizer.state.items():
        before = saved["optimizer"].get(param, {})
        for key, tensor in param_state.items():
            if key in before:
                tensor.copy_(before[key])
            elif torch.is_tensor(tensor):
                tensor.zero_()
    state.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], state.generator.device)


def use_cuda_graph(p: TrainParams, device: torch.device) -> bool:
    """train.cuda_graph resolved: auto is on for CUDA, unless torch.compile is on (its
    own graphs cannot nest in ours) or the moving average (which runs only eagerly)."""
    if p.cuda_graph == "on" and device.type != "cuda":
        raise StageError(f"train.cuda_graph is on but training runs on the {device.type}; "
                         "set train.cuda_graph to auto or off")
    if p.cuda_graph == "auto":
        return (device.type == "cuda" and not switch(p.compile, device, auto_on=None)
                and p.ema == 0)
    return p.cuda_graph == "on"


def make_runner(state: TrainState, data: DeviceData, p: TrainParams,
                graphed: bool) -> EagerRunner | GraphRunner:
    """A GraphRunner if GRAPHED and capturing works; otherwise, or if capturing fails
    (one warning line), an EagerRunner, with STATE as it was."""
    if not graphed:
        return EagerRunner()
    start = time.perf_counter()
    try:
        runner = GraphRunner(state, data, p)
    except Exception as err:  # noqa: BLE001 - any failure to capture means: run eagerly
        print(f"warning: capturing the training step in a CUDA graph failed "
              f"({first_line(err)}); training eagerly instead. To skip the attempt, set "
              "train.cuda_graph=off (dvc exp run -S train.cuda_graph=off)", flush=True)
        return EagerRunner()
    print(f"training step captured in CUDA graphs in {time.perf_counter() - start:.2f} s")
    return runner


def score(model, data: DeviceData, batch_size: int | None = TEST_BATCH_SIZE
          ) -> tuple[float, float]:
    """(mean loss, accuracy %) of MODEL on DATA, in eval mode; BATCH_SIZE None is all
    of DATA in one batch."""
    out = predict(model, data.x, batch_size or len(data))
    loss = F.nll_loss(out, data.y, reduction="sum").item() / len(data)
    return loss, 100 * (out.argmax(dim=1) == data.y).sum().item() / len(data)


def fit(state: TrainState, train_data: DeviceData, test_data: DeviceData, p: TrainParams,
        on_epoch=None, runner: EagerRunner | GraphRunner | None = None) -> list[dict]:
    """Train from STATE.epoch to P.epochs, calling ON_EPOCH(state) after each epoch.

    RUNNER runs the training steps; by default the one train.cuda_graph asks for."""
    if runner is None:
        runner = make_runner(state, train_data, p, use_cuda_graph(p, train_data.x.device))
    while state.epoch < p.epochs:
        epoch = state.epoch + 1
        lr = state.lrs[state.step]
        start = time.perf_counter()
        train_loss, train_acc = runner.train_epoch(state, train_data, p,
                                                   desc=f"epoch {epoch}/{p.epochs}")
        test_loss, test_acc = score(state.scored, test_data, runner.test_batch_size)
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


def fingerprint(p: TrainParams, runtime: RuntimeParams, device: torch.device, *facts) -> str:
    """What a resumable state must match: everything that changes the bytes a run
    writes. The train params, how torch computes (the runtime section), the device
    type, the code that trains, and FACTS about the data (its content, normalisation)."""
    code = hashlib.sha256(b"".join(path.read_bytes() for path in CODE)).hexdigest()
    key = json.dumps([p.fingerprint(), dataclasses.asdict(runtime), device.type, code, *facts])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def data_digest(*tensors: torch.Tensor) -> str:
    """A hash of the tensors' shapes, types and bytes (CPU tensors)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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
    params = load_params()
    apply_runtime(params.runtime)
    p = params.train
    device = resolve_device(p.device)
    mean, std = load_stats(args.data / "stats.json")
    train_split, test_split = (load_split(args.data / f"{name}.pt") for name in ("train", "test"))
    train_data = to_device(*train_split, mean, std, device)
    test_data = to_device(*test_split, mean, std, device)
    state_path = args.models / "state.pt"
    key = fingerprint(p, params.runtime, device, data_digest(*train_split, *test_split),
                      mean, std)
    state = restore(p, device, len(train_data), state_path, key)
    # zeros in eval mode: the summary must not touch the RNG or BatchNorm statistics
    info = summary(state.model, input_data=torch.zeros(1, 1, 28, 28, device=device),
                   mode="eval", verbose=0, col_names=("output_size", "num_params"))
    print(info)
    write_text(args.models / "summary.txt", f"{info}\n")
    n_params = count_params(state.model)
    print(f"device {device}, {n_params} parameters, {len(train_data)} train / "
          f"{len(test_data)} test images, channels_last {switch(p.channels_last, device)}, "
          f"compile {switch(p.compile, device, auto_on=None)}, "
          f"cuda_graph {use_cuda_graph(p, device)}, "
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
