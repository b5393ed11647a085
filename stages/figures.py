"""Matplotlib for writing files (no display needed), atomic PNG writes, and grids of
digits."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stages.common import atomic_path  # noqa: E402

__all__ = ["digit_grid", "plt", "save_png"]


def save_png(fig, path: str | Path, dpi: int = 80) -> None:
    """Write FIG to PATH as a PNG, atomically, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def digit_grid(path: str | Path, digits: list, titles: list[str], caption: str,
               cell: tuple[float, float] = (1.1, 1.3), fontsize: int = 9) -> None:
    """DIGITS (28×28 arrays, white on black, drawn dark on light) in rows of up to 8,
    each under its title, with CAPTION above, written to PATH. CELL: inches per digit."""
    cols = min(8, max(1, len(digits)))
    rows = max(1, math.ceil(len(digits) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell[0], rows * cell[1]), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, digit, title in zip(axes.flat, digits, titles):
        ax.imshow(digit, cmap="gray_r")
        ax.set_title(title, fontsize=fontsize)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
