"""The recipe search: candidates ranked on a validation split, never on the test set.

    python -m experiments.search next                        # which runs the plan asks for
    python -m experiments.search run --next [--share K/N] [--jobs 2]
    python -m experiments.search run --seeds 1-4 [--only base,bilinear] [--share K/N]
    python -m experiments.search collect [--baseline REV]    # after `make exp-pull`
    python -m experiments.search table

experiments/search.yaml pins a full recipe (`recipe`: every train key of params.yaml that
defines what is learned) and the search's fixed params (a validation split of 10,000
training images); each candidate changes a few recipe keys. `run` queues one DVC
experiment per (candidate, seed) pair (`dvc exp run --queue -n search-NAME-sSEED -S ...
train`: the train stage only, every recipe key set explicitly), runs them on JOBS queue
workers and records in experiments/search.json, under the search's name, each run's
effective params (the train and runtime sections it ran with), its per-epoch validation
accuracy and loss, and the batch's wall time and machine. No test metric is read.

The plan is successive halving over paired seeds (the same seed is the same data
order for every candidate): every candidate on seeds 1-4; then, at each rung of RUNGS,
only those whose mean is within one standard error of the best one's (the SE of their
paired differences) go on; the base always goes on, as the reference. `--share K/N`
runs the K-th of N shares of the pairs, so that N machines split a batch; each then
`make exp-push`es, and `collect` on one machine, after `make exp-pull`, records them all.
`table` prints the ranking: each candidate's mean, its standard error, and its
difference from the base with a 95 % interval over the seeds they share.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

from experiments.queue import experiment_rev, output, read_at, run_queued
from experiments.seeds import parse_seeds
from stages.common import StageError, read_json, run_cli, write_json
from stages.history import metric_path, read_metric
from stages.params import parse_params, read_yaml, read_yaml_text

SEARCH_FILE = Path(__file__).with_name("search.yaml")
SEARCH_JSON = Path("experiments/search.json")  # from the repository root
PARAMS_FILE = Path("params.yaml")
LIVE_DIR = "metrics/train"
VAL = {metric: metric_path(LIVE_DIR, "val", metric).as_posix() for metric in ("acc", "loss")}
BASE = "base"  # the candidate every other one is compared with
# train keys that are not the recipe: the seed (set per run), where and how fast it runs
NOT_RECIPE = ("seed", "device", "resume", "channels_last", "compile", "cuda_graph")
RUNGS = (4, 7, 10)  # seeds 1..N at each rung of the successive halving
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # a candidate's name, part of a git ref

# Student's t, the 0.975 quantile (two-sided 95 %) for 1-30 degrees of freedom, to three
# decimals: the table of NIST/SEMATECH's e-Handbook of Statistical Methods, section
# 1.3.6.7.2 (tests/test_search.py checks each against mpmath's t distribution).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """Student's t quantile 0.975 with DF degrees of freedom: the table up to 30, then
    the Cornish-Fisher expansion around the normal's 1.95996 (off by < 0.001 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df} < 1")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


# --- search.yaml: the recipe, pinned, and the candidates --------------------------

def recipe_keys(params: dict, fixed: dict) -> set[str]:
    """The train keys of PARAMS (params.yaml) that define the recipe: all but NOT_RECIPE
    and the search's FIXED keys."""
    return {f"train.{key}" for key in params["train"] if key not in NOT_RECIPE} - set(fixed)


