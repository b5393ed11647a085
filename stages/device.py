"""The training device, the speed switches, and torch.compile with a fallback to eager."""

from __future__ import annotations

import torch
from torch import nn

from stages.common import StageError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when a GPU is present, else the CPU; `cuda` needs a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device is cuda but torch sees no CUDA GPU; "
                         "set train.device to auto or cpu")
    return torch.device(name)


def switch(value: str, device: torch.device, auto_on: str | None = "cuda") -> bool:
    """A speed option's on/off/auto; `auto` is on for the device type AUTO_ON, where it
    was measured to pay (None: on no device)."""
    return device.type == auto_on if value == "auto" else value == "on"


def first_line(err: BaseException) -> str:
    """The innermost cause's type and first line: torch wraps compiler errors twice."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}"[:200].rstrip(": ")


class CompiledModel:
    """MODEL through torch.compile, falling back to MODEL itself if compiling fails.

    torch.compile compiles lazily, at the first call for each input shape and mode, so
    a missing C compiler or a GPU that Triton does not support shows up there. Then the
    call is retried eagerly: if that fails too, the error was the model's own and is
    raised; otherwise the model stays eager from then on, and one line says why.
    """

    def __init__(self, model: nn.Module, mode: str | None):
        self.model = model
        self.compiled = torch.compile(model, mode=mode, dynamic=False)
        self.active = True  # False once compiling has failed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.model(x)
        try:
            return self.compiled(x)
        except Exception as err:  # noqa: BLE001 - torch raises many types; see the retry
            out = self.model(x)
            self.active = False
            print(f"warning: torch.compile failed ({first_line(err)}); continuing without "
                  "compiling. To skip compiling, set train.compile=off "
                  "(dvc exp run -S train.compile=off)", flush=True)
            return out

    # what the training loop and predict() use of an nn.Module
    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> "CompiledModel":
        self.model.train(mode)
        return self

    def eval(self) -> "CompiledModel":
        return self.train(False)


def compile_model(model: nn.Module, device: torch.device) -> CompiledModel:
    # CUDA graphs ("reduce-overhead") remove the launch cost of this tiny model's kernels
    return CompiledModel(model, "reduce-overhead" if device.type == "cuda" else None)


def is_compiled(net) -> bool:
    """True while NET runs through torch.compile (not after falling back to eager)."""
    return isinstance(net, CompiledModel) and net.active


def mark_step(net) -> None:
    """Tell CUDA graphs a new step begins, so that they may reuse their buffers."""
    if is_compiled(net):
        torch.compiler.cudagraph_mark_step_begin()
