"""Device-resident MNIST: load once, normalise once, batch by seeded indices.

Shared by train, evaluate and the speed benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.common import StageError, load_torch, read_json


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when a GPU is present, else the CPU; `cuda` needs a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device is cuda but torch sees no CUDA GPU; "
                         "set train.device to auto or cpu")
    return torch.device(name)


def load_split(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,) saved by preprocess."""
    split = load_torch(path, "preprocessed split")
    images = split.get("images") if isinstance(split, dict) else None
    labels = split.get("labels") if isinstance(split, dict) else None
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)
            and images.dtype == torch.uint8 and images.dim() == 3
            and labels.dtype == torch.int64 and labels.shape == images.shape[:1]):
        raise StageError(f"{path}: not a preprocessed split (uint8 images N×28×28, int64 "
                         "labels N); rerun the preprocess stage")
    return images, labels


def load_stats(path: str | Path) -> tuple[float, float]:
    stats = read_json(path, "normalisation statistics")
    try:
        mean, std = float(stats["mean"]), float(stats["std"])
    except (KeyError, TypeError, ValueError):
        raise StageError(f"{path}: needs numeric mean and std; rerun the preprocess stage") from None
    if not std > 0:
        raise StageError(f"{path}: std {std} must be > 0; rerun the preprocess stage")
    return mean, std


@dataclass
class DeviceData:
    """Normalised images (N, 1, 28, 28) float32 and labels (N,) on one device."""

    x: torch.Tensor
    y: torch.Tensor
    background: float  # the value a black pixel has after normalisation

    def __len__(self) -> int:
        return len(self.y)


def to_device(images: torch.Tensor, labels: torch.Tensor, mean: float, std: float,
              device: torch.device) -> DeviceData:
    # one channel: the NCHW and channels_last layouts of X are the same
    x = images.to(device).unsqueeze(1).float().div_(255).sub_(mean).div_(std)
    return DeviceData(x=x, y=labels.to(device), background=-mean / std)


def pixel_centres(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The centres of N pixels in [-1, 1] coordinates, as affine_grid computes them
    with align_corners=False."""
    return torch.linspace(-1, 1, n, device=device, dtype=dtype) * (n - 1) / n


def rotate(x: torch.Tensor, max_degrees: float, background: float,
           generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own angle, uniform in ±MAX_DEGREES, in one batched op.

    Nearest-neighbour sampling, as torchvision's RandomRotation does by default;
    pixels rotated in from outside the frame take the background value. The sampling
    grid is what F.affine_grid returns for these rotations, bit for bit (tested), but
    built by broadcasting: on the CPU affine_grid took 7 times as long as this.
    """
    n, _, h, w = x.shape
    angles = torch.rand(n, device=x.device, generator=generator, dtype=x.dtype)
    angles = (angles * 2 - 1) * math.radians(max_degrees)
    cos, sin = angles.cos().view(n, 1, 1), angles.sin().view(n, 1, 1)
    xs = pixel_centres(w, x.device, x.dtype).view(1, 1, w)
    ys = pixel_centres(h, x.device, x.dtype).view(1, h, 1)
    grid = torch.stack([cos * xs + (-sin) * ys, sin * xs + cos * ys], dim=-1)  # (n, h, w, 2)
    return F.grid_sample(x - background, grid, mode="nearest", align_corners=False) + background


def is_compiled(model: torch.nn.Module) -> bool:
    """True for the wrapper torch.compile returns."""
    return hasattr(model, "_orig_mod")


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probabilities (N, 10) for all of X, in batches, in eval mode."""
    was_training = model.training
    model.eval()
    outs = []
    for xb in x.split(batch_size):
        if is_compiled(model):
            torch.compiler.cudagraph_mark_step_begin()
        outs.append(model(xb).clone())  # a CUDA-graphed model reuses its output buffer
    out = torch.cat(outs)
    model.train(was_training)
    return out
