"""Images made with numpy and Pillow, to fit and measure the digit check
(stages/ood.py, stages/calibrate.py): things that are not digits, digits typed in
Pillow's font, and MNIST digits drawn again with a round pen, as on the page.

KINDS maps each kind of non-digit to a function that draws one image from a numpy
Generator. The same seed gives the same images; fitting and measuring use other
seeds. Sizes, colours and modes vary as a user's files would: 8-bit grey and colour,
16-bit grey, dark on light and light on dark.

Letters that are drawn like digits in common fonts (O o D Q I l i j J S s Z z B b G g
q T t A) are left out: a model of digits may rightly read them as digits.
"""

from __future__ import annotations

import functools
import math
import string
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LOOKALIKES = set("OoDQIlijJSsZzBbGgqTtA")
LETTERS = "".join(c for c in string.ascii_letters if c not in LOOKALIKES)


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at SIZE pixels: the same on every machine."""
    return ImageFont.load_default(size)


def _size(rng: np.random.Generator, low: int = 28, high: int = 400) -> tuple[int, int]:
    w = int(rng.integers(low, high + 1))
    return w, max(low, int(w * rng.uniform(0.6, 1.6)))


def _ink_and_paper(rng: np.random.Generator) -> tuple[int, int]:
    """A dark and a light grey level, in either order (ink, paper)."""
    dark, light = int(rng.integers(0, 80)), int(rng.integers(170, 256))
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def _colour(rng: np.random.Generator) -> Image.Image | None:
    """None, or an RGB tint to multiply a grey image by."""
    return None if rng.random() < 0.6 else tuple(int(v) for v in rng.integers(120, 256, 3))


def _finish(grey: Image.Image, rng: np.random.Generator) -> Image.Image:
    """GREY (mode L) as it is, or tinted to RGB."""
    tint = _colour(rng)
    if tint is None:
        return grey
    return Image.merge("RGB", [grey.point(lambda v, t=t: v * t // 255) for t in tint])


def noise(rng: np.random.Generator) -> Image.Image:
    """Uniform or Gaussian noise: grey, colour, or 16-bit grey."""
    w, h = _size(rng, 16, 300)
    form = rng.integers(0, 4)
    if form == 0:  # 16-bit grey, as a scanner or camera writes it
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # I;16
    if form == 1:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    sigma = rng.uniform(20, 90)
    grey = np.clip(rng.normal(rng.uniform(60, 200), sigma, (h, w)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L")


def solid(rng: np.random.Generator) -> Image.Image:
    """One colour over the whole image, with faint noise as a photo of paper has."""
    w, h = _size(rng)
    level = rng.uniform(0, 255)
    grey = np.clip(level + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8)
    return _finish(Image.fromarray(grey, "L"), rng)


def gradient(rng: np.random.Generator) -> Image.Image:
    """A linear gradient at any angle, or a radial one, between two grey levels."""
    w, h = _size(rng)
    ys, xs = np.mgrid[0:h, 0:w] / max(w, h)
    if rng.random() < 0.6:
        angle = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
    else:
        cx, cy = rng.uniform(0, w / max(w, h)), rng.uniform(0, h / max(w, h))
        t = np.hypot(xs - cx, ys - cy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    a, b = _ink_and_paper(rng)
    return _finish(Image.fromarray((a + (b - a) * t).astype(np.uint8), "L"), rng)


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    n = int(rng.integers(3, 9))
    star = rng.random() < 0.3
    points = []
    for i in range(n * (2 if star else 1)):
        radius = r * (0.45 if star and i % 2 else 1.0) * rng.uniform(0.8, 1.0)
        angle = 2 * math.pi * i / (n * (2 if star else 1))
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def shapes(rng: np.random.Generator) -> Image.Image:
    """Filled rectangles, ellipses, polygons and stars, one to six of them."""
    w, h = _size(rng, 40, 400)
    ink, paper = _ink_and_paper(rng)
    image = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 7))):
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        r = rng.uniform(0.1, 0.4) * min(w, h)
        form = rng.integers(0, 3)
        if form == 0:
            rw, rh = r * rng.uniform(0.5, 1.0), r * rng.uniform(0.5, 1.0)
            draw.rectangle((cx - rw, cy - rh, cx + rw, cy + rh), fill=ink)
        elif form == 1:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r,
                          cy + r * rng.uniform(0.5, 1.0)), fill=ink)
        else:
            draw.polygon(_polygon(rng, cx, cy, r), fill=ink)
    return _finish(image, rng)


def _text(rng: np.random.Generator, text: str) -> Image.Image:
    size = int(rng.integers(16, 120))
    ink, paper = _ink_and_paper(rng)
    left, top, right, bottom = font(size).getbbox(text)
    margin = int(rng.integers(2, size))
    image = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), paper)
    ImageDraw.Draw(image).text((margin - left, margin - top), text, fill=ink, font=font(size),
                               stroke_width=int(rng.integers(0, 1 + size // 16)),
                               stroke_fill=ink)
    if rng.random() < 0.5:
        image = image.rotate(rng.uniform(-20, 20), Image.Resampling.BILINEAR, expand=True,
                             fillcolor=paper)
    return _finish(image, rng)


def letter(rng: np.random.Generator) -> Image.Image:
    """One letter in Pillow's font (digit look-alikes left out)."""
    return _text(rng, LETTERS[int(rng.integers(len(LETTERS)))])


