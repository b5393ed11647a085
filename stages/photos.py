"""Photos of a sheet of paper, made with numpy and Pillow: a digit, or something that is
not one, written dark on a light sheet and photographed as a phone would. The calibrate
stage fits and measures the digit check on them; the tests read them through predict.

Each photo starts as a clean sheet: paper and ink of a random grey (tinted as a lamp
tints them), the writing off-centre, 40-60 % of the frame's height. DEGRADATIONS are
what a photo can suffer on top, each alone or together:

- light: the light falls off across the sheet and a soft shadow lies over part of it;
  the paper darkens by up to MAX_SHADOW grey levels;
- noise: sensor noise, Gaussian, σ 4-8 grey levels;
- blur: out of focus, a Gaussian blur of σ 1-2 pixels;
- jpeg: saved as JPEG at quality 60-85 (else PNG);
- small: the writing a quarter of the frame's height;
- ruled: light ruled lines, or squares, printed on the paper;
- exif: stored sideways, with the EXIF orientation that turns it upright, as phones do;
- edge: the sheet does not fill the frame: the desk, darker, shows along one side.

STYLES are how the digit is written and where, one at a time, on the same layout:

- pen1, pen2, pen3: a pen's line, 1-2, 2-3 or 3-4 % of the digit's height wide (MNIST's
  strokes are 10-15 %): the digit's centre line (Zhang-Suen thinning) drawn again;
- pencil: a line 2-4 % wide, light grey (50-80 grey levels below the paper), grainy;
- desk: a small light note on a dark desk, the note from an eighth to half of the frame
  (a quarter, typically);
- board: a light, chalky digit on a dark blackboard hung on a light wall.

The same seed gives the same photo; the layout (sheet, colours, place) comes from the
seed alone, so one digit under each degradation lies at the same place on the same
sheet, and only the degradation differs.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stages.synthetic import LETTERS, font, scribble

DEGRADATIONS = {  # what a photo can suffer, in a few words
    "light": "uneven light: a fall-off and a soft shadow, up to 80 grey levels",
    "noise": "sensor noise, σ 4–8 grey levels",
    "blur": "out of focus: a blur of σ 1–2 pixels",
    "jpeg": "JPEG at quality 60–85",
    "small": "a small digit: a quarter of the frame's height",
    "ruled": "ruled or squared paper",
    "exif": "stored sideways, with an EXIF orientation",
    "edge": "the sheet's edge: the desk along one side",
}
STYLES = {  # how and where the digit is written
    "pen1": "a pen: strokes 1–2 % of the digit's height",
    "pen2": "a pen: strokes 2–3 % of the digit's height",
    "pen3": "a pen: strokes 3–4 % of the digit's height",
    "pencil": "pencil: strokes 2–4 %, 50–80 grey levels light",
    "desk": "a small note on a dark desk",
    "board": "a light digit on a blackboard, on a light wall",
}
PEN_WIDTHS = {"pen1": (0.01, 0.02), "pen2": (0.02, 0.03), "pen3": (0.03, 0.04),
              "pencil": (0.02, 0.04)}  # the line's width, as a share of the digit's height
MAX_SHADOW = 80    # grey levels the paper loses, at most, to uneven light
SIDE = 480         # the frame's shorter side, in pixels; the longer is 4/3 of it
ROTATIONS = {6: 1, 8: 3, 3: 2}  # EXIF orientation: quarter turns (np.rot90) of the stored pixels
NON_DIGITS = {  # photographed non-digits
    "blank": "a blank sheet in uneven light",
    "lined": "a ruled or squared sheet",
    "scribble": "a scribble on paper",
    "letter": "a letter on paper",
}


def _seeded(seed: list[int], part: str) -> np.random.Generator:
    """A generator for one PART of a photo (the layout, or one degradation)."""
    return np.random.default_rng([*seed, 1 + (["layout", *DEGRADATIONS, *STYLES].index(part))])


def _grid(frame: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of FRAME as float32, a column (rows, 1) and a row (1, cols)
    that broadcast against each other."""
    ys, xs = np.ogrid[0:frame[0], 0:frame[1]]
    return ys.astype(np.float32), xs.astype(np.float32)


