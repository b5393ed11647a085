"""dvc.yaml's stages list, as deps, exactly the project modules their commands import."""

from __future__ import annotations

import ast
import shlex

import pytest
import yaml

from helpers import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(cmd: str) -> str:
    """The module a `python -m MODULE ...` command runs."""
    words = shlex.split(cmd)
    assert words[:2] == ["python", "-m"], cmd
    return words[2]


def project_imports(module: str) -> set[str]:
    """MODULE's file and the files of every stages.* module it imports, directly or
    not, with the package's __init__, which Python runs first."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((REPO / (name.replace(".", "/") + ".py")).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
                todo.append(node.module)
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("stages.")]
    return {name.replace(".", "/") + ".py" for name in seen} | {"stages/__init__.py"}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_depends_on_exactly_the_modules_its_command_imports(name):
    """A module missing from deps would not rerun the stage when it changes; one listed
    but not imported would rerun it for nothing."""
    stage = STAGES[name]
    listed = {dep for dep in stage["deps"] if dep.startswith("stages/")}
    assert listed == project_imports(stage_module(stage["cmd"]))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_that_applies_the_runtime_depends_on_its_params(name):
    stage = STAGES[name]
    if "stages/runtime.py" in project_imports(stage_module(stage["cmd"])):
        assert "runtime" in stage.get("params", []), name
