"""tools.report: its parts on small inputs made here, a tiny DVC project of two commits
(params, metrics, the seeds' spread, a signal mid-run), then `make report` on the real
step commits in a fresh clone, on a revision that lacks outputs, and on a name git does
not know."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from clones import make, make_env, sh
from helpers import REPO, assert_one_line_error
from stages.common import StageError
from stages.plot import read_history as plot_history
from tools import docs, report

BASE, HEAD = "HEAD^{/^step-4:}", "HEAD^{/^step-5:}"  # the example in docs/report.md
EXAMPLE = REPO / "docs" / "report.md"
REV = {role: report.Revision(role, role, sha * 40, f"{role}: a title")
       for role, sha in (("base", "a"), ("head", "b"))}


# --- the parts -----------------------------------------------------------------------

def test_dvc_status_splits_into_changes_and_what_only_the_cache_can_check():
    cached = report.cached_outputs({"stages": {
        "train": {"outs": ["models/model.pt", {"metrics/train": {"cache": False}}]},
        "prepare": {"outs": [{"data/prepared/train.pt": None}]}}})
    assert cached == ["models/model.pt", "data/prepared/train.pt"]
    status = {  # as `dvc status --json` has it in a clone without data
        "train": [{"changed deps": {"data/prepared": "modified",
                                    "stages/train.py": "modified",
                                    "params.yaml": {"train.lr": "modified"}}},
                  {"changed outs": {"models/model.pt": "not in cache",
                                    "metrics/train": "modified"}}],
        "evaluate": [{"changed deps": {"models/model.pt": "deleted"}}, "changed command"],
    }
    changes, unchecked = report.status_changes(status, cached)
    assert changes == ["`train`: dep `stages/train.py` modified",
                       "`train`: param `train.lr` modified",
                       "`train`: out `metrics/train` modified",
                       "`evaluate`: changed command"]
    assert unchecked == ["data/prepared", "models/model.pt"]


def test_a_change_in_test_accuracy_is_set_against_the_seed_to_seed_sd():
    # by hand: finals 99.50, 99.55, 99.60 have mean 99.55 and deviations −0.05, 0, +0.05,
    # so SD² = (0.0025 + 0 + 0.0025) / (3 − 1) = 0.0025 and SD = 0.05
    seeds = {"seeds": {str(i): {"final": acc} for i, acc in enumerate((99.5, 99.55, 99.6), 1)}}
    sd, n = report.seed_spread(json.dumps(seeds))
    assert n == 3 and sd == pytest.approx(0.05)
    assert report.against_spread(-0.01, sd) == "−0.01, within one seed-to-seed SD (0.05)"
    assert report.against_spread(0.12, sd) == "+0.12, 2.4 seed-to-seed SDs (0.05)"
    assert report.against_spread(0.12, 0.03) == "+0.12, 4.0 seed-to-seed SDs (0.03)"
    diff = {"metrics/eval.json": {"accuracy": {"old": 99.56, "new": 99.55,
                                               "diff": -0.010000000000005116},
                                  "errors": {"old": 44, "new": 45, "diff": 1}},
            "metrics/train/metrics.json": {"test.acc": {"old": 99.56, "new": 99.55,
                                                        "diff": -0.01},
                                           "best.test_acc": {"old": 99.6, "new": 99.5,
                                                             "diff": -0.1}}}
    assert report.test_accuracy_changes(diff) == {
        -0.01: ["`metrics/eval.json` `accuracy`", "`metrics/train/metrics.json` `test.acc`"]}
    assert report.test_accuracy_changes({"metrics/eval.json": {"errors": {"diff": 1}}}) == {}
    with pytest.raises(StageError, match="holds 1 seed, too few"):
        report.seed_spread(json.dumps({"seeds": {"1": {"final": 99.5}}}))
    with pytest.raises(StageError, match="^metrics/seeds.json is unreadable"):
        report.seed_spread("{}")


def test_the_digits_that_changed_and_the_confusion_change():
    base = pd.DataFrame({"actual": [1, 2, 3, 4, 5], "predicted": [1, 7, 3, 9, 6]})
    head = pd.DataFrame({"actual": [1, 2, 3, 4, 5], "predicted": [7, 2, 3, 8, 6]})
    changed = report.changed_digits(base, head)
    assert {kind: frame.index.tolist() for kind, frame in changed.items()} == {
        "newly wrong": [0], "newly right": [1], "still wrong, another answer": [3]}
    change = report.confusion_matrix(head) - report.confusion_matrix(base)
    assert (change.loc[1, 7], change.loc[1, 1], change.loc[2, 7], change.loc[4, 8]) == (1, -1, -1, 1)
    assert change.to_numpy().sum() == 0
    assert "| **1** |  | −1 |  |  |  |  |  | +1 |  |  |" in report.change_markdown(change)
    with pytest.raises(StageError, match="holds other test images"):
        report.changed_digits(base, head.iloc[:4])


def test_the_curves_read_from_text_as_the_plot_stage_reads_its_files():
    texts = {name: (REPO / path).read_text() for name, path in report.history_paths().items()}
    ours = report.read_history(texts)
    assert list(ours.columns) == ["train/acc", "train/loss", "test/acc", "test/loss"]
    pd.testing.assert_frame_equal(ours, plot_history(REPO / docs.LIVE_DIR)[ours.columns])


def test_the_figures_are_the_same_bytes_when_drawn_again(tmp_path):
    texts = {name: (REPO / path).read_text() for name, path in report.history_paths().items()}
    histories = {REV["base"]: report.read_history(texts), REV["head"]: report.read_history(texts)}
    frame = pd.read_csv(REPO / report.CONFUSION)
    matrices = {rev: report.confusion_matrix(frame) for rev in REV.values()}
    for attempt in ("a", "b"):
        report.draw_curves(histories, tmp_path / attempt / "curves.png")
        report.draw_confusion(matrices, tmp_path / attempt / "confusion.png")
    for name in ("curves.png", "confusion.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_an_output_a_revision_lacks_or_that_cannot_be_read_is_one_line():
    rev = report.resolve(REPO, "head", "HEAD")

    def unreadable(texts):
        raise StageError(f"{report.CONFUSION} is unreadable (no columns)")

    parsed, lines = report.read_outputs(REPO, (rev,), [report.CONFUSION, "no/such.csv"],
                                        len, "left out")
    assert (parsed, lines) == ({}, [f"{rev.label} has no `no/such.csv`: left out."])
    parsed, lines = report.read_outputs(REPO, (rev,), [report.CONFUSION], unreadable, "left out")
    assert (parsed, lines) == ({}, [f"{rev.label}: plots/confusion.csv is unreadable (no "
                                    "columns): left out."])
    with pytest.raises(StageError, match=r"^plots/confusion.csv is unreadable"):
        report.read_confusion("a,b\n1\n2,3,4,5\n")


def test_a_shallow_clone_says_how_to_get_the_history(tmp_path):
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(shallow)],
                   check=True)
    with pytest.raises(StageError, match=r"^base revision 'HEAD\^\{/\^step-4:\}' is not a "
                                         r"commit in this repository; this shallow clone "
                                         r"lacks history: `git fetch --unshallow`$"):
        report.resolve(shallow, "base", BASE)


# --- a tiny DVC project of two commits ------------------------------------------------

SEEDS_DOC = {"seeds": {str(i): {"final": acc} for i, acc in enumerate((99.5, 99.55, 99.6), 1)}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A DVC project with one stage, params.yaml and metrics/eval.json. The base commit
    has metrics/seeds.json (SD 0.05, by hand above); the head commit adds a param
    (train.scale, only a new key), lowers accuracy by 0.01 and drops seeds.json."""
    top = tmp_path_factory.mktemp("tiny")
    env = make_env(top)
    root = top / "repo"
    sh("git", "init", "-q", "-b", "main", str(root), cwd=top, env=env)
    sh("dvc", "init", "-q", cwd=root, env=env)
    (root / "metrics").mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"run": {"cmd": "echo run > out.txt", "params": ["train"],
                           "outs": ["out.txt"]}},
        "metrics": ["metrics/eval.json", "metrics/seeds.json"]}))
    for params, accuracy, seeds, title in (({"lr": 0.1}, 99.5, SEEDS_DOC, "base"),
                                           ({"lr": 0.1, "scale": 0.1}, 99.49, None, "head")):
        (root / "params.yaml").write_text(yaml.safe_dump({"train": params}))
        (root / "metrics" / "eval.json").write_text(json.dumps({"accuracy": accuracy}))
        if seeds:
            (root / "metrics" / "seeds.json").write_text(json.dumps(seeds))
        else:
            sh("git", "rm", "-q", "metrics/seeds.json", cwd=root, env=env)
        sh("dvc", "repro", "-q", cwd=root, env=env)
        sh("git", "add", "-A", cwd=root, env=env)
        sh("git", "commit", "-qm", title, cwd=root, env=env)
    return root, env


