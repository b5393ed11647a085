"""Predict: image files of any format, size and mode become MNIST-style digits.

The model is the real Net, trained here for a few seconds on digits rendered from
Pillow's own font (rotated, resized and shifted), 28×28 white on black like MNIST's.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import warnings
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from helpers import REPO, run_stage, stage_env
from stages.common import StageError, run_cli, save_torch
from stages.data import to_device
from stages.model import Net, checkpoint
from stages.predict import (Failure, Prediction, classify, expand_paths, grey_levels,
                            load_model, load_predictor, main, predict_files, read_digit,
                            to_mnist)

font = functools.cache(ImageFont.load_default)


def font_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N uint8 digits (N, 28, 28), white on black, in Pillow's font at random sizes,
    angles (±15°) and shifts (±1 pixel), and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, label in enumerate(labels):
        image = Image.new("L", (28, 28))
        size = int(rng.integers(20, 29))
        centre = (14 + int(rng.integers(-1, 2)), 14 + int(rng.integers(-1, 2)))
        ImageDraw.Draw(image).text(centre, str(label), fill=255, font=font(size), anchor="mm",
                                   stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
        images[i] = np.asarray(image.rotate(rng.uniform(-15, 15), Image.Resampling.BILINEAR))
    return torch.from_numpy(images), torch.from_numpy(labels)


def on_paper(digit: np.ndarray, size: tuple[int, int] = (300, 260), offset=(37, 11)) -> Image.Image:
    """DIGIT (28×28, white on black) upscaled 8 times (bicubic) and inverted to dark ink,
    pasted at OFFSET on white paper of SIZE."""
    ink = ImageOps.invert(Image.fromarray(digit).resize((224, 224), Image.Resampling.BICUBIC))
    paper = Image.new("L", size, 255)
    paper.paste(ink, offset)
    return paper


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A checkpoint of Net trained for one pass over 4,000 font digits (about 3 s)."""
    images, labels = font_digits(4000, seed=0)
    mean, std = images.float().div(255).mean().item(), images.float().div(255).std().item()
    data = to_device(images, labels, mean, std, torch.device("cpu"))
    torch.manual_seed(0)
    model = Net(dropout=0.0)
    batches = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).split(64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.02, total_steps=len(batches))
    for batch in batches:
        loss = F.nll_loss(model(data.x[batch]), data.y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_torch(path, checkpoint(model, {"dropout": 0.0},
                                normalisation={"mean": mean, "std": std}))
    return path


def test_large_png_and_jpeg_files_agree_with_the_28x28_digits(model_path, tmp_path):
    images, labels = font_digits(200, seed=1)
    model, mean, std = load_model(model_path)
    original = classify(model, images, mean, std).argmax(dim=1)
    # a model that learnt nothing would agree with itself trivially
    assert (original == labels).float().mean() >= 0.97
    for i, digit in enumerate(images.numpy()):
        paper = on_paper(digit)
        if i % 2:
            paper.save(tmp_path / f"{i:03d}.png")
        else:
            paper.convert("RGB").save(tmp_path / f"{i:03d}.jpg", quality=85)
    results = predict_files([tmp_path], load_predictor(model_path, None))
    assert [r.path for r in results] == sorted(str(p) for p in tmp_path.iterdir())
    assert all(isinstance(r, Prediction) for r in results)
    from_files = torch.tensor([r.digit for r in results])
    agreement = (from_files == original).float().mean().item()
    assert agreement >= 0.98, f"agreement {agreement:.1%}"
    for r in results:
        assert 1 >= r.probability >= r.runner_up_probability >= 0 and r.digit != r.runner_up


def test_digit_is_framed_as_mnist():
    """Longer side 20 pixels, centre of mass at (14, 14), whatever the ink colour."""
    digit = font_digits(1, seed=2)[0][0].numpy()
    dark_on_light = to_mnist(grey_levels(on_paper(digit, size=(400, 250), offset=(150, 20))))
    light_on_dark = to_mnist(grey_levels(ImageOps.invert(on_paper(digit))))
    rows, cols = np.nonzero(dark_on_light)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == 20
    mass = dark_on_light[rows, cols].astype(float)
    assert abs((rows * mass).sum() / mass.sum() - 14) <= 0.5
    assert abs((cols * mass).sum() / mass.sum() - 14) <= 0.5
    assert np.abs(dark_on_light.astype(int) - light_on_dark).max() <= 2
    # and close to the 28×28 digit it was made from
    assert np.abs(dark_on_light.astype(int) - to_mnist(digit.astype(float))).mean() < 8


@pytest.mark.parametrize("name, convert", [
    ("rgb.jpg", lambda im: im.convert("RGB")),
    ("cmyk.jpg", lambda im: im.convert("CMYK")),
    ("palette.gif", lambda im: im.convert("P")),
    ("bitonal.bmp", lambda im: im.point(lambda v: 255 if v > 128 else 0).convert("1")),
    ("grey16.png", lambda im: im.convert("I").point(lambda v: v * 257).convert("I;16")),
    ("float.tiff", lambda im: im.convert("F").point(lambda v: v / 255)),
    ("lossless.webp", lambda im: im.convert("RGB")),
    # black ink on a transparent background: transparency is laid over white
    ("transparent.png", lambda im: Image.merge("LA", (Image.new("L", im.size, 0),
                                                      ImageOps.invert(im)))),
])
def test_formats_and_modes_give_the_same_digit(tmp_path, name, convert):
    digit = font_digits(1, seed=3)[0][0].numpy()
    paper = on_paper(digit)
    reference = to_mnist(grey_levels(paper))
    path = tmp_path / name
    convert(paper).save(path, **({"lossless": True} if name.endswith(".webp") else {}))
    tolerance = 40 if name.startswith("bitonal") else 3  # the threshold moves the edges
    assert np.abs(read_digit(path).astype(int) - reference).mean() < tolerance


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"seven, in words\n", "not an image"),
])
def test_unreadable_files_say_why(tmp_path, content, reason):
    path = tmp_path / "digit.png"
    path.write_bytes(content)
    with pytest.raises(StageError, match=reason):
        read_digit(path)