def _placed(ink: np.ndarray, frame: tuple[int, int], height: float,
            rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Ink coverage INK (0-1, any size) scaled to HEIGHT × the frame's height (bicubic),
    at a random place inside FRAME (rows, cols): coverage of the frame, and the box it
    lies in (top, left, bottom, right)."""
    rows, cols = frame
    h = max(1, round(rows * height))
    w = max(1, min(cols - 2, round(ink.shape[1] * h / ink.shape[0])))
    scaled = Image.fromarray(ink.astype(np.float32), "F").resize((w, h), Image.Resampling.BICUBIC)
    out = np.zeros(frame, np.float32)
    top = int(rng.integers(0, rows - h + 1))
    left = int(rng.integers(0, cols - w + 1))
    out[top:top + h, left:left + w] = np.clip(np.asarray(scaled), 0, 1)
    return out, (top, left, top + h, left + w)


def _desk(frame: tuple[int, int], box: tuple[int, int, int, int],
          rng: np.random.Generator) -> np.ndarray:
    """A mask of the desk beyond the sheet's edge, slightly aslant, on the side of FRAME
    farthest from the writing in BOX, over most of the paper on that side (at most a
    fifth of the frame)."""
    rows, cols = frame
    top, left, bottom, right = box
    margins = {"top": top, "left": left, "bottom": rows - bottom, "right": cols - right}
    side = max(margins, key=margins.get)
    across = rows if side in ("top", "bottom") else cols
    depth = min(margins[side] * rng.uniform(0.5, 0.9), across / 5)
    ys, xs = _grid(frame)
    slant = math.tan(math.radians(rng.uniform(-3, 3)))
    if side in ("top", "bottom"):
        inward = ys if side == "top" else rows - 1 - ys
        return inward < depth - slant * (xs - cols / 2)
    inward = xs if side == "left" else cols - 1 - xs
    return inward < depth - slant * (ys - rows / 2)


def _lines(frame: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Coverage of ruled lines (or squares, one time in two) across FRAME, slightly
    aslant, as a notebook's: 1-3 pixels wide, every 1/16-1/8 of the frame's height."""
    rows, cols = frame
    spacing = rows / rng.uniform(8, 16)
    width = rng.uniform(1.0, 3.0)
    angle = math.radians(rng.uniform(-0.4, 0.4))
    ys, xs = _grid(frame)

    def ruling(t: np.ndarray) -> np.ndarray:
        u = (t - rng.uniform(0, spacing)) / spacing
        distance = np.abs(u - np.rint(u)) * spacing  # to the nearest line
        return np.clip(width / 2 + 0.5 - distance, 0, 1)  # 1 on the line, anti-aliased

    cover = ruling(ys * math.cos(angle) - xs * math.sin(angle))
    if rng.random() < 0.5:
        cover = np.maximum(cover, ruling(xs * math.cos(angle) + ys * math.sin(angle)))
    return cover


def _light(frame: tuple[int, int], paper: float, rng: np.random.Generator) -> np.ndarray:
    """A factor (0-1] for the light on each pixel: a linear fall-off in a random direction
    and a soft-edged shadow over part of the frame, together taking the paper down by
    up to MAX_SHADOW grey levels."""
    rows, cols = frame
    ys, xs = (v / max(frame) for v in _grid(frame))
    angle = rng.uniform(0, 2 * math.pi)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())
    angle = rng.uniform(0, 2 * math.pi)  # the shadow's edge: a line through the frame
    across = (xs - rng.uniform(0.2, 0.8) * cols / max(frame)) * math.cos(angle) \
        + (ys - rng.uniform(0.2, 0.8) * rows / max(frame)) * math.sin(angle)
    shadow = 1 / (1 + np.exp(-across / rng.uniform(0.02, 0.08)))
    drop = rng.uniform(0.5, 1.0) * MAX_SHADOW
    share = rng.uniform(0.2, 0.8)  # of the drop, the fall-off's; the shadow has the rest
    darkening = drop * (share * t + (1 - share) * shadow)
    return 1 - darkening / paper


def _thinned(mask: np.ndarray) -> np.ndarray:
    """MASK's centre line, one pixel wide (Zhang & Suen, 1984)."""
    img = np.pad(mask.astype(np.uint8), 1)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            c = img[1:-1, 1:-1]
            p2, p3, p4, p5 = img[:-2, 1:-1], img[:-2, 2:], img[1:-1, 2:], img[2:, 2:]
            p6, p7, p8, p9 = img[2:, 1:-1], img[2:, :-2], img[1:-1, :-2], img[:-2, :-2]
            ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            count = sum(ring[:8])
            turns = sum((ring[i] == 0) & (ring[i + 1] == 1) for i in range(8))
            if step == 0:
                side = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                side = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            remove = (c == 1) & (count >= 2) & (count <= 6) & (turns == 1) & side
            if remove.any():
                c[remove] = 0
                changed = True
    return img[1:-1, 1:-1].astype(bool)


