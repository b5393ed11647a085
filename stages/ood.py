"""The digit check: does an image look like the digits the model knows?

A classifier of this size answers every input with a digit, and often with p > 0.99:
noise, a letter or a photo of a wall all come back as confident digits. The check
flags such inputs. It reads what the model itself computes for the 28×28 digit that
preprocessing made, plus a few statistics of its ink:

- the mean of each channel after every convolution block (86 numbers: the pooled
  activations that Lee et al., 2018, fit class-conditional Gaussians to for their
  Mahalanobis detector), and the 10 logits (the energy score of Liu et al., 2020,
  and the maximum softmax of Hendrycks & Gimpel, 2017, are functions of them);
- five ink statistics of the digit: how much ink, how much of the frame it covers,
  how much of it is solid, how much edge it has per unit of ink, and how many
  separate strokes a row or column crosses.

A small network (one hidden layer; the mean of several such fits) turns these 101
numbers into a score. It is fitted as in outlier exposure (Hendrycks et al., 2019),
with the model itself left as it is: MNIST training digits and digits typed in
Pillow's font on one side, images made by stages/synthetic.py on the other. The
threshold is the score that a set share of held-out MNIST training digits exceeds.
stages/calibrate.py fits it and measures it; docs/use.md has the numbers and how the
simpler scores fared.

The check belongs to one checkpoint: its file records the checkpoint's md5.
"""

from __future__ import annotations

import hashlib
import math
import shlex
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.common import StageError, read_json

N_LOGITS, N_INK = 10, 5  # the last columns of features(): logits, then ink statistics
INK = 0.2    # a pixel over this level (of 1) is ink, for the ink statistics
SOLID = 0.6  # and over this one, the solid core of a stroke
BATCH_SIZE = 1000
FIX = "rerun the calibrate stage (dvc repro calibrate)"