@pytest.mark.slow
def test_a_diff_table_per_file_and_a_line_for_a_file_a_revision_lacks(tiny):
    """The tiny project's base has metrics/seeds.json, its head not; neither has ood.json."""
    root, _ = tiny
    base, head = (report.resolve(root, role, rev) for role, rev in (("base", "HEAD^"),
                                                                    ("head", "HEAD")))
    diff = {"metrics/seeds.json": {"seeds.1.final": {"old": 99.561234567, "new": None}},
            "metrics/ood.json": {f"k{i}": {"old": i, "new": i + 1, "diff": 1}
                                 for i in range(report.FOLDED + 1)}}
    parts = report.diff_markdown(root, diff, base, head, "metrics")
    assert parts[:3] == [
        f"{head.label} has no `metrics/seeds.json`: its metrics show as {docs.DASH}.",
        f"{base.label} has no `metrics/ood.json`: its metrics show as {docs.DASH}.",
        f"{head.label} has no `metrics/ood.json`: its metrics show as {docs.DASH}."]
    assert parts[3].splitlines()[-1] == (f"| `seeds.1.final` | 99.56123 | {docs.DASH} | "
                                         f"{docs.DASH} |")
    assert parts[4].startswith("<details><summary><code>metrics/ood.json</code>: 13 changed")
    assert report.diff_markdown(root, {}, base, head, "params") == ["No params changed."]


