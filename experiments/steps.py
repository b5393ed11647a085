"""The documented improvement steps as named DVC experiments.

    python -m experiments.steps check           # validate experiments/steps.yaml
    python -m experiments.steps run [--jobs N]  # run every step, then compare them
    python -m experiments.steps compare         # only the comparison

`run` uses `dvc exp run -n step-N -S key=value ...`; with --jobs above 1 it queues
the steps and starts N queue workers, each with OMP_NUM_THREADS set so that the
workers share the cores instead of fighting over them.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import time
from pathlib import Path


from stages.common import StageError, run_cli
from stages.params import parse_params, read_yaml

STEPS_FILE = Path(__file__).with_name("steps.yaml")
FIELDS = {"title", "params", "target", "notebook", "analysis"}


def load_steps(path: Path = STEPS_FILE, params_path: Path = Path("params.yaml")) -> dict:
    """Steps by name, each checked: known fields, and overrides that params.yaml accepts."""
    steps, base = read_yaml(path), read_yaml(params_path)
    if not isinstance(steps, dict) or not steps:
        raise StageError(f"{path}: expected a mapping of step names to steps")
    for name, step in steps.items():
        if not isinstance(step, dict) or set(step) != FIELDS:
            raise StageError(f"{path}: {name} must have exactly the fields {sorted(FIELDS)}")
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


def sh(*cmd: str, env: dict | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def queue_status() -> str:
    return subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True,
                          check=True).stdout


def wait_for_queue(names: list[str], start_workers, status=queue_status,
                   poll_s: float = 15) -> None:
    """Wait until the queue is idle; fail if any of NAMES failed.

    DVC's workers sometimes all stop while tasks are still queued
    (treeverse/dvc#10562); START_WORKERS() starts them again then.
    """
    while True:
        time.sleep(poll_s)
        text = status()
        if "Running" in text:
            continue
        if "Queued" not in text:
            print(text)
            break
        if "Worker status: 0 active" in text:
            start_workers()
    failed = [line.split()[1] for line in text.splitlines()
              if "Failed" in line and len(line.split()) > 1 and line.split()[1] in names]
    if failed:
        raise StageError(f"experiments {', '.join(failed)} failed; see `dvc queue logs NAME`")


def run_steps(steps: dict, jobs: int) -> None:
    if jobs <= 1:
        for name, step in steps.items():
            sh("dvc", "exp", "run", "-n", name, *overrides(step))
        return
    for name, step in steps.items():
        sh("dvc", "exp", "run", "--queue", "-n", name, *overrides(step))
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def start_workers() -> None:
        sh("dvc", "queue", "start", "--jobs", str(jobs),
           env={**os.environ, "OMP_NUM_THREADS": str(threads)})

    start_workers()
    wait_for_queue(list(steps), start_workers)


def compare(steps: dict) -> None:
    names = list(steps)
    sh("dvc", "exp", "show", "--only-changed", "--drop", "per_class|Created|State|Executor")
    sh("dvc", "metrics", "diff", names[0], names[-1])
    sh("dvc", "params", "diff", names[0], names[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("check", "run", "compare"))
    parser.add_argument("--jobs", type=int, default=1, help="parallel queue workers")
    args = parser.parse_args()
    steps = load_steps()
    if args.command == "check":
        for name, step in steps.items():
            print(f"{name}: {step['title']}: {' '.join(overrides(step)[1::2])}")
        return
    try:
        if args.command == "run":
            run_steps(steps, args.jobs)
        compare(steps)
    except subprocess.CalledProcessError as err:
        raise StageError(f"`{' '.join(err.cmd)}` failed with exit {err.returncode}") from None


if __name__ == "__main__":
    run_cli(main)
