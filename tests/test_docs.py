"""README.md and docs/: generated tables current, links that resolve, a short README;
and tools.docs' generators on small inputs made here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import types

import pytest
import yaml

from helpers import REPO
from stages.common import StageError
from tools import docs

MARKDOWN = docs.markdown_files(REPO)


# --- the repository's own docs ---------------------------------------------------

SHALLOW = docs.is_shallow(REPO)


def test_every_generated_block_is_current():
    # a shallow clone checks all but the blocks read from the step commits (next test);
    # otherwise no skip: without the step commits, this fails with the generator's
    # error, which names the step and the command that makes them
    stale = docs.refresh(REPO, check=True, skip=docs.HISTORY_BLOCKS if SHALLOW else frozenset())
    assert stale == [], "\n".join(stale)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    broken = []
    for target in docs.relative_links(path.read_text()):
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(REPO)}")
        elif anchor and linked.suffix == ".md" and anchor not in docs.anchors(linked.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert broken == [], f"{path.relative_to(REPO)}:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_no_placeholder_is_left_in_the_docs(path):
    placeholders = [line for line in docs.prose_lines(path.read_text())
                    if re.fullmatch(r"\s*(VERDICT|TODO|TBD|FIXME|XXX)\b.*", line)]
    assert placeholders == []


def test_the_docs_say_which_steps_were_chosen_on_test():
    """Steps 1-5 were chosen on the test set, step 6's change on validation: no page
    may say the recipe was chosen without the test set."""
    for path in MARKDOWN:
        assert "recipe was chosen without the test set" not in " ".join(
            path.read_text().split()), path
    readme = " ".join((REPO / "README.md").read_text().split())
    assert ("Steps 1 to 5, the bulk of the recipe, were chosen on the test set; step 6's one "
            "change, a random zoom, on a validation split") in readme


def test_readme_is_a_landing_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 160
    first = "\n".join(lines[:40])
    assert "make repro   # fresh machine" in first
    assert "make test    # fresh machine" in first


# --- links and anchors -----------------------------------------------------------

def test_github_slugs():
    assert docs.github_slug("step-1: A lighter model") == "step-1-a-lighter-model"
    assert docs.github_slug("Speed, reliability, tests") == "speed-reliability-tests"
    assert docs.github_slug("The runtime_env (see [here](x.md))") == "the-runtime_env-see-here"
    text = "# Top\n```\n# not a heading\n```\n## The `train` stage\n## Top\n"
    assert docs.anchors(text) == {"top", "the-train-stage", "top-1"}


def test_relative_links_skip_urls_and_code():
    text = ("[a](docs/a.md) ![b](plots/b.png) [c](https://x.org/c.md) [d](#d)\n"
            "`[e](e.md)`\n```\n[f](f.md)\n```\n[g](docs/g.md#h \"title\")\n")
    assert docs.relative_links(text) == ["docs/a.md", "plots/b.png", "#d", "docs/g.md#h"]


# --- the generators --------------------------------------------------------------

EVAL = {"accuracy": 99.52, "errors": 48, "loss": 0.015, "params": 7776}


def train_metrics(final=99.52, best=99.58, epoch=13, train=99.6017):
    return {"test": {"acc": final}, "step": 15, "params": 7776,
            "best": {"test_acc": best, "test_epoch": epoch, "train_acc": train}}


def test_result_is_one_row_of_the_run():
    text = docs.result_markdown(EVAL, train_metrics())
    assert text.splitlines()[2] == "| **99.52 %** | 48 | 7,776 | 15 | 99.58 % (13) |"


def test_epochs_table_has_a_column_per_epoch():
    text = docs.epochs_markdown({1: 98.2, 2: 99.0}, {1: 92.356, 2: 97.9})
    assert text.splitlines() == ["| epoch | 1 | 2 |", "|---|---|---|",
                                 "| test % | 98.20 | 99.00 |", "| train % | 92.36 | 97.90 |"]


def write_seeds(root, lr=0.2):
    from experiments.seeds import summarise

    results = {1: {"final": 99.52, "best": 99.58, "best_epoch": 13, "epochs": 15},
               2: {"final": 99.4, "best": 99.5, "best_epoch": 12, "epochs": 15}}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["lr"] = lr
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/seeds.json").write_text(json.dumps(summarise(results, params)))
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())


def test_seeds_table_from_seeds_json(tmp_path):
    assert "run `make seeds`" in docs.seeds_block(tmp_path)
    ran_lr = yaml.safe_load((REPO / "params.yaml").read_text())["train"]["lr"]
    write_seeds(tmp_path, lr=ran_lr)
    text = docs.seeds_block(tmp_path)
    assert "| 1 | 99.52 | 99.58 (13) |" in text and "| 2 | 99.40 | 99.50 (12) |" in text
    assert "min 99.40, median 99.46, mean 99.46" in text
    assert "params.yaml has since changed" not in text


def test_seeds_table_says_when_params_yaml_moved_on(tmp_path):
    write_seeds(tmp_path, lr=0.123)
    assert "params.yaml has since changed: `train.lr` 0.123 (params.yaml:" in docs.seeds_block(
        tmp_path)


def test_benchmark_table_from_its_json(tmp_path):
    assert "--out benchmarks/results-cpu.json" in docs.benchmark_block(tmp_path)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks/results-cpu.json").write_text(json.dumps({
        "project_img_s": 2500.0, "baseline_img_s": 1000.0, "ceiling_img_s": 2600.0,
        "paired_vs_baseline": 2.4, "paired_vs_ceiling": 0.95, "device": "cpu (1 threads)",
        "torch": "2.14.1", "train_images": 60000, "rounds": 3}))
    text = docs.benchmark_block(tmp_path)
    assert "| cpu (1 threads) | 2.14.1 | 2,500 | 1,000 | 2,600 | 2.50× | 0.96× | 2.40×, 0.95× |" in text
    assert "fastest of 3 rounds of 60,000 training images" in text


def test_search_block_from_search_json(tmp_path):
    from experiments.search import table

    assert "python -m experiments.search next" in docs.search_block(tmp_path)
    (tmp_path / "experiments").mkdir()
    record = (REPO / "experiments/search.json").read_text()
    (tmp_path / "experiments/search.json").write_text(record)
    assert docs.search_block(tmp_path) == table(json.loads(record))


LEDGER_ENTRY = {"when": "2026-12-06", "recipe": "step 6", "scored": "seeds 1 to 10",
                "why": "score it once", "decided": "nothing | yet", "record": "6a3a5c6"}


def test_the_test_read_ledger_is_a_table_of_its_entries(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments/test_reads.yaml").write_text(yaml.safe_dump(
        [{**LEDGER_ENTRY, "when": "before 2026-11-25", "scored": "one run,\n  of each"},
         LEDGER_ENTRY], sort_keys=False))
    assert docs.ledger_block(tmp_path).splitlines() == [
        "| when | recipe | scored on test | why | what it decided | where recorded |",
        "|---|---|---|---|---|---|",
        "| before 2026-11-25 | step 6 | one run, of each | score it once | nothing \\| yet "
        "| 6a3a5c6 |",
        "| 2026-12-06 | step 6 | seeds 1 to 10 | score it once | nothing \\| yet | 6a3a5c6 |"]


@pytest.mark.parametrize("text, message", [
    ("[]\n", "expected a list of entries"),
    ("- {when: 2026-12-06, recipe: a, scored: b, why: c, decided: d, record: e}\n",
     r"entry 1 needs exactly when, recipe, scored, why, decided, record, each a line of "
     r"text \(quote a date\)"),
    ("- {when: x, recipe: a, scored: b, why: c, decided: d}\n", "entry 1 needs exactly"),
])
def test_a_malformed_ledger_is_one_line_error(tmp_path, text, message):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments/test_reads.yaml").write_text(text)
    with pytest.raises(StageError, match=message):
        docs.ledger_block(tmp_path)


def test_gpu_block_without_results_and_with_them(tmp_path, monkeypatch):
    check = types.SimpleNamespace(RESULTS="benchmarks/results-gpu.json",
                                  gpu_table=lambda results: f"| {results['device']} |")
    monkeypatch.setattr(docs, "gpu_check", check)
    assert docs.gpu_block(tmp_path) == docs.NO_GPU  # no results file yet
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks/results-gpu.json").write_text('{"device": "H100"}')
    assert docs.gpu_block(tmp_path) == "| H100 |"


# --- the steps, read from step commits in a small repository ---------------------

def git(root, *args):
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def commit_run(root, message, accuracy, best, epoch, train):
    (root / "metrics/train").mkdir(parents=True, exist_ok=True)
    (root / "metrics/eval.json").write_text(json.dumps({**EVAL, "accuracy": accuracy}))
    (root / "metrics/train/metrics.json").write_text(json.dumps(
        train_metrics(accuracy, best, epoch, train)))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)


@pytest.fixture
def step_repo(tmp_path, monkeypatch):
    """A git repository with two steps in steps.yaml and a commit for each; step-1's
    second commit is younger than step-2's, so it is the one that counts."""
    for var, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
                       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}.items():
        monkeypatch.setenv(var, value)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    steps = {"step-1": {"title": "First", "params": {"train.lr": 0.01, "train.dropout": 0.1},
                        "target": "Be first.", "analysis": "It was.",
                        "notebook": {"best_train": 99.0, "best_test": 99.32,
                                     "best_test_epoch": 13}},
             "step-2": {"title": "Second", "params": {"train.weight_decay": 0.0001},
                        "target": "Be second.", "analysis": "Also.", "notebook": None,
                        "results": "A note on the run."}}
    (tmp_path / "experiments/steps.yaml").write_text(yaml.safe_dump(steps, sort_keys=False))
    git(tmp_path, "init", "-q", "-b", "main")
    commit_run(tmp_path, "step-1: First", 99.0, 99.1, 9, 98.0)
    commit_run(tmp_path, "step-2: Second", 99.33, 99.42, 13, 99.12)
    commit_run(tmp_path, "step-1: First, again", 99.2, 99.3, 14, 98.5)
    commit_run(tmp_path, "not a step-1: commit", 50.0, 50.0, 1, 50.0)
    return tmp_path