@torch.inference_mode()
def activations(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For normalised digits X (N, 1, 28, 28): the mean of each channel after every layer
    of model.features that still has a picture, but the max-pool, which repeats the
    block before it (N, 86 for Net); and the logits (N, 10)."""
    was_training = model.training
    model.eval()
    means, logits = [], []
    for xb in x.split(BATCH_SIZE):
        pooled = []
        for layer in model.features:
            xb = layer(xb)
            if xb.shape[-1] > 1 and not isinstance(layer, nn.MaxPool2d):
                pooled.append(xb.mean(dim=(2, 3)))
        means.append(torch.cat(pooled, dim=1))
        logits.append(xb.flatten(1))
    model.train(was_training)
    return torch.cat(means), torch.cat(logits)


def ink_statistics(digits: torch.Tensor) -> torch.Tensor:
    """Five numbers (N, 5) for uint8 digits (N, 28, 28), white on black: the mean level,
    the share of pixels that are ink, the share of ink that is solid, the edge per unit
    of ink, and the mean number of separate runs of ink in the rows and columns that
    hold ink."""
    d = digits.float() / 255
    ink = d > INK
    n_ink = ink.sum(dim=(1, 2)).clamp(min=1)
    edge = (d.diff(dim=2).abs().sum(dim=(1, 2)) + d.diff(dim=1).abs().sum(dim=(1, 2)))
    starts_r = (ink.int().diff(dim=2) == 1).sum(dim=2) + ink[:, :, 0]  # runs per row
    starts_c = (ink.int().diff(dim=1) == 1).sum(dim=1) + ink[:, 0, :]  # and per column
    lines = ((starts_r > 0).sum(dim=1) + (starts_c > 0).sum(dim=1)).clamp(min=1)
    return torch.stack([d.mean(dim=(1, 2)), ink.float().mean(dim=(1, 2)),
                        (d > SOLID).sum(dim=(1, 2)) / n_ink,
                        edge / d.sum(dim=(1, 2)).clamp(min=1e-6),
                        (starts_r.sum(dim=1) + starts_c.sum(dim=1)) / lines], dim=1)


def features(model: nn.Module, x: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """What the check reads (N, 101): channel means, logits and ink statistics of the
    uint8 DIGITS, which X holds normalised."""
    means, logits = activations(model, x)
    return torch.cat([means, logits, ink_statistics(digits)], dim=1).float()


def logits_of(feats: torch.Tensor) -> torch.Tensor:
    """The model's logits (N, 10) in rows of features()."""
    return feats[:, -N_INK - N_LOGITS:-N_INK]


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _exact(values: torch.Tensor) -> list:
    """float32 VALUES as nested lists of the shortest decimals that read back the same."""
    if values.dim() > 1:
        return [_exact(row) for row in values]
    return [float(str(v)) for v in values.numpy().astype(np.float32)]


TENSORS = ("centre", "scale", "hidden", "hidden_bias", "out")


@dataclass(frozen=True)
class DigitCheck:
    """The fitted check: features are centred and scaled, then a hidden layer of ReLUs
    and a linear output give the score; over THRESHOLD is flagged."""

    model_md5: str           # the checkpoint it was fitted for
    centre: torch.Tensor     # (F,)
    scale: torch.Tensor      # (F,)
    hidden: torch.Tensor     # (H, F)
    hidden_bias: torch.Tensor  # (H,)
    out: torch.Tensor        # (H,)
    out_bias: float
    threshold: float

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """The score (N,) of features FEATS (N, F): higher is less like a digit."""
        z = (feats - self.centre) / self.scale
        return torch.relu(z @ self.hidden.T + self.hidden_bias) @ self.out + self.out_bias

    def looks_like_digit(self, feats: torch.Tensor) -> list[bool]:
        """For each row of FEATS (N, F), from features(): not flagged."""
        return (self.scores(feats) <= self.threshold).tolist()

    def to_json(self) -> dict:
        return {"model_md5": self.model_md5, "threshold": self.threshold,
                "out_bias": self.out_bias,
                **{name: _exact(getattr(self, name)) for name in TENSORS}}

    @classmethod
    def from_json(cls, doc: dict, source: str) -> DigitCheck:
        try:
            tensors = {name: torch.tensor(doc[name], dtype=torch.float32) for name in TENSORS}
            check = cls(model_md5=str(doc["model_md5"]), out_bias=float(doc["out_bias"]),
                        threshold=float(doc["threshold"]), **tensors)
        except (KeyError, TypeError, ValueError):
            raise StageError(f"{source}: not a digit check (a field is missing or of the "
                             f"wrong type); {FIX}") from None
        n_features = check.centre.shape[0]
        if not (check.scale.shape == (n_features,) and check.hidden.dim() == 2
                and check.hidden.shape[1] == n_features
                and check.hidden_bias.shape == check.out.shape == check.hidden.shape[:1]
                and math.isfinite(check.threshold)):
            raise StageError(f"{source}: the digit check's shapes do not fit together; {FIX}")
        return check


def fit(digits: torch.Tensor, others: torch.Tensor, hidden: int, fits: int, steps: int,
        lr: float, weight_decay: float, seed: int, model_md5: str,
        pool: Executor | None = None) -> DigitCheck:
    """A check fitted to tell feature rows DIGITS (label 0) from OTHERS (label 1), each
    side weighted as much as the other; its threshold is left at +inf.

    FITS networks of HIDDEN units are fitted, each from the next draws of SEED's
    generator, and the check's score is the mean of theirs: one hidden layer of
    FITS × HIDDEN units whose output weights are divided by FITS. One fit's score
    depends on its start: the non-digits it passes change from seed to seed. The
    networks start here, one after the other; they are fitted in POOL's processes, if
    given, which compute as this one does (the environment that apply_runtime() pinned)."""
    x = torch.cat([digits, others])
    y = torch.cat([torch.zeros(len(digits)), torch.ones(len(others))])
    weight = torch.where(y == 1, 0.5 / len(others), 0.5 / len(digits))
    centre, scale = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    z = (x - centre) / scale
    torch.manual_seed(seed)
    starts = [nn.Sequential(nn.Linear(z.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
              for _ in range(fits)]
    fitting = partial(_fitted_net, z=z, y=y, weight=weight, steps=steps, lr=lr,
                      weight_decay=weight_decay)
    nets = list(pool.map(fitting, starts) if pool is not None else map(fitting, starts))
    return DigitCheck(model_md5=model_md5, centre=centre, scale=scale,
                      hidden=torch.cat([first.weight for first, _ in nets]),
                      hidden_bias=torch.cat([first.bias for first, _ in nets]),
                      out=torch.cat([last.weight[0] for _, last in nets]) / fits,
                      out_bias=float(sum(last.bias[0] for _, last in nets) / fits),
                      threshold=math.inf)


def _fitted_net(net: nn.Sequential, z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                steps: int, lr: float, weight_decay: float) -> tuple[nn.Linear, nn.Linear]:
    """The two layers of NET (linear, ReLU, linear), fitted from where it starts by
    full-batch Adam to the rows Z (labels Y, weighted by WEIGHT); without gradients."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(net(z).squeeze(1), y,
                                                              weight=weight, reduction="sum")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.requires_grad_(False)
    return net[0], net[2]


def rounded(check: DigitCheck) -> DigitCheck:
    """CHECK as its JSON file will give it back: each number the float32 that its
    shortest decimal reads back as."""
    return replace(check, **{name: torch.tensor(_exact(getattr(check, name)), dtype=torch.float32)
                             for name in TENSORS})


def load_check(path: Path, model_path: Path) -> DigitCheck:
    """The digit check in PATH, which must have been fitted for checkpoint MODEL_PATH."""
    check = DigitCheck.from_json(read_json(path, "digit check"), str(path))
    if check.model_md5 != file_md5(model_path):
        raise StageError(f"{path}: the digit check was fitted for another checkpoint than "
                         f"{model_path} (md5 differs); {FIX} if that is the pipeline's "
                         f"model, or fit one for it (python -m stages.calibrate --model "
                         f"{shlex.quote(str(model_path))} --ood CHECK.json --metrics "
                         "CHECK.metrics.json --passed-png CHECK.png, then --ood CHECK.json), "
                         "or pass --ood none to go without it")
    return check
