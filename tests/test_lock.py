"""requirements.lock: compiled from requirements.txt (`make lock`), with hashes, and
what `make setup` installed."""

from __future__ import annotations

import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from helpers import REPO

LOCK = REPO / "requirements.lock"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """`name==version` lines (extras dropped, continuation lines skipped) by name."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            found[canonical(m[1])] = m[2]
    return found


def locked() -> dict[str, tuple[str, list[str]]]:
    """Each locked package's version and hashes."""
    entries, current = {}, None
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            current = canonical(m[1])
            entries[current] = (m[2], [])
        elif current and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[current][1].append(h[1])
    return entries


def test_the_lock_pins_every_requirement_at_its_version():
    wanted = pins((REPO / "requirements.txt").read_text())
    lock = locked()
    assert len(wanted) >= 16
    assert {name: lock.get(name, ("missing",))[0] for name in wanted} == wanted


def test_every_locked_package_has_hashes_and_the_lock_says_how_it_was_made():
    lock = locked()
    assert len(lock) > len(pins((REPO / "requirements.txt").read_text()))  # dependencies too
    assert [name for name, (_, hashes) in lock.items() if not hashes] == []
    assert "make lock" in LOCK.read_text()[:600]  # pip-compile's header names the command


def installed_from_the_lock() -> bool:
    """Whether this Python is the virtualenv `make setup` installed from this lock."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    return (Path(sys.prefix) / f".installed-{digest}").exists()


@pytest.mark.skipif(not installed_from_the_lock(),
                    reason="this Python was not installed by `make setup` from this lock")
def test_the_environment_is_the_lock():
    lock = locked()
    differ = {name: (version, metadata.version(name)) for name, (version, _) in lock.items()
              if metadata.version(name) != version}
    assert differ == {}