def test_steps_table_reads_each_steps_youngest_commit(step_repo):
    lines = docs.steps_block(step_repo).splitlines()
    assert lines[2] == ("| step-1 | First | lr=0.01, dropout=0.1 | 99.20 | 99.30 (14) | 98.50 "
                        "| 99.00 / 99.32 (13) |")
    assert lines[3] == "| step-2 | Second | weight_decay=0.0001 | 99.33 | 99.42 (13) | 99.12 | — |"
    assert len(lines) == 4


def test_step_notes_hold_target_results_and_analysis(step_repo):
    text = docs.step_notes_block(step_repo)
    assert "### step-1: First" in text and "### step-2: Second" in text
    assert "**Target.** Be first." in text and "**Analysis.** Also." in text
    assert ("**Results.** Final test accuracy 99.33 % (48 errors); as the notebook measures it, "
            "selected on test, best 99.42 % at epoch 13; best train accuracy 99.12 %. A note "
            "on the run.") in text
    assert "The notebook: best train 99.00 %, best test 99.32 % (epoch 13)." in text
    assert "Sets `train.lr=0.01`, `train.dropout=0.1`." in text


def test_the_last_step_carries_the_seed_summary_of_params_yaml(step_repo):
    summary = "Over 2 seeds (`metrics/seeds.json`), the final test accuracy was 99.40 %"
    assert summary not in docs.step_notes_block(step_repo)
    write_seeds(step_repo, lr=yaml.safe_load((REPO / "params.yaml").read_text())["train"]["lr"])
    first, last = docs.step_notes_block(step_repo).split("### step-2")
    assert summary + " at least, median 99.46 %, mean 99.46 %. A note on the run." in last
    assert "seeds" not in first
    write_seeds(step_repo, lr=0.123)  # seeds of another recipe say nothing of this one
    assert summary not in docs.step_notes_block(step_repo)


