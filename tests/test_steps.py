"""experiments/steps.yaml is well formed and names real params, with valid values."""

from __future__ import annotations

import pytest
import yaml

from helpers import REPO
from experiments.queue import wait_for_queue
from experiments.steps import STEPS_FILE, load_steps, overrides
from stages.common import StageError

PARAMS = REPO / "params.yaml"


def test_the_steps_load_and_the_last_is_params_yaml():
    steps = load_steps(STEPS_FILE, PARAMS)
    names = list(steps)
    assert names == [f"step-{n}" for n in range(1, len(names) + 1)] and len(names) >= 5
    base = yaml.safe_load(PARAMS.read_text())
    for key, value in steps[names[-1]]["params"].items():
        section, leaf = key.split(".")
        assert base[section][leaf] == value, key
    for name in names[:-1]:  # earlier steps differ from it
        assert any(steps[name]["params"][key] != base["train"][key.split(".")[1]]
                   for key in steps[name]["params"])
    assert overrides(steps["step-2"])[:4] == ["-S", "train.schedule=step", "-S", "train.lr=0.01"]


def write_steps(tmp_path, **step_params):
    steps = yaml.safe_load(STEPS_FILE.read_text())
    steps["step-2"]["params"].update(step_params)
    path = tmp_path / "steps.yaml"
    path.write_text(yaml.safe_dump(steps))
    return path


@pytest.mark.parametrize("params, message", [
    ({"train.dropuot": 0.1}, "step-2 sets train.dropuot, which params.yaml does not have"),
    ({"trian.dropout": 0.1}, "step-2 sets trian.dropout"),
    ({"train": 0.1}, "step-2 sets train,"),
    ({"train.dropout": 1.5}, "step-2: params.yaml: train.dropout = 1.5 is out of range"),
    ({"train.epochs": "ten"}, "step-2: params.yaml: train.epochs = 'ten' is not an integer"),
])
def test_a_bad_override_fails_before_any_run(tmp_path, params, message):
    with pytest.raises(StageError, match=message):
        load_steps(write_steps(tmp_path, **params), PARAMS)


def test_a_step_missing_a_field_fails(tmp_path):
    steps = yaml.safe_load(STEPS_FILE.read_text())
    del steps["step-1"]["analysis"]
    path = tmp_path / "steps.yaml"
    path.write_text(yaml.safe_dump(steps))
    with pytest.raises(StageError, match="step-1 must have the fields"):
        load_steps(path, PARAMS)


def status(*rows: tuple[str, str, str], active: int, idle: int = 0) -> str:
    """`dvc queue status` as DVC prints it, for ROWS of (task id, name, status)."""
    lines = ["Task     Name    Created    Status"]
    lines += [f"{task}  {name}  11:33 PM   {state}" for task, name, state in rows]
    return "\n".join(lines + ["", f"Worker status: {active} active, {idle} idle"])


def test_wait_for_queue_restarts_workers_that_stopped_early_and_reports_failures():
    """DVC's workers can all exit with tasks still queued; the wait starts them again
    once no worker has answered two polls in a row."""
    done, queued = ("aaaaaaa", "step-1", "Success"), ("bbbbbbb", "step-2", "Queued")
    sequence = iter([
        status(("aaaaaaa", "step-1", "Running"), queued, active=1),
        status(done, queued, active=0),
        status(done, queued, active=0),
        status(done, ("bbbbbbb", "step-2", "Running"), active=1),
        status(done, ("bbbbbbb", "step-2", "Failed"), active=0),
    ])
    starts = []
    with pytest.raises(StageError, match="experiments step-2 failed"):
        wait_for_queue({"aaaaaaa": "step-1", "bbbbbbb": "step-2"}, lambda: starts.append(1),
                       status=lambda: next(sequence), poll_s=0)
    assert starts == [1]


def test_wait_for_queue_starts_no_worker_beside_one_that_answers_or_missed_one_call():
    """A worker shown idle, or a busy one that missed a single call, is still there:
    `dvc queue start` would start a second worker of its number beside it."""
    running, queued = ("aaaaaaa", "seed-1", "Running"), ("bbbbbbb", "seed-2", "Queued")
    sequence = iter([
        status(running, queued, active=0, idle=1),
        status(running, queued, active=0),
        status(running, queued, active=0, idle=1),
        status(running, queued, active=0),
        status(running, queued, active=1),
        status(("aaaaaaa", "seed-1", "Success"), ("bbbbbbb", "seed-2", "Success"), active=0),
    ])
    starts = []
    wait_for_queue({"aaaaaaa": "seed-1", "bbbbbbb": "seed-2"}, lambda: starts.append(1),
                   status=lambda: next(sequence), poll_s=0)
    assert starts == []


