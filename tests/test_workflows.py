"""The forge's workflows, checked without a forge: each against the GitHub-workflow schema
that check-jsonschema ships (offline), and the tests workflow against README's command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
IDS = [path.name for path in WORKFLOWS]


def lint(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.github-workflows", *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def load(name: str) -> dict:
    """A workflow, parsed. YAML 1.1 reads the key `on` as True; put it back."""
    doc = yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())
    doc["on"] = doc.pop(True)
    return doc


def test_the_three_workflows_are_there():
    assert IDS == ["report.yml", "tests.yml", "train.yml"]


def test_the_committed_workflows_pass_the_schema():
    proc = lint(*WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_a_workflow_with_an_unknown_key_fails(path, tmp_path):
    text, n = re.subn(r"^(\s+)(runs-on:.*)$", r"\1\2\n\1timeout_minutes: 5", path.read_text(),
                      count=1, flags=re.M)
    assert n == 1
    broken = tmp_path / path.name
    broken.write_text(text)
    proc = lint(broken)
    assert proc.returncode == 1
    assert "'timeout_minutes' was unexpected" in proc.stdout


def readme_test_command() -> str:
    """The command README's "Run it" block gives for the tests, without its comment."""
    section = (REPO / "README.md").read_text().split("## Run it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    return next(command for command in commands if command.endswith(" test"))


def test_each_test_step_of_the_tests_workflow_is_readmes_command():
    command = readme_test_command()
    assert command == "make test"
    runs = [step["run"].strip() for job in load("tests.yml")["jobs"].values()
            for step in job["steps"] if "run" in step]
    testing = [run for run in runs if re.search(r"\b(pytest|make)\b", run)]
    assert testing == [command], runs


def test_the_tests_workflow_caches_the_virtualenv_that_make_uses_on_the_locks_hash():
    venv = re.search(r"^VENV \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    caches = [step["with"] for step in load("tests.yml")["jobs"]["tests"]["steps"]
              if step.get("uses", "").startswith("actions/cache@")
              and step["with"]["path"] == venv]
    assert len(caches) == 1 and "hashFiles('requirements.lock')" in caches[0]["key"]


def test_what_the_docs_say_of_the_report_and_train_workflows():
    report = load("report.yml")
    assert list(report["on"]) == ["pull_request"]
    assert report["permissions"] == {"contents": "read", "pull-requests": "write"}
    steps = report["jobs"]["report"]["steps"]
    assert steps[0]["with"]["fetch-depth"] == 0
    assert "make report BASE=origin/${{ github.base_ref }}" in [s.get("run") for s in steps]
    train = load("train.yml")
    assert list(train["on"]) == ["workflow_dispatch"]
    assert train["jobs"]["train"]["runs-on"] == ["self-hosted", "gpu"]
    assert train["permissions"] == {"contents": "write"}
