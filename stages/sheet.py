"""Find the digit on a sheet: grey levels of any size in, a 28×28 MNIST-style digit out.

stages/predict.py's read_digit calls it, for predict, the page (stages/serve.py) and
the digit check's calibration alike. The image steps are OpenCV's (its headless
build), one call each into compiled code. docs/use.md#photos-of-a-digit-on-paper has
them in words:

1. Paper up: light where the border and most of the image are, unless, on a copy
   about POLARITY pixels a side, the other way up finds strokes that lie on a patch
   that this way finds (a light note on a dark desk, a dark board on a light wall;
   a note that the frame cuts goes on beyond it), or this way finds no ink at all.
2. The paper's own level at each pixel: a morphological closing (a max, then a min,
   over a square CLOSING of the shorter side) of a copy reduced to about COARSE pixels
   a side, enlarged again; nowhere darker than FLOOR of its lightest level.
3. Ink: how much darker than its paper a pixel is, as a share of the paper's level.
   Nothing MIN_CONTRAST grey levels darker: blank, unless a thin line (a pen's or a
   pencil's, which the smoothing fades) is, and half that over LONG of the image.
4. Ruled paper: LINES or more thin lines across the sheet are taken out of what the
   thresholds see.
5. The digit: Otsu's threshold marks sure ink, a lower one above the paper's noise the
   rest (hysteresis); pieces along half a side or more (the sheet's edge) are dropped,
   unless along one side only, across half the image and thin (a cropped 7's bar);
   ink within JOIN stroke widths is one piece; the piece with the most ink, and the
   pieces near it with a share of its ink, are the digit.
6. Strokes thinner than MNIST's (STROKE of the digit's height) are widened to it.
7. As MNIST's digits were made: cropped to the ink, the longer side scaled to 20
   pixels (Lanczos), placed in a 28×28 frame with its centre of mass at (14, 14).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stages.common import StageError


def _opencv():
    """cv2, imported without the change that its loader makes to LD_LIBRARY_PATH (for
    child processes only): importing a stage leaves the process's environment as it was."""
    before = os.environ.get("LD_LIBRARY_PATH")
    import cv2

    if before is None:
        os.environ.pop("LD_LIBRARY_PATH", None)
    else:
        os.environ["LD_LIBRARY_PATH"] = before
    return cv2


cv2 = _opencv()

SIDE = 28          # the frame
BOX = 20           # the longer side of the digit in the frame
CENTRE = 14        # where MNIST's centre of mass lies (row and column index), on average
MIN_CONTRAST = 32  # grey levels between the paper and the darkest ink; less is blank
CROP_LEVEL = 26    # of 255: fainter traces of the digit's ink are dropped (10 %)
COARSE = 64        # pixels a side of the reduced image that the paper's level is read on
CLOSING = 1 / 3    # the closing's square, as a share of the shorter side
FLOOR = 1 / 2      # the paper is nowhere darker than this share of its lightest level
LINE = 1 / 4       # a ruled line's test length, as a share of the image's width (height)
THIN = 1 / 50      # a ruled line is thinner than this share of the image's height (width)
LINE_LEVEL = 0.04  # a line is at least this share of the darkest ink
LINE_CAP = 1.5     # a line takes out at most this many times the lines' median level
LINES = 3          # lines that run across the sheet: so many make it ruled paper
ACROSS = 1 / 2     # a line runs across the sheet over this share of its width at least
WANDER = 7         # pixels across that a slanted line may wander over and still be one
NOISE_SIGMAS = 4   # the lower threshold is at least this many noise σ above the paper
NEAR = 1 / 2       # a second piece of the digit lies within this share of the first's size
SHARE = 0.005      # and holds at least this share of its ink
ALONG = 1 / 2      # a piece along this share of a side, or more, is the sheet's edge,
THIN_STROKE = 0.15  # unless along one side only, across half the image, and this thin
                    # (the radius of the largest disc inside it over its longer side)
EDGE_WEIGHT = 0.3  # a piece touching the image's edge counts this much of its ink
SAMPLE = 128       # pixels a side, at least, that medians are taken over
STROKE = 0.11      # MNIST's stroke width, as a share of the digit's height (its median)
JOIN = 1.5         # ink within this many stroke widths of other ink is one piece with it,
JOIN_MAX = 1 / 100  # but no farther than this share of the shorter side (a ruled line's
                    # remnant stays apart from a thick digit)
POLARITY = 256     # pixels a side, about, of the copy that paper and ink are told on
PATCH = 0.2        # ink this thick for its size (the radius of the largest disc inside it
                   # over its longer side) may be a patch: a note, a board
