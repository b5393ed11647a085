"""In CI, a skipped browser or SSH test fails the run.

Both suites skip, with the reason, where their program is missing (Chromium, sshd):
right on a laptop, but in CI it means the setup failed, and a failed `apt-get install`
would otherwise turn a whole suite off with the run still green. So where `CI` is set
(`CI=true`, as CI services set it), a test marked `browser` or `ssh` that skips is
reported as failed, with the skip's reason. Other skips (`cuda` tests without a GPU)
stay skips. tests/conftest.py imports the hook below.
"""

from __future__ import annotations

import os

import pytest

SUITES = ("browser", "ssh")  # markers whose tests must run in CI


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    suites = [name for name in SUITES if item.get_closest_marker(name)]
    if report.skipped and suites and in_ci() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"CI is set, and the {suites[0]} tests must run in CI, but this "
                           f"one was skipped: {skip_reason(report)}")
