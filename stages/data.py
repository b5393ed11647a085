"""Device-resident MNIST: load once, normalise once, batch by seeded indices, augment
whole batches on the device.

Shared by train, evaluate, export and the speed benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.common import StageError, load_torch, read_json


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


def split_validation(labels: torch.Tensor, size: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, validation) that hold SIZE of the images with LABELS out for
    validation, in their original order.

    Class-balanced: each class gives the validation split its share of the labels,
    rounded down, and the images left to place go to the classes with the largest
    remainders (the lower class first on a tie). Which images of a class are held out
    is drawn from a generator seeded with SEED only, so the split is the same whatever
    the training seed."""
    n = len(labels)
    if not 0 < size < n:
        raise StageError(f"train.val_size {size} must be between 1 and {n - 1}, the "
                         f"{n} training images less one; 0 holds out none")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / n
    quotas = exact.floor().long()
    left = size - int(quotas.sum())
    # largest remainders first; a stable sort keeps the lower class first on ties
    order = torch.sort(exact - quotas, descending=True, stable=True).indices
    quotas[order[:left]] += 1
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(n, dtype=torch.bool)
    for label, quota in zip(classes.tolist(), quotas.tolist()):
        members = (labels == label).nonzero().squeeze(1)
        chosen = members[torch.randperm(len(members), generator=generator)[:quota]]
        held[chosen] = True
    return (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)


@dataclass
class DeviceData:
    """Normalised images (N, 1, 28, 28) float32 and, where known, labels (N,) on one
    device."""

    x: torch.Tensor
    y: torch.Tensor | None
    background: float  # the value a black pixel has after normalisation

    def __len__(self) -> int:
        return len(self.x)


def to_device(images: torch.Tensor, labels: torch.Tensor | None, mean: float, std: float,
              device: torch.device) -> DeviceData:
    """uint8 IMAGES (N, 28, 28), normalised with MEAN and STD, and LABELS (None for
    images to predict) on DEVICE."""
    # one channel: the NCHW and channels_last layouts of X are the same
    x = images.to(device).unsqueeze(1).float().div_(255).sub_(mean).div_(std)
    y = labels.to(device) if labels is not None else None
    return DeviceData(x=x, y=y, background=-mean / std)


def pixel_centres(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The centres of N pixels in [-1, 1] coordinates, as affine_grid computes them
    with align_corners=False."""
    return torch.linspace(-1, 1, n, device=device, dtype=dtype) * (n - 1) / n


ELASTIC_SIGMA = 4.0  # pixels: the smoothing of train.elastic's random displacements


def smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """FIELD (N, C, H, W) blurred by a Gaussian of SIGMA pixels, one channel at a time,
    with reflected borders. Built from device ops only, so a CUDA graph can hold it."""
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, device=field.device, dtype=field.dtype)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = field.shape[1]
    rows = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    field = F.conv2d(F.pad(field, (radius, radius, 0, 0), mode="reflect"), rows, groups=c)
    cols = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    return F.conv2d(F.pad(field, (0, 0, radius, radius), mode="reflect"), cols, groups=c)


def augment(x: torch.Tensor, rotation: float, translate: float, background: float,
            generator: torch.Generator, scale: float = 0.0, elastic: float = 0.0,
            mode: str = "nearest") -> torch.Tensor:
    """Rotate each image by its own angle, uniform in ±ROTATION degrees, zoom it by its
    own factor, uniform in 1 ± SCALE, shift it by up to ±TRANSLATE pixels on each
    axis, and with ELASTIC > 0 distort it by a smooth random displacement field (each
    axis uniform in ±1, blurred by a Gaussian of ELASTIC_SIGMA pixels, scaled so that the
    image's largest displacement is ELASTIC pixels), in one batched resampling.

    MODE is grid_sample's: nearest-neighbour by default, as torchvision's RandomRotation
    does, or bilinear; pixels moved in from outside the frame take the background
    value. The rotation grid is what F.affine_grid returns for these rotations, bit for
    bit (tested), but built by broadcasting: on the CPU affine_grid took 7 times as long
    as this. The angles are drawn first, so that a run without translation draws exactly
    what it drew before translation existed, then the zoom factors, so that a run without
    zooming draws and computes exactly what it did before zooming existed, and the
    elastic fields last, for the same reason.
    """
    if rotation == 0 and translate == 0 and scale == 0 and elastic == 0:
        return x
    n, _, h, w = x.shape
    xs = pixel_centres(w, x.device, x.dtype).view(1, 1, w)
    ys = pixel_centres(h, x.device, x.dtype).view(1, h, 1)
    if rotation > 0:
        angles = torch.rand(n, device=x.device, generator=generator, dtype=x.dtype)
        angles = (angles * 2 - 1) * math.radians(rotation)
        cos, sin = angles.cos().view(n, 1, 1), angles.sin().view(n, 1, 1)
        gx, gy = cos * xs + (-sin) * ys, sin * xs + cos * ys  # (n, h, w) each
    else:
        gx, gy = xs.expand(n, h, w), ys.expand(n, h, w)
    if translate > 0:
        shift = torch.rand(n, 2, device=x.device, generator=generator, dtype=x.dtype)
        shift = (shift * 2 - 1) * translate  # pixels; a pixel is 2/side in grid units
    if scale > 0:  # a digit drawn ZOOM times as large samples the image at grid / ZOOM
        zoom = torch.rand(n, device=x.device, generator=generator, dtype=x.dtype)
        zoom = (1 + (zoom * 2 - 1) * scale).view(n, 1, 1)
        gx, gy = gx / zoom, gy / zoom
    if translate > 0:
        gx = gx + (shift[:, 0] * (2 / w)).view(n, 1, 1)
        gy = gy + (shift[:, 1] * (2 / h)).view(n, 1, 1)
    if elastic > 0:
        field = torch.rand(n, 2, h, w, device=x.device, generator=generator, dtype=x.dtype)
        field = smooth(field * 2 - 1, ELASTIC_SIGMA)
        peak = field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        field = field * (elastic / peak)  # pixels
        gx, gy = gx + field[:, 0] * (2 / w), gy + field[:, 1] * (2 / h)
    grid = torch.stack([gx, gy], dim=-1)  # (n, h, w, 2)
    return F.grid_sample(x - background, grid, mode=mode, align_corners=False) + background
