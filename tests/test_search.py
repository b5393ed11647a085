"""The recipe search: its candidates, its runs' overrides, and its ranking, which reads
validation accuracy only."""

from __future__ import annotations

import pytest

from experiments.search import SEARCH_FILE, load_search, overrides, ranking, table
from helpers import REPO
from stages.common import StageError
from stages.params import parse_params, read_yaml


def test_every_candidate_is_a_valid_recipe_on_a_validation_split():
    search = load_search()
    assert search["fixed"]["train.val_size"] == 10000
    base = read_yaml(REPO / "params.yaml")
    for name in search["candidates"]:
        args = overrides(search, name, seed=3)
        settings = dict(arg.split("=", 1) for arg in args[1::2])
        assert args[0::2] == ["-S"] * len(settings)
        assert settings["train.val_size"] == "10000" and settings["train.seed"] == "3"
        raw = {section: dict(values) for section, values in base.items()}
        for key, value in settings.items():
            section, leaf = key.split(".")
            raw[section][leaf] = type(base[section][leaf])(value)
        parse_params(raw)  # every key exists and every value is allowed


def test_a_candidate_without_params_or_why_is_refused(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("fixed: {train.val_size: 10}\ncandidates:\n  a: {params: {}}\n")
    with pytest.raises(StageError, match="candidate a needs `params` \\(a mapping\\) and `why`"):
        load_search(path)
    assert load_search(SEARCH_FILE)


def run(acc: float, loss: float = 0.02) -> dict:
    return {"val_acc": acc, "val_loss": loss, "epochs": 15, "commit": "abcdef0123"}


def test_the_ranking_puts_more_seeds_first_then_the_higher_validation_mean():
    doc = {"runs": {"a": {"1": run(99.70)},
                    "b": {"1": run(99.60), "2": run(99.66)},
                    "c": {"1": run(99.62), "2": run(99.62, 0.01)}},
           "candidates": {name: {"params": {"train.lr": 0.3}, "why": ""} for name in "abc"},
           "batches": [{"candidates": ["a", "b", "c"], "seeds": [1], "wall_s": 600, "jobs": 2,
                        "machine": "a CPU, 2 cores", "code": "abcdef0"}]}
    rows = ranking(doc)
    assert [row["candidate"] for row in rows] == ["b", "c", "a"]  # a: one seed only
    assert rows[0]["mean"] == pytest.approx(99.63) and rows[0]["min"] == 99.60
    text = table(doc)
    assert "| 1 | b | `train.lr: 0.3` | 2 | 99.630 | 99.60–99.66 |" in text
    assert "| **all** | | | **10 min** |" in text
    assert "test" not in text  # the search reads no test accuracy