def test_wait_for_queue_judges_only_its_own_tasks():
    """An earlier failed run of the same name and someone else's running or queued
    experiment neither fail this wait nor hold it up nor restart the workers."""
    old = [("0000000", "seed-3", "Failed"), ("1111111", "theirs", "Running"),
           ("2222222", "later", "Queued")]
    sequence = iter([status(*old, ("ccccccc", "seed-3", "Running"), active=1),
                     status(*old, ("ccccccc", "seed-3", "Success"), active=0)])
    starts = []
    wait_for_queue({"ccccccc": "seed-3"}, lambda: starts.append(1),
                   status=lambda: next(sequence), poll_s=0)
    assert starts == []


class Clock:
    """time.sleep and time.monotonic for experiments.queue: sleeping moves it on."""

    def __init__(self):
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def test_wait_for_queue_returns_a_task_shown_running_with_no_worker_left(monkeypatch):
    """DVC can show a task as Running for good after its worker is gone; the wait hands
    it back once no worker has answered for lost_after_s, and not while one answers now
    and then (a busy worker may miss a call)."""
    import experiments.queue

    clock = Clock()
    monkeypatch.setattr(experiments.queue, "time", clock)
    lost = status(("0000000", "seed-2", "Success"), ("ccccccc", "seed-3", "Running"), active=0)
    polls = []

    def polled() -> str:
        polls.append(clock.now)
        return lost

    assert wait_for_queue({"0000000": "seed-2", "ccccccc": "seed-3"}, lambda: None,
                          status=polled, poll_s=15, lost_after_s=60) == {"ccccccc"}
    assert polls == [15, 30, 45, 60, 75]  # first seen alone at 15 s, lost 60 s later
    busy = status(("ccccccc", "seed-3", "Running"), active=1)
    done = status(("ccccccc", "seed-3", "Success"), active=0)
    sequence = iter([lost] * 4 + [busy] + [lost] * 4 + [done])
    assert wait_for_queue({"ccccccc": "seed-3"}, lambda: None, status=lambda: next(sequence),
                          poll_s=15, lost_after_s=60) == set()


class LosingQueue:
    """DVC's queue as `sh` and `dvc queue status` show it, losing every task it is given:
    each shows as Running with no worker, until killed."""

    def __init__(self):
        self.rows, self.commands = {}, []

    def sh(self, *cmd: str, check: bool = True) -> None:
        self.commands.append(cmd[1:3])
        if cmd[1:4] == ("exp", "run", "--queue"):
            self.rows[f"{len(self.rows):07x}"] = (cmd[cmd.index("-n") + 1], "Running")
        elif cmd[1:3] == ("queue", "kill"):
            self.rows[cmd[3]] = (self.rows[cmd[3]][0], "Failed")

    def status(self) -> str:
        return status(*((task, *row) for task, row in self.rows.items()), active=0)


def test_a_run_lost_each_time_it_is_queued_again_fails_in_one_line(monkeypatch):
    import experiments.queue

    from experiments.queue import REQUEUES, run_queued

    queue, clock = LosingQueue(), Clock()
    monkeypatch.setattr(experiments.queue, "time", clock)
    monkeypatch.setattr(experiments.queue, "sh", queue.sh)
    with pytest.raises(StageError, match=r"^DVC's queue lost seed-3 \(shown as Running with no "
                                         r"worker left\) after lost runs were queued again 2 "
                                         r"times; see `dvc queue status`, and run again$"):
        run_queued({"seed-3": ["-S", "train.seed=3"]}, jobs=1, status=queue.status)
    assert REQUEUES == 2
    assert queue.commands == [("exp", "run"), ("queue", "start"), ("queue", "kill")] * 3
    assert [state for _, state in queue.rows.values()] == ["Failed"] * 3


# --- the step commits, made by a real `dvc repro` in a small repository ---------

SCORE = """\
import json, yaml
p = yaml.safe_load(open("params.yaml"))["train"]
json.dump({"accuracy": 90 + 100 * p["lr"], "dropout": p["dropout"]}, open("metrics/eval.json", "w"))
"""