@pytest.mark.parametrize("paper", [Image.new("L", (50, 40), 255),
                                   Image.new("RGB", (30, 30), "black"),
                                   Image.new("L", (50, 40), 200)])
def test_blank_images_have_no_ink(tmp_path, paper):
    path = tmp_path / "blank.jpg"
    paper.save(path)
    with pytest.raises(StageError, match="no ink"):
        read_digit(path)


def mixed_folder(tmp_path):
    """Three good digits and three bad files; returns (folder, good paths, bad paths)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = []
    for i, digit in enumerate(font_digits(3, seed=4)[0].numpy()):
        good.append(folder / f"good{i}.png")
        on_paper(digit).save(good[-1])
    bad = [folder / "notes.png", folder / "empty.jpg", folder / "white.png"]
    bad[0].write_text("not a picture\n")
    bad[1].write_bytes(b"")
    Image.new("L", (120, 90), 255).save(bad[2])
    (folder / "README.txt").write_text("ignored: not an image file name\n")
    return folder, good, bad


@pytest.mark.slow
def test_mixed_folder_predicts_the_good_and_names_each_bad_file(model_path, tmp_path):
    folder, good, bad = mixed_folder(tmp_path)
    missing, no_images = tmp_path / "missing.png", tmp_path / "no_images"
    no_images.mkdir()
    proc = run_stage("stages.predict", str(folder), str(missing), str(no_images),
                     "--model", str(model_path), "--ood", "none", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = proc.stderr.splitlines()
    expected = sorted(bad) + [missing, no_images]
    assert [line.split(": ")[1] for line in errors] == [str(p) for p in expected], proc.stderr
    assert all(line.startswith("error: ") for line in errors)
    lines = proc.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in good]


def test_a_path_that_is_neither_file_nor_folder_is_named_as_such(tmp_path):
    fifo, missing = tmp_path / "pipe.png", tmp_path / "missing.png"
    os.mkfifo(fifo)
    assert [(f.path, f.error) for f in expand_paths([fifo, missing])] == [
        (str(fifo), "not a file or a folder"), (str(missing), "no such file or folder")]


@pytest.mark.slow
def test_a_reader_that_leaves_early_ends_predict_quietly(model_path, tmp_path):
    """`python -m stages.predict folder | head -1`: no BrokenPipeError traceback."""
    folder, good, _ = mixed_folder(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "stages.predict", *map(str, good * 20),
                             "--model", str(model_path), "--ood", "none"], cwd=tmp_path,
                            env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # gone before the first answer is written
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert stderr == ""


@pytest.mark.parametrize("stdout", ["a file", "in memory"])
def test_a_broken_pipe_that_is_not_stdout_is_raised(monkeypatch, tmp_path, stdout):
    """Only stdout's reader leaving is quiet: a socket's broken pipe is a bug to see."""
    def main() -> None:
        raise BrokenPipeError("a socket's")

    if stdout == "in memory":
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO()))
    with pytest.raises(BrokenPipeError, match="a socket's"):
        run_cli(main)


def run_main(argv: list[str], monkeypatch) -> int:
    """Run predict's command line in this process; its exit status."""
    monkeypatch.setattr(sys, "argv", ["predict", *argv])
    try:
        run_cli(main)
    except SystemExit as exit:
        return exit.code
    return 0


