"""tools.report: its parts on small inputs made here, then `make report` on the real step
commits in a fresh clone, on a revision that lacks outputs, and on a name git does not know."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest
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


def test_a_diff_table_per_file_and_a_line_for_a_file_a_revision_lacks():
    diff = {"metrics/eval.json": {"accuracy": {"old": 99.561234567, "new": None}},
            "metrics/ood.json": {f"k{i}": {"old": i, "new": i + 1, "diff": 1}
                                 for i in range(report.FOLDED + 1)}}
    parts = report.diff_markdown(diff, REV["base"], REV["head"], "metrics")
    assert parts[0] == f"head bbbbbbb has no `metrics/eval.json`: its metrics show as {docs.DASH}."
    assert parts[1].splitlines()[-1] == f"| `accuracy` | 99.56123 | {docs.DASH} | {docs.DASH} |"
    assert parts[2].startswith("<details><summary><code>metrics/ood.json</code>: 13 changed")
    assert report.diff_markdown({}, REV["base"], REV["head"], "params") == ["No params changed."]


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


# --- make report in a fresh clone ------------------------------------------------------

needs_history = pytest.mark.skipif(docs.is_shallow(REPO), reason=(
    "this shallow clone lacks the step commits that the report compares; "
    "`git fetch --unshallow` to run it"))


@pytest.fixture
def clone(tmp_path) -> tuple:
    """A fresh clone of this repository, with no DVC remote, and with the working tree's
    Makefile and tools/report.py, so that they are what runs on the committed steps."""
    env = make_env(tmp_path)
    path = tmp_path / "clone"
    sh("git", "clone", "-q", str(REPO), str(path), cwd=tmp_path, env=env)
    for name in ("Makefile", "tools/report.py"):
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
def test_a_name_git_does_not_know_is_one_line_and_exit_1(tmp_path):
    env = make_env(tmp_path)
    proc = sh(sys.executable, "-m", "tools.report", "--base", "no-such-rev",
              "--out", str(tmp_path / "report.md"), cwd=REPO, env=env, check=False)
    assert assert_one_line_error(proc).startswith(
        "error: base revision 'no-such-rev' is not a commit in this repository")
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report").exists()
