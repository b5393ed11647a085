"""The recipe in params.yaml over several seeds, summarised in metrics/seeds.json.

    python -m experiments.seeds run --seeds 1-10 [--jobs 2]   # queue, run, then summarise
    python -m experiments.seeds summarise --seeds 1-10 [--baseline REV]  # only read what ran

`run` queues one DVC experiment per seed (`dvc exp run --queue -n seed-N -S
train.seed=N train`: the train stage only) on HEAD and runs them on JOBS queue workers, one thread each (the runtime.threads
param). Then it reads each experiment's per-epoch history from its commit and writes
metrics/seeds.json: each seed's final and best test accuracy and the epoch of the best,
the minimum, median and mean of the finals, and the params the seeds shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

import pandas as pd

from experiments.queue import experiment_rev, output, read_at, run_queued
from stages.common import StageError, run_cli, write_json
from stages.history import metric_path, read_metric
from stages.params import read_yaml, read_yaml_text

SEEDS_JSON = Path("metrics/seeds.json")
TEST_ACC = metric_path("metrics/train", "test", "acc").as_posix()


def parse_seeds(text: str) -> list[int]:
    """'1-5' or '1,3,7' (or both, '1-3,8') as a sorted list of distinct seeds."""
    seeds = set()
    try:
        for part in text.split(","):
            first, dash, last = part.partition("-")
            low, high = int(first), int(last if dash else first)
            if high < low:
                raise ValueError
            seeds.update(range(low, high + 1))
    except ValueError:
        raise StageError(f"--seeds {text}: expected seeds >= 0 like 1-5 or 1,3,7") from None
    return sorted(seeds)


def seed_result(acc: pd.Series) -> dict:
    """Final and best test accuracy of one run, from its test accuracy by epoch."""
    return {"final": round(float(acc.iloc[-1]), 4), "best": round(float(acc.max()), 4),
            "best_epoch": int(acc.idxmax()), "epochs": int(acc.index[-1])}


def recipe(params: dict) -> dict:
    """What seeds of PARAMS (params.yaml, as the stages read it) share: `train.KEY` but
    the seed, and `runtime.KEY`."""
    shared = {f"train.{k}": v for k, v in params["train"].items() if k != "seed"}
    shared.update({f"runtime.{k}": v for k, v in params["runtime"].items()})
    return shared


def summarise(results: dict[int, dict], params: dict) -> dict:
    """The seeds.json document: per seed, then min, median and mean of the finals."""
    finals = [r["final"] for r in results.values()]
    return {
        "seeds": {str(seed): r for seed, r in sorted(results.items())},
        "final": {"min": min(finals), "median": round(statistics.median(finals), 4),
                  "mean": round(statistics.fmean(finals), 4), "n": len(finals)},
        "params": recipe(params),
    }


def other_recipe(doc: dict, params: dict) -> list[str]:
    """How the recipe that seeds.json DOC measured differs from PARAMS, the params.yaml
    of the same commit: `train.lr 0.2 where params.yaml has 0.01` for each key that DOC
    recorded and PARAMS sets otherwise (a key added to params.yaml after the seeds ran
    does not count); empty when the file measured that commit's own recipe. A commit can
    carry a seeds.json made for another recipe: the step commits hold the one of the
    recipe that was current when they were made."""
    studied, current = doc.get("params") or {}, recipe(params)
    return [f"{key} {value} where params.yaml has "
            + (f"{current[key]}" if key in current else "no such key")
            for key, value in sorted(studied.items())
            if key not in current or current[key] != value]


def study_recipe(study: str, params: str, source: str) -> list[str]:
    """other_recipe() of a commit's seeds.json and params.yaml, given as their texts
    STUDY and PARAMS; SOURCE (the commit's name) opens the one-line error for a file
    that cannot be read as such."""
    try:
        doc = json.loads(study)
    except ValueError as err:
        raise StageError(f"{source}:{SEEDS_JSON} is not JSON ({err}); compare that commit's "
                         "file by hand") from None
    recipe_params = read_yaml_text(params, f"{source}:params.yaml")
    try:
        return other_recipe(doc, recipe_params)
    except (TypeError, KeyError, AttributeError) as err:
        raise StageError(f"{source}: {SEEDS_JSON} or params.yaml is not laid out as "
                         f"expected ({type(err).__name__}: {err})") from None


def read_results(seeds: list[int], baseline: str = "HEAD") -> tuple[dict[int, dict], dict]:
    """Each seed's result, read from the commit of its experiment, and the params the
    first of them ran with (all share them except the seed; checked)."""
    results, params = {}, None
    for seed in seeds:
        rev = experiment_rev(f"seed-{seed}", baseline)
        results[seed] = seed_result(read_metric(f"{rev[:7]}:{TEST_ACC}", "acc",
                                                text=read_at(rev, TEST_ACC)))
        # as the stages read it: 1e-4 is a number, not PyYAML's string '1e-4'
        ran = read_yaml_text(read_at(rev, "params.yaml"), f"{rev[:7]}:params.yaml")
        if ran["train"].pop("seed") != seed:  # the rest must be the same for every seed
            raise StageError(f"experiment seed-{seed} did not run with train.seed={seed}")
        if params is not None and ran != params:
            raise StageError(f"experiment seed-{seed} ran with other params than seed-{seeds[0]}; "
                             "rerun them together")
        params = ran
    return results, params


def table(doc: dict) -> str:
    """seeds.json as the markdown table README shows."""
    rows = ["| seed | final test % | best test % (epoch), selected on test |", "|---|---|---|"]
    rows += [f"| {seed} | {r['final']:.2f} | {r['best']:.2f} ({r['best_epoch']}) |"
             for seed, r in sorted(doc["seeds"].items(), key=lambda item: int(item[0]))]
    f = doc["final"]
    rows.append(f"| **{f['n']} seeds** | min {f['min']:.2f}, median {f['median']:.2f}, "
                f"mean {f['mean']:.2f} | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "summarise"))
    parser.add_argument("--seeds", default="1-10", help="e.g. 1-10 or 1,3,7 (default 1-10)")
    parser.add_argument("--baseline", default="HEAD", help="the commit the experiments "
                        "run on (default HEAD, as it is when the command starts)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel queue workers")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    read_yaml("params.yaml")  # a clear error outside the repository root
    try:
        baseline = output("git", "rev-parse", args.baseline).strip()
        if args.command == "run":
            run_queued({f"seed-{s}": ["-S", f"train.seed={s}"] for s in seeds}, args.jobs,
                       targets=("train",))
        results, params = read_results(seeds, baseline)
    except subprocess.CalledProcessError as err:
        raise StageError(f"`{' '.join(err.cmd)}` failed with exit {err.returncode}") from None
    doc = summarise(results, params)
    write_json(SEEDS_JSON, doc)
    print(table(doc))
    print(f"wrote {SEEDS_JSON}")


if __name__ == "__main__":
    run_cli(main)