def load_search(path: Path = SEARCH_FILE, params_path: Path = PARAMS_FILE) -> dict:
    """search.yaml, checked against params.yaml: its name, fixed params, a `recipe` that
    pins every recipe key of params.yaml (no more, no fewer), and candidates, each
    changing recipe keys only (`params`) and saying `why`; every candidate's settings
    make valid params."""
    search = read_yaml(path)
    if not (isinstance(search, dict) and isinstance(search.get("search"), str)
            and isinstance(search.get("fixed"), dict) and isinstance(search.get("recipe"), dict)
            and isinstance(search.get("candidates"), dict) and BASE in search["candidates"]):
        raise StageError(f"{path}: expected a `search` name, `fixed` params, the `recipe` and "
                         f"`candidates`, one of them `{BASE}`")
    params = read_yaml(params_path)
    wanted, pinned = recipe_keys(params, search["fixed"]), set(search["recipe"])
    if pinned != wanted:
        gaps = [f"it lacks {', '.join(sorted(wanted - pinned))}" if wanted - pinned else "",
                f"{params_path} has no {', '.join(sorted(pinned - wanted))}"
                if pinned - wanted else ""]
        raise StageError(f"{path}: `recipe` must pin every recipe key of {params_path}'s train "
                         f"section: {'; '.join(g for g in gaps if g)}")
    for name, candidate in search["candidates"].items():
        if not (NAME.match(str(name)) and isinstance(candidate, dict)
                and set(candidate) == {"params", "why"} and isinstance(candidate["params"], dict)):
            raise StageError(f"{path}: candidate {name} needs a name of a-z, 0-9, - and _, "
                             "`params` (a mapping) and `why`")
        stray = set(candidate["params"]) - pinned
        if stray:
            raise StageError(f"{path}: candidate {name} sets {', '.join(sorted(stray))}, "
                             "which is not a recipe key")
        raw = {section: dict(values) for section, values in params.items()}
        for key, value in settings(search, name, seed=1).items():
            section, leaf = key.split(".", 1)
            raw[section][leaf] = value
        try:
            parse_params(raw)
        except StageError as err:
            raise StageError(f"{path}: candidate {name} makes invalid params: {err}") from None
    return search


def settings(search: dict, candidate: str, seed: int) -> dict:
    """Every param one run of CANDIDATE pins: fixed, the recipe with the candidate's
    changes, and the seed."""
    return {**search["fixed"], **search["recipe"], **search["candidates"][candidate]["params"],
            "train.seed": seed}


def _yaml(value) -> str:
    """VALUE as `-S` writes it: YAML that reads back as the same value and type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    return str(value)


def overrides(search: dict, candidate: str, seed: int) -> list[str]:
    """The -S arguments of one search run: every pinned param."""
    return [arg for key, value in settings(search, candidate, seed).items()
            for arg in ("-S", f"{key}={_yaml(value)}")]


def run_name(candidate: str, seed: int) -> str:
    return f"search-{candidate}-s{seed}"


# --- one run, read from its experiment commit -------------------------------------

def run_result(rev: str) -> dict:
    """What the run committed as REV holds for the record: its final-epoch validation
    accuracy and loss, its per-epoch validation curve and the params it ran with (the
    train and runtime sections of its params.yaml). Only the validation files and
    params.yaml are read."""
    curve = {metric: read_metric(f"{rev[:7]}:{path}", metric, text=read_at(rev, path))
             for metric, path in VAL.items()}
    acc, loss = curve["acc"], curve["loss"]
    epochs = list(range(1, len(acc) + 1))
    if list(acc.index) != epochs or list(loss.index) != epochs:
        raise StageError(f"experiment commit {rev[:7]}: the validation history is not one row "
                         "per epoch from 1; rerun it")
    ran = read_yaml_text(read_at(rev, PARAMS_FILE.as_posix()), f"{rev[:7]}:params.yaml")
    return {"val_acc": round(float(acc.iloc[-1]), 4), "val_loss": round(float(loss.iloc[-1]), 6),
            "epochs": len(epochs), "commit": rev,
            "curve": {"val_acc": [round(float(v), 4) for v in acc],
                      "val_loss": [round(float(v), 6) for v in loss]},
            "params": {f"{section}.{key}": value for section in ("train", "runtime")
                       for key, value in ran.get(section, {}).items()}}


def mismatch(ran: dict, wanted: dict) -> list[str]:
    """`key value (pinned: other)` for each of WANTED's params that RAN set otherwise."""
    return [f"{key} {ran.get(key, 'unset')} (pinned: {value})" for key, value in wanted.items()
            if ran.get(key) != value]


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    try:
        gpus = output("nvidia-smi", "--query-gpu=name", "--format=csv,noheader").split("\n")
    except (OSError, subprocess.CalledProcessError):
        gpus = []
    gpu = "; ".join(g.strip() for g in gpus if g.strip())
    return f"{model}, {os.cpu_count()} cores" + (f"; {gpu}" if gpu else "")