def test_a_gpu_check_that_did_not_record_its_commit_is_dated_by_git(step_repo):
    """The first schema had no commit: the one HEAD's history held at the check's start."""
    measured = git(step_repo, "rev-parse", "HEAD").strip()
    started = git(step_repo, "log", "-1", "--format=%cI").strip()
    (step_repo / "benchmarks").mkdir()
    (step_repo / "benchmarks/results-gpu.json").write_text(json.dumps({"started": started}))
    git(step_repo, "add", "-A")
    subprocess.run(["git", "commit", "-qm", "later"], cwd=step_repo, check=True,
                   env={**os.environ, "GIT_COMMITTER_DATE": "2030-01-01T00:00:00+00:00"})
    assert docs.gpu_results(step_repo)["commit"] == f"{measured[:7]} (HEAD when the check started)"
    (step_repo / "benchmarks/results-gpu.json").write_text(
        json.dumps({"started": started, "commit": "abc1234"}))
    assert docs.gpu_results(step_repo)["commit"] == "abc1234"


def test_steps_are_read_from_heads_history_only(step_repo):
    """A younger `step-1:` commit on another branch, or a fetched ref, does not count."""
    expected = docs.steps_block(step_repo)
    git(step_repo, "checkout", "-q", "-b", "other")
    commit_run(step_repo, "step-1: On another branch", 10.0, 10.0, 1, 10.0)
    git(step_repo, "update-ref", "refs/remotes/origin/x", "HEAD")
    git(step_repo, "checkout", "-q", "main")
    assert docs.steps_block(step_repo) == expected


