"""Plot stage: accuracy and loss curves, train and validation or test, per epoch.

Reads:  LIVE_DIR/plots/metrics/{train,val,test}/{acc,loss}.tsv, DVCLive's history
        (val/ where the run held out a validation split, and then no test/: such a
        run scores no test metric).
Writes: OUT_DIR/accuracy.png and OUT_DIR/loss.png.
Params: none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from stages.common import StageError, run_cli
from stages.figures import plt, save_png
from stages.history import metric_path, read_metric

CURVES = {"acc": ("accuracy.png", "accuracy (%)"), "loss": ("loss.png", "loss (NLL)")}
SPLITS = ("train", "val", "test")
SCORED = ("val", "test")  # val with a validation split, test without one


def splits(live_dir: str | Path) -> list[str]:
    """The splits whose history LIVE_DIR holds: train, and val or test (or, from older
    runs with a validation split, both)."""
    scored = [split for split in SCORED if metric_path(live_dir, split, "acc").exists()]
    return ["train", *(scored or ["test"])]  # neither: test's file is reported missing


def read_history(live_dir: str | Path) -> pd.DataFrame:
    """One row per epoch, with columns train/acc, train/loss and test/acc, test/loss
    (or val/acc, val/loss with a validation split)."""
    columns = [read_metric(metric_path(live_dir, split, metric), metric).rename(f"{split}/{metric}")
               for split in splits(live_dir) for metric in CURVES]
    history = pd.concat(columns, axis=1).sort_index()
    if history.empty or history.isna().any().any():
        raise StageError(f"{live_dir}: per-epoch history is empty or its files disagree on "
                         "the epochs; rerun the train stage")
    return history


def draw_curves(history: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    paths = []
    for metric, (name, ylabel) in CURVES.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for split in [s for s in SPLITS if f"{s}/{metric}" in history]:
            ax.plot(history.index, history[f"{split}/{metric}"], marker="o", markersize=3,
                    label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        if metric == "acc":
            split = "test" if "test/acc" in history else "val"
            best = history[f"{split}/acc"].max()
            name_of = {"test": "test", "val": "validation"}[split]
            ax.set_title(f"best {name_of} accuracy {best:.2f}%", fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / name
        save_png(fig, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("live_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    for path in draw_curves(read_history(args.live_dir), args.out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