# --- the record -------------------------------------------------------------------

def current(doc: dict, search: dict) -> dict:
    """The record of SEARCH (by its name) in DOC, search.json, made if new; its recipe,
    candidates and fixed params as search.yaml has them now."""
    entry = doc.setdefault("searches", {}).setdefault(search["search"], {})
    # a candidate since dropped from search.yaml keeps its entry, for its runs
    entry.update(title=search.get("title", search["search"]), fixed=search["fixed"],
                 recipe=search["recipe"],
                 candidates={**entry.get("candidates", {}), **search["candidates"]})
    entry.setdefault("runs", {})
    entry.setdefault("batches", [])
    return entry


def record_runs(entry: dict, search: dict, revs: dict[tuple[str, int], str],
                machine_name: str | None) -> None:
    """Read each (candidate, seed) run of REVS (its experiment commit) into ENTRY's runs,
    after checking that it ran the params search.yaml pins for it."""
    for (name, seed), rev in sorted(revs.items()):
        result = run_result(rev)
        wrong = mismatch(result["params"], settings(search, name, seed))
        if wrong:
            raise StageError(f"experiment {run_name(name, seed)} ({rev[:7]}) ran other params "
                             f"than search.yaml pins for it: {', '.join(wrong)}; rerun it")
        entry["runs"].setdefault(name, {})[str(seed)] = {**result, "machine": machine_name}


def check_record(entry: dict, search: dict) -> None:
    """Refuse a record whose runs of a candidate ran other params than search.yaml pins
    now: one name, one recipe."""
    for name, by_seed in entry["runs"].items():
        if name not in search["candidates"]:
            continue
        for seed, result in by_seed.items():
            wrong = mismatch(result.get("params", {}), settings(search, name, int(seed)))
            if wrong:
                raise StageError(f"{SEARCH_JSON}: {name}'s seed {seed} ran other params than "
                                 f"search.yaml pins now ({', '.join(wrong)}); give the "
                                 "changed candidate a new name")


def pair_list(pairs: dict[str, list[int]]) -> list[tuple[str, int]]:
    """PAIRS ({candidate: seeds}) as (candidate, seed) pairs, seed by seed."""
    return sorted(((name, seed) for name, seeds in pairs.items() for seed in seeds),
                  key=lambda pair: (pair[1], list(pairs).index(pair[0])))


def parse_share(text: str) -> tuple[int, int]:
    k, slash, n = text.partition("/")
    try:
        share = int(k), int(n)
    except ValueError:
        share = (0, 0)
    if not slash or not 1 <= share[0] <= share[1]:
        raise StageError(f"--share {text}: expected K/N with 1 <= K <= N, like 1/2")
    return share


def share(pairs: list[tuple[str, int]], k: int, n: int) -> list[tuple[str, int]]:
    """The K-th of N shares of PAIRS: every N-th pair from the K-th, so that each pair
    is in exactly one share and the shares differ in size by one pair at most."""
    return pairs[k - 1::n]


