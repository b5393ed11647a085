"""Predict: the digit in each image file, with the trained model.

Reads:  MODEL (models/model.pt) and image files, or folders of them (any format Pillow
        opens, any size and mode).
Writes: one line per file to stdout: the digit, its probability and the runner-up
        (with --json, one JSON object per line); one line per bad file, and exit 1.
Params: none (the normalisation statistics come from the checkpoint).

Each image is made into a digit as MNIST's were: grey levels, inverted if the
background is light, cropped to the ink, the longer side scaled to 20 pixels, and
placed in a 28×28 frame with its centre of mass at the centre.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stages.common import StageError, load_torch, run_cli
from stages.data import to_device
from stages.model import from_checkpoint, predict

SIDE = 28          # the frame
BOX = 20           # the longer side of the digit in the frame
CENTRE = 14        # where MNIST's centre of mass lies (row and column index), on average
MIN_CONTRAST = 32  # grey levels between background and the darkest ink; less is blank
CROP_LEVEL = 26    # after stretching the ink to 0–255, lighter traces are noise (10 %)
BATCH_SIZE = 256


@dataclass
class Prediction:
    path: str
    digit: int
    probability: float
    runner_up: int
    runner_up_probability: float


@dataclass
class Failure:
    path: str
    error: str


def image_suffixes() -> set[str]:
    """The file name endings of the formats Pillow can open."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def expand_paths(paths: list[Path]) -> list[Path | Failure]:
    """The files named, and the image files in the folders named (recursively, sorted,
    hidden ones skipped), in order; a missing path or a folder without images is a
    Failure in its place."""
    suffixes = image_suffixes()
    items: list[Path | Failure] = []
    for path in paths:
        if path.is_file():
            items.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            items += found or [Failure(str(path), "folder holds no image files")]
        else:
            items.append(Failure(str(path), "no such file or folder"))
    return items


def grey_levels(image: Image.Image) -> np.ndarray:
    """The image's first frame as grey levels 0–255 (float): transparency laid over
    white, 16-bit and floating-point images scaled to that range."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float64)
        top = grey.max()
        scale = 255 / 65535 if top > 255 else 255.0 if image.mode == "F" and top <= 1 else 1.0
        return np.clip(grey * scale, 0, 255)
    if image.has_transparency_data:
        white = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float64)


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """A 28×28 uint8 digit, white ink on black, from grey levels of any size."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if np.median(border) >= 128:  # dark ink on paper
        grey, border = 255 - grey, 255 - border
    ink = np.clip(grey - np.median(border), 0, None)
    if ink.max() < MIN_CONTRAST:
        raise StageError("no ink: the image is blank or nearly so")
    ink *= 255 / ink.max()
    ink[ink < CROP_LEVEL] = 0  # paper texture and compression noise
    digit = Image.fromarray(ink.round().astype(np.uint8))
    digit = digit.crop(digit.getbbox())
    scale = BOX / max(digit.size)
    digit = digit.resize((max(1, round(digit.width * scale)), max(1, round(digit.height * scale))),
                         Image.Resampling.LANCZOS)
    mass = np.asarray(digit, dtype=np.float64)
    rows, cols = np.indices(mass.shape)
    centre_row = (rows * mass).sum() / mass.sum()
    centre_col = (cols * mass).sum() / mass.sum()
    frame = Image.new("L", (SIDE, SIDE))
    frame.paste(digit, (round(CENTRE - centre_col), round(CENTRE - centre_row)))
    return np.array(frame)  # a writable copy


def read_digit(path: Path) -> np.ndarray:
    """The 28×28 digit in the image file PATH; StageError says why it cannot be read."""
    try:
        if path.stat().st_size == 0:
            raise StageError("empty file")
        with Image.open(path) as image:
            grey = grey_levels(image)
    except UnidentifiedImageError:
        raise StageError("not an image Pillow can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise StageError(f"unreadable image ({err})") from None
    return to_mnist(grey)


def load_model(path: Path) -> tuple[torch.nn.Module, float, float]:
    """The model and its training data's normalisation (mean, std) from checkpoint PATH."""
    ckpt = load_torch(path, "checkpoint")
    model = from_checkpoint(ckpt, str(path))
    try:
        mean, std = float(ckpt["normalisation"]["mean"]), float(ckpt["normalisation"]["std"])
    except (KeyError, TypeError, ValueError):
        raise StageError(f"{path}: checkpoint has no normalisation (mean, std); "
                         "rerun the train stage") from None
    return model, mean, std


def classify(model: torch.nn.Module, digits: torch.Tensor, mean: float,
             std: float) -> torch.Tensor:
    """Probabilities (N, 10) for uint8 DIGITS (N, 28, 28), normalised as in training."""
    labels = torch.zeros(len(digits), dtype=torch.int64)  # to_device wants some
    x = to_device(digits, labels, mean, std, torch.device("cpu")).x
    return predict(model, x, BATCH_SIZE).exp()


def predict_files(paths: list[Path], model_path: Path) -> list[Prediction | Failure]:
    """A Prediction or a Failure for each file in PATHS (folders expanded), in order."""
    model, mean, std = load_model(model_path)
    results = expand_paths(paths)
    digits, readable = [], []  # readable: indices into RESULTS
    for i, path in enumerate(results):
        if isinstance(path, Failure):
            continue
        try:
            digits.append(torch.from_numpy(read_digit(path)))
            readable.append(i)
        except StageError as err:
            results[i] = Failure(str(path), str(err))
    if digits:
        top = classify(model, torch.stack(digits), mean, std).topk(2, dim=1)
        for i, p, d in zip(readable, top.values.tolist(), top.indices.tolist()):
            results[i] = Prediction(str(results[i]), d[0], round(p[0], 6), d[1], round(p[1], 6))
    return results


def format_result(result: Prediction | Failure, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(result))
    if isinstance(result, Failure):
        return f"error: {result.path}: {result.error}"
    return (f"{result.path}: {result.digit} (p={result.probability:.4f}), "
            f"runner-up {result.runner_up} (p={result.runner_up_probability:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                        help="image files, or folders of them")
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    results = predict_files(args.paths, args.model)
    for result in results:
        to_stderr = isinstance(result, Failure) and not args.json
        print(format_result(result, args.json), file=sys.stderr if to_stderr else sys.stdout)
    if any(isinstance(r, Failure) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
