"""Running DVC experiments on the queue, and reading what they wrote.

Shared by experiments.steps and experiments.seeds.
"""

from __future__ import annotations

import subprocess
import time

from stages.common import StageError


def sh(*cmd: str, env: dict | None = None, check: bool = True) -> None:
    """Run CMD, echoing it; a failure raises CalledProcessError where CHECK."""
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=check, env=env)


def output(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def queue_status() -> str:
    return output("dvc", "queue", "status")


def queue_tasks(text: str) -> dict[str, tuple[str, str]]:
    """`dvc queue status`'s rows as {task id: (name, status)}."""
    tasks = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] != "Task" and words[-1] in TASK_STATES:
            tasks[words[0]] = (words[1], words[-1])
    return tasks


TASK_STATES = ("Queued", "Running", "Success", "Failed")
PENDING = ("Queued", "Running")
NO_WORKER = "Worker status: 0 active, 0 idle"  # no worker answered DVC's call
LOST_AFTER_S = 60.0  # a task shown as Running while no worker answers for this long is lost
REQUEUES = 2         # times a lost run is queued again before the wait gives up


def wait_for_queue(tasks: dict[str, str], start_workers, status=queue_status,
                   poll_s: float = 15, lost_after_s: float = LOST_AFTER_S) -> set[str]:
    """Wait until each of TASKS ({task id: name}) has ended; fail if any of them failed.

    Only these tasks count: other entries of the queue, running or failed, from
    earlier runs or other people, are left alone. DVC's workers sometimes all stop
    while tasks are still queued (treeverse/dvc#10562); START_WORKERS() starts them
    again then, if one of TASKS is among them, once no worker has answered two polls
    in a row. A busy worker can miss one call, and `dvc queue start` starts a second
    worker of the same number beside one that misses its own check: more workers
    than --jobs, on cores that are already full.

    A task can also be lost: shown as Running for good, with no worker left to run it.
    A worker that is shutting down because the queue was empty can take a task queued
    in that moment and exit without running it; a worker killed from outside (out of
    memory) leaves its task so too. Where some of TASKS have been Running with no
    worker for LOST_AFTER_S, the wait returns their ids; otherwise an empty set."""
    alone_since = None  # when no worker answered, in every poll since
    while True:
        time.sleep(poll_s)
        text = status()
        rows = queue_tasks(text)
        states = {task: rows.get(task, (name, "missing"))[1] for task, name in tasks.items()}
        if not any(state in PENDING for state in states.values()):
            break
        if NO_WORKER not in text:
            alone_since = None
            continue
        if alone_since is None:  # a busy worker may miss one call: wait for the next
            alone_since = time.monotonic()
            continue
        if "Queued" in states.values():
            start_workers()
        running = {task for task, state in states.items() if state == "Running"}
        if running and time.monotonic() - alone_since >= lost_after_s:
            return running
    failed = [tasks[task] for task, state in states.items() if state not in ("Success",)]
    if failed:
        raise StageError(f"experiments {', '.join(failed)} failed; see `dvc queue logs NAME`")
    return set()


def queue_runs(runs: dict[str, list[str]], status=queue_status,
               targets: tuple[str, ...] = ()) -> dict[str, str]:
    """Queue one experiment per name in RUNS (its -S arguments); their task ids, as
    {task id: name}."""
    before = set(queue_tasks(status()))
    for name, args in runs.items():
        sh("dvc", "exp", "run", "--queue", "-f", "-n", name, *args, *targets)
    for _ in range(30):  # `dvc queue status` may list a new task a moment later
        tasks = {task: name for task, (name, _) in queue_tasks(status()).items()
                 if task not in before and name in runs}
        if sorted(tasks.values()) == sorted(runs):
            return tasks
        time.sleep(1)
    raise StageError(f"queued {', '.join(runs)} but `dvc queue status` lists "
                     f"{', '.join(sorted(tasks.values())) or 'none of them'}")


def end_lost(task: str, status=queue_status, tries: int = 5) -> None:
    """Kill TASK, lost, until DVC no longer shows it as Running: a first kill stops what
    is left of its run, if anything is; one after that has exited ends the task."""
    for _ in range(tries):
        sh("dvc", "queue", "kill", task, check=False)
        if queue_tasks(status()).get(task, ("", "ended"))[1] != "Running":
            return
        time.sleep(1)


def run_queued(runs: dict[str, list[str]], jobs: int, status=queue_status,
               poll_s: float = 15, targets: tuple[str, ...] = (),
               lost_after_s: float = LOST_AFTER_S) -> None:
    """Queue one experiment per name in RUNS (its -S arguments), run them on JOBS workers
    and wait for them (by their task ids). Each stage pins its own thread count
    (params.yaml's runtime.threads), so JOBS workers use JOBS cores at
    runtime.threads=1. TARGETS limits each run to those stages and what they need.
    A run that the queue loses (wait_for_queue) is killed, so that DVC stops showing it
    as Running, and queued again, up to REQUEUES times."""
    tasks = queue_runs(runs, status, targets)

    def start_workers() -> None:
        sh("dvc", "queue", "start", "--jobs", str(jobs))

    start_workers()
    for attempt in range(REQUEUES + 1):
        lost = wait_for_queue(tasks, start_workers, status, poll_s, lost_after_s)
        if not lost:
            return
        names = sorted(tasks[task] for task in lost)
        for task in sorted(lost):
            end_lost(task, status)
        if attempt == REQUEUES:
            raise StageError(f"DVC's queue lost {', '.join(names)} (shown as Running with no "
                             f"worker left) after lost runs were queued again {REQUEUES} "
                             "times; see `dvc queue status`, and run again")
        print(f"DVC's queue lost {', '.join(names)}: shown as Running with no worker left "
              f"for {lost_after_s:.0f} s; killed, and queued again", flush=True)
        tasks = {task: name for task, name in tasks.items() if task not in lost}
        tasks.update(queue_runs({name: runs[name] for name in names}, status, targets))
        start_workers()


def experiment_rev(name: str, baseline: str = "HEAD") -> str:
    """The commit of experiment NAME made on top of BASELINE (a commit)."""
    head = output("git", "rev-parse", baseline).strip()
    refs = output("git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps")
    for line in refs.splitlines():
        ref, rev = line.split()
        if ref.endswith(f"/{head[:2]}/{head[2:]}/{name}"):  # DVC's refs/exps/ab/cdef…/NAME
            return rev
    raise StageError(f"no experiment named {name} on top of {baseline} ({head[:7]}); "
                     "did it run? see `dvc exp show`")


def read_at(rev: str, path: str) -> str:
    """The text of PATH as committed in REV."""
    try:
        return output("git", "show", f"{rev}:{path}")
    except subprocess.CalledProcessError:
        raise StageError(f"{path} is missing from experiment commit {rev[:7]}") from None


