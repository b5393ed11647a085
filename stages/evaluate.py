"""Evaluate stage: score the final checkpoint on the test set.

Reads:  MODEL (models/model.pt), DATA_DIR/test.pt and DATA_DIR/stats.json.
Writes: METRICS (accuracy %, loss, params, errors, per-class accuracy %),
        CONFUSION (one row per test image: actual, predicted; DVC's confusion
        template) and ERRORS_PNG, a grid of misclassified digits, true→predicted.
Params: evaluate.batch_size, evaluate.max_errors, train.device, runtime.*.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from stages.common import atomic_path, load_torch, run_cli, write_json
from stages.data import load_split, load_stats, to_device
from stages.device import resolve_device
from stages.figures import digit_grid
from stages.model import count_params, from_checkpoint, predict
from stages.params import load_params
from stages.runtime import apply as apply_runtime


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             mean: float, std: float, device: torch.device, batch_size: int):
    """Return (metrics dict, predictions) for MODEL on uint8 IMAGES and LABELS."""
    data = to_device(images, labels, mean, std, device)
    model = model.to(device)
    out = predict(model, data.x, batch_size)
    pred = out.argmax(dim=1).cpu()
    loss = F.nll_loss(out, data.y, reduction="sum").item() / len(labels)
    right = pred == labels
    per_class = {str(c): round(100 * right[labels == c].float().mean().item(), 4)
                 for c in range(10) if (labels == c).any()}
    metrics = {
        "accuracy": round(100 * right.float().mean().item(), 4),
        "loss": round(loss, 6),
        "params": count_params(model),
        "errors": int((~right).sum()),
        "per_class": per_class,
    }
    return metrics, pred


def write_confusion(path: Path, labels: torch.Tensor, pred: torch.Tensor) -> None:
    frame = pd.DataFrame({"actual": labels.numpy(), "predicted": pred.numpy()})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def errors_caption(shown: int, errors: int) -> str:
    """What the errors figure says of itself: how many of the errors it shows."""
    if errors == 0:
        return "no misclassified test digits"
    if shown == 0:
        return f"{errors} misclassified test digits, none drawn (evaluate.max_errors is 0)"
    return f"misclassified test digits (true→predicted): {shown} of {errors} shown"


def draw_errors(path: Path, images: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor,
                max_errors: int) -> str:
    """A grid of up to MAX_ERRORS misclassified digits, each titled true→predicted;
    returns its caption."""
    errors = (pred != labels).nonzero().flatten()
    wrong = errors[:max_errors].tolist()
    caption = errors_caption(len(wrong), len(errors))
    digit_grid(path, [images[i].numpy() for i in wrong],
               [f"{int(labels[i])}→{int(pred[i])}" for i in wrong], caption)
    return caption


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--confusion", type=Path, required=True)
    parser.add_argument("--errors-png", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    apply_runtime(params.runtime)
    device = resolve_device(params.train.device)
    model = from_checkpoint(load_torch(args.model, "checkpoint"), str(args.model))
    images, labels = load_split(args.data / "test.pt")
    mean, std = load_stats(args.data / "stats.json")
    metrics, pred = evaluate(model, images, labels, mean, std, device,
                             params.evaluate.batch_size)
    write_confusion(args.confusion, labels, pred)
    draw_errors(args.errors_png, images, labels, pred, params.evaluate.max_errors)
    write_json(args.metrics, metrics)
    print(f"test accuracy {metrics['accuracy']:.2f}%, loss {metrics['loss']:.4f}, "
          f"{metrics['errors']} errors, {metrics['params']} parameters")


if __name__ == "__main__":
    run_cli(main)