def plan(runs: dict, names: list[str], rungs: tuple[int, ...] = RUNGS
         ) -> tuple[dict[str, list[int]], list[str]]:
    """Successive halving: the seeds each candidate of NAMES needs next, and a line per
    decision. At each rung R of RUNGS, the candidates still in need seeds 1..R; once all
    have them, those whose paired gap to the best (the best's mean minus theirs, over
    seeds 1..R) is within one standard error of that gap go on to the next rung, with
    the base. After the last rung, nothing is needed: they are the finalists."""
    alive, notes = list(names), []
    for i, rung in enumerate(rungs):
        seeds = range(1, rung + 1)
        missing = {name: [s for s in seeds if str(s) not in runs.get(name, {})] for name in alive}
        missing = {name: need for name, need in missing.items() if need}
        if missing:
            return missing, notes
        if i + 1 == len(rungs):
            break
        acc = {name: [runs[name][str(s)]["val_acc"] for s in seeds] for name in alive}
        best = max(alive, key=lambda name: statistics.fmean(acc[name]))
        keep, stop = [], []
        for name in alive:
            diffs = [b - a for a, b in zip(acc[name], acc[best])]
            gap, se = statistics.fmean(diffs), standard_error(diffs)
            if name in (best, BASE) or gap <= se + 1e-9:
                keep.append(name)
            else:
                stop.append(f"{name} ({gap:.3f} below, SE {se:.3f})")
        notes.append(f"after seeds 1-{rung}: best {best}; on to seeds 1-{rungs[i + 1]}: "
                     f"{', '.join(keep)}; stopped: {', '.join(stop) or 'none'}")
        alive = keep
    notes.append(f"finalists, on seeds 1-{rungs[-1]}: {', '.join(alive)}; nothing left to run")
    return {}, notes


# --- the ranking -------------------------------------------------------------------

def standard_error(values: list[float]) -> float:
    """The standard error of VALUES' mean: their sample SD over the root of their count."""
    return statistics.stdev(values) / math.sqrt(len(values))


def paired(run: dict[str, dict], base: dict[str, dict]) -> dict | None:
    """RUN's final validation accuracy minus BASE's over the seeds both ran ({seed:
    run}): the mean difference and the half-width of its 95 % interval (Student's t with
    n - 1 degrees of freedom); None under two shared seeds."""
    shared = sorted(set(run) & set(base), key=int)
    if len(shared) < 2:
        return None
    diffs = [run[s]["val_acc"] - base[s]["val_acc"] for s in shared]
    mean = statistics.fmean(diffs)
    half = t975(len(diffs) - 1) * standard_error(diffs)
    return {"n": len(diffs), "mean": mean, "half": half, "low": mean - half, "high": mean + half}


def ranking(entry: dict) -> list[dict]:
    """One search's candidates by mean final validation accuracy, best first; those run
    on more seeds rank above those run on fewer. Each with its number of seeds, mean,
    standard error (None for one seed) and paired difference from the base."""
    rows = []
    for name, by_seed in entry["runs"].items():
        accs = [run["val_acc"] for run in by_seed.values()]
        rows.append({"candidate": name, "seeds": sorted(int(s) for s in by_seed),
                     "n": len(accs), "mean": statistics.fmean(accs),
                     "se": standard_error(accs) if len(accs) > 1 else None,
                     "val_loss": statistics.fmean(r["val_loss"] for r in by_seed.values()),
                     "diff": None if name == BASE or BASE not in entry["runs"]
                     else paired(by_seed, entry["runs"][BASE])})
    return sorted(rows, key=lambda r: (-r["n"], -r["mean"], r["val_loss"]))


def _settings(params: dict) -> str:
    return ", ".join(f"`{k}: {_yaml(v)}`" for k, v in params.items()) or "none: the base"


def _diff(diff: dict | None) -> str:
    if diff is None:
        return "—"
    return f"{diff['mean']:+.3f} ± {diff['half']:.3f} ({diff['n']} seeds)"


