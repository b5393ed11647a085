"""experiments.seeds: seeds parsing and the summary metrics/seeds.json holds."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments.seeds import other_recipe, parse_seeds, seed_result, summarise, table
from helpers import REPO
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
    acc = pd.Series([98.0, 99.51, 99.49, 99.5], index=[1, 2, 3, 4])
    assert seed_result(acc) == {"final": 99.5, "best": 99.51, "best_epoch": 2, "epochs": 4}


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


def test_the_params_of_a_seed_run_are_read_as_the_stages_read_them(tmp_path, monkeypatch):
    """PyYAML alone reads 1e-4 as the string '1e-4'; seeds.json must hold the number, or
    the docs report a drift from params.yaml that is not there."""
    import experiments.seeds as seeds

    text = (REPO / "params.yaml").read_text().replace("weight_decay: 0.0001",
                                                     "weight_decay: 1e-4")
    assert "weight_decay: 1e-4" in text
    history = "step\tacc\ttimestamp\n1\t99.0\t0\n2\t99.5\t0\n"
    files = {"params.yaml": text.replace("seed: 1\n", "seed: 3\n"), seeds.TEST_ACC: history}
    monkeypatch.setattr(seeds, "experiment_rev", lambda name, baseline: "abcdef0123")
    monkeypatch.setattr(seeds, "read_at", lambda rev, path: files[path])
    results, params = seeds.read_results([3])
    assert results == {3: {"final": 99.5, "best": 99.5, "best_epoch": 2, "epochs": 2}}
    assert params["train"]["weight_decay"] == 0.0001
    doc = summarise(results, params)
    assert doc["params"]["train.weight_decay"] == 0.0001

    from tools.docs import params_drift
    from stages.params import read_yaml
    assert params_drift(doc["params"], read_yaml(REPO / "params.yaml")) == []


def test_a_seed_study_of_another_recipe_is_told_from_the_commits_own():
    """A commit can carry the seeds.json of another recipe (the step commits carry the
    one that was current when they were made): what differs is named, key by key."""
    params = {"train": {"lr": 0.2, "epochs": 15, "seed": 1}, "runtime": {"threads": 1}}
    doc = summarise({1: {"final": 99.5}, 2: {"final": 99.6}}, params)
    assert other_recipe(doc, params) == []
    assert other_recipe(doc, {**params, "train": {**params["train"], "seed": 7}}) == []
    # a key that params.yaml gained after the seeds ran is not a difference
    later = {**params, "train": {**params["train"], "scale": 0.0}}
    assert other_recipe(doc, later) == []
    other = {"train": {"lr": 0.01, "seed": 1}, "runtime": {"threads": 1}}
    assert other_recipe(doc, other) == ["train.epochs 15 where params.yaml has no such key",
                                        "train.lr 0.2 where params.yaml has 0.01"]
