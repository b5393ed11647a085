"""The per-epoch history that DVCLive writes: one TSV per metric, under the train
stage's LIVE_DIR/plots/metrics/ (train/acc.tsv, test/loss.tsv, ...).

One reader for the plot stage, the docs' tables and the seed summary, which reads
the files out of experiment commits.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from stages.common import StageError

METRICS_DIR = Path("plots/metrics")  # inside DVCLive's folder


def metric_path(live_dir: str | Path, split: str, metric: str) -> Path:
    return Path(live_dir) / METRICS_DIR / split / f"{metric}.tsv"


def read_metric(source: str | Path, metric: str, text: str | None = None) -> pd.Series:
    """One DVCLive TSV (columns step, METRIC, timestamp) as METRIC's values by epoch.

    SOURCE is the file; with TEXT, its content as read elsewhere (from a git commit),
    and SOURCE only names it in errors."""
    try:
        frame = pd.read_csv(io.StringIO(text) if text is not None else source, sep="\t",
                            usecols=["step", metric])
    except FileNotFoundError:
        raise StageError(f"{source}: per-epoch history not found; run the train stage "
                         "(dvc repro train)") from None
    except (ValueError, pd.errors.ParserError) as err:
        raise StageError(f"{source}: unreadable history ({err}); rerun the train stage") from None
    series = frame.set_index("step")[metric]
    series.index.name = "epoch"
    return series
