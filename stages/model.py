"""The 7,776-parameter CNN, and how to rebuild it from a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from stages.common import StageError
from stages.device import mark_step


class Dropout16(nn.Dropout):
    """nn.Dropout with half the random draws: each 32-bit draw gives two 16-bit uniforms.

    torch's CPU generator makes one 32-bit draw per element, and for this model the
    masks were over a quarter of a CPU training step. The keep probability is
    rounded to a multiple of 1/65536 (p = 0.01 drops 0.009995 of the units).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        draws = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device)
        uniform16 = draws.random_(-2**31, 2**31).view(torch.int16)[:n].view(x.shape)
        keep = uniform16 >= round(self.p * 65536) - 32768
        return x * keep * (1.0 / (1.0 - self.p))


def conv_block(c_in: int, c_out: int, dropout: float, fast_dropout: bool) -> nn.Sequential:
    """3×3 convolution (no bias, no padding) → ReLU → BatchNorm → Dropout."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(c_out),
        (Dropout16 if fast_dropout else nn.Dropout)(dropout),
    )


class Net(nn.Module):
    """Input (B, 1, 28, 28) normalised digits; output (B, 10) log-probabilities.

    FAST_DROPOUT picks Dropout16 for training; it has no weights, so checkpoints
    do not record it and rebuild with nn.Dropout.
    """

    def __init__(self, dropout: float, fast_dropout: bool = False):
        super().__init__()
        d = dict(dropout=dropout, fast_dropout=fast_dropout)
        self.features = nn.Sequential(
            conv_block(1, 8, **d),                        # (B, 8, 26, 26)
            conv_block(8, 12, **d),                       # (B, 12, 24, 24)
            nn.MaxPool2d(2),                              # (B, 12, 12, 12)
            nn.Conv2d(12, 10, kernel_size=1, bias=False),  # (B, 10, 12, 12)
            conv_block(10, 12, **d),                      # (B, 12, 10, 10)
            conv_block(12, 12, **d),                      # (B, 12, 8, 8)
            conv_block(12, 16, **d),                      # (B, 16, 6, 6)
            conv_block(16, 16, **d),                      # (B, 16, 4, 4)
            nn.AdaptiveAvgPool2d(1),                      # (B, 16, 1, 1)
            nn.Conv2d(16, 10, kernel_size=1, bias=False),  # (B, 10, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1).log_softmax(dim=1)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def checkpoint(model: nn.Module, model_args: dict, **extra) -> dict:
    """A checkpoint: the state dict, the arguments that rebuild the model, and EXTRA."""
    # a copy: on the CPU, .cpu() would return the live tensors, which go on training
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {"model": state, "model_args": dict(model_args), **extra}


def from_checkpoint(ckpt: dict, source: str) -> Net:
    """Rebuild the model from a checkpoint loaded with weights_only=True."""
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise StageError(f"{source}: not a checkpoint of this project (no model/model_args); "
                         "rerun the train stage")
    fix = "rerun the train stage"
    try:
        model = Net(**ckpt["model_args"])
    except TypeError as err:
        raise StageError(f"{source}: checkpoint's model_args do not fit this architecture "
                         f"({err}); {fix}") from None
    expected = model.state_dict()
    weights = ckpt["model"] if isinstance(ckpt["model"], dict) else {}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    shapes = [k for k in expected.keys() & weights.keys()
              if tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        problems = [f"{len(v)} {what} (first: {v[0]})" for what, v in
                    (("missing", missing), ("unexpected", extra), ("wrongly shaped", shapes)) if v]
        raise StageError(f"{source}: checkpoint does not fit this architecture: "
                         f"{', '.join(problems)} weights; {fix}")
    model.load_state_dict(weights)
    return model


@torch.inference_mode()
def predict(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probabilities (N, 10) for all of X, in batches, in eval mode.

    MODEL is a Net or its CompiledModel; a CUDA-graphed model reuses its output buffer,
    so each batch's output is copied before the next batch runs.
    """
    was_training = model.training
    model.eval()
    outs = []
    for xb in x.split(batch_size):
        mark_step(model)
        outs.append(model(xb).clone())
    out = torch.cat(outs)
    model.train(was_training)
    return out
