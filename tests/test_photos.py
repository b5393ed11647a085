"""Photos of digits on paper (stages/photos.py), read as predict reads a file
(stages/sheet.py): MNIST test digits photographed under each degradation alone and all
together, read by a model trained here on real MNIST digits, with its digit check."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from stages import calibrate
from stages.calibrate import Reader, framed, photo_set, read_files, worker_pool
from stages.common import StageError
from stages.photos import (DEGRADATIONS, NON_DIGITS, STYLES, non_digit_photos, photograph,
                           restroked)
from stages.sheet import stroke_width
from stages.predict import load_model, read_digit

SETS = [*DEGRADATIONS, "all"]
N_SAME = 16     # digits whose photos are compared with the clean photo's digit
N_READ = 100    # digits whose photos the model reads
SEED = 5


def degradations(name: str) -> frozenset[str]:
    return frozenset(DEGRADATIONS) if name == "all" else frozenset([name])


def test_photos_are_the_same_for_a_seed_and_share_their_sheet():
    ink = np.zeros((28, 28))
    ink[6:22, 12:16] = 1
    assert photograph(ink, [1, 2], {"noise"}) == photograph(ink, [1, 2], {"noise"})
    assert photograph(ink, [1, 2], {"noise"}) != photograph(ink, [1, 3], {"noise"})
    clean = np.asarray(Image.open(io.BytesIO(photograph(ink, [1, 2]))).convert("L"), float)
    shaded = np.asarray(Image.open(io.BytesIO(photograph(ink, [1, 2], {"light"}))).convert("L"),
                        float)
    assert clean.shape == shaded.shape
    # the same sheet, only darker: the ink where it was, and the paper at most 80 darker
    assert 0 <= (clean - shaded).max() <= 81 and np.argmin(clean) == np.argmin(shaded)
    with pytest.raises(ValueError, match="unknown degradations"):
        photograph(ink, [1], {"rain"})


def test_a_style_keeps_the_layout_and_writes_the_digit_its_way():
    ink = np.zeros((28, 28))
    ink[6:22, 11:17] = 1
    grey = {style: np.asarray(Image.open(io.BytesIO(photograph(ink, [1, 2], style=style)))
                              .convert("L"), float) for style in [None, *STYLES]}
    assert all(g.shape == grey[None].shape for g in grey.values())
    assert photograph(ink, [1, 2], style="desk") == photograph(ink, [1, 2], style="desk")
    # a desk darker than the note, most of the frame; a board darker than its wall
    assert np.median(grey["desk"]) < 128 < grey["desk"].max()
    assert grey["board"][0, 0] > 128 > np.median(grey["board"][grey["board"] < 128])
    with pytest.raises(ValueError, match="unknown style"):
        photograph(ink, [1], style="crayon")


@pytest.mark.parametrize("share", [0.015, 0.025, 0.035, 0.1])
def test_a_digit_written_again_has_the_line_width_asked_for(mnist, share):
    """The centre line drawn again: its width is SHARE of the digit's height, as the
    preprocessing measures stroke widths (within a quarter, and the round ends)."""
    for digit in mnist["test"][0][:5].numpy():
        cover = restroked(digit / 255, share) >= 0.5
        rows = np.flatnonzero(cover.any(axis=1))
        height = rows[-1] - rows[0] + 1
        assert abs(stroke_width(cover) - share * height) <= 2 + 0.25 * share * height


def test_a_photo_stored_sideways_is_turned_upright():
    ink = np.zeros((28, 28))
    ink[6:22, 12:16] = 1
    with Image.open(io.BytesIO(photograph(ink, [4, 0], {"exif"}))) as stored:
        assert stored.getexif()[0x0112] in (3, 6, 8)
        upright = np.asarray(ImageOps.exif_transpose(stored).convert("L"), int)
    clean = np.asarray(Image.open(io.BytesIO(photograph(ink, [4, 0]))).convert("L"), int)
    assert upright.shape == clean.shape and np.abs(upright - clean).max() <= 1


@pytest.fixture(scope="module")
def clean_digits(mnist) -> torch.Tensor:
    """The 28×28 digits read from the first N_SAME test digits on clean sheets."""
    clean, read, _ = read_files(photo_set(mnist["test"][0][:N_SAME], SEED, frozenset()))
    assert read == list(range(N_SAME))
    return clean


@pytest.mark.parametrize("name", SETS)
def test_each_degradation_leaves_the_digit_as_on_a_clean_sheet(mnist, clean_digits, name):
    """The 28×28 digit read from a degraded photo is close to the one read from the same
    digit on the same sheet, photographed clean."""
    images, clean = mnist["test"][0][:N_SAME], clean_digits
    degraded, read, _ = read_files(photo_set(images, SEED, degradations(name)))
    assert read == list(range(N_SAME)), f"refused: {set(range(N_SAME)) - set(read)}"
    difference = np.abs(degraded.numpy().astype(int) - clean.numpy()).mean(axis=(1, 2))
    # blur and JPEG change the edges a little; a shadow taken for ink, a ruled line or
    # the desk moves and shrinks the whole digit (about 40 grey levels)
    assert np.median(difference) < 12 and (difference < 25).mean() >= 0.9, \
        f"mean difference per digit: {np.round(difference, 1).tolist()}"


def test_files_read_in_other_processes_are_read_as_here(mnist, monkeypatch):
    """The calibrate stage reads its photos and frames MNIST digits in a pool of
    processes: the same digits, in the same order, the same files refused, as here."""
    files = [*photo_set(mnist["test"][0][:5], SEED, frozenset(DEGRADATIONS)), b"",
             *non_digit_photos("blank", 3, SEED), b"not an image",
             *non_digit_photos("scribble", 3, SEED)]
    monkeypatch.setattr(calibrate, "BATCH", 4)  # the files go out in several batches
    with worker_pool(2) as pool:
        there = read_files(iter(files), pool)
        framed_there = framed(mnist["test"][0][:9], pool)
    here = read_files(files)
    assert here[2] == there[2] == len(files) and 8 <= len(here[1]) < len(files)
    assert here[1] == there[1] and torch.equal(here[0], there[0])
    assert torch.equal(framed_there, framed(mnist["test"][0][:9]))


@pytest.fixture(scope="module")
def reader(mnist_model) -> Reader:
    return Reader(*load_model(mnist_model))


@pytest.fixture(scope="module")
def clean_sheets(mnist, reader):
    """The last N_READ test digits photographed on a clean sheet, as the model reads them."""
    images, labels = mnist["test"][0][-N_READ:], mnist["test"][1][-N_READ:]
    return reader.files(photo_set(images, SEED, frozenset()), labels)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first may wait for the session's model and check
@pytest.mark.parametrize("name", [*SETS, *STYLES])
def test_photographed_digits_are_read_as_well_as_clean_ones(mnist, reader, mnist_check,
                                                            clean_sheets, name):
    """The model reads photos of test digits, under each degradation and written in
    each style (a pen, pencil, a note on a desk, a blackboard), as well as the same
    digits on a clean sheet, and the check flags few of them."""
    images, labels = mnist["test"][0][-N_READ:], mnist["test"][1][-N_READ:]
    check, clean = mnist_check[1].check, clean_sheets
    style = name if name in STYLES else None
    photos = reader.files(photo_set(images, SEED, frozenset() if style else degradations(name),
                                    style), labels)
    flagged = int((check.scores(photos.feats) > check.threshold).sum())
    print(f"{name}: read right {photos.correct} of {N_READ} (clean sheet {clean.correct}), "
          f"refused {photos.refused}, flagged {flagged}")
    assert photos.correct >= clean.correct - 3
    assert photos.refused + flagged <= 10


@pytest.mark.slow
@pytest.mark.parametrize("kind", NON_DIGITS)
def test_photographed_non_digits_are_refused_or_flagged(reader, mnist_check, kind):
    check = mnist_check[1].check
    group = reader.files(non_digit_photos(kind, 40, seed=SEED))
    flagged = int((check.scores(group.feats) > check.threshold).sum()) if group.total > group.refused \
        else 0
    caught = group.refused + flagged
    print(f"{kind}: {group.refused} refused, {flagged} flagged of {group.total}")
    assert caught >= 0.85 * group.total


def test_a_blank_sheet_in_uneven_light_has_no_ink():
    for i in range(5):
        blank = photograph(np.zeros((28, 28)), [SEED, i], {"light", "noise", "jpeg", "ruled"})
        with pytest.raises(StageError, match="no ink"):
            read_digit(blank)
