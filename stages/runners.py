"""The training step, and the two ways of running it.

train_step is one step as device work only: gather the batch, augment it, forward,
loss, backward, SGD and the moving average. EagerRunner calls it once per batch (the
CPU, and CUDA without graphs); GraphRunner captures it in CUDA graphs once and replays
them. train.cuda_graph, which chooses between them, is resolved here (use_cuda_graph;
train.compile's use_compile lives with the state it compiles, in stages/state.py).

Used by the train stage (stages/train.py), the CPU benchmark and the GPU check.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages.common import StageError
from stages.data import DeviceData, augment
from stages.device import first_line, mark_step
from stages.params import TrainParams
from stages.state import RUNNER_SETTINGS, TrainState, use_compile

POSTFIX_EVERY = 50  # steps between progress-bar updates (each one syncs the device)
# the per-epoch test pass's batch: a speed setting only (1000 gave bit-identical results)
TEST_BATCH_SIZE = 250


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


def augmenting(p: TrainParams, epochs_done: int) -> bool:
    """Whether the epoch after EPOCHS_DONE is augmented: all but the last
    train.clean_epochs are."""
    return epochs_done < p.epochs - p.clean_epochs


def train_step(state: TrainState, data: DeviceData, idx: torch.Tensor, p: TrainParams,
               totals: Totals, augmented: bool = True) -> None:
    """One training step on the images DATA[IDX], at the optimizer's current lr: augment
    (if AUGMENTED), forward, loss, backward, SGD, the moving average; the batch's loss
    and correct count are added to TOTALS.

    Device work only, with no host synchronisation: EagerRunner calls it for each
    batch, GraphRunner captures it once in a CUDA graph and replays it."""
    x, y = data.x[idx], data.y[idx]
    if augmented:
        x = augment(x, p.rotation, p.translate, data.background, state.generator, p.scale,
                    p.elastic, p.interpolation)
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
        augmented = augmenting(p, state.epoch)
        totals, seen = Totals.zeros(data.x.device), 0
        bar = tqdm(order.split(p.batch_size), desc=desc, leave=False, unit="batch")
        for i, idx in enumerate(bar, 1):
            mark_step(state.net)  # a new step for torch.compile's CUDA graphs
            for group in state.optimizer.param_groups:
                group["lr"] = state.lrs[state.step]
            train_step(state, data, idx, p, totals, augmented)
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

    The graphs hold the augmented step, so train.clean_epochs (epochs without
    augmentation) runs eagerly only.
    """

    name = "CUDA graphs"
    test_batch_size = None  # the whole test set at once
    WARMUP = 3  # eager steps before capture, on a side stream, as torch's notes advise

    def __init__(self, state: TrainState, data: DeviceData, p: TrainParams, capture: bool = True):
        device = data.x.device
        if p.clean_epochs:
            raise ValueError("train.clean_epochs runs eagerly only")
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
    own graphs cannot nest in ours), the moving average or clean epochs (which run only
    eagerly)."""
    if p.cuda_graph == "on" and device.type != "cuda":
        raise StageError(f"train.cuda_graph is on but training runs on the {device.type}; "
                         "set train.cuda_graph to auto or off")
    if p.cuda_graph == "auto":
        return (device.type == "cuda" and not use_compile(p, device) and p.ema == 0
                and p.clean_epochs == 0)
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