def test_json_has_one_object_per_file(model_path, tmp_path, monkeypatch, capsys):
    folder, good, bad = mixed_folder(tmp_path)
    assert run_main(["--json", str(folder), "--model", str(model_path), "--ood", "none"],
                    monkeypatch) == 1
    out, err = capsys.readouterr()
    assert err == ""
    records = {r["path"]: r for r in map(json.loads, out.splitlines())}
    assert set(records) == {str(p) for p in good + bad}
    for path in good:
        r = records[str(path)]
        assert r["digit"] in range(10) and r["runner_up"] in range(10)
        assert 0 <= r["runner_up_probability"] <= r["probability"] <= 1
        assert r["looks_like_digit"] is None  # --ood none
    assert "not an image" in records[str(bad[0])]["error"]
    assert records[str(bad[1])]["error"] == "empty file"
    assert "no ink" in records[str(bad[2])]["error"]


def test_all_good_exits_zero(model_path, tmp_path, monkeypatch, capsys):
    folder, good, _ = mixed_folder(tmp_path)
    assert run_main([*map(str, good), "--model", str(model_path), "--ood", "none"],
                    monkeypatch) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == len(good) and err == ""


def test_results_keep_the_order_of_the_arguments(model_path, tmp_path):
    folder, good, bad = mixed_folder(tmp_path)
    results = predict_files([good[2], tmp_path / "gone", bad[1], good[0]],
                            load_predictor(model_path, None))
    assert [type(r) for r in results] == [Prediction, Failure, Failure, Prediction]
    assert [r.path for r in results] == [str(good[2]), str(tmp_path / "gone"), str(bad[1]),
                                         str(good[0])]


def test_missing_model_is_one_line_error(tmp_path, monkeypatch, capsys):
    Image.new("L", (30, 30), 255).save(tmp_path / "digit.png")
    model = tmp_path / "nowhere.pt"
    assert run_main([str(tmp_path / "digit.png"), "--model", str(model)], monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model}: checkpoint not found") and err.count("\n") == 1


# --- EXIF orientation, large images, a model loaded once --------------------------

# Each EXIF orientation value (1-8) and how a camera stores an upright image under it:
# the stored pixels are the upright ones turned or mirrored; the viewer undoes it.
STORED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
          5: lambda a: a.T, 6: lambda a: np.rot90(a, 1), 7: lambda a: np.rot90(a, 2).T,
          8: lambda a: np.rot90(a, -1)}


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_first(tmp_path, orientation, suffix):
    digit = font_digits(1, seed=6)[0][0].numpy()
    upright = np.asarray(on_paper(digit, size=(300, 220), offset=(50, 0)))
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    path = tmp_path / f"photo{suffix}"
    stored.save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    expected = to_mnist(upright.astype(float))
    # as stored, the digit is turned or mirrored: without EXIF, most would differ
    if orientation != 1:
        assert float(np.abs(to_mnist(np.asarray(stored, float)).astype(int) - expected).mean()) > 10
    difference = float(np.abs(read_digit(path).astype(int) - expected).mean())
    assert difference < 3, f"mean difference {difference:.1f} grey levels from the upright digit"


def test_an_image_over_the_pixel_limit_is_refused_naming_the_limit(tmp_path):
    from stages.predict import MAX_PIXELS

    side = int(MAX_PIXELS ** 0.5) + 1
    path = tmp_path / "huge.png"
    Image.new("1", (side, side), 1).save(path)  # a few kB on disk
    with pytest.raises(StageError, match=rf"{side}×{side}.*over the limit of {MAX_PIXELS:,} "
                                         r"pixels"):
        read_digit(path)
    # a bomb that Pillow itself refuses gets the same message
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1
    Image.new("1", (side, side), 1).save(path)
    with pytest.raises(StageError, match=rf"over the limit of {MAX_PIXELS:,} pixels"):
        read_digit(path)


