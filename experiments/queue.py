"""Running DVC experiments on the queue, and reading what they wrote.

Shared by experiments.steps and experiments.seeds.
"""

from __future__ import annotations

import subprocess
import time

from stages.common import StageError


def sh(*cmd: str, env: dict | None = None) -> None:
    """Run CMD, echoing it; a failure raises CalledProcessError."""
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def output(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def queue_status() -> str:
    return output("dvc", "queue", "status")


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


def run_queued(runs: dict[str, list[str]], jobs: int) -> None:
    """Queue one experiment per name in RUNS (its -S arguments), run them on JOBS workers
    and wait. Each stage pins its own thread count (params.yaml's runtime.threads), so
    JOBS workers use JOBS cores at runtime.threads=1."""
    for name, args in runs.items():
        sh("dvc", "exp", "run", "--queue", "-f", "-n", name, *args)

    def start_workers() -> None:
        sh("dvc", "queue", "start", "--jobs", str(jobs))

    start_workers()
    wait_for_queue(list(runs), start_workers)


def experiment_rev(name: str) -> str:
    """The commit of experiment NAME made on top of HEAD."""
    head = output("git", "rev-parse", "HEAD").strip()
    refs = output("git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps")
    for line in refs.splitlines():
        ref, rev = line.split()
        if ref.endswith(f"/{head[:2]}/{head[2:]}/{name}"):  # DVC's refs/exps/ab/cdef…/NAME
            return rev
    raise StageError(f"no experiment named {name} on top of HEAD ({head[:7]}); "
                     "did it run? see `dvc exp show`")


def read_at(rev: str, path: str) -> str:
    """The text of PATH as committed in REV."""
    try:
        return output("git", "show", f"{rev}:{path}")
    except subprocess.CalledProcessError:
        raise StageError(f"{path} is missing from experiment commit {rev[:7]}") from None


