"""Matplotlib for writing files (no display needed), and atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stages.common import atomic_path  # noqa: E402

__all__ = ["plt", "save_png"]


def save_png(fig, path: str | Path, dpi: int = 80) -> None:
    """Write FIG to PATH as a PNG, atomically, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