PEAK_MEMORY = """
import sys
from pathlib import Path
from stages.predict import read_digit
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Linux: the peak (VmHWM) starts again from the current size
before = status("VmRSS")
digit = read_digit(Path(sys.argv[1]))
print((status("VmHWM") - before) // 1024, int(digit.astype(bool).sum()))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="measures the peak memory through Linux's /proc")
def test_a_large_image_is_read_in_little_memory(tmp_path):
    """A 6000×6000 RGB PNG of 130 kB took 1.27 GB through float64 copies."""
    digit = font_digits(1, seed=7)[0][0].numpy()
    page = Image.new("RGB", (6000, 6000), "white")
    ink = Image.fromarray(digit).resize((3000, 3000), Image.Resampling.BICUBIC)
    ink = ink.point(lambda v: 0 if v > 128 else 255)  # black ink, sharp: it compresses well
    page.paste(ink.convert("RGB"), (1500, 1000))
    path = tmp_path / "big.png"
    page.save(path)
    proc = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    grown_mb, inked = map(int, proc.stdout.split())
    assert inked > 50  # it read a digit
    # the decoded RGB image alone is 108 MB; float64 copies of it were 288 MB each
    assert grown_mb < 300, f"peak memory grew by {grown_mb} MB"


def test_predict_files_takes_a_loaded_model(model_path, tmp_path, monkeypatch):
    from stages import predict as module

    folder, good, _ = mixed_folder(tmp_path)
    loaded = module.load_predictor(model_path, ood_path=None)
    monkeypatch.setattr(module, "load_torch", lambda *a, **k: pytest.fail("reloaded"))
    first = predict_files(good, loaded)
    assert predict_files(good, loaded) == first
    assert [r.digit for r in first] == [r.digit for r in predict_files(good[::-1], loaded)][::-1]


# --- precision: the range an image's values use; NaN and infinity -----------------

def paper_values(top: float) -> np.ndarray:
    """A font digit on paper as floats from 0 (ink) to TOP (paper)."""
    return np.asarray(on_paper(font_digits(1, seed=8)[0][0].numpy()), np.float64) * top / 255


@pytest.mark.parametrize("name, top, make", [
    # a 12-bit scanner's values in a 16-bit PNG: 255/65535 made its paper 3.6 grey levels
    ("scan12.png", 920, lambda a: Image.fromarray(a.round().astype(np.uint16))),
    ("float4095.tiff", 4095, lambda a: Image.fromarray(a.astype(np.float32))),
    ("int32.tiff", 100_000, lambda a: Image.fromarray(a.round().astype(np.int32))),
    ("signed.tiff", 2, lambda a: Image.fromarray((a - 1).astype(np.float32))),  # -1 to 1
])
def test_wide_images_are_scaled_by_the_range_they_use(tmp_path, name, top, make):
    reference = to_mnist(paper_values(255))
    path = tmp_path / name
    image = make(paper_values(top))
    image.save(path)
    with Image.open(path) as saved:
        assert saved.mode == image.mode and saved.mode in ("I;16", "F", "I")
    assert np.abs(read_digit(path).astype(int) - reference).mean() < 3


@pytest.mark.parametrize("bad", [[np.nan], [np.inf], [np.nan, -np.inf, np.inf]])
def test_nan_and_infinity_are_read_as_paper_without_a_warning(tmp_path, bad):
    values = paper_values(1).astype(np.float32)
    reference = read_digit_of(Image.fromarray(values), tmp_path / "clean.tiff")
    spots = [(0, 0), (130, 150), (200, 40)]  # a corner, and two in or near the digit
    for (row, col), value in zip(spots, bad * 3):
        values[row, col] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning on stderr fails here
        digit = read_digit_of(Image.fromarray(values), tmp_path / "spots.tiff")
    assert np.abs(digit.astype(int) - reference).mean() < 1


def read_digit_of(image: Image.Image, path: Path) -> np.ndarray:
    image.save(path)
    return read_digit(path)


def test_an_image_of_nan_only_is_one_line(tmp_path):
    path = tmp_path / "nan.tiff"
    Image.fromarray(np.full((40, 30), np.nan, np.float32)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(StageError, match="^no ink: the image holds no finite values"):
            read_digit(path)


# --- large images: reduced first, then turned upright and made grey ----------------

def sheet_with_a_seven(side: int, mode: str) -> Image.Image:
    """A SIDE×SIDE sheet, transparent in mode RGBA, with a large 7 in black ink."""
    image = Image.new(mode, (side, side), (255, 255, 255, 0) if mode == "RGBA" else "white")
    ImageDraw.Draw(image).line([(side // 4, side // 4), (3 * side // 4, side // 4),
                                (side // 2, 3 * side // 4)], fill="black", width=side // 25)
    return image


def stored_with_orientation(upright: Image.Image, orientation: int, path: Path, **save):
    """UPRIGHT saved at PATH as a camera stores it under EXIF ORIENTATION."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}
    upright.transpose(undo[orientation]).save(path, exif=exif, **save)