def sides(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """ROWS with an interval, split: those above the base, below it, and told apart
    from it by neither (the interval includes zero)."""
    compared = [r for r in rows if r["diff"] is not None]
    return ([r for r in compared if r["diff"]["low"] > 0],
            [r for r in compared if r["diff"]["high"] < 0],
            [r for r in compared if r["diff"]["low"] <= 0 <= r["diff"]["high"]])


def halved(entry: dict) -> bool:
    """Whether ENTRY is searched by successive halving: a search that pins its recipe."""
    return bool(entry.get("recipe"))


def wall_s(entry: dict) -> float:
    """ENTRY's batches' wall time, in seconds (a batch that did not record one counts 0)."""
    return sum(batch.get("wall_s") or 0 for batch in entry["batches"])


def verdict(rows: list[dict]) -> str:
    """One line: which candidates' 95 % intervals lie above or below zero, and which
    include it."""
    above, below, within = sides(rows)
    groups = {"above the base (its interval above zero)": above,
              "below the base (its interval below zero)": below,
              "not told apart from the base (its interval includes zero)": within}
    parts = [f"{what}: {', '.join(r['candidate'] for r in group)}"
             for what, group in groups.items() if group]
    fewer = [r["candidate"] for r in rows if r["candidate"] != BASE and r["diff"] is None]
    if fewer:
        parts.append(f"under two seeds shared with the base, no interval: {', '.join(fewer)}")
    return "Verdict, from the record: " + ("; ".join(parts) or "no candidate ran yet") + "."


def halving(entry: dict) -> str:
    """A list: the successive halving's decisions from the record so far, and what it
    still needs."""
    needed, notes = plan(entry["runs"], list(entry["candidates"]))
    if needed:
        notes.append("still to run: " + "; ".join(
            f"{name} on seeds {', '.join(map(str, seeds))}" for name, seeds in needed.items()))
    return "\n".join(["Successive halving, from the record:", ""] + [f"- {note}." for note in notes])


def search_table(name: str, entry: dict) -> str:
    """One search of search.json as markdown: its ranking and verdict, every run's final
    validation accuracy by seed, and its batches."""
    rows = ranking(entry)
    lines = [f"### {entry.get('title', name)}", ""]
    if entry.get("note"):
        lines += [entry["note"], ""]
    if entry.get("recipe"):
        lines += ["The base, as `experiments/search.yaml` pins it for every run: "
                  + _settings(entry["recipe"]) + f"; and {_settings(entry['fixed'])}.", ""]
    lines += ["| rank | candidate | changes from the base | seeds | mean val % | SE of the mean | "
              "difference from the base, ± 95 % interval (paired seeds) | mean val loss |",
              "|---|---|---|---|---|---|---|---|"]
    for rank, row in enumerate(rows, 1):
        se = "—" if row["se"] is None else f"{row['se']:.3f}"
        lines.append(f"| {rank} | {row['candidate']} | "
                     f"{_settings(entry['candidates'][row['candidate']]['params'])} | {row['n']} | "
                     f"{row['mean']:.3f} | {se} | {_diff(row['diff'])} | {row['val_loss']:.4f} |")
    lines += ["", verdict(rows), ""]
    if halved(entry):
        lines += [halving(entry), ""]
    machines = sorted({run["machine"] for by_seed in entry["runs"].values()
                       for run in by_seed.values() if run.get("machine")})
    if len(machines) > 1:
        lines += [f"These runs came from {len(machines)} machines ({'; '.join(machines)}): "
                  "a CPU and a GPU give other numbers, so rank only runs of one kind of "
                  "device together.", ""]
    seeds = sorted({seed for row in rows for seed in row["seeds"]})
    lines += ["Final validation accuracy % by seed, and each run's experiment commit. The "
              "commits are local to the machine that ran them (DVC's experiment refs are not "
              "pushed with the branch); what an audit needs is in `experiments/search.json`"
              + (": each run's params and per-epoch validation accuracy and loss."
                 if any("curve" in run for by_seed in entry["runs"].values()
                        for run in by_seed.values())
                 else ", which for this search holds each run's final epoch only."), "",
              "| candidate | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for row in rows:
        by_seed = entry["runs"][row["candidate"]]
        cells = [f"{by_seed[str(s)]['val_acc']:.2f} `{by_seed[str(s)]['commit'][:7]}`"
                 if str(s) in by_seed else "" for s in seeds]
        lines.append(f"| {row['candidate']} | " + " | ".join(cells) + " |")
    lines += ["", "| batch | runs | wall time | queue workers | machine | code |",
              "|---|---|---|---|---|---|"]
    for i, batch in enumerate(entry["batches"], 1):
        if "pairs" in batch:
            runs = "; ".join(f"{n} s{', '.join(map(str, s))}" for n, s in batch["pairs"].items())
        else:
            runs = (f"{', '.join(batch['candidates'])} × seeds "
                    f"{', '.join(map(str, batch['seeds']))}")
        if batch.get("share"):
            runs += f" (share {batch['share']})"
        wall = "—" if batch.get("wall_s") is None else f"{batch['wall_s'] / 60:.0f} min"
        lines.append(f"| {i} | {runs} | {wall} | {batch.get('jobs') or '—'} | "
                     f"{batch.get('machine') or 'not recorded'} | `{batch['code']}` |")
    lines.append(f"| **all** | | **{wall_s(entry) / 60:.0f} min** | | | |")
    return "\n".join(lines)


def _order(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name)]


def summary(name: str, entry: dict) -> str:
    """One paragraph on where search NAME stands: its size and cost, the paired
    difference from the base of every candidate on the most seeds, and the verdict."""
    rows, title = ranking(entry), entry.get("title", name)
    if not rows:
        return f"{title}: no run yet."
    needed, _ = plan(entry["runs"], list(entry["candidates"]))
    runs = sum(len(by_seed) for by_seed in entry["runs"].values())
    most = max(row["n"] for row in rows)
    state = ("" if not halved(entry) else ", successive halving done" if not needed else
             f", successive halving under way ({sum(map(len, needed.values()))} runs to go)")
    leaders = [f"{row['candidate']} {_diff(row['diff'])}" for row in rows
               if row["n"] == most and row["diff"] is not None]
    above, below, _ = ([row["candidate"] for row in side] for side in sides(rows))
    text = (f"{title}: {len(entry['candidates']) - 1} candidates against the base, {runs} "
            f"runs on the validation split in {wall_s(entry) / 3600:.1f} h of wall time{state}. "
            f"Those on the most seeds, by their final validation accuracy's paired "
            f"difference from the base (± 95 % interval): {', '.join(leaders) or 'none yet'}.")
    if above:
        return text + f" Above the base: {', '.join(above)}."
    return text + (" No candidate is above the base"
                   + (f"; below it: {', '.join(below)}." if below else "."))


def newest(doc: dict) -> str:
    """The name of search.json's newest search (by the number in its name)."""
    return max(doc["searches"], key=_order)


def table(doc: dict) -> str:
    """search.json as markdown: each search, the newest (by the number in its name) first."""
    return "\n\n".join(search_table(name, doc["searches"][name])
                       for name in sorted(doc["searches"], key=_order, reverse=True))


# --- the commands -----------------------------------------------------------------

def read_doc() -> dict:
    return read_json(SEARCH_JSON, "search results") if SEARCH_JSON.exists() else {}


def requested(args, search: dict, entry: dict) -> dict[str, list[int]]:
    """The pairs a `run` asks for, {candidate: seeds}: the plan's (--next) or --only's
    candidates × --seeds."""
    if args.next:
        return plan(entry["runs"], list(search["candidates"]))[0]
    names = args.only.split(",") if args.only else list(search["candidates"])
    unknown = [name for name in names if name not in search["candidates"]]
    if unknown:
        raise StageError(f"--only {args.only}: no candidate {', '.join(unknown)} in "
                         f"{SEARCH_FILE.name}; choose from {', '.join(search['candidates'])}")
    return {name: parse_seeds(args.seeds) for name in names}


def search_experiments(search: dict, baseline: str) -> dict[tuple[str, int], str]:
    """{(candidate, seed): commit} of SEARCH's experiments on top of BASELINE: every ref
    refs/exps/ab/cdef.../search-NAME-sSEED, this machine's or pulled."""
    head = output("git", "rev-parse", baseline).strip()
    refs = output("git", "for-each-ref", "--format=%(refname) %(objectname)",
                  f"refs/exps/{head[:2]}/{head[2:]}/")
    found = {}
    for line in refs.splitlines():
        ref, rev = line.split()
        match = re.fullmatch(r"search-(.+)-s(\d+)", ref.rsplit("/", 1)[1])
        if match and match[1] in search["candidates"]:
            found[(match[1], int(match[2]))] = rev
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("next", "run", "collect", "table"))
    parser.add_argument("--next", action="store_true", help="run: the pairs `next` lists")
    parser.add_argument("--seeds", default="1-4", help="run: e.g. 1-4 or 5,6 (default 1-4)")
    parser.add_argument("--only", help="run: candidates, comma-separated (default all)")
    parser.add_argument("--share", help="run: K/N, the K-th of N shares of the pairs")
    parser.add_argument("--jobs", type=int, default=2, help="run: parallel queue workers")
    parser.add_argument("--baseline", default="HEAD", help="collect: the commit they ran on")
    parser.add_argument("--machine", help="collect: the machine that ran them, if known")
    args = parser.parse_args()
    doc = read_doc()
    if args.command == "table":
        print(table(doc))
        return
    search = load_search(SEARCH_FILE, PARAMS_FILE)
    entry = current(doc, search)
    check_record(entry, search)
    if args.command == "next":
        needed, notes = plan(entry["runs"], list(search["candidates"]))
        print("\n".join(notes))
        for name, seeds in needed.items():
            print(f"{name}: seeds {', '.join(map(str, seeds))}")
        if needed:
            print("run them: python -m experiments.search run --next [--share K/N]")
        return
    baseline = output("git", "rev-parse", args.baseline).strip()
    if args.command == "collect":
        revs = {pair: rev for pair, rev in search_experiments(search, baseline).items()
                if entry["runs"].get(pair[0], {}).get(str(pair[1]), {}).get("commit") != rev}
        record_runs(entry, search, revs, args.machine)
        if revs:
            pairs = {}
            for name, seed in sorted(revs):
                pairs.setdefault(name, []).append(seed)
            entry["batches"].append({"pairs": pairs, "wall_s": None, "jobs": None,
                                     "machine": args.machine, "code": baseline[:7],
                                     "collected": True})
        print(f"{len(revs)} new runs recorded")
    else:
        pairs = pair_list(requested(args, search, entry))
        if args.share:
            pairs = share(pairs, *parse_share(args.share))
        if not pairs:
            print("nothing to run")
            return
        start = time.monotonic()
        try:
            run_queued({run_name(n, s): overrides(search, n, s) for n, s in pairs}, args.jobs,
                       targets=("train",))
        except subprocess.CalledProcessError as err:
            raise StageError(f"`{' '.join(err.cmd)}` failed with exit {err.returncode}") from None
        here = machine()
        record_runs(entry, search, {(n, s): experiment_rev(run_name(n, s), baseline)
                                    for n, s in pairs}, here)
        by_name = {}
        for name, seed in pairs:
            by_name.setdefault(name, []).append(seed)
        entry["batches"].append({"pairs": by_name, "wall_s": round(time.monotonic() - start),
                                 "jobs": args.jobs, "machine": here, "code": baseline[:7],
                                 "share": args.share})
    write_json(SEARCH_JSON, doc)
    print(table(doc))


if __name__ == "__main__":
    run_cli(main)