def test_a_shallow_clone_says_how_to_get_the_step_commits(step_repo, tmp_path):
    clone = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", step_repo.as_uri(), str(clone))
    assert docs.is_shallow(clone) and not docs.is_shallow(step_repo)
    with pytest.raises(StageError, match=r"^step-1: this shallow clone lacks the step commits; "
                                         r"fetch them with `git fetch --unshallow`$"):
        docs.steps_block(clone)


def test_a_shallow_clone_checks_every_block_but_those_read_from_history(step_repo, tmp_path):
    """What test_every_generated_block_is_current does in a shallow clone: the blocks
    read from the step commits are left out, every other block is still checked, and
    without leaving them out the check stops at one line that says how to fetch them."""
    (step_repo / "README.md").write_text(
        f"# R\n\n<!-- generated: steps -->\n\n{docs.steps_block(step_repo)}\n\n"
        "<!-- end: steps -->\n\n<!-- generated: result -->\nold\n<!-- end: result -->\n")
    git(step_repo, "add", "README.md")
    git(step_repo, "commit", "-qm", "README")
    assert docs.refresh(step_repo, check=True) == [
        "README.md: block result is stale; run `python -m tools.docs`"]
    clone = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", step_repo.as_uri(), str(clone))
    assert docs.refresh(clone, check=True, skip=docs.HISTORY_BLOCKS) == [
        "README.md: block result is stale; run `python -m tools.docs`"]
    with pytest.raises(StageError, match="shallow clone lacks the step commits"):
        docs.refresh(clone, check=True)


def test_a_step_without_a_commit_is_one_clear_error(step_repo):
    steps = yaml.safe_load((step_repo / "experiments/steps.yaml").read_text())
    steps["step-3"] = {**steps["step-2"], "title": "Third"}
    (step_repo / "experiments/steps.yaml").write_text(yaml.safe_dump(steps, sort_keys=False))
    with pytest.raises(StageError, match=r"step-3 has no commit .*python -m experiments.steps "
                                         r"commit"):
        docs.steps_block(step_repo)


# --- finding, checking and rewriting blocks --------------------------------------

def docs_root(tmp_path):
    (tmp_path / "metrics/train").mkdir(parents=True)
    (tmp_path / "metrics/eval.json").write_text(json.dumps(EVAL))
    (tmp_path / "metrics/train/metrics.json").write_text(json.dumps(train_metrics()))
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# R\n\n<!-- generated: result -->\nold\n<!-- end: result -->\n\ntail\n")
    (tmp_path / "docs/a.md").write_text("# A\n\n<!-- generated: benchmark -->\n"
                                        "<!-- end: benchmark -->\n")
    return tmp_path


def test_check_lists_stale_blocks_then_refresh_fixes_them(tmp_path, monkeypatch, capsys):
    root = docs_root(tmp_path)
    monkeypatch.chdir(root)
    assert docs.main(["--check"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "README.md: block result is stale; run `python -m tools.docs`",
        "docs/a.md: block benchmark is stale; run `python -m tools.docs`"]
    assert docs.main([]) == 0
    readme = (root / "README.md").read_text()
    assert readme.startswith("# R\n\n<!-- generated: result -->\n\n| test accuracy |")
    assert readme.endswith("|\n\n<!-- end: result -->\n\ntail\n")
    assert docs.refresh(root, check=True) == []
    capsys.readouterr()
    assert docs.main(["--check"]) == 0


@pytest.mark.parametrize("text, message", [
    ("<!-- generated: result -->\n", "README.md: generated block result has no end marker"),
    ("<!-- generated: nope -->\n<!-- end: nope -->\n", "unknown generated block nope"),
])
def test_malformed_blocks_are_one_line_errors(tmp_path, text, message):
    root = docs_root(tmp_path)
    (root / "README.md").write_text(text)
    with pytest.raises(StageError, match=message):
        docs.refresh(root, check=True)