RING = 13          # pixels across the ring around strokes (less the 2 next to them)
ON = 1 / 2         # the strokes lie on a patch where it is this share of their ring
BLUR = 1 / 480     # σ of the smoothing that thresholds see, as a share of the shorter side
FINE = 0.7         # σ (pixels) of the smoothing where that one leaves no ink: a thin line
LONG = 1 / 10      # is ink there if it runs over this share of the shorter side


def paper_level(paper: np.ndarray, closing: float = CLOSING) -> np.ndarray:
    """The paper's grey level at each pixel of PAPER (light paper, dark ink): the closing
    (over a square CLOSING of the shorter side) of a reduced copy, enlarged again
    (bilinear)."""
    rows, cols = paper.shape
    factor = max(1, min(rows, cols) // COARSE)
    small = cv2.resize(paper, (-(-cols // factor), -(-rows // factor)),
                       interpolation=cv2.INTER_AREA) if factor > 1 else paper
    k = 2 * round(min(small.shape) * closing / 2) + 1
    closed = cv2.morphologyEx(small, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    # a patch of ink wider than the square is not paper: no shadow is that dark
    closed = np.maximum(closed, FLOOR * closed.max())
    return cv2.resize(closed, (cols, rows), interpolation=cv2.INTER_LINEAR) if factor > 1 \
        else closed


def _bar(length: int, width: int, horizontal: bool) -> np.ndarray:
    """A rectangle of ones LENGTH long and WIDTH wide, along rows or along columns."""
    return np.ones((width, length) if horizontal else (length, width), np.uint8)


def ruled_lines(ink: np.ndarray) -> np.ndarray | None:
    """The ink of ruled lines (or squares) that run across the sheet, capped at the
    lines' own level (a digit's straight bar along a line keeps the rest of its ink),
    or None where fewer than LINES lines do in either direction."""
    def across(opened: np.ndarray, axis: int, horizontal: bool) -> bool:
        """Whether LINES or more lines in OPENED run across the sheet. A slanted line
        wanders over a few rows: together they hold it across."""
        present = (opened > LINE_LEVEL * ink.max()).astype(np.uint8)
        band = cv2.dilate(present, _bar(1, WANDER, horizontal)).mean(axis=axis) >= ACROSS
        return np.count_nonzero(np.diff(band.astype(np.int8), prepend=0) == 1) >= LINES

    found = []
    for axis, horizontal in ((1, True), (0, False)):
        length = max(3, round(ink.shape[axis] * LINE))
        opened = cv2.morphologyEx(ink, cv2.MORPH_OPEN, _bar(length, 1, horizontal))
        if not across(opened, axis, horizontal):  # no lines, thin or thick: most images
            continue
        # long and thin: what a bar THICK wide also holds is a stroke, not a line
        thick = max(2, round(ink.shape[1 - axis] * THIN))
        opened -= cv2.morphologyEx(ink, cv2.MORPH_OPEN, _bar(length, thick, horizontal))
        if across(opened, axis, horizontal):
            level = np.median(opened[opened > LINE_LEVEL * ink.max()])
            found.append(np.minimum(opened, LINE_CAP * level))
    return np.maximum.reduce(found) if found else None


def otsu(values: np.ndarray, top: float) -> float:
    """Otsu's threshold of VALUES (0..TOP), in their units."""
    levels = np.clip(values * (255 / top), 0, 255).astype(np.uint8)
    level, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return level * top / 255


@dataclass(frozen=True)
class Pieces:
    """The connected pieces (8-connected) of a mask: a label per pixel (0: none), and
    per label its box, its ink (none counted for label 0), and whether it touches the
    image's edge."""

    labels: np.ndarray
    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    h: np.ndarray
    mass: np.ndarray
    edge: np.ndarray

    @classmethod
    def of(cls, ink: np.ndarray, mask: np.ndarray, join: int = 0) -> Pieces:
        """The pieces of MASK; with JOIN, ink within JOIN pixels of other ink joins its
        piece."""
        mask = mask.astype(np.uint8)
        joined = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (join, join))) \
            if join > 1 else mask
        count, labels, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
        if join > 1:
            labels = labels * mask
        x, y, w, h = (stats[:, i] for i in range(4))
        rows, cols = mask.shape
        edge = (x == 0) | (y == 0) | (x + w == cols) | (y + h == rows)
        edge[0] = False
        on = np.flatnonzero(mask)  # ink is summed where the mask is: a small share of pixels
        mass = np.bincount(labels.ravel()[on], weights=ink.ravel()[on], minlength=count)
        return cls(labels, x, y, w, h, mass, edge)

    def frame_like(self) -> np.ndarray:
        """Pieces that lie along half of one of the image's sides or more: the sheet's
        edge and the desk beyond it, a shadow at the border (a digit that runs into the
        side touches it with a stroke's end)."""
        sides = (self.labels[0], self.labels[-1], self.labels[:, 0], self.labels[:, -1])
        along = np.array([np.bincount(side, minlength=len(self.mass)) / len(side)
                          for side in sides]) >= ALONG
        along[:, 0] = False  # the paper
        rows, cols = self.labels.shape
        # how far each piece reaches in from the top, bottom, left and right sides
        reach = np.array([(self.y + self.h) / rows, (rows - self.y) / rows,
                          (self.x + self.w) / cols, (cols - self.x) / cols])
        # along one side only and across half the image: a digit's stroke (a tightly
        # cropped 7's bar), not the sheet's edge
        stroke = (along.sum(axis=0) == 1) & (np.where(along, reach, 0).max(axis=0) >= ALONG)
        for label in np.flatnonzero(stroke):  # and thin for its size: not a desk
            box = (slice(self.y[label], self.y[label] + self.h[label]),
                   slice(self.x[label], self.x[label] + self.w[label]))
            piece = np.pad((self.labels[box] == label).astype(np.uint8), 1)
            radius = float(cv2.distanceTransform(piece, cv2.DIST_L2, 3).max())
            stroke[label] = radius < THIN_STROKE * max(self.w[label], self.h[label])
        return along.any(axis=0) & ~stroke


def stroke_width(mask: np.ndarray) -> float:
    """The typical width of MASK's strokes, in pixels: twice the distance from their
    centre line (the ridge of the distance transform) to the nearest pixel outside."""
    if not mask.any():
        return 1.0
    dt = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    ridge = (dt > 0) & (dt >= cv2.dilate(dt, np.ones((3, 3), np.uint8)))
    return max(1.0, 2 * float(np.median(dt[ridge])) - 1)


def widened(digit: np.ndarray) -> np.ndarray:
    """DIGIT (0-255, white on black) with strokes thinner than MNIST's (STROKE of its
    height) widened to them: a grey dilation by the difference. A pen's line 1-4 % of
    the height would otherwise shrink to a faint trace a pixel wide in 20 pixels."""
    rows = np.flatnonzero(digit.any(axis=1))
    cols = np.flatnonzero(digit.any(axis=0))
    height = rows[-1] - rows[0] + 1
    grow = round(STROKE * height - stroke_width(digit >= 128))
    if grow < 2:
        return digit
    pad = grow
    top, left = max(0, rows[0] - pad), max(0, cols[0] - pad)
    part = digit[top:rows[-1] + 1 + pad, left:cols[-1] + 1 + pad]
    out = np.zeros_like(digit)
    out[top:top + part.shape[0], left:left + part.shape[1]] = cv2.dilate(
        part, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (grow | 1, grow | 1)))
    return out


def patch_thickness(mask: np.ndarray, longer: int) -> float:
    """How thick MASK (uint8, 0/1), whose box's longer side is LONGER, is for its size:
    the radius of the largest disc inside it over LONGER. Where it reaches one or two
    sides of the frame (a note that the frame cuts goes on beyond it), the frame does not
    bound the disc; where it reaches three or four (a shadow, the desk around a sheet),
    it does."""
    sides = sum(bool(side.any()) for side in (mask[0], mask[-1], mask[:, 0], mask[:, -1]))
    bounded = np.pad(mask, 1) if sides >= 3 else mask
    radius = float(cv2.distanceTransform(bounded, cv2.DIST_L2, 3).max())
    return min(radius, longer) / longer


@dataclass(frozen=True)
class Candidate:
    """The main piece of ink on a small copy of the image, one way up: a mask of it,
    and how thick it is for its size: the radius of the largest disc inside it (a
    patch's), or half its stroke width (strokes'), over its longer side."""

    mask: np.ndarray
    thickness: float
    edge: bool  # it touches the image's edge

    @classmethod
    def of(cls, paper: np.ndarray, closing: float, patch: bool) -> Candidate | None:
        """The main piece of ink in PAPER (light paper, dark ink) on the paper level of a
        CLOSING, the sheet's edge too for a PATCH; None: no ink."""
        level = paper_level(paper, closing)
        darker = np.clip(level - paper, 0, None)
        top = float(darker.max())
        if top < MIN_CONTRAST:
            return None
        p = Pieces.of(darker, darker > max(otsu(darker, top), CROP_LEVEL / 255 * top))
        if patch:  # a note may reach the image's edge
            inside = np.ones(len(p.mass), bool)
        else:  # writing clear of the edge first, as a strip of desk is not
            inside = ~p.frame_like()
            clear = inside & ~p.edge
            clear[0] = False
            inside = clear if clear.any() else inside
        inside[0] = False
        if not inside.any():
            return None
        main = int(np.argmax(np.where(inside, p.mass, 0)))
        mask = (p.labels == main).astype(np.uint8)
        longer = int(max(p.w[main], p.h[main]))
        if patch:
            thickness = patch_thickness(mask, longer)
        else:  # a blot where strokes meet does not make them thick
            thickness = stroke_width(mask) / 2 / longer
        return cls(mask.astype(bool), thickness, bool(p.edge[main]))


def border_level(grey: np.ndarray) -> float:
    """The median grey level of GREY's border."""
    return float(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))