def restroked(ink: np.ndarray, share: float) -> np.ndarray:
    """Ink coverage (0-1) of INK (coverage, 28×28) written again along its centre line
    with a line SHARE of the digit's height wide, on a canvas 32 times the size."""
    up = 4  # the centre line is found at 4 times the size, drawn at 8 times that
    big = Image.fromarray(ink.astype(np.float32), "F").resize(
        (ink.shape[1] * up, ink.shape[0] * up), Image.Resampling.BICUBIC)
    mask = np.asarray(big) > 0.5
    line = _thinned(mask)
    scale = 8
    rows = np.flatnonzero(mask.any(axis=1))
    width = max(1.0, share * (rows[-1] - rows[0] + 1) * scale) if len(rows) else 1.0
    canvas = Image.new("L", (mask.shape[1] * scale, mask.shape[0] * scale), 0)
    draw = ImageDraw.Draw(canvas)
    ys, xs = np.nonzero(line)
    points = set(zip(ys.tolist(), xs.tolist()))
    r = width / 2

    def at(y: int, x: int) -> tuple[float, float]:
        return (x + 0.5) * scale, (y + 0.5) * scale

    for y, x in points:
        cx, cy = at(y, x)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            if (y + dy, x + dx) in points:
                draw.line((at(y, x), at(y + dy, x + dx)), fill=255, width=max(1, round(width)))
    return np.asarray(canvas, np.float32) / 255


def _around(box: tuple[int, int, int, int], frame: tuple[int, int], margin: float,
            inset: float) -> tuple[int, int, int, int]:
    """BOX grown by MARGIN times its height on each side, inside FRAME less INSET of
    its shorter side (but never cutting into BOX)."""
    top, left, bottom, right = box
    grow = round(margin * (bottom - top))
    edge = round(inset * min(frame))
    return (max(min(top, edge), top - grow), max(min(left, edge), left - grow),
            min(max(bottom, frame[0] - edge), bottom + grow),
            min(max(right, frame[1] - edge), right + grow))


def _written(ink: np.ndarray, seed: list[int], style: str | None,
             frame: tuple[int, int], paper: float, pen: float, height: float,
             layout: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int], float]:
    """The sheet (or the scene) in STYLE, before the ink: its grey levels, the ink's
    coverage, the box the ink lies in, and the ink's grey level."""
    r = _seeded(seed, style) if style else None
    if style in PEN_WIDTHS:
        ink = restroked(ink, r.uniform(*PEN_WIDTHS[style]))
    cover, box = _placed(ink, frame, height, layout)
    if style == "pencil":
        pen = paper - r.uniform(50, 80)
        cover = cover * r.uniform(0.6, 1.0, frame).astype(np.float32)  # graphite's grain
    grey = np.full(frame, paper, np.float32)
    if style == "desk":
        top, left, bottom, right = _around(box, frame, r.uniform(0.25, 0.6), 0.0)
        note = np.zeros(frame, bool)
        note[top:bottom, left:right] = True
        grey[~note] = r.uniform(25, 90)
    if style == "board":
        top, left, bottom, right = _around(box, frame, r.uniform(0.6, 1.5), r.uniform(0.05, 0.12))
        wall, board = r.uniform(170, 230), r.uniform(30, 80)
        grey[:] = wall
        grey[top:bottom, left:right] = board
        pen = r.uniform(170, 235)  # chalk
        cover = cover * r.uniform(0.6, 1.0, frame).astype(np.float32)  # chalk's grain
    return grey, cover, box, pen


def photograph(ink: np.ndarray, seed: list[int], degradations: frozenset[str] | set[str] = frozenset(),
               style: str | None = None) -> bytes:
    """The file (JPEG or PNG bytes) of a photo of INK (coverage 0-1, any size; all zeros
    for a blank sheet) written on a sheet, with DEGRADATIONS, from SEED; written in
    STYLE (None: as the digit is, dark on the sheet)."""
    unknown = set(degradations) - set(DEGRADATIONS)
    if unknown:
        raise ValueError(f"unknown degradations: {sorted(unknown)}")
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown style: {style}")
    rng = _seeded(seed, "layout")
    frame = (SIDE, SIDE * 4 // 3) if rng.random() < 0.5 else (SIDE * 4 // 3, SIDE)
    paper, pen = rng.uniform(200, 245), rng.uniform(15, 70)
    tint = rng.uniform(0.9, 1.0, 3)  # warm light: less blue
    tint[0] = 1.0
    height = rng.uniform(0.4, 0.6)
    if "small" in degradations:
        height = 0.25
    elif style in ("desk", "board"):
        height = 0.3
    grey, cover, box, pen = _written(ink, seed, style, frame, paper, pen, height, rng)
    if "ruled" in degradations:
        r = _seeded(seed, "ruled")
        grey -= _lines(frame, r) * (paper - r.uniform(140, 190))  # printed, lighter than ink
    grey += (pen - grey) * cover
    if "edge" in degradations:
        r = _seeded(seed, "edge")
        grey[_desk(frame, box, r)] = r.uniform(30, 110)
    if "light" in degradations:
        grey *= _light(frame, paper, _seeded(seed, "light"))
    if "blur" in degradations:
        sigma = _seeded(seed, "blur").uniform(1.0, 2.0)
        blurred = Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8))
        grey = np.array(blurred.filter(ImageFilter.GaussianBlur(sigma)), np.float32)
    if "noise" in degradations:
        r = _seeded(seed, "noise")
        grey += r.uniform(4, 8) * r.standard_normal(frame, dtype=np.float32)
    grey = np.clip(grey, 0, 255).round().astype(np.uint8)
    exif = Image.Exif()
    if "exif" in degradations:
        orientation = list(ROTATIONS)[int(_seeded(seed, "exif").integers(len(ROTATIONS)))]
        grey = np.ascontiguousarray(np.rot90(grey, ROTATIONS[orientation]))
        exif[0x0112] = orientation
    image = Image.fromarray(grey, "L")
    image = Image.merge("RGB", [image.point(lambda v, t=t: v * t) for t in tint])
    buffer = io.BytesIO()
    if "jpeg" in degradations:
        quality = int(_seeded(seed, "jpeg").integers(60, 86))
        image.save(buffer, format="JPEG", quality=quality, exif=exif)
    else:
        image.save(buffer, format="PNG", compress_level=1, exif=exif)
    return buffer.getvalue()


