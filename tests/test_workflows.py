"""The forge's workflows, checked without a forge: each against the GitHub-workflow schema
that check-jsonschema ships (offline), and the tests workflow against README's command."""

from __future__ import annotations

import os
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
    step = next(step for step in steps if step.get("name") == "Report")
    assert (step["env"], step["run"]) == ({"BASE_REF": "${{ github.base_ref }}"},
                                          'make report BASE="origin/$BASE_REF"')
    train = load("train.yml")
    assert list(train["on"]) == ["workflow_dispatch"]
    assert train["jobs"]["train"]["runs-on"] == ["self-hosted", "gpu"]
    assert train["permissions"] == {"contents": "write"}


# --- what a step's shell sees: values in env, tokens out of argv, the project's checks ------

def run_steps() -> list[tuple[str, dict, dict]]:
    """(workflow, job, step) for each step with `run:`, in every workflow."""
    return [(path.name, job, step) for path in WORKFLOWS
            for job in load(path.name)["jobs"].values()
            for step in job["steps"] if "run" in step]


def step_env(name: str, job: dict, step: dict) -> dict[str, str]:
    """The environment a step's `env:` blocks give it: the workflow's, the job's, its own."""
    return {**load(name).get("env", {}), **job.get("env", {}), **step.get("env", {})}


def test_no_run_step_interpolates_an_expression():
    """`${{ github.head_ref }}` or `${{ inputs.x }}` in `run:` becomes shell code before the
    shell starts; an expression belongs in `env:`, where the shell reads it as a value."""
    found = [(name, step.get("name"), expression) for name, _, step in run_steps()
             for expression in re.findall(r"\$\{\{[^}]*\}\}", step["run"])]
    assert not found


def test_no_run_step_puts_a_token_on_a_command_line():
    """A variable that holds a secret or the job's token is read by the program that needs
    it (here git, through GIT_ASKPASS), never expanded into a command's arguments, which
    other users of a self-hosted runner can read in /proc."""
    leaks = []
    for name, job, step in run_steps():
        secret = [var for var, value in step_env(name, job, step).items()
                  if re.search(r"secrets\.|github\.token", str(value))]
        leaks += [(name, step.get("name"), var) for var in secret
                  if re.search(rf"\$\{{?{var}\b", step["run"])]
        assert not re.search(r"https://[^/\s]*:[^/\s]*@", step["run"]), step["run"]
    assert not leaks


def test_the_train_workflow_pulls_and_pushes_through_the_make_targets():
    """Plain `dvc pull` and `dvc exp push` skip the host-key check and `verify`."""
    runs = "\n".join(step["run"] for name, _, step in run_steps() if name == "train.yml")
    assert not re.findall(r"\bdvc\s+(?:exp\s+)?(?:pull|push)\b", runs)
    assert re.search(r"^\s*make pull\b", runs, re.M)
    assert re.search(r"^\s*make exp-push\b", runs, re.M)
    push = next(step for name, _, step in run_steps() if name == "train.yml"
                and "make exp-push" in step["run"])
    assert set(push["env"]) == {"EXP", "GH_TOKEN"}  # the name, too, as a value


def test_the_train_workflows_askpass_gives_git_and_dvcs_git_the_token_from_env(tmp_path):
    """The step that writes GIT_ASKPASS, run here; then git and scmrepo (DVC's git
    library) each ask it for github.com's login, as a push does."""
    step = next(step for name, _, step in run_steps()
                if name == "train.yml" and "GIT_ASKPASS=" in step["run"])
    github_env = tmp_path / "github_env"
    subprocess.run(["bash", "-e", "-c", step["run"]], check=True, timeout=30,
                   env={**os.environ, "RUNNER_TEMP": str(tmp_path),
                        "GITHUB_ENV": str(github_env)})
    written = dict(line.split("=", 1) for line in github_env.read_text().splitlines())
    assert list(written) == ["GIT_ASKPASS"]
    assert "GH_TOKEN" not in step.get("env", {})
    assert "secret-123" not in Path(written["GIT_ASKPASS"]).read_text()
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1",
               GIT_TERMINAL_PROMPT="0", GIT_ASKPASS=written["GIT_ASKPASS"],
               GH_TOKEN="secret-123")
    git = subprocess.run(["git", "credential", "fill"], input="protocol=https\n"
                         "host=github.com\npath=owner/repo.git\n\n", env=env,
                         capture_output=True, text=True, timeout=30, check=True)
    assert {"username=x-access-token", "password=secret-123"} <= set(git.stdout.splitlines())
    dulwich = subprocess.run(
        [sys.executable, "-c", "from scmrepo.git.credentials import Credential; "
         "c = Credential(url='https://github.com/owner/repo.git').fill(); "
         "print(c.username, c.password)"],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    assert dulwich.stdout == "x-access-token secret-123\n"
