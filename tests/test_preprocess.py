"""stages.preprocess: validate the IDX files, write train.pt/test.pt/stats.json, all or none."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import random_images, random_labels, write_idx
from stages import preprocess
from stages.common import StageError


def test_preprocess_writes_tensors_and_stats(raw_dir, tmp_path):
    raw, arrays = raw_dir
    out = tmp_path / "prepared"
    stats = preprocess.preprocess(raw, out)

    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "test.pt", "train.pt"]
    for split, prefix in [("train", "train"), ("test", "t10k")]:
        data = torch.load(out / f"{split}.pt", weights_only=True)
        images, labels = data["images"], data["labels"]
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (len(arrays[f"{prefix}-labels-idx1-ubyte"]), 28, 28)
        assert np.array_equal(images.numpy(), arrays[f"{prefix}-images-idx3-ubyte"])
        assert np.array_equal(labels.numpy(), arrays[f"{prefix}-labels-idx1-ubyte"])

    train = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    expected = {"mean": pytest.approx(train.mean(), rel=1e-12),
                "std": pytest.approx(train.std(), rel=1e-12)}  # training images only
    assert json.loads((out / "stats.json").read_text()) == expected
    assert stats == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]  # no staging left


# Each breaks one file of a good raw folder; returns (file named in the error, message part).

def bad_magic(raw):
    write_idx(raw / "train-images-idx3-ubyte", random_images(64), magic=1234)
    return "train-images-idx3-ubyte", "magic number 1234 is not 2051"


def labels_as_images(raw):
    write_idx(raw / "t10k-images-idx3-ubyte", random_labels(32))
    return "t10k-images-idx3-ubyte", "magic number 2049 is not 2051"


def truncated_images(raw):
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    return "t10k-images-idx3-ubyte", "truncated or padded"


def padded_labels(raw):
    path = raw / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    return "train-labels-idx1-ubyte", "header says 64 items (72 bytes) but the file has 73 bytes"


def truncated_header(raw):
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:10])
    return "train-images-idx3-ubyte", "truncated IDX header (10 bytes)"


def count_mismatch(raw):
    write_idx(raw / "train-labels-idx1-ubyte", random_labels(63))
    return "train-images-idx3-ubyte", "64 images but train-labels-idx1-ubyte has 63 labels"


def label_ten(raw):
    labels = random_labels(32)
    labels[5] = 10
    write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    return "t10k-labels-idx1-ubyte", "label 10 at index 5 is not a digit 0-9"


def not_28x28(raw):
    write_idx(raw / "train-images-idx3-ubyte", random_images(64, side=32))
    return "train-images-idx3-ubyte", "images are 32x32, expected 28x28"


def missing(raw):
    (raw / "t10k-labels-idx1-ubyte").unlink()
    return "t10k-labels-idx1-ubyte", "not found"


@pytest.mark.parametrize("breaker", [
    bad_magic, labels_as_images, truncated_images, padded_labels, truncated_header,
    count_mismatch, label_ten, not_28x28, missing,
], ids=lambda f: f.__name__)
def test_bad_input_fails_naming_the_file_and_writes_nothing(raw_dir, tmp_path, breaker):
    raw, _ = raw_dir
    name, problem = breaker(raw)
    out = tmp_path / "prepared"
    with pytest.raises(StageError) as err:
        preprocess.preprocess(raw, out)
    msg = str(err.value)
    assert msg.startswith(f"{raw / name}: ")
    assert problem in msg
    assert msg.endswith(preprocess.FIX)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no staging folder


def test_failure_leaves_an_existing_out_dir_untouched(raw_dir, tmp_path):
    raw, _ = raw_dir
    out = tmp_path / "prepared"
    preprocess.preprocess(raw, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    label_ten(raw)
    with pytest.raises(StageError):
        preprocess.preprocess(raw, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- normalisation_stats ------------------------------------------------------

def test_stats_of_black_and_white_halves():
    images = torch.cat([torch.zeros(1, 28, 28), torch.full((1, 28, 28), 255.0)]).to(torch.uint8)
    stats = preprocess.normalisation_stats(images)
    # population std: the unbiased one would be 0.5 * sqrt(1568 / 1567) = 0.50016
    assert stats == {"mean": pytest.approx(0.5, abs=1e-12), "std": pytest.approx(0.5, abs=1e-12)}


def test_stats_by_hand():
    images = torch.tensor([[[0, 255], [255, 255]]], dtype=torch.uint8)
    # x = 0, 1, 1, 1: mean 3/4, variance (9/16 + 3 * 1/16) / 4 = 3/16
    stats = preprocess.normalisation_stats(images)
    assert stats["mean"] == pytest.approx(0.75, abs=1e-12)
    assert stats["std"] == pytest.approx(math.sqrt(3 / 16), abs=1e-12)
    assert all(isinstance(v, float) for v in stats.values())  # json-serialisable


def test_stats_of_no_images_is_an_error():
    with pytest.raises(StageError, match="empty"):
        preprocess.normalisation_stats(torch.empty(0, 28, 28, dtype=torch.uint8))


def test_stats_are_exact_whatever_the_thread_count():
    """Integer sums: the same bits with 1 or 2 threads, and the textbook value."""
    images = torch.from_numpy(random_images(3000, seed=5))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = preprocess.normalisation_stats(images)
        torch.set_num_threads(2)
        two = preprocess.normalisation_stats(images)
    finally:
        torch.set_num_threads(before)
    assert one == two
    x = images.numpy().astype("float64") / 255
    assert one["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert one["std"] == pytest.approx(x.std(), rel=1e-12)
    assert preprocess.normalisation_stats(torch.tensor([[0, 255]], dtype=torch.uint8)) == {
        "mean": 0.5, "std": 0.5}
