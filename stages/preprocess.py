"""Preprocess stage: parse and validate the IDX files, save compact tensors.

Reads:  RAW_DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte (from download).
Writes: OUT_DIR/train.pt and OUT_DIR/test.pt ({"images": uint8 (N, 28, 28),
        "labels": int64 (N,)}), and OUT_DIR/stats.json, the training images'
        mean and std on the [0, 1] scale, which train and evaluate normalise with.
Params: runtime.* (applied first; see stages/runtime.py). The statistics are exact
integer sums, the same under any runtime.
"""

from __future__ import annotations

import argparse
import math
import struct
from pathlib import Path

import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from stages.common import StageError, atomic_dir, run_cli, write_json
from stages.params import load_params
from stages.runtime import apply as apply_runtime

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # IDX: unsigned byte data, 3 and 1 dimensions
SIDE = 28
SPLITS = {"train": "train", "test": "t10k"}
FIX = "rerun the download stage (dvc repro -f download)"


def check_header(path: Path, magic: int) -> int:
    """Check an IDX file's magic number, shape and size; return its item count."""
    ndim = magic & 0xFF
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(4 + 4 * ndim)
    except FileNotFoundError:
        raise StageError(f"{path}: not found; {FIX}") from None
    except OSError as err:
        raise StageError(f"{path}: cannot be read ({err.strerror}); {FIX}") from None
    if len(header) < 4 + 4 * ndim:
        raise StageError(f"{path}: truncated IDX header ({size} bytes); {FIX}")
    found, count, *dims = struct.unpack(f">{1 + ndim}I", header)
    if found != magic:
        raise StageError(f"{path}: magic number {found} is not {magic}, so this is not an "
                         f"MNIST {'image' if ndim == 3 else 'label'} file; {FIX}")
    if count == 0:
        raise StageError(f"{path}: header says the file holds no items; {FIX}")
    if dims and dims != [SIDE, SIDE]:
        raise StageError(f"{path}: images are {dims[0]}x{dims[1]}, expected {SIDE}x{SIDE}; {FIX}")
    expected = len(header) + count * SIDE * SIDE if ndim == 3 else len(header) + count
    if size != expected:
        raise StageError(f"{path}: header says {count} items ({expected} bytes) but the file "
                         f"has {size} bytes, so it is truncated or padded; {FIX}")
    return count


def read_split(raw_dir: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and validate one split's images (uint8, N×28×28) and labels (int64, N)."""
    image_path = raw_dir / f"{prefix}-images-idx3-ubyte"
    label_path = raw_dir / f"{prefix}-labels-idx1-ubyte"
    n_images = check_header(image_path, IMAGE_MAGIC)
    n_labels = check_header(label_path, LABEL_MAGIC)
    if n_images != n_labels:
        raise StageError(f"{image_path}: {n_images} images but {label_path.name} has "
                         f"{n_labels} labels; the counts must agree; {FIX}")
    images = read_image_file(str(image_path))
    labels = read_label_file(str(label_path))
    if int(labels.max()) > 9:
        bad = int((labels > 9).nonzero()[0])
        raise StageError(f"{label_path}: label {int(labels[bad])} at index {bad} is not a "
                         f"digit 0-9; {FIX}")
    return images.contiguous(), labels.contiguous()


def normalisation_stats(images: torch.Tensor) -> dict[str, float]:
    """Mean and std of uint8 images on the [0, 1] scale.

    Computed from exact integer sums, so the result does not depend on the order of a
    floating-point reduction, which changes with the thread count and the CPU.
    """
    if images.numel() == 0:
        raise StageError("the training set is empty; cannot compute normalisation statistics")
    n = images.numel()
    pixels = images.to(torch.int64)
    total, squares = int(pixels.sum()), int(pixels.square().sum())
    # n² var = n Σx² − (Σx)², exact in Python's integers; then scale by 255
    return {"mean": total / (n * 255), "std": math.sqrt(n * squares - total**2) / (n * 255)}


def preprocess(raw_dir: str | Path, out_dir: str | Path) -> dict[str, float]:
    """Write train.pt, test.pt and stats.json to OUT_DIR, all or none."""
    raw_dir = Path(raw_dir)
    splits = {split: read_split(raw_dir, prefix) for split, prefix in SPLITS.items()}
    stats = normalisation_stats(splits["train"][0])
    with atomic_dir(out_dir) as staging:
        for split, (images, labels) in splits.items():
            torch.save({"images": images, "labels": labels}, staging / f"{split}.pt")
            print(f"{split}: {len(labels)} images, {images.shape[1]}x{images.shape[2]}")
        write_json(staging / "stats.json", stats)
    print(f"train mean {stats['mean']:.4f}, std {stats['std']:.4f}")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    apply_runtime(load_params().runtime)
    preprocess(args.raw_dir, args.out_dir)


if __name__ == "__main__":
    run_cli(main)
