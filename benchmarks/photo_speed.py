"""How long one 12-megapixel phone photo takes to predict, and how much memory, on one core.

Run from the repository root after `dvc repro` (it needs models/model.pt and
models/ood.json):

    python -m benchmarks.photo_speed [--rounds 5] [--side 4000] [--style pen1]

It writes a photo of an MNIST-like digit (stages/photos.py, all degradations; with
--style, written in that style instead: a pen's thin line, pencil, ...) enlarged
to SIDE×(3/4·SIDE) pixels as a JPEG (quality 90, EXIF orientation 6, as a phone stores
it) to a temporary folder. Then, in a fresh process pinned to one CPU core with one
thread for torch and OpenCV, with the model and its check loaded, it times
`predict_files` on it (decoding, preprocessing, the model and the check) ROUNDS times,
and reads the peak of the process's memory (VmHWM, Linux) against its size before the
first round. It prints the numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from stages.common import StageError, run_cli
from stages.photos import DEGRADATIONS, STYLES, photograph

MEASURE = """
import os, sys, time
from pathlib import Path
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import torch
from stages.predict import load_predictor, predict_files
from stages.sheet import cv2
torch.set_num_threads(1)
cv2.setNumThreads(1)
predictor = load_predictor(Path(sys.argv[2]), Path(sys.argv[3]))
from benchmarks.memory import restart_peak, status
restart_peak()
before = status("VmRSS")
times = []
for _ in range(int(sys.argv[4])):
    start = time.perf_counter()
    result = predict_files([Path(sys.argv[1])], predictor)[0]
    times.append(time.perf_counter() - start)
print(" ".join(f"{t:.4f}" for t in times), (status("VmHWM") - before) // 1024, result)
"""


def phone_photo(path: Path, side: int, style: str | None = None) -> None:
    """A photo of a digit, all degradations (or written in STYLE), enlarged to SIDE ×
    3/4 SIDE, as a phone's JPEG stored sideways (EXIF orientation 6) at quality 90."""
    ink = np.zeros((28, 28))
    ink[5:23, 12:16] = 1  # a 1
    ink[5:9, 9:16] = 1
    degradations = frozenset() if style else frozenset(DEGRADATIONS)
    with Image.open(io.BytesIO(photograph(ink, [0, 0], degradations, style))) as small:
        upright = small.convert("RGB")
    if upright.width < upright.height:
        upright = upright.transpose(Image.Transpose.ROTATE_90)
    large = upright.resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    large.transpose(Image.Transpose.ROTATE_270).save(path, quality=90, exif=exif)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--ood", type=Path, default=Path("models/ood.json"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--side", type=int, default=4000, help="the photo's longer side")
    parser.add_argument("--style", choices=sorted(STYLES), help="how the digit is written")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.jpg"
        phone_photo(path, args.side, args.style)
        with Image.open(path) as image:
            width, height = image.size
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(args.model),
                               str(args.ood), str(args.rounds)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise StageError(f"the measuring process failed: {proc.stderr.strip().splitlines()[-1]}")
        *times, grown, result = proc.stdout.split(" ", args.rounds + 1)
        size = path.stat().st_size
    times = [float(t) for t in times]
    print(f"{width}×{height} JPEG ({width * height / 1e6:.1f} megapixels, {size / 1e6:.1f} MB), "
          f"one core: predict_files {min(times) * 1000:.0f} ms at best, "
          f"{np.median(times) * 1000:.0f} ms median of {len(times)}, first "
          f"{times[0] * 1000:.0f} ms; peak memory {grown} MB over the loaded process")
    print(f"answer: {result.strip()}")


if __name__ == "__main__":
    run_cli(main)
