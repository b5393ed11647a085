"""The documented improvement steps as commits, each made from a real run.

    python -m experiments.steps check               # validate experiments/steps.yaml
    python -m experiments.steps commit [--jobs N]   # one `step-N: title` commit per step
    python -m experiments.steps commit --only step-6  # only these; the others stay
    python -m experiments.steps compare             # metrics and params, first vs last

`commit` needs a clean git tree. For each step of steps.yaml, in order, it writes the
step's params into params.yaml, runs `dvc repro` and commits params.yaml, dvc.lock,
metrics/ and plots/ as `step-N: <title>`; after the last step params.yaml is the
recommended recipe. With --jobs above 1 the runs go to DVC's queue first, N at a time
(the bytes are the same: each stage pins its thread count), and each step's commit is
then made from its experiment with `dvc exp apply`, which overwrites tracked files
edited meanwhile: leave the tree alone while it runs.

Git names these commits by message: `HEAD^{/^step-1:}` is the youngest commit in
HEAD's history whose message starts with `step-1:`, so `dvc metrics diff
'HEAD^{/^step-1:}' 'HEAD^{/^step-5:}'` compares two steps of this branch, without
training.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
from pathlib import Path

from experiments.queue import experiment_rev, output, read_at, run_queued, sh
from experiments.seeds import SEEDS_JSON, study_recipe
from stages.common import StageError, run_cli
from stages.params import parse_params, read_yaml

STEPS_FILE = Path(__file__).with_name("steps.yaml")
PARAMS_FILE = Path("params.yaml")
FIELDS = {"title", "params", "target", "notebook", "analysis", "results"}
REQUIRED = FIELDS - {"results"}
# what a step commit holds: the params and everything the run wrote that git tracks
COMMITTED = ["params.yaml", "dvc.lock", "metrics", "plots", "models/summary.txt",
             "models/ood.json", "models/.gitignore", "data/prepared/stats.json"]


def load_steps(path: Path = STEPS_FILE, params_path: Path = PARAMS_FILE) -> dict:
    """Steps by name, each checked: known fields, and overrides that params.yaml accepts."""
    steps, base = read_yaml(path), read_yaml(params_path)
    if not isinstance(steps, dict) or not steps:
        raise StageError(f"{path}: expected a mapping of step names to steps")
    for name, step in steps.items():
        if not isinstance(step, dict) or not REQUIRED <= set(step) <= FIELDS:
            raise StageError(f"{path}: {name} must have the fields {sorted(REQUIRED)} "
                             "(and may have results)")
        if not isinstance(step["params"], dict) or not step["params"]:
            raise StageError(f"{path}: {name}.params must map params.yaml keys to values")
        merged = copy.deepcopy(base)
        for key, value in step["params"].items():
            section, _, leaf = str(key).partition(".")
            if section not in merged or not leaf or leaf not in merged[section]:
                raise StageError(f"{path}: {name} sets {key}, which params.yaml does not have")
            merged[section][leaf] = value
        try:
            parse_params(merged)
        except StageError as err:
            raise StageError(f"{path}: {name}: {err}") from None
    return steps


def overrides(step: dict) -> list[str]:
    return [arg for key, value in step["params"].items() for arg in ("-S", f"{key}={value}")]


def commit_message(name: str, step: dict) -> str:
    return f"{name}: {step['title']}"


def require_clean_tree() -> None:
    dirty = output("git", "status", "--porcelain", "--untracked-files=no").strip()
    if dirty:
        raise StageError("the git tree has uncommitted changes; commit or stash them first, "
                         "so that each step commit holds only its run")


def commit_step(name: str, step: dict) -> None:
    sh("git", "add", "-A", "--", *[path for path in COMMITTED if Path(path).exists()])
    sh("git", "commit", "-q", "-m", commit_message(name, step))


def select(steps: dict, only: str | None) -> dict:
    """The steps that ONLY names (all of them for None), in steps.yaml's order."""
    if only is None:
        return steps
    names = only.split(",")
    unknown = [name for name in names if name not in steps]
    if unknown:
        raise StageError(f"--only {only}: no step {', '.join(unknown)} in {STEPS_FILE.name}; "
                         f"choose from {', '.join(steps)}")
    return {name: step for name, step in steps.items() if name in names}


def commit_steps(steps: dict, jobs: int) -> None:
    """One commit per step, in order, each from a real run of the current code."""
    require_clean_tree()
    if jobs > 1:
        run_queued({name: overrides(step) for name, step in steps.items()}, jobs)
        # by commit, found while HEAD is still their baseline: each step commit moves HEAD
        revs = {name: experiment_rev(name) for name in steps}
        for name, step in steps.items():
            sh("dvc", "exp", "apply", revs[name])
            commit_step(name, step)
        return
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` uses

    recipe = PARAMS_FILE.read_text()  # each step's overrides apply to this, as -S would
    for name, step in steps.items():
        PARAMS_FILE.write_text(recipe)
        apply_overrides(PARAMS_FILE, [f"{k}={v}" for k, v in step["params"].items()])
        sh("dvc", "repro")
        commit_step(name, step)


def step_rev(name: str) -> str:
    """Git's name for step NAME's commit: the youngest in HEAD's history whose message
    starts with `NAME:` (other branches and fetched refs do not count)."""
    return f"HEAD^{{/^{name}:}}"


def foreign_seed_studies(revs: list[str]) -> list[str]:
    """A line for each of REVS whose metrics/seeds.json measured another recipe than
    its params.yaml's: the step commits before the last hold the seed study of the
    recipe that was current when they were made, not their own."""
    lines = []
    for rev in revs:
        try:
            study = read_at(rev, str(SEEDS_JSON))
        except StageError:  # no seed study there
            continue
        if other := study_recipe(study, read_at(rev, str(PARAMS_FILE)), rev):
            lines.append(f"{rev}: {SEEDS_JSON} measured another recipe than its "
                         f"{PARAMS_FILE} ({', '.join(other[:3])}{', …' * (len(other) > 3)})")
    return lines


def compare(steps: dict) -> None:
    """`dvc metrics diff` and `dvc params diff` of the first step against the last; a seed
    study that is not the step's own is left out of the metrics, with a line that says
    so."""
    first, last = (step_rev(name) for name in (list(steps)[0], list(steps)[-1]))
    targets = []
    if foreign := foreign_seed_studies([first, last]):
        for line in foreign:
            print(f"{line}: left out of the metrics diff", flush=True)
        targets = ["--targets", *(path for path in read_yaml(Path("dvc.yaml"))["metrics"]
                                  if path != str(SEEDS_JSON))]
    sh("dvc", "metrics", "diff", first, last, *targets)
    sh("dvc", "params", "diff", first, last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("check", "commit", "compare"))
    parser.add_argument("--jobs", type=int, default=1, help="parallel queue workers")
    parser.add_argument("--only", help="commit only these steps (comma-separated), on top "
                        "of HEAD; the other steps keep their commits")
    args = parser.parse_args()
    steps = load_steps()
    if args.command == "check":
        for name, step in steps.items():
            print(f"{name}: {step['title']}: {' '.join(overrides(step)[1::2])}")
        return
    try:
        if args.command == "commit":
            commit_steps(select(steps, args.only), args.jobs)
        compare(steps)
    except subprocess.CalledProcessError as err:
        raise StageError(f"`{' '.join(err.cmd)}` failed with exit {err.returncode}") from None


if __name__ == "__main__":
    run_cli(main)