@pytest.mark.parametrize("orientation", [5, 6, 8])
@pytest.mark.parametrize("name, mode", [("big.png", "RGBA"), ("big.jpg", "RGB"),
                                        ("palette.png", "P")])
def test_a_large_image_is_turned_upright_after_its_reduction(tmp_path, orientation, name, mode):
    upright = sheet_with_a_seven(2100, "RGB").crop((0, 0, 2100, 1700))  # reduced by 3
    if mode == "RGBA":  # the white paper made transparent
        upright.putalpha(ImageOps.invert(upright.convert("L")))
    stored_with_orientation(upright.convert(mode), orientation, tmp_path / name)
    expected = to_mnist(np.asarray(upright.convert("L").reduce(3), np.float64))
    assert np.abs(read_digit(tmp_path / name).astype(int) - expected).mean() < 2


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "P with a transparent colour", "1"])
def test_strips_give_the_image_converted_then_reduced(mode):
    from stages.predict import STRIP_ROWS, grey_of, reduced_grey

    rng = np.random.default_rng(9)
    noise = Image.fromarray(rng.integers(0, 256, (2 * STRIP_ROWS + 77, 2500, 4), np.uint8))
    image = noise.convert(mode.split()[0]) if mode != "LA" else noise.convert("L").convert("LA")
    if mode == "P with a transparent colour":
        image.info["transparency"] = 3
        assert image.has_transparency_data
    whole = grey_of(image).reduce(3)
    assert np.array_equal(np.asarray(reduced_grey(image)), np.asarray(whole))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="measures the peak memory through Linux's /proc")
def test_a_large_rgba_png_with_an_exif_orientation_is_read_in_little_memory(tmp_path):
    """A 6000×6000 RGBA PNG turned upright, and then made RGBA and grey, at full size
    took 440 MB over the process; decoding it alone takes 144 MB."""
    upright = sheet_with_a_seven(6000, "RGBA")
    path = tmp_path / "big.png"
    stored_with_orientation(upright, 6, path)
    proc = subprocess.run([sys.executable, "-c", PEAK_MEMORY + SAVE_DIGIT, str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    grown_mb, inked = map(int, proc.stdout.split())
    assert grown_mb < 300, f"peak memory grew by {grown_mb} MB"
    small = Image.new("RGBA", (1000, 1000), "white")
    small.alpha_composite(upright.reduce(6))
    expected = to_mnist(np.asarray(small.convert("L"), np.float64))
    assert inked > 50 and np.abs(np.load(path.with_suffix(".npy")).astype(int)
                                 - expected).mean() < 2


SAVE_DIGIT = """
import numpy as np
np.save(Path(sys.argv[1]).with_suffix(".npy"), digit)
"""


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
@pytest.mark.parametrize("size", [(300, 260), (2100, 1700)])  # the second is reduced
def test_16_bit_colour_is_read_with_all_its_bits(tmp_path, suffix, size):
    """Pillow reads 16-bit colour as its high bytes: a 12-bit colour scan's paper at
    920 of 65535 became 3 of 255."""
    import cv2

    paper = on_paper(font_digits(1, seed=8)[0][0].numpy(), size=size, offset=(300, 200)
                     if size[0] > 1000 else (37, 11))
    reference = to_mnist(grey_levels(paper))
    values = np.asarray(paper, np.float64)[..., None] * np.array([0.93, 0.97, 1.0]) * 920 / 255
    path = tmp_path / f"scan{suffix}"
    cv2.imwrite(str(path), values.round().astype(np.uint16))  # BGR: a warm paper
    with Image.open(path) as saved:
        assert saved.mode == "RGB" and saved.getextrema()[0][1] <= 3  # as Pillow sees it
    assert np.abs(read_digit(path).astype(int) - reference).mean() < 3


def test_16_bit_colour_with_transparency_is_laid_over_white(tmp_path):
    import cv2

    paper = on_paper(font_digits(1, seed=8)[0][0].numpy())
    reference = to_mnist(grey_levels(paper))
    pixels = np.zeros((*np.asarray(paper).shape, 4), np.uint16)  # black ink ...
    pixels[..., 3] = (255 - np.asarray(paper, np.uint16)) * 257  # ... where it is opaque
    cv2.imwrite(str(tmp_path / "ink.png"), pixels)
    assert np.abs(read_digit(tmp_path / "ink.png").astype(int) - reference).mean() < 3