def some_degradations(rng: np.random.Generator) -> frozenset[str]:
    """Each degradation with probability 1/2: photos to fit the check on."""
    return frozenset(d for d in DEGRADATIONS if rng.random() < 0.5)


def non_digit(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Ink coverage (0-1) of a non-digit to photograph: a blank sheet (all zeros; with
    light, a shadow on blank paper), lined paper alone (zeros too: the lines come from
    `ruled`), a scribble, or one letter that no font draws like a digit."""
    if kind in ("blank", "lined"):
        return np.zeros((28, 28), np.float32)
    if kind == "scribble":
        drawing = np.asarray(scribble(rng).convert("L"), np.float32)
    elif kind == "letter":
        letter = LETTERS[int(rng.integers(len(LETTERS)))]
        size = 96
        left, top, right, bottom = font(size).getbbox(letter)
        canvas = Image.new("L", (right - left + 8, bottom - top + 8), 0)
        ImageDraw.Draw(canvas).text((4 - left, 4 - top), letter, fill=255, font=font(size),
                                    stroke_width=int(rng.integers(1, 5)), stroke_fill=255)
        return np.asarray(canvas, np.float32) / 255
    else:
        raise ValueError(f"unknown non-digit: {kind}")
    # scribble() draws on paper of either polarity: the ink is what differs from the border
    border = np.median(np.concatenate([drawing[0], drawing[-1]]))
    cover = np.abs(drawing - border)
    return cover / max(float(cover.max()), 1.0)


def non_digit_photos(kind: str, n: int, seed: int) -> list[bytes]:
    """N photos of non-digits of KIND, from SEED, each with some degradations (lined
    paper always ruled; a blank sheet always in uneven light)."""
    number = list(NON_DIGITS).index(kind)
    rng = np.random.default_rng([seed, len(DEGRADATIONS), number])
    photos = []
    for i in range(n):
        degradations = set(some_degradations(rng))
        degradations |= {"lined": {"ruled"}, "blank": {"light"}}.get(kind, set())
        photos.append(photograph(non_digit(kind, rng), [seed, number, i],
                                 frozenset(degradations)))
    return photos


def lamp_photo(ink: np.ndarray, seed: list[int]) -> bytes:
    """Another generator, never fitted on: the photo that issue 27 describes. INK
    written dark on a light 600×600 sheet, off-centre; a desk lamp's light falling off
    from a point near the sheet by up to 70 grey levels; sensor noise of σ 6, a blur of
    1.2 pixels, and JPEG at quality 80."""
    rng = np.random.default_rng([*seed, 99])
    side, paper, pen = 600, rng.uniform(215, 240), rng.uniform(20, 60)
    height = rng.uniform(0.3, 0.5)
    cover, _ = _placed(ink, (side, side), height, rng)
    grey = paper + (pen - paper) * cover
    ys, xs = _grid((side, side))
    lamp = rng.uniform(-0.5, 1.5, 2) * side  # where the light is brightest
    falloff = np.hypot(ys - lamp[0], xs - lamp[1])
    grey -= 70 * (falloff / falloff.max()) * paper / 255
    blurred = Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8))
    grey = np.array(blurred.filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    grey += 6 * rng.standard_normal((side, side), dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8)).save(buffer, format="JPEG",
                                                                        quality=80)
    return buffer.getvalue()
