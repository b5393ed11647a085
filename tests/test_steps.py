"""experiments/steps.yaml is well formed and names real params, with valid values."""

from __future__ import annotations

import pytest
import yaml

from helpers import REPO
from experiments.steps import STEPS_FILE, load_steps, overrides, wait_for_queue
from stages.common import StageError

PARAMS = REPO / "params.yaml"


def test_the_steps_load_and_the_last_is_params_yaml():
    steps = load_steps(STEPS_FILE, PARAMS)
    assert list(steps) == ["step-1", "step-2", "step-3", "step-4"]
    base = yaml.safe_load(PARAMS.read_text())
    for key, value in steps["step-4"]["params"].items():
        section, leaf = key.split(".")
        assert base[section][leaf] == value, key
    assert any(steps["step-3"]["params"][key] != base["train"][key.split(".")[1]]
               for key in steps["step-3"]["params"])
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
    with pytest.raises(StageError, match="step-1 must have exactly the fields"):
        load_steps(path, PARAMS)


def status(*rows: tuple[str, str], active: int) -> str:
    lines = ["Task     Name    Created    Status"]
    lines += [f"abc1234  {name}  11:33 PM   {state}" for name, state in rows]
    return "\n".join(lines + ["", f"Worker status: {active} active, 0 idle"])


def test_wait_for_queue_restarts_workers_that_stopped_early_and_reports_failures():
    """DVC's workers can all exit with tasks still queued; the wait starts them again."""
    sequence = iter([
        status(("step-1", "Running"), ("step-2", "Queued"), active=1),
        status(("step-1", "Success"), ("step-2", "Queued"), active=0),  # workers gone
        status(("step-1", "Success"), ("step-2", "Running"), active=1),
        status(("step-1", "Success"), ("step-2", "Failed"), active=0),
    ])
    starts = []
    with pytest.raises(StageError, match="experiments step-2 failed"):
        wait_for_queue(["step-1", "step-2"], lambda: starts.append(1),
                       status=lambda: next(sequence), poll_s=0)
    assert starts == [1]
