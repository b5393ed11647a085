"""tests/ci_suites.py: with CI set, a skipped browser or SSH test fails the run, and
other skips stay skips, in one process and spread over pytest-xdist's workers as
`make test` runs. Each case runs pytest on a small generated test file, with the
project's hook in its conftest."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import REPO

CONFTEST = """\
import pytest
from ci_suites import pytest_runtest_makereport  # noqa: F401

@pytest.fixture(scope="session")
def sshd():
    pytest.skip("no sshd here")
"""

TESTS = """\
import pytest

@pytest.mark.browser
@pytest.mark.skipif(True, reason="no Chromium here")
def test_browser_skipped():
    pass

@pytest.mark.ssh
def test_ssh_skipped_by_its_fixture(sshd):
    pass

@pytest.mark.ssh
def test_ssh_that_runs():
    pass

@pytest.mark.ssh
@pytest.mark.xfail(reason="a known failure")
def test_ssh_expected_to_fail():
    assert False

@pytest.mark.cuda
@pytest.mark.skipif(True, reason="no GPU here")
def test_cuda_skipped():
    pass

def test_other_skipped():
    pytest.skip("not here")
"""


def without_xdist(env) -> dict[str, str]:
    """ENV less what an xdist worker sets for itself, so that a pytest started from a
    worker runs as its own session (with or without xdist of its own)."""
    return {k: v for k, v in env.items() if not k.startswith("PYTEST_XDIST_")}


def outcomes(tmp_path: Path, ci: str | None, *args: str) -> tuple[int, dict[str, str]]:
    """Run the generated tests with CI=ci (unset: None) and pytest's ARGS; the exit status
    and each test's outcome, from pytest's JUnit XML (an XFAIL counts as skipped there)."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_suites.py").write_text(TESTS)
    env = {k: v for k, v in without_xdist(os.environ).items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO / "tests")
    if ci is not None:
        env["CI"] = ci
    report = tmp_path / "report.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning",
                           f"--junitxml={report}", *args, "test_suites.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    found = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        found[case.get("name")] = kinds[0] if kinds else "passed"
        if kinds and kinds[0] in ("failure", "error"):
            found[case.get("name") + " says"] = case.find(kinds[0]).get("message", "")
    return proc.returncode, found


ANYWHERE = {"test_ssh_that_runs": "passed", "test_ssh_expected_to_fail": "skipped",
            "test_cuda_skipped": "skipped", "test_other_skipped": "skipped"}


# two workers, the generated tests spread over both (`make test` sends each file
# to one worker: --dist loadfile)
XDIST = ("-n", "2", "--dist", "load")


@pytest.mark.parametrize("ci, args", [(None, ()), ("", ()), ("false", ()), (None, XDIST)])
def test_outside_ci_the_suites_skip(tmp_path, ci, args):
    code, found = outcomes(tmp_path, ci, *args)
    assert code == 0
    assert found == {**ANYWHERE, "test_browser_skipped": "skipped",
                     "test_ssh_skipped_by_its_fixture": "skipped"}


@pytest.mark.parametrize("ci, args", [("true", ()), ("1", ()), ("true", XDIST)])
def test_in_ci_a_skipped_browser_or_ssh_test_fails_with_its_reason(tmp_path, ci, args):
    code, found = outcomes(tmp_path, ci, *args)
    assert code == 1
    browser, ssh = found.pop("test_browser_skipped says"), found.pop(
        "test_ssh_skipped_by_its_fixture says")
    # both skipped in their setup, whose failure JUnit calls an error
    assert found == {**ANYWHERE, "test_browser_skipped": "error",
                     "test_ssh_skipped_by_its_fixture": "error"}
    assert "the browser tests must run in CI" in browser and "no Chromium here" in browser
    assert "the ssh tests must run in CI" in ssh and "no sshd here" in ssh


ONCE_CONFTEST = """\
import os
import time
from pathlib import Path

import pytest
from helpers import made_once

@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    def make(folder):
        with open("made.log", "a") as log:
            log.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
        time.sleep(1)  # long enough for the other worker to ask meanwhile
        (folder / "value").write_text("42")
    return made_once(tmp_path_factory, "shared", make)
"""

ONCE_TESTS = """\
import os
import pytest

@pytest.mark.parametrize("i", range(6))
def test_uses_it(shared, i):
    with open("used.log", "a") as log:
        log.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
    assert (shared / "value").read_text() == "42"
"""


@pytest.mark.parametrize("args", [(), XDIST])
def test_made_once_makes_a_session_fixture_once_for_all_workers(tmp_path, args):
    """tests/conftest.py trains the session's model through helpers.made_once: one
    worker trains it, the other waits and reads it."""
    (tmp_path / "conftest.py").write_text(ONCE_CONFTEST)
    (tmp_path / "test_once.py").write_text(ONCE_TESTS)
    env = {**without_xdist(os.environ),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           *args, "test_once.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    made = (tmp_path / "made.log").read_text().split()
    used = (tmp_path / "used.log").read_text().split()
    assert len(made) == 1 and len(used) == 6
    assert len(set(used)) == (2 if args else 1)  # with xdist, both workers used it
