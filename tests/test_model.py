"""The network, its dropout, the batched rotation, and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stages.common import StageError, load_torch, save_torch
from stages.data import augment
from stages.device import resolve_device
from stages.model import Dropout16, Net, checkpoint, count_params, from_checkpoint, predict


def rotate(x, degrees, background, generator):
    return augment(x, degrees, 0.0, background, generator)


def test_parameter_count_is_7776():
    assert count_params(Net(dropout=0.01)) == 7776
    assert count_params(Net(dropout=0.01, fast_dropout=True)) == 7776


def test_output_is_log_probabilities_per_class():
    out = Net(dropout=0.0).eval()(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))


@pytest.mark.parametrize("p", [0.01, 0.3])
def test_dropout16_drops_p_of_units_and_rescales(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = Dropout16(p).train()(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1 / 65536
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))


def test_dropout16_is_identity_in_eval_and_keeps_gradients():
    x = torch.randn(3, 8, 5, 5, requires_grad=True)
    assert torch.equal(Dropout16(0.5).eval()(x), x)
    y = Dropout16(0.5).train()(x)
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # dropped units pass no gradient


def test_rotation_keeps_background_and_varies_per_image():
    background = -0.42
    g = torch.Generator().manual_seed(0)
    blank = torch.full((4, 1, 28, 28), background)
    torch.testing.assert_close(rotate(blank, 7.0, background, g), blank)

    bar = torch.full((2, 1, 28, 28), background)
    bar[:, :, 2:26, 13:15] = 3.0  # a vertical stroke; both images identical
    out = rotate(bar, 30.0, background, g)
    assert not torch.equal(out[0], out[1])  # one angle per image
    assert not torch.equal(out[0], bar[0])
    # nearest-neighbour sampling moves pixels, it never invents new values
    values = out.unique()
    assert torch.isclose(values[:, None], torch.tensor([background, 3.0])).any(dim=1).all()


@pytest.mark.parametrize("degrees", [7.0, 180.0])
def test_rotation_grid_is_affine_grids_bit_for_bit(degrees):
    """rotate() builds its grid without F.affine_grid; the result must not change."""
    x = torch.randn(64, 1, 28, 28)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        angles = (torch.rand(64, generator=g) * 2 - 1) * math.radians(degrees)
        cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
        theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(64, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        expected = F.grid_sample(x - 0.5, grid, mode="nearest", align_corners=False) + 0.5
        assert torch.equal(rotate(x, degrees, 0.5, torch.Generator().manual_seed(seed)),
                           expected)


def test_rotation_is_seeded():
    x = torch.randn(8, 1, 28, 28)
    a = rotate(x, 7.0, 0.0, torch.Generator().manual_seed(3))
    b = rotate(x, 7.0, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_translation_shifts_each_image_by_at_most_translate_pixels():
    x = torch.full((64, 1, 28, 28), -1.0)
    x[:, :, 12:16, 12:16] = 2.0  # a 4x4 block in the middle
    out = augment(x, 0.0, 2.0, -1.0, torch.Generator().manual_seed(0))
    rows = (out[:, 0] == 2.0).any(dim=2).float().argmax(dim=1) - 12
    cols = (out[:, 0] == 2.0).any(dim=1).float().argmax(dim=1) - 12
    assert rows.abs().max() <= 2 and cols.abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # one shift per image
    assert ((out == 2.0).sum(dim=(1, 2, 3)) == 16).all()  # moved, not resized


def test_no_augmentation_returns_the_batch_and_draws_nothing():
    x = torch.randn(4, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert augment(x, 0.0, 0.0, 0.0, g) is x
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Net(dropout=0.05)
    model.train()(torch.randn(16, 1, 28, 28))  # move the BatchNorm statistics off their init
    path = tmp_path / "model.pt"
    save_torch(path, checkpoint(model, {"dropout": 0.05}, epoch=3))
    ckpt = load_torch(path, "checkpoint")
    assert ckpt["epoch"] == 3
    rebuilt = from_checkpoint(ckpt, str(path))
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(predict(rebuilt, x, 2), predict(model, x, 3))


def test_the_same_checkpoint_saves_to_the_same_bytes(tmp_path):
    """torch.save names its archive after the file; save_torch must not depend on the
    temporary name it writes through, or dvc.lock would change on every run."""
    torch.manual_seed(0)
    ckpt = checkpoint(Net(dropout=0.05), {"dropout": 0.05}, epoch=1)
    save_torch(tmp_path / "a" / "model.pt", ckpt)
    save_torch(tmp_path / "b" / "model.pt", ckpt)
    save_torch(tmp_path / "other.pt", ckpt)
    data = (tmp_path / "a" / "model.pt").read_bytes()
    assert data == (tmp_path / "b" / "model.pt").read_bytes()
    assert data == (tmp_path / "other.pt").read_bytes()
    assert not list(tmp_path.glob("**/.*.tmp"))  # no temporary file left behind


def test_checkpoint_is_a_snapshot_not_the_live_weights():
    model = Net(dropout=0.0)
    ckpt = checkpoint(model, {"dropout": 0.0})
    before = ckpt["model"]["features.0.0.weight"].clone()
    with torch.no_grad():
        model.features[0][0].weight.add_(1.0)
    assert torch.equal(ckpt["model"]["features.0.0.weight"], before)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    other = nn.Sequential(nn.Conv2d(1, 4, 3))
    ckpt = checkpoint(other, {"dropout": 0.0})
    with pytest.raises(StageError, match="does not fit this architecture"):
        from_checkpoint(ckpt, "other.pt")
    with pytest.raises(StageError, match="not a checkpoint"):
        from_checkpoint({"weights": 1}, "odd.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(StageError, match="train.device is cuda but torch sees no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