@pytest.mark.slow
def test_a_file_whose_changed_keys_are_all_new_is_not_said_missing(tiny, tmp_path,
                                                                    monkeypatch):
    root, env = tiny
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    report.write_report(root, "HEAD^", "HEAD", tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "has no `params.yaml`" not in text
    assert f"| `train.scale` | {docs.DASH} | 0.1 | {docs.DASH} |" in text
    base = report.resolve(root, "base", "HEAD^")
    head = report.resolve(root, "head", "HEAD")
    # seeds.json is gone at head, so the spread is the base's: 0.05 by hand
    assert (f"\nTest accuracy (`metrics/eval.json` `accuracy`), head − base: −0.01, within "
            f"one seed-to-seed SD (0.05): the standard deviation of the final test "
            f"accuracy over the 3 seeds of `metrics/seeds.json` at {base.label}; a "
            f"difference between two single runs spreads √2 times as much.\n") in text
    assert f"{head.label} has no `metrics/seeds.json`: its metrics show as" in text
    assert "**Yes.** `dvc status`" in text


@pytest.mark.slow
def test_without_seeds_json_the_noise_is_unknown(tiny):
    root, _ = tiny
    head = report.resolve(root, "head", "HEAD")
    diff = {"metrics/eval.json": {"accuracy": {"old": 99.5, "new": 99.38, "diff": -0.12}}}
    assert report.noise_markdown(root, head, head, diff) == [
        "Test accuracy (`metrics/eval.json` `accuracy`), head − base: −0.12; the "
        "seed-to-seed spread is unknown: neither revision has `metrics/seeds.json` "
        "(`make seeds` measures it)."]
    base = report.resolve(root, "base", "HEAD^")
    assert report.noise_markdown(root, base, head, diff)[0].startswith(
        "Test accuracy (`metrics/eval.json` `accuracy`), head − base: −0.12, 2.4 "
        "seed-to-seed SDs (0.05): ")



def test_the_noise_comes_from_a_revisions_own_seed_study_or_says_whose_it_is(tmp_path):
    """The step commits carry the seeds.json of the recipe that was current when they
    were made. The report takes a revision's own study where there is one, and names
    the recipe of one that is not."""
    from experiments.seeds import summarise

    env = make_env(tmp_path)
    root = tmp_path / "repo"
    sh("git", "init", "-q", "-b", "main", str(root), cwd=tmp_path, env=env)
    (root / "metrics").mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    study = summarise({i: {"final": acc} for i, acc in enumerate((99.5, 99.55, 99.6), 1)},
                      params)  # SD 0.05, of this recipe
    (root / "metrics" / "seeds.json").write_text(json.dumps(study))
    for lr, title in ((params["train"]["lr"], "base"), (0.5, "head")):  # the study stays
        params["train"]["lr"] = lr
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        sh("git", "add", "-A", cwd=root, env=env)
        sh("git", "commit", "-qm", title, cwd=root, env=env)
    base = report.resolve(root, "base", "HEAD^")
    head = report.resolve(root, "head", "HEAD")
    diff = {"metrics/eval.json": {"accuracy": {"old": 99.5, "new": 99.38, "diff": -0.12}}}
    own = report.noise_markdown(root, base, head, diff)  # head's is not its own: base's
    assert own == [f"Test accuracy (`metrics/eval.json` `accuracy`), head − base: −0.12, "
                   f"2.4 seed-to-seed SDs (0.05): the standard deviation of the final test "
                   f"accuracy over the 3 seeds of `metrics/seeds.json` at {base.label}; a "
                   f"difference between two single runs spreads √2 times as much."]
    [other] = report.noise_markdown(root, head, head, diff)
    assert (f"over the 3 seeds of `metrics/seeds.json` at {head.label}, which measured "
            f"another recipe than that revision's `params.yaml` (train.lr "
            f"{study['params']['train.lr']} where params.yaml has 0.5); a difference") in other

FAKE_DVC = """#!/bin/sh
# `dvc status` tells the test that the report is in its temporary worktree, then waits
# there for the signal; any other dvc command finds nothing changed
case "$1" in
  status) echo $$ > "$READY.tmp" && mv "$READY.tmp" "$READY" && exec sleep 300 ;;
  *) echo '{}' ;;
esac
"""


def alive(pid: int) -> bool:
    """Whether PID runs (a zombie, which no one reaps here, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_mid_report_leaves_no_worktree_and_no_files(tiny, tmp_path, sig):
    """A cancelled CI job: the signal arrives while `dvc status` runs in the temporary
    worktree (the fake dvc below says when; no timing)."""
    root, env = tiny
    bin_dir, temp, out = tmp_path / "bin", tmp_path / "temp", tmp_path / "out"
    for folder in (bin_dir, temp, out):
        folder.mkdir()
    (bin_dir / "dvc").write_text(FAKE_DVC)
    (bin_dir / "dvc").chmod(0o755)
    ready = tmp_path / "ready"
    run_env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "TMPDIR": str(temp),
               "READY": str(ready), "PYTHONPATH": str(REPO)}

    def worktrees() -> list[str]:
        listing = sh("git", "worktree", "list", "--porcelain", cwd=root, env=env).stdout
        return [line for line in listing.splitlines() if line.startswith("worktree ")]

    proc = subprocess.Popen([sys.executable, "-m", "tools.report", "--base", "HEAD^",
                             "--out", str(out / "report.md")], cwd=root, env=run_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status_pid = None
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the report never reached `dvc status`"
            time.sleep(0.05)
        status_pid = int(ready.read_text())
        assert len(worktrees()) == 2 and any(temp.iterdir())  # in the worktree now
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == -sig, stderr  # died of the signal, after cleaning up
        assert "Traceback" not in stderr, stderr
        assert worktrees() == [f"worktree {root}"]
        assert not list(temp.iterdir())
        assert not list(out.iterdir())  # no report, no half-written figures
        assert not alive(status_pid)
    finally:
        proc.kill()
        proc.wait()
        if status_pid and alive(status_pid):
            os.kill(status_pid, signal.SIGKILL)
        for line in worktrees()[1:]:  # what a failure left, for the next case
            sh("git", "worktree", "remove", "--force", line.split(" ", 1)[1], cwd=root,
               env=env)


# --- make report in a fresh clone ------------------------------------------------------

needs_history = pytest.mark.skipif(docs.is_shallow(REPO), reason=(
    "this shallow clone lacks the step commits that the report compares; "
    "`git fetch --unshallow` to run it"))


@pytest.fixture
def clone(tmp_path) -> tuple:
    """A fresh clone of this repository, with no DVC remote, and with the working tree's
    Makefile, tools/report.py and experiments/seeds.py (which the report reads seed
    studies with), so that they are what runs on the committed steps."""
    env = make_env(tmp_path)
    path = tmp_path / "clone"
    sh("git", "clone", "-q", str(REPO), str(path), cwd=tmp_path, env=env)
    for name in ("Makefile", "tools/report.py", "experiments/seeds.py"):
        shutil.copy(REPO / name, path / name)
    return path, env


@pytest.mark.slow
@needs_history
def test_make_report_on_two_step_commits_writes_docs_example(clone):
    path, env = clone
    make("report", path, {**env, "BASE": BASE, "HEAD": HEAD})
    text = (path / "report.md").read_text()
    assert text == EXAMPLE.read_text(), (
        "docs/report.md is stale: run `make docs`")
    assert "\n**Yes.** `dvc status` at head" in text
    for name in ("curves.png", "confusion.png"):  # the bytes may differ between machines
        with Image.open(path / "report" / name) as new, \
                Image.open(EXAMPLE.with_suffix("") / name) as committed:
            assert new.size == committed.size, name


@pytest.mark.slow
@needs_history
def test_a_revision_that_lacks_outputs_gets_a_line_each_and_the_rest(clone, monkeypatch):
    path, env = clone
    lost = ["plots/confusion.csv", "metrics/eval.json", report.history_paths()["test/acc"]]
    sh("git", "rm", "-q", *lost, cwd=path, env=env)
    sh("git", "commit", "-qm", "lose some outputs", cwd=path, env=env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    report.write_report(path, "HEAD^", "HEAD", path / "report.md")
    text = (path / "report.md").read_text()
    head = sh("git", "rev-parse", "--short=7", "HEAD", cwd=path, env=env).stdout.strip()
    for line in (f"head {head} has no `plots/confusion.csv`: no confusion matrix and no "
                 "digits to compare.",
                 f"head {head} has no `metrics/eval.json`: its metrics show as {docs.DASH}.",
                 f"head {head} has no `{lost[2]}`: its curves are left out.",
                 "- `evaluate`: out `metrics/eval.json` deleted"):
        assert f"\n{line}\n" in text, line
    assert "## Params (`dvc params diff`)\n\nNo params changed." in text
    assert "(report/curves.png)" in text  # the base's curves alone
    assert "**No.** `dvc status`" in text and "confusion.png" not in text
    assert sorted(p.name for p in (path / "report").iterdir()) == ["curves.png"]


@pytest.mark.slow
def test_a_base_with_a_quote_and_a_semicolon_stays_a_name(clone):
    """A branch may be named so (git allows both); report.yml passes the pull request's
    base branch to `make report BASE=...`."""
    path, env = clone
    base = "x';touch pwned;'"
    proc = make("report", path, env, f"BASE={base}", check=False)
    assert proc.returncode != 0
    assert f"error: base revision {base!r} is not a commit in this repository" in proc.stderr
    assert not (path / "pwned").exists()


@pytest.mark.slow
def test_a_name_git_does_not_know_is_one_line_and_exit_1(tmp_path):
    env = make_env(tmp_path)
    proc = sh(sys.executable, "-m", "tools.report", "--base", "no-such-rev",
              "--out", str(tmp_path / "report.md"), cwd=REPO, env=env, check=False)
    assert assert_one_line_error(proc).startswith(
        "error: base revision 'no-such-rev' is not a commit in this repository")
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report").exists()