def word(rng: np.random.Generator) -> Image.Image:
    """Two to eight letters, any letters, in Pillow's font."""
    n = int(rng.integers(2, 9))
    return _text(rng, "".join(rng.choice(list(string.ascii_letters), n)))


def texture(rng: np.random.Generator) -> Image.Image:
    """Stripes, a checkerboard, dots, or smooth blotches."""
    w, h = _size(rng, 40, 400)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    period = rng.uniform(4, max(w, h) / 4)
    form = rng.integers(0, 4)
    if form == 0:
        angle = rng.uniform(0, math.pi)
        t = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period) > 0
    elif form == 1:
        t = ((xs // period).astype(int) + (ys // period).astype(int)) % 2 == 1
    elif form == 2:
        t = np.hypot((xs % period) - period / 2, (ys % period) - period / 2) < period / 4
    else:
        coarse = rng.random((int(rng.integers(3, 12)), int(rng.integers(3, 12))))
        smooth = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h),
                                                                         Image.Resampling.BICUBIC)
        t = np.asarray(smooth) > 128
    ink, paper = _ink_and_paper(rng)
    grey = np.where(t, ink, paper).astype(np.uint8)
    image = Image.fromarray(grey, "L").filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))
    return _finish(image, rng)


def scribble(rng: np.random.Generator) -> Image.Image:
    """A pen going back and forth many times: a crossed-out patch."""
    w, h = _size(rng, 60, 400)
    ink, paper = _ink_and_paper(rng)
    image = Image.new("L", (w, h), paper)
    n = int(rng.integers(12, 40))
    xs = rng.uniform(0.1, 0.9, n) * w
    ys = np.sort(rng.uniform(0.1, 0.9, n)) * h if rng.random() < 0.5 else rng.uniform(0.1, 0.9, n) * h
    width = max(1, int(min(w, h) * rng.uniform(0.01, 0.05)))
    ImageDraw.Draw(image).line(list(zip(xs.tolist(), ys.tolist())), fill=ink, width=width,
                               joint="curve")
    return _finish(image, rng)


KINDS: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "noise": noise,
    "solid": solid,
    "gradient": gradient,
    "shapes": shapes,
    "letters": letter,
    "words": word,
    "textures": texture,
    "scribbles": scribble,
}


def make(kind: str, n: int, seed: int) -> list[Image.Image]:
    """N images of KIND from SEED; another seed gives other images."""
    rng = np.random.default_rng([seed, list(KINDS).index(kind)])
    return [KINDS[kind](rng) for _ in range(n)]


def typed_digits(n: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """N digits typed in Pillow's font, drawn as the letters are, and their labels."""
    rng = np.random.default_rng([seed, len(KINDS)])
    labels = [int(v) for v in rng.integers(0, 10, n)]
    return [_text(rng, str(label)) for label in labels], labels


# --- MNIST digits drawn with a pen, stroke by stroke -------------------------------

PEN_LEVEL = 128  # a pixel of an MNIST digit brighter than this is traced
Stroke = list[tuple[float, float]]  # the points a pen passes through, down all the way


def pen_strokes(digit: np.ndarray, level: int = PEN_LEVEL) -> list[Stroke]:
    """Strokes that trace DIGIT (28×28, white on black) as a hand fills a shape: each run
    of pixels over LEVEL in a row is gone over from the centre of its first pixel to that
    of its last, and a run that overlaps one in the row above carries on that stroke,
    back the other way. Points are (x, y) in pixels of the digit."""
    strokes: list[Stroke] = []
    open_runs: list[tuple[int, int, Stroke]] = []  # the last row's runs and their strokes
    for row, values in enumerate(np.asarray(digit) > level):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], values.astype(np.int8), [0]])))
        runs, taken = [], set()
        for first, end in zip(edges[::2].tolist(), edges[1::2].tolist()):
            y = row + 0.5
            above = next((i for i, (a, b, _) in enumerate(open_runs)
                          if a < end and first < b and i not in taken), None)
            if above is None:
                stroke = [(first + 0.5, y), (end - 0.5, y)]
                strokes.append(stroke)
            else:
                taken.add(above)
                stroke = open_runs[above][2]
                forward = stroke[-1][0] <= stroke[-2][0]  # the last pass went right to left
                ends = [(first + 0.5, y), (end - 0.5, y)]
                stroke += ends if forward else ends[::-1]
            runs.append((first, end, stroke))
        open_runs = runs
    return strokes


def drawn(strokes: list[Stroke], scale: float, width: float, side: int) -> Image.Image:
    """STROKES drawn in black on a white SIDE×SIDE canvas, SCALE canvas pixels to a digit
    pixel, with a round pen WIDTH pixels wide, as the page's canvas draws them."""
    image = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(image)
    r = width / 2
    for stroke in strokes:
        points = [(x * scale, y * scale) for x, y in stroke]
        draw.line(points, fill=0, width=round(width), joint="curve")
        for x, y in points:  # round caps and joints
            draw.ellipse((x - r, y - r, x + r, y + r), fill=0)
    return image