@pytest.fixture
def step_repo(tmp_path, monkeypatch):
    """A git + DVC repository whose one stage turns train.lr into a metric."""
    import subprocess

    for var, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
                       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    (tmp_path / "score.py").write_text(SCORE)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"score": {"cmd": "python score.py", "deps": ["score.py"],
                             "params": ["train.lr", "train.dropout"],
                             "outs": [{"metrics/eval.json": {"cache": False}}]}},
        "metrics": ["metrics/eval.json"]}))
    for cmd in (["git", "init", "-q", "-b", "main"], ["dvc", "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "pipeline"]):
        subprocess.run(cmd, check=True)
    steps = {"step-1": {"title": "First", "params": {"train.lr": 0.01, "train.dropout": 0.1},
                        "target": "t", "notebook": None, "analysis": "a"},
             "step-2": {"title": "Second", "params": {"train.lr": 0.05},
                        "target": "t", "notebook": None, "analysis": "a"}}
    (tmp_path / "steps.yaml").write_text(yaml.safe_dump(steps, sort_keys=False))
    return tmp_path


@pytest.mark.slow
def test_commit_makes_one_commit_per_step_from_a_real_run(step_repo):
    import json
    import subprocess

    from experiments.steps import commit_steps

    recipe = yaml.safe_load((step_repo / "params.yaml").read_text())
    steps = load_steps(step_repo / "steps.yaml", step_repo / "params.yaml")
    commit_steps(steps, jobs=1)

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              check=True).stdout

    assert git("log", "--format=%s").splitlines()[:2] == ["step-2: Second", "step-1: First"]
    assert git("status", "--porcelain", "--untracked-files=no") == ""
    first = git("rev-parse", "HEAD^{/^step-1:}").strip()
    first = yaml.safe_load(git("show", f"{first}:params.yaml"))
    assert (first["train"]["lr"], first["train"]["dropout"]) == (0.01, 0.1)
    # step 2's overrides apply to the recipe, not on top of step 1's
    last = yaml.safe_load((step_repo / "params.yaml").read_text())
    assert last["train"]["lr"] == 0.05 and last["train"]["dropout"] == recipe["train"]["dropout"]
    diff = json.loads(subprocess.run(["dvc", "metrics", "diff", "HEAD^{/^step-1:}",
                                      "HEAD^{/^step-2:}", "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    change = diff["metrics/eval.json"]["accuracy"]
    assert change["old"] == pytest.approx(91.0) and change["new"] == pytest.approx(95.0)


def test_commit_refuses_a_dirty_tree(step_repo):
    from experiments.steps import commit_steps

    (step_repo / "score.py").write_text(SCORE + "\n# edited\n")
    with pytest.raises(StageError, match="uncommitted changes"):
        commit_steps(load_steps(step_repo / "steps.yaml", step_repo / "params.yaml"), jobs=1)


@pytest.mark.slow
def test_a_failed_run_on_the_queue_does_not_fail_a_later_one(step_repo, capsys):
    """A real queue: a run that fails, then the same name queued again with params that
    work. The old Failed row stays in `dvc queue status`; the second run succeeds."""
    import subprocess

    from experiments.queue import queue_status, queue_tasks, run_queued

    # a queued run starts from the commit, which has no metrics/ folder
    (step_repo / "score.py").write_text("import os\nos.makedirs('metrics', exist_ok=True)\n"
                                        + SCORE + "if p['lr'] > 1:\n    raise SystemExit(1)\n")
    subprocess.run(["git", "commit", "-qam", "score fails for lr > 1"], check=True)
    with pytest.raises(StageError, match="experiments seed-3 failed"):
        run_queued({"seed-3": ["-S", "train.lr=2"]}, jobs=1, poll_s=1)
    run_queued({"seed-3": ["-S", "train.lr=0.5"]}, jobs=1, poll_s=1)
    states = sorted(state for name, state in queue_tasks(queue_status()).values()
                    if name == "seed-3")
    # the first run's worker, shutting down, can take the second and drop it: that one is
    # killed (Failed) and queued again (the test below): 2 of 24 runs, six at once on 2 cores
    lost = capsys.readouterr().out.count("DVC's queue lost seed-3")
    assert states == ["Failed"] * (1 + lost) + ["Success"]


@pytest.mark.slow
@pytest.mark.timeout(180)  # a wait that misses the lost run never ends
def test_a_run_whose_worker_is_killed_is_killed_and_queued_again(step_repo, capsys):
    """A real queue whose worker is killed while it runs an experiment, as the
    out-of-memory killer would: DVC shows the run as Running for good. run_queued kills
    that task and queues the run again, which then succeeds."""
    import os
    import signal
    import subprocess

    from experiments.queue import (experiment_rev, queue_status, queue_tasks, read_at,
                                   run_queued)

    first = step_repo.parent / "first-run"  # the first run takes a while: long enough to kill
    (step_repo / "score.py").write_text(
        f"import os, pathlib, time\nfirst = pathlib.Path({str(first)!r})\n"
        "if not first.exists():\n    first.touch()\n    time.sleep(10)\n"
        "os.makedirs('metrics', exist_ok=True)\n" + SCORE)
    subprocess.run(["git", "commit", "-qam", "the first score takes a while"], check=True)
    killed = []

    def status() -> str:
        text = queue_status()
        if not killed and "Running" in text:
            for pid_file in (step_repo / ".dvc/tmp/exps/celery").glob("*.pid"):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                killed.append(pid_file.name)
        return text

    # long enough that a busy worker missing a few calls is not taken for a lost one
    run_queued({"seed-4": ["-S", "train.lr=0.5"]}, jobs=1, status=status, poll_s=1,
               lost_after_s=10)
    assert killed
    assert "DVC's queue lost seed-4: shown as Running with no worker left for 10 s; " \
           "killed, and queued again" in capsys.readouterr().out
    states = [state for name, state in queue_tasks(queue_status()).values() if name == "seed-4"]
    assert len(states) == 2 and "Running" not in states and "Success" in states
    assert '"accuracy": 140.0' in read_at(experiment_rev("seed-4"), "metrics/eval.json")


def test_only_selects_steps_in_order_and_names_an_unknown_one():
    from experiments.steps import select

    steps = load_steps(STEPS_FILE, PARAMS)
    assert list(select(steps, "step-3,step-1")) == ["step-1", "step-3"]
    assert select(steps, None) is steps
    with pytest.raises(StageError, match="--only step-9: no step step-9 in steps.yaml"):
        select(steps, "step-9")


def test_compare_leaves_out_a_seed_study_that_is_not_the_steps_own(step_repo, capfd):
    """Step commits carry metrics/seeds.json as it was when they were made: here step 1
    carries step 2's study. `compare` says so and leaves it out of the metrics diff,
    which would otherwise show step 2's seeds against step 1's as a change."""
    import json
    import subprocess

    from experiments.seeds import summarise
    from experiments.steps import compare, foreign_seed_studies

    def commit(lr, accuracy, seeds, message):
        params = yaml.safe_load(PARAMS.read_text())
        params["train"]["lr"] = lr
        (step_repo / "params.yaml").write_text(yaml.safe_dump(params))
        (step_repo / "metrics" / "eval.json").write_text(json.dumps({"accuracy": accuracy}))
        (step_repo / "metrics" / "seeds.json").write_text(json.dumps(seeds))
        subprocess.run(["git", "add", "-A"], check=True)
        subprocess.run(["git", "commit", "-qm", message], check=True)
        return params

    dvc_yaml = yaml.safe_load((step_repo / "dvc.yaml").read_text())
    dvc_yaml["metrics"].append("metrics/seeds.json")
    (step_repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    second = yaml.safe_load(PARAMS.read_text())
    second["train"]["lr"] = 0.05
    study = summarise({1: {"final": 99.5}, 2: {"final": 99.6}}, second)
    commit(0.01, 91.0, study, "step-1: First")
    commit(0.05, 95.0, {**study, "final": {**study["final"], "mean": 99.4}}, "step-2: Second")

    assert foreign_seed_studies(["HEAD^{/^step-2:}"]) == []
    [line] = foreign_seed_studies(["HEAD^{/^step-1:}", "HEAD^{/^step-2:}"])
    assert line == ("HEAD^{/^step-1:}: metrics/seeds.json measured another recipe than "
                    "its params.yaml (train.lr 0.05 where params.yaml has 0.01)")
    capfd.readouterr()
    compare(load_steps(step_repo / "steps.yaml", step_repo / "params.yaml"))
    out = capfd.readouterr().out
    assert f"{line}: left out of the metrics diff" in out
    assert "accuracy" in out and "seeds.json" not in out.split("left out")[1]
