"""Predict: the digit in each image file, with the trained model.

Reads:  MODEL (models/model.pt), its digit check (models/ood.json, from the calibrate
        stage) and image files, or folders of them (any format Pillow opens, any
        size and mode, up to MAX_PIXELS).
Writes: one line per file to stdout: the digit, its probability and the runner-up,
        and a warning where the image does not look like a digit (with --json, one
        JSON object per line); one line per bad file, and exit 1.
Params: none (the normalisation statistics come from the checkpoint).

Each image is reduced in Pillow to at most WORK_SIDE pixels a side, turned upright as
its EXIF orientation says, and made into grey levels; stages/sheet.py finds the
digit on it (a scan, a drawing, or a photo of a sheet in uneven light, on ruled paper)
and frames it as MNIST's digits were. The server (stages/serve.py) reads images
through the same functions.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from stages.common import StageError, load_torch, run_cli
from stages.data import to_device
from stages.model import from_checkpoint, predict
from stages.ood import DigitCheck, features, load_check, logits_of
from stages.sheet import cv2, to_mnist

BATCH_SIZE = 256
OOD_JSON = "models/ood.json"  # the digit check, written by the calibrate stage
MAX_PIXELS = 50_000_000  # the largest image read: a 48-megapixel photo fits, 8000×6000
WORK_SIDE = 1024   # images are reduced to this many pixels a side before any arithmetic


@dataclass
class Prediction:
    path: str
    digit: int
    probability: float
    runner_up: int
    runner_up_probability: float
    looks_like_digit: bool | None  # None: no digit check (--ood none)


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
    hidden ones skipped), in order; a missing path, a folder without images, or a path
    that is neither file nor folder (a pipe, a device) is a Failure in its place."""
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
        elif path.exists():  # a pipe, a socket, a device
            items.append(Failure(str(path), "not a file or a folder"))
        else:
            items.append(Failure(str(path), "no such file or folder"))
    return items