def light_around(grey: np.ndarray) -> bool:
    """Whether the border or most of GREY is light."""
    step = max(1, min(grey.shape) // SAMPLE)
    return border_level(grey) >= 128 or bool(np.median(grey[::step, ::step]) >= 128)


def light_paper(grey: np.ndarray, around: bool) -> bool:
    """Whether the paper is light (dark ink) in GREY, told from the ink and what lies
    around it. Light where AROUND says (light_around(GREY): a desk along a sheet's
    border, a scribble over most of the paper leave it light), unless the other
    way up finds strokes that lie on what this way finds as a patch of ink (a light
    note on a dark desk, a dark board on a light wall), or this way finds none."""
    factor = max(1, min(grey.shape) // POLARITY)
    small = cv2.resize(grey, (-(-grey.shape[1] // factor), -(-grey.shape[0] // factor)),
                       interpolation=cv2.INTER_AREA) if factor > 1 else grey
    # the patch: darker than the lightest paper anywhere; the strokes: than their paper
    other = 255 - small if around else small
    patch = Candidate.of(small if around else 255 - small, 1.0, patch=True)
    strokes = Candidate.of(other, CLOSING, patch=False)
    if strokes is None or strokes.thickness >= THIN_STROKE or strokes.edge:
        return around  # (paper between ruled lines runs to the edge)
    if patch is None:
        return not around
    # what lies around the strokes: mostly the patch (a note's paper, the board), and
    # lighter than they are; not the same paper (that a bold digit's bend holds)
    near = strokes.mask.astype(np.uint8)
    ring = cv2.dilate(near, np.ones((RING, RING), np.uint8)) \
        > cv2.dilate(near, np.ones((5, 5), np.uint8))
    if not ring.any():  # strokes all over the copy
        return around
    contrast = np.median(other[ring]) - np.median(other[strokes.mask])
    rows, cols = np.nonzero(strokes.mask)
    box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    if (patch.thickness >= PATCH and patch.mask[ring].mean() >= ON and contrast >= MIN_CONTRAST
            and patch.mask.sum() >= 2 * box):
        return not around
    return around


def paper_noise(sample: np.ndarray) -> float:
    """The lower threshold above the paper's noise in SAMPLE: NOISE_SIGMAS σ, from the
    median absolute deviation (robust to the ink in it)."""
    spread = np.median(np.abs(sample - np.median(sample))) if sample.size else 0.0
    return NOISE_SIGMAS * 1.4826 * float(spread)


def digit_pieces(ink: np.ndarray, sure: np.ndarray, low: float) -> np.ndarray:
    """A mask of the digit: of the pieces of INK over LOW that hold SURE ink, the one
    with the most ink (one along the edge counts for less), and those near it that hold
    a share of its ink."""
    width = stroke_width(sure)
    p = Pieces.of(ink, ink > low, join=round(min(JOIN * width, JOIN_MAX * min(ink.shape))) | 1)
    seeded = np.zeros(len(p.mass), bool)
    seeded[np.unique(p.labels[sure])] = True
    seeded[0] = False  # the paper
    if not seeded.any():
        return np.zeros(ink.shape, bool)
    main = int(np.argmax(np.where(seeded, p.mass * np.where(p.edge, EDGE_WEIGHT, 1.0), -1.0)))
    reach = NEAR * max(p.w[main], p.h[main])
    near = ((p.x + p.w >= p.x[main] - reach) & (p.x <= p.x[main] + p.w[main] + reach)
            & (p.y + p.h >= p.y[main] - reach) & (p.y <= p.y[main] + p.h[main] + reach))
    keep = seeded & near & (p.mass >= SHARE * p.mass[main])
    keep[main] = True
    return keep[p.labels]


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """A 28×28 uint8 digit, white ink on black, from grey levels of any size."""
    grey = np.asarray(grey, np.float32)
    step = max(1, min(grey.shape) // SAMPLE)  # medians of a sample of pixels are as good
    around = light_around(grey)
    light = light_paper(grey, around)
    # paper told from around the ink, against the border or most of the image: a desk
    # or a wall beyond it (a note over half of the frame leaves only the border dark,
    # clearly darker than the middle grey that noise gives)
    beyond_paper = (light != around
                    or (light and border_level(grey) < 128 - MIN_CONTRAST))
    paper = grey if light else 255 - grey
    level = paper_level(paper)
    darker = np.clip(level - paper, 0, None)
    sigma = min(paper.shape) * BLUR
    smooth = cv2.GaussianBlur(darker, (0, 0), sigma) if sigma >= 0.5 else darker
    thin = bool(smooth.max() < MIN_CONTRAST)
    if thin:  # blank, or a line too thin for the smoothing
        smooth = cv2.GaussianBlur(darker, (0, 0), FINE)
        p = Pieces.of(smooth, smooth >= MIN_CONTRAST / 2)  # a grainy line holds together
        strong = np.unique(p.labels[smooth >= MIN_CONTRAST])
        strong = strong[strong > 0]
        if not (np.maximum(p.w, p.h)[strong] >= LONG * min(grey.shape)).any():
            raise StageError("no ink: the image is blank or nearly so")
    ink, smooth = darker / level, smooth / level  # shares of the paper's level
    lines = ruled_lines(smooth)
    if lines is not None:  # out of what the thresholds see; the digit keeps its own ink
        smooth = np.clip(smooth - lines, 0, None)
    sample = smooth[::step, ::step]
    # the paper's noise, from the whole sample; from the paper's side of Otsu's threshold
    # only for a thin line that only the finer smoothing finds (a light pencil line), and
    # where a desk or a wall lies beyond the paper
    if (thin or beyond_paper) and sample.max() > 0:
        sample = sample[sample <= otsu(sample, float(sample.max()))]
    noise = paper_noise(sample)
    faint = smooth > max(CROP_LEVEL / 255 * float(smooth.max()), noise)
    frame = Pieces.of(smooth, faint)
    beyond = frame.frame_like()[frame.labels]
    if (faint & ~beyond).any():  # the sheet's edge, unless it is all there is
        smooth = np.where(beyond, 0, smooth)
    if (smooth * level).max() < MIN_CONTRAST:  # nothing but ruled lines
        raise StageError("no ink: the image is blank or nearly so")
    top = float(smooth.max())
    sure = smooth > max(otsu(smooth, top), CROP_LEVEL / 255 * top)
    mask = digit_pieces(smooth, sure, max(CROP_LEVEL / 255 * top, noise))
    full = float(np.percentile(ink[mask & sure], 95)) if (mask & sure).any() else top
    digit = np.clip(np.where(mask, ink, 0) * (255 / max(full, 1e-6)), 0, 255)
    digit[digit < CROP_LEVEL] = 0
    if not digit.any():
        raise StageError("no ink: the image is blank or nearly so")
    return framed(widened(digit))


def framed(ink: np.ndarray) -> np.ndarray:
    """INK (0-255, white on black) cropped to itself, its longer side scaled to BOX
    pixels, and pasted into a SIDE×SIDE frame with its centre of mass at CENTRE."""
    digit = Image.fromarray(ink.round().astype(np.uint8))
    digit = digit.crop(digit.getbbox())
    scale = BOX / max(digit.size)
    digit = digit.resize((max(1, round(digit.width * scale)), max(1, round(digit.height * scale))),
                         Image.Resampling.LANCZOS)
    mass = np.asarray(digit, dtype=np.float64)
    if not mass.any():  # a trace too faint to survive the scaling
        raise StageError("no ink: the image is blank or nearly so")
    rows, cols = np.indices(mass.shape)
    centre_row = (rows * mass).sum() / mass.sum()
    centre_col = (cols * mass).sum() / mass.sum()
    frame = Image.new("L", (SIDE, SIDE))
    frame.paste(digit, (round(CENTRE - centre_col), round(CENTRE - centre_row)))
    return np.array(frame)  # a writable copy

