"""The recipe search: candidates ranked on a validation split, never on the test set.

    python -m experiments.search run --seeds 1 [--only base,scale] [--jobs 2]
    python -m experiments.search table

`run` queues one DVC experiment per candidate of experiments/search.yaml and seed
(`dvc exp run --queue -n search-NAME-sSEED -S ... train`: the train stage only), with
the search's fixed params (a validation split of 10,000 training images), runs them
on JOBS queue workers and records each run's final-epoch validation loss and accuracy
in experiments/search.json, with the batch's wall time and the machine it ran on.
Screen coarsely with one seed, then run the best few on more seeds. The test
accuracy of a search run is never read. `table` prints the ranking.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from experiments.queue import experiment_rev, output, read_at, run_queued
from experiments.seeds import parse_seeds
from stages.common import StageError, read_json, run_cli, write_json
from stages.history import metric_path, read_metric
from stages.params import read_yaml

SEARCH_FILE = Path(__file__).with_name("search.yaml")
SEARCH_JSON = Path("experiments/search.json")  # from the repository root
LIVE_DIR = "metrics/train"
VAL = {metric: metric_path(LIVE_DIR, "val", metric).as_posix() for metric in ("acc", "loss")}


def load_search(path: Path = SEARCH_FILE) -> dict:
    """search.yaml, checked: fixed params and candidates, each with params and why."""
    search = read_yaml(path)
    if not (isinstance(search, dict) and isinstance(search.get("fixed"), dict)
            and isinstance(search.get("candidates"), dict) and search["candidates"]):
        raise StageError(f"{path}: expected `fixed` params and a mapping of `candidates`")
    for name, candidate in search["candidates"].items():
        if not (isinstance(candidate, dict) and set(candidate) == {"params", "why"}
                and isinstance(candidate["params"], dict)):
            raise StageError(f"{path}: candidate {name} needs `params` (a mapping) and `why`")
    return search


def run_name(candidate: str, seed: int) -> str:
    return f"search-{candidate}-s{seed}"


def overrides(search: dict, candidate: str, seed: int) -> list[str]:
    """The -S arguments of one search run."""
    settings = {**search["fixed"], **search["candidates"][candidate]["params"],
                "train.seed": seed}
    return [arg for key, value in settings.items() for arg in ("-S", f"{key}={value}")]


def run_result(rev: str) -> dict:
    """The final-epoch validation accuracy and loss of the run committed as REV."""
    acc, loss = (read_metric(f"{rev[:7]}:{path}", metric, text=read_at(rev, path))
                 for metric, path in VAL.items())
    return {"val_acc": round(float(acc.iloc[-1]), 4), "val_loss": round(float(loss.iloc[-1]), 6),
            "epochs": int(acc.index[-1]), "commit": rev}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def record(doc: dict, search: dict, names: list[str], seeds: list[int], baseline: str,
           wall_s: float, jobs: int) -> dict:
    """DOC (search.json) with the runs of NAMES × SEEDS read from their experiments on
    BASELINE, and the batch that ran them."""
    runs = doc.setdefault("runs", {})
    for name in names:
        for seed in seeds:
            runs.setdefault(name, {})[str(seed)] = run_result(
                experiment_rev(run_name(name, seed), baseline))
    doc.setdefault("batches", []).append({
        "candidates": names, "seeds": seeds, "wall_s": round(wall_s), "jobs": jobs,
        "machine": machine(), "code": baseline[:7]})
    doc["fixed"] = search["fixed"]
    doc["candidates"] = search["candidates"]
    return doc


def ranking(doc: dict) -> list[dict]:
    """Candidates by mean final validation accuracy over their seeds, best first; those
    run on more seeds rank above those run on fewer."""
    rows = []
    for name, by_seed in doc["runs"].items():
        accs = [run["val_acc"] for run in by_seed.values()]
        rows.append({"candidate": name, "seeds": sorted(int(s) for s in by_seed),
                     "mean": statistics.fmean(accs), "min": min(accs), "max": max(accs),
                     "val_loss": statistics.fmean(r["val_loss"] for r in by_seed.values())})
    return sorted(rows, key=lambda r: (-len(r["seeds"]), -r["mean"], r["val_loss"]))


def _settings(params: dict) -> str:
    return ", ".join(f"`{k}: {v}`" for k, v in params.items()) or "none (step 5)"


def table(doc: dict) -> str:
    """search.json as markdown: the ranking, every run, and the batches' wall time."""
    lines = ["| rank | candidate | changes from step 5 | seeds | mean val % | spread (min–max) "
             "| mean val loss | runs (experiment commits) |", "|---|---|---|---|---|---|---|---|"]
    for rank, row in enumerate(ranking(doc), 1):
        name = row["candidate"]
        runs = ", ".join(f"s{seed} `{run['commit'][:7]}` {run['val_acc']:.2f}"
                         for seed, run in sorted(doc["runs"][name].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {rank} | {name} | {_settings(doc['candidates'][name]['params'])} | "
                     f"{len(row['seeds'])} | {row['mean']:.3f} | {row['min']:.2f}–{row['max']:.2f} "
                     f"| {row['val_loss']:.4f} | {runs} |")
    total = sum(batch["wall_s"] for batch in doc["batches"])
    lines += ["", "| batch | candidates | seeds | wall time | queue workers | machine | code |",
              "|---|---|---|---|---|---|---|"]
    for i, batch in enumerate(doc["batches"], 1):
        lines.append(f"| {i} | {', '.join(batch['candidates'])} | "
                     f"{', '.join(map(str, batch['seeds']))} | {batch['wall_s'] / 60:.0f} min | "
                     f"{batch['jobs']} | {batch['machine']} | `{batch['code']}` |")
    lines.append(f"| **all** | | | **{total / 60:.0f} min** | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--seeds", default="1", help="e.g. 1 or 2-3 (default 1)")
    parser.add_argument("--only", help="candidates to run, comma-separated (default all)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel queue workers")
    args = parser.parse_args()
    search = load_search()
    if args.command == "run":
        names = args.only.split(",") if args.only else list(search["candidates"])
        unknown = [name for name in names if name not in search["candidates"]]
        if unknown:
            raise StageError(f"--only {args.only}: no candidate {', '.join(unknown)} in "
                             f"{SEARCH_FILE.name}; choose from {', '.join(search['candidates'])}")
        seeds = parse_seeds(args.seeds)
        baseline = output("git", "rev-parse", "HEAD").strip()
        start = time.monotonic()
        try:
            run_queued({run_name(n, s): overrides(search, n, s) for n in names for s in seeds},
                       args.jobs, targets=("train",))
        except subprocess.CalledProcessError as err:
            raise StageError(f"`{' '.join(err.cmd)}` failed with exit {err.returncode}") from None
        doc = read_json(SEARCH_JSON, "search results") if SEARCH_JSON.exists() else {}
        write_json(SEARCH_JSON, record(doc, search, names, seeds, baseline,
                                       time.monotonic() - start, args.jobs))
    print(table(read_json(SEARCH_JSON, "search results")))


if __name__ == "__main__":
    run_cli(main)