def reduction(image: Image.Image) -> int:
    """The factor that brings IMAGE's longer side to at most WORK_SIDE pixels (1: none)."""
    return -(-max(image.size) // WORK_SIDE)


def reduced(image: Image.Image) -> Image.Image:
    """IMAGE averaged over square boxes (in Pillow) until its longer side is at most
    WORK_SIDE pixels; small images as they are."""
    factor = reduction(image)
    if factor <= 1:
        return image
    size = (-(-image.width // factor), -(-image.height // factor))
    return image.resize(size, Image.Resampling.BOX)


STRIP_ROWS = 256  # rows converted at a time, where conversion must come before reduction


def grey_of(image: Image.Image) -> Image.Image:
    """IMAGE in mode L, transparency laid over white."""
    if image.has_transparency_data:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    return image.convert("L")


def reduced_grey(image: Image.Image) -> Image.Image:
    """grey_of(IMAGE), reduced as reduced() does, for images that Pillow cannot average
    as they are (transparency, palettes, 1-bit): converted and averaged a strip of rows
    at a time, so that only the decoded image itself is ever full size."""
    factor = reduction(image)
    if factor <= 1:
        return grey_of(image)
    rows = factor * -(-STRIP_ROWS // factor)
    grey = Image.new("L", (-(-image.width // factor), -(-image.height // factor)))
    for top in range(0, image.height, rows):
        strip = image.crop((0, top, image.width, min(top + rows, image.height)))
        grey.paste(grey_of(strip).reduce(factor), (0, top // factor))
    return grey


# EXIF orientation: the transposition that turns the stored pixels upright, as in
# ImageOps.exif_transpose; it commutes with the reduction, so it is done after it
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def unit_range(grey: np.ndarray, floating: bool) -> np.ndarray:
    """Grey levels 0–255 from the values of a 16-bit, 32-bit or floating-point image:
    from 0 (or the lowest value, if negative) to the top of the range the values use,
    which is 1 for floats up to 1, 255 for values up to 255 (8-bit values in a wider
    type), and else the highest value (a 12-bit scan stored as 16 bits). NaN and
    infinities become the median of the other values: the paper, in a scan or a photo."""
    finite = np.isfinite(grey)
    if not finite.any():
        raise StageError("no ink: the image holds no finite values (NaN or infinity)")
    if not finite.all():
        grey = np.where(finite, grey, np.median(grey[finite]))
    low, high = min(float(grey.min()), 0.0), float(grey.max())
    top = 1.0 if floating and high <= 1 else 255.0 if high <= 255 else high
    return np.clip((grey - low) * (255 / (top - low)), 0, 255)


def deep_colour(image: Image.Image) -> bool:
    """Whether IMAGE is colour of 16 bits a channel (a PNG or TIFF), which Pillow reads
    as 8 bits a channel: the high bytes only."""
    if image.format not in ("PNG", "TIFF") or image.mode not in ("RGB", "RGBA") or not image.tile:
        return False
    args = image.tile[0].args
    return ";16" in (args if isinstance(args, str) else str(args[0]) if args else "")


def deep_colour_grey(image: Image.Image) -> Image.Image | None:
    """A deep_colour IMAGE's grey levels, decoded from its file by OpenCV, with all 16 bits,
    and reduced as reduced() does: mode I;16, or F where transparency was laid over
    white (65535); None where OpenCV cannot decode it so."""
    image.fp.seek(0)
    pixels = cv2.imdecode(np.frombuffer(image.fp.read(), np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16 or pixels.ndim != 3:
        return None
    grey = cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_BGR2GRAY)
    if pixels.shape[2] == 4:
        alpha = pixels[..., 3] / np.float32(65535)
        grey = grey * alpha + 65535 * (1 - alpha)
    return reduced(Image.fromarray(grey))


def grey_levels(image: Image.Image) -> np.ndarray:
    """The image's first frame, upright as its EXIF orientation says, reduced to at most
    WORK_SIDE pixels a side, as grey levels 0–255 (float): transparency laid over white,
    16-bit (grey or colour), 32-bit and floating-point images scaled by the range their
    values use (unit_range).

    Everything before the last lines happens in Pillow (in OpenCV for 16-bit colour,
    which Pillow reads as 8 bits), on the image's own pixels, and the reduction comes
    first: an image is never copied at full size (a 16-bit colour one once, in grey),
    nor becomes a large float array. A JPEG is decoded straight to grey at the smallest
    of 1/1, 1/2, 1/4 or 1/8 scale that keeps WORK_SIDE pixels.
    """
    image.draft("L", (WORK_SIDE, WORK_SIDE))  # JPEG only; other formats ignore it
    wide = image.mode in ("I", "F") or image.mode.startswith("I;16")
    small = deep_colour_grey(image) if deep_colour(image) else None
    if small is not None:
        wide = True
    elif wide or not (image.has_transparency_data or image.mode in ("1", "P")):
        small = reduced(image)
    else:  # Pillow resizes 1 and P by nearest neighbour, RGBA at full size premultiplied
        small = reduced_grey(image)
    method = UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation))
    if method is not None:
        small = small.transpose(method)
    if wide:
        return unit_range(np.asarray(small.convert("F"), dtype=np.float64), image.mode == "F")
    return np.asarray(small.convert("L"), dtype=np.float64)


def too_large(pixels: str) -> StageError:
    return StageError(f"image too large: {pixels}, over the limit of {MAX_PIXELS:,} pixels; "
                      "scale it down")


def read_digit(source: Path | bytes) -> np.ndarray:
    """The 28×28 digit in an image file: SOURCE is its path or its bytes. StageError
    says why it cannot be read."""
    try:
        if (len(source) if isinstance(source, bytes) else source.stat().st_size) == 0:
            raise StageError("empty file")
        with warnings.catch_warnings():
            # Pillow warns from 89 million pixels; MAX_PIXELS refuses fewer than that
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise too_large(f"{width}×{height} = {width * height:,} pixels")
                grey = grey_levels(image)
    except UnidentifiedImageError:
        raise StageError("not an image Pillow can read") from None
    except Image.DecompressionBombError:
        raise too_large(f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # truncated or damaged
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


@dataclass(frozen=True)
class Predictor:
    """A checkpoint loaded once, and the digit check fitted for it (None: no check)."""

    model: torch.nn.Module
    mean: float
    std: float
    check: DigitCheck | None


def load_predictor(model_path: Path, ood_path: Path | None) -> Predictor:
    """The checkpoint MODEL_PATH and the digit check in OOD_PATH (None: without one)."""
    model, mean, std = load_model(model_path)
    check = None if ood_path is None else load_check(ood_path, model_path)
    return Predictor(model, mean, std, check)


def normalise(digits: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 DIGITS (N, 28, 28) as the model's input (N, 1, 28, 28), as in training."""
    return to_device(digits, None, mean, std, torch.device("cpu")).x


def classify(model: torch.nn.Module, digits: torch.Tensor, mean: float,
             std: float) -> torch.Tensor:
    """Probabilities (N, 10) for uint8 DIGITS (N, 28, 28), normalised as in training."""
    return predict(model, normalise(digits, mean, std), BATCH_SIZE).exp()


def predict_digits(predictor: Predictor,
                   digits: torch.Tensor) -> tuple[torch.Tensor, list[bool | None]]:
    """Probabilities (N, 10) for uint8 DIGITS (N, 28, 28), and whether each looks like a
    digit the model knows (None for each where the predictor has no check). The model
    runs once: with a check, the probabilities come from the logits it reads."""
    if predictor.check is None:
        probabilities = classify(predictor.model, digits, predictor.mean, predictor.std)
        return probabilities, [None] * len(digits)
    feats = features(predictor.model, normalise(digits, predictor.mean, predictor.std), digits)
    return logits_of(feats).log_softmax(dim=1).exp(), predictor.check.looks_like_digit(feats)


def prediction(path: str, probabilities: torch.Tensor, looks_like_digit: bool | None) -> Prediction:
    """The Prediction for one image's PROBABILITIES (10,): the digit and the runner-up."""
    top = probabilities.topk(2)
    (p, p2), (d, d2) = top.values.tolist(), top.indices.tolist()
    return Prediction(path, d, round(p, 6), d2, round(p2, 6), looks_like_digit)


def predict_files(paths: list[Path], predictor: Predictor) -> list[Prediction | Failure]:
    """A Prediction or a Failure for each file in PATHS (folders expanded), in order."""
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
        probabilities, looks = predict_digits(predictor, torch.stack(digits))
        for i, p, looks_like_digit in zip(readable, probabilities, looks):
            results[i] = prediction(str(results[i]), p, looks_like_digit)
    return results


NOT_A_DIGIT = "does not look like a digit the model knows"


def format_result(result: Prediction | Failure, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(result))
    if isinstance(result, Failure):
        return f"error: {result.path}: {result.error}"
    line = (f"{result.path}: {result.digit} (p={result.probability:.4f}), "
            f"runner-up {result.runner_up} (p={result.runner_up_probability:.4f})")
    return line if result.looks_like_digit is not False else f"{line}; {NOT_A_DIGIT}"


def ood_path(value: str) -> Path | None:
    """--ood's value: a path, or `none` for no digit check."""
    return None if value == "none" else Path(value)


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --ood, which predict and serve share."""
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--ood", type=ood_path, default=Path(OOD_JSON), metavar="PATH",
                        help=f"the digit check fitted for MODEL (default {OOD_JSON}); "
                             "`none`: predict without it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                        help="image files, or folders of them")
    model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    results = predict_files(args.paths, load_predictor(args.model, args.ood))
    for result in results:
        to_stderr = isinstance(result, Failure) and not args.json
        print(format_result(result, args.json), file=sys.stderr if to_stderr else sys.stdout)
    if any(isinstance(r, Failure) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
