"""experiments.seeds: seeds parsing and the summary metrics/seeds.json holds."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments.seeds import parse_seeds, seed_result, summarise, table
from stages.common import StageError


@pytest.mark.parametrize("text, seeds", [("1-5", [1, 2, 3, 4, 5]), ("3", [3]),
                                         ("1,3,7", [1, 3, 7]), ("1-3,8,2", [1, 2, 3, 8])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a-b", "1-", "-3", "5-1"])
def test_bad_seeds_are_one_line_errors(text):
    with pytest.raises(StageError, match="--seeds"):
        parse_seeds(text)


def test_seed_result_takes_the_last_epoch_and_the_best_with_its_epoch():
    history = pd.DataFrame({"step": [1, 2, 3, 4], "acc": [98.0, 99.51, 99.49, 99.5]})
    assert seed_result(history) == {"final": 99.5, "best": 99.51, "best_epoch": 2, "epochs": 4}


def test_summary_and_table():
    results = {2: {"final": 99.5, "best": 99.6, "best_epoch": 13, "epochs": 15},
               1: {"final": 99.6, "best": 99.6, "best_epoch": 15, "epochs": 15},
               3: {"final": 99.55, "best": 99.58, "best_epoch": 14, "epochs": 15}}
    params = {"train": {"lr": 0.2, "epochs": 15}, "runtime": {"threads": 1}}
    doc = summarise(results, params)
    assert list(doc["seeds"]) == ["1", "2", "3"]
    assert doc["final"] == {"min": 99.5, "median": 99.55, "mean": 99.55, "n": 3}
    assert doc["params"] == {"train.lr": 0.2, "train.epochs": 15, "runtime.threads": 1}
    lines = table(doc).splitlines()
    assert lines[2] == "| 1 | 99.60 | 99.60 (15) |"
    assert lines[-1] == "| **3 seeds** | min 99.50, median 99.55, mean 99.55 | |"
