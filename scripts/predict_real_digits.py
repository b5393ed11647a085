"""Predict on real MNIST test digits saved as large dark-on-light JPEG files.

Takes N test digits, evenly spaced through data/prepared/test.pt, upscales each
(bicubic) to SIZE×SIZE pixels, inverts it to dark ink on white, saves it as a JPEG,
runs stages.predict on the folder, and prints how often that agrees with the model on
the original 28×28 digits, and the accuracy against the labels.

    python -m scripts.predict_real_digits [--model models/model.pt] [--n 200] [--size 224]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageOps

from stages.common import StageError, run_cli
from stages.data import load_split
from stages.predict import Prediction, classify, load_predictor, predict_files


def save_as_paper(images: torch.Tensor, folder: Path, size: int, quality: int = 90) -> list[Path]:
    """Each uint8 digit upscaled to SIZE×SIZE, dark on light, as FOLDER/00000.jpg etc."""
    paths = []
    for i, digit in enumerate(images.numpy()):
        image = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        ImageOps.invert(image).save(path, quality=quality)
        paths.append(path)
    return paths


def measure(model_path: Path, images: torch.Tensor, labels: torch.Tensor,
            size: int) -> dict[str, float]:
    """Agreement (%) of predictions from SIZE-pixel JPEG files of IMAGES with the model
    on IMAGES themselves, and the accuracy (%) of both against LABELS."""
    predictor = load_predictor(model_path, ood_path=None)  # the digits only
    original = classify(predictor.model, images, predictor.mean, predictor.std).argmax(dim=1)
    with tempfile.TemporaryDirectory() as tmp:
        save_as_paper(images, Path(tmp), size)
        results = predict_files([Path(tmp)], predictor)
    failed = [r for r in results if not isinstance(r, Prediction)]
    if failed:
        raise StageError(f"{len(failed)} files were not predicted; first: {failed[0]}")
    from_files = torch.tensor([r.digit for r in results])
    return {name: round(100 * same.float().mean().item(), 2) for name, same in (
        ("agreement", from_files == original), ("accuracy_files", from_files == labels),
        ("accuracy_originals", original == labels))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    images, labels = load_split(args.data / "test.pt")
    picked = torch.arange(args.n) * (len(labels) // args.n)  # evenly spaced
    result = measure(args.model, images[picked], labels[picked], args.size)
    print(f"{args.n} test digits as {args.size}×{args.size} dark-on-light JPEG files:")
    print(f"  agreement with the model on the 28×28 digits: {result['agreement']:.1f}%")
    print(f"  accuracy from the files:   {result['accuracy_files']:.1f}%")
    print(f"  accuracy on the originals: {result['accuracy_originals']:.1f}%")


if __name__ == "__main__":
    run_cli(main)
